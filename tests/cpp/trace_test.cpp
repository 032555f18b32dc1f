#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "testing.h"

#include <pipegear/schedule.h>
#include <pipegear/trace.h>

using pipegear::Phase;
using pipegear::Trace;
using pipegear::TraceEvent;

namespace {

// The GPipe schedule with every cell taking `unit` ns and starting at its
// clock (schedule_clocks); every backward recomputes.
Trace unit_gpipe_trace(int64_t stages,
                       int64_t micro_batches,
                       int64_t unit = 1000) {
  auto schedule = pipegear::gpipe_schedule(stages, micro_batches);
  auto clocks = pipegear::schedule_clocks(schedule, micro_batches);
  std::vector<TraceEvent> events;
  for (int64_t s = 0; s < stages; ++s) {
    for (size_t i = 0; i < schedule[s].size(); ++i) {
      const auto& cell = schedule[s][i];
      TraceEvent e;
      e.stage = s;
      e.micro_batch = cell.micro_batch;
      e.phase = cell.phase;
      e.recompute = cell.phase == Phase::kBackward;
      e.start_ns = clocks[s][i] * unit;
      e.end_ns = e.start_ns + unit;
      events.push_back(e);
    }
  }
  return Trace(stages, micro_batches, std::move(events));
}

size_t count(const std::string& haystack, const std::string& needle) {
  size_t n = 0;
  for (size_t at = haystack.find(needle); at != std::string::npos;
       at = haystack.find(needle, at + needle.size())) {
    ++n;
  }
  return n;
}

} // namespace

TEST_CASE("bubble fraction of hand-made events", "[trace]") {
  // stage 0 busy [0, 10) and [30, 40); stage 1 busy [10, 30): 40 of 80 ns.
  Trace trace(2, 1,
              {{0, 0, Phase::kForward, false, 0, 10},
               {1, 0, Phase::kForward, false, 10, 20},
               {1, 0, Phase::kBackward, false, 20, 30},
               {0, 0, Phase::kBackward, true, 30, 40}});
  CHECK(trace.makespan() == Approx(40e-9));
  CHECK(trace.bubble_fraction() == Approx(0.5));
  CHECK(trace.theoretical_bubble_fraction() == Approx(0.5));
  CHECK(trace.stages() == 2);
  CHECK(trace.micro_batches() == 1);
  CHECK(trace.events().size() == 4);

  // Overlapping cells on one stage are counted once.
  Trace overlapping(1, 2,
                    {{0, 0, Phase::kForward, false, 0, 10},
                     {0, 1, Phase::kForward, false, 5, 15},
                     {0, 1, Phase::kBackward, false, 20, 25}});
  CHECK(overlapping.bubble_fraction() == Approx(5.0 / 25.0));

  // No idle time at all.
  Trace dense(1, 2,
              {{0, 0, Phase::kForward, false, 100, 200},
               {0, 1, Phase::kForward, false, 200, 300}});
  CHECK(dense.bubble_fraction() == Approx(0.0).margin(1e-12));
  CHECK(dense.makespan() == Approx(200e-9));
}

TEST_CASE("unit-time GPipe traces have the theoretical bubble", "[trace]") {
  // Forward and backward of a cell take the same time, so fill and drain
  // each idle (K-1) of (M+K-1) units per stage.
  for (int64_t k = 1; k <= 6; ++k) {
    for (int64_t m = 1; m <= 8; ++m) {
      CAPTURE(k, m);
      auto trace = unit_gpipe_trace(k, m);
      const double expected =
          static_cast<double>(k - 1) / static_cast<double>(m + k - 1);
      REQUIRE(trace.theoretical_bubble_fraction() == Approx(expected));
      REQUIRE(trace.bubble_fraction() == Approx(expected));
      REQUIRE(trace.makespan() == Approx(2 * (m + k - 1) * 1e-6));
    }
  }
}

TEST_CASE("empty and default traces", "[trace]") {
  Trace none;
  CHECK(none.empty());
  CHECK(none.makespan() == 0.0);
  CHECK(none.bubble_fraction() == 0.0);
  CHECK(none.theoretical_bubble_fraction() == 0.0);
  Trace no_events(3, 4, {});
  CHECK(no_events.empty());
  CHECK(no_events.bubble_fraction() == 0.0);
  CHECK(no_events.theoretical_bubble_fraction() == Approx(2.0 / 6.0));
  CHECK(count(no_events.to_chrome_trace(), "\"ph\":\"X\"") == 0);
}

TEST_CASE("Trace rejects inconsistent events", "[trace]") {
  using E = TraceEvent;
  REQUIRE_THROWS_AS(Trace(0, 1, {}), c10::ValueError);
  REQUIRE_THROWS_AS(Trace(1, 0, {}), c10::ValueError);
  REQUIRE_THROWS_AS(Trace(2, 2, {E{2, 0, Phase::kForward, false, 0, 1}}),
                    c10::IndexError);
  REQUIRE_THROWS_AS(Trace(2, 2, {E{-1, 0, Phase::kForward, false, 0, 1}}),
                    c10::IndexError);
  REQUIRE_THROWS_AS(Trace(2, 2, {E{0, 2, Phase::kForward, false, 0, 1}}),
                    c10::IndexError);
  REQUIRE_THROWS_AS(Trace(2, 2, {E{0, 0, Phase::kForward, false, 5, 1}}),
                    c10::ValueError);
  REQUIRE_THROWS_WITH(Trace(2, 2, {E{0, 0, Phase::kForward, false, 0, 1},
                                   E{0, 7, Phase::kForward, false, 0, 1}}),
                      Catch::Contains("event 1") && Catch::Contains("7"));
}

TEST_CASE("chrome trace holds one complete event per cell", "[trace]") {
  auto trace = unit_gpipe_trace(3, 4);
  auto json = trace.to_chrome_trace();
  CHECK(json.front() == '{');
  CHECK(json.back() == '}');
  CHECK(json.find("\"traceEvents\":[") != std::string::npos);
  CHECK(count(json, "\"ph\":\"X\"") == trace.events().size());
  CHECK(count(json, "\"cat\":\"forward\"") == 12);
  CHECK(count(json, "\"cat\":\"backward\"") == 12);
  CHECK(count(json, "\"name\":\"thread_name\"") == 3);
  CHECK(json.find("\"name\":\"stage 2\"") != std::string::npos);
  // Microseconds from the first cell: the unit (1000 ns) is 1 us.
  CHECK(json.find("\"ts\":0.000") != std::string::npos);
  CHECK(json.find("\"dur\":1.000") != std::string::npos);
  CHECK(json.find("\"recompute\":true") != std::string::npos);
  // Brackets balance (a cheap well-formedness check; Python json.loads
  // checks the rest).
  CHECK(count(json, "{") == count(json, "}"));
  CHECK(count(json, "[") == count(json, "]"));

  Trace odd(1, 1, {{0, 0, Phase::kForward, false, 1000000, 1001234}});
  CHECK(odd.to_chrome_trace().find("\"dur\":1.234") != std::string::npos);
}

TEST_CASE("chrome trace names the chunk of interleaved cells", "[trace]") {
  using E = TraceEvent;
  Trace trace(2, 2, {E{0, 1, Phase::kForward, false, 0, 1000, 1},
                     E{1, 0, Phase::kBackwardWeight, false, 0, 1000, 0}});
  auto json = trace.to_chrome_trace();
  CHECK(json.find("\"name\":\"F1.1\"") != std::string::npos);
  CHECK(json.find("\"name\":\"W0.0\"") != std::string::npos);
  CHECK(json.find("\"chunk\":1") != std::string::npos);
  // Without chunks, the names are the clock table's of one stage per row.
  Trace plain(1, 1, {E{0, 0, Phase::kForward, false, 0, 1000}});
  CHECK(plain.to_chrome_trace().find("\"name\":\"F0\"") !=
        std::string::npos);
  CHECK(plain.to_chrome_trace().find("chunk") == std::string::npos);
  REQUIRE_THROWS_WITH(Trace(1, 1, {E{0, 0, Phase::kForward, false, 0, 1, -1}}),
                      Catch::Contains("event 0 has chunk -1"));
}

TEST_CASE("save_chrome_trace writes the JSON and reports bad paths",
          "[trace]") {
  auto trace = unit_gpipe_trace(2, 2);
  const std::string path = "pipegear_trace_test.json";
  trace.save_chrome_trace(path);
  std::ifstream file(path);
  std::stringstream content;
  content << file.rdbuf();
  CHECK(content.str() == trace.to_chrome_trace() + "\n");
  std::remove(path.c_str());
  REQUIRE_THROWS_AS(trace.save_chrome_trace("/nonexistent/dir/trace.json"),
                    c10::Error);
}
