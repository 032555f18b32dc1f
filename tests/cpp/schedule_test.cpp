#include "testing.h"

#include <pipegear/schedule.h>

#include <algorithm>

using pipegear::Cell;
using pipegear::Phase;

TEST_CASE("generated schedules are valid for every K, M", "[schedule]") {
  for (int64_t k = 1; k <= 8; ++k) {
    for (int64_t m = 1; m <= 12; ++m) {
      auto g = pipegear::gpipe_schedule(k, m);
      REQUIRE_NOTHROW(pipegear::validate_schedule(g, m));
      REQUIRE(pipegear::is_fill_drain(g));
      auto clocks = pipegear::schedule_clocks(g, m);
      // GPipe takes 2(M + K - 1) clocks.
      int64_t span = 0;
      for (auto& row : clocks) {
        for (auto t : row) {
          span = std::max(span, t + 1);
        }
      }
      REQUIRE(span == 2 * (m + k - 1));
      auto f = pipegear::one_f_one_b_schedule(k, m);
      REQUIRE_NOTHROW(pipegear::validate_schedule(f, m));
      REQUIRE(pipegear::is_fill_drain(f) == (m == 1));
    }
  }
}

namespace {

int64_t span_of(const pipegear::Schedule& s, int64_t m) {
  int64_t span = 0;
  for (auto& row : pipegear::schedule_clocks(s, m)) {
    for (auto t : row) {
      span = std::max(span, t + 1);
    }
  }
  return span;
}

} // namespace

TEST_CASE("zero-bubble schedules: valid, split, their span and memory",
          "[schedule][zb]") {
  for (int64_t k = 1; k <= 8; ++k) {
    for (int64_t m = 1; m <= 33; ++m) {
      INFO("K=" << k << " M=" << m);
      auto h1 = pipegear::zb_h1_schedule(k, m);
      auto h2 = pipegear::zb_h2_schedule(k, m);
      REQUIRE_NOTHROW(pipegear::validate_schedule(h1, m));
      REQUIRE_NOTHROW(pipegear::validate_schedule(h2, m));
      for (const auto& sched : {h1, h2}) {
        for (const auto& row : sched) {
          REQUIRE(row.size() == static_cast<size_t>(3 * m));
          for (const auto& c : row) {
            REQUIRE(c.phase != Phase::kBackward);  // every backward split
          }
        }
      }
      // One unit per cell (F = B = W): ZB-H1 takes 3M + K - 1 once
      // M >= K (against 1F1B's 3M + 3(K-1), its backward being B + W);
      // fewer micro-batches are bound by one micro-batch's path, 2K + 1
      // cells, plus 3 per further micro-batch.
      const int64_t bound = m >= k ? 3 * m + k - 1 : 2 * k + 1 + 2 * (m - 1);
      CHECK(span_of(h1, m) == bound);
      CHECK(span_of(h2, m) <= span_of(h1, m));
      const auto p1 = pipegear::peak_activations(h1);
      const auto p2 = pipegear::peak_activations(h2);
      for (int64_t s = 0; s < k; ++s) {
        CHECK(p1[s] == std::min(k, m));  // 1F1B's peak, K on stage 0
        CHECK(p2[s] <= p2[0]);
      }
      CHECK(p2[0] == std::min(2 * k - 1, m));
    }
  }
  // 1F1B's and GPipe's memory, for comparison.
  CHECK(pipegear::peak_activations(pipegear::gpipe_schedule(4, 8)) ==
        std::vector<int64_t>{8, 8, 8, 8});
  CHECK(pipegear::peak_activations(pipegear::one_f_one_b_schedule(4, 8)) ==
        std::vector<int64_t>{4, 3, 2, 1});
}

TEST_CASE("render_schedule draws B and W cells", "[schedule][zb]") {
  auto text = pipegear::render_schedule(pipegear::zb_h1_schedule(3, 4), 4);
  CHECK(text ==
        " clock  0  1  2  3  4  5  6  7  8  9 10 11 12 13\n"
        "stage0 F0 F1 F2       B0 W0 F3 B1 W1 B2 W2 B3 W3\n"
        "stage1    F0 F1    B0 F2 B1 W0 F3 B2 W1 B3 W2 W3\n"
        "stage2       F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3\n");
  CHECK(pipegear::parse_schedule_kind("zb-h1") == pipegear::ScheduleKind::kZBH1);
  CHECK(pipegear::parse_schedule_kind("zb-h2") == pipegear::ScheduleKind::kZBH2);
}

TEST_CASE("the validator checks the dependencies of B and W cells",
          "[schedule][zb]") {
  using pipegear::Phase;
  auto z = pipegear::zb_h1_schedule(2, 2);
  auto find = [&](int64_t s, int64_t j, Phase p) {
    for (size_t i = 0; i < z[s].size(); ++i) {
      if (z[s][i].micro_batch == j && z[s][i].phase == p) {
        return i;
      }
    }
    FAIL("no such cell");
    return size_t{0};
  };
  SECTION("W before its B") {
    std::swap(z[1][find(1, 0, Phase::kBackwardInput)],
              z[1][find(1, 0, Phase::kBackwardWeight)]);
    CHECK_THROWS_WITH(pipegear::validate_schedule(z, 2),
                      Catch::Contains("backward_weight of micro-batch 0 "
                                      "before its backward_input"));
  }
  SECTION("B without its W") {
    z[0].erase(z[0].begin() + find(0, 1, Phase::kBackwardWeight));
    CHECK_THROWS_WITH(pipegear::validate_schedule(z, 2),
                      Catch::Contains("runs the backward_input of micro-batch 1 "
                                      "but never its backward_weight"));
  }
  SECTION("W without its B") {
    z[0].erase(z[0].begin() + find(0, 1, Phase::kBackwardInput));
    CHECK_THROWS_AS(pipegear::validate_schedule(z, 2), c10::ValueError);
  }
  SECTION("whole and split backward of one micro-batch") {
    z[0].push_back({1, Phase::kBackward});
    CHECK_THROWS_WITH(pipegear::validate_schedule(z, 2),
                      Catch::Contains("both a whole backward and a split one"));
  }
  SECTION("B before the next stage's B: deadlock") {
    // stage 0 runs B1 first, which needs stage 1's B1, which stage 1 runs
    // after its B0, which waits... for nothing: move stage 0's B1 before
    // its F1, so stage 1 never gets F1.
    const auto b1 = find(0, 1, Phase::kBackwardInput);
    const auto f1 = find(0, 1, Phase::kForward);
    z[0].erase(z[0].begin() + b1);
    z[0].insert(z[0].begin() + f1, {1, Phase::kBackwardInput});
    CHECK_THROWS_AS(pipegear::validate_schedule(z, 2), c10::ValueError);
  }
  SECTION("a W waiting for the other stage's B: deadlock") {
    // stage 1 (the last) runs W0 before anything: its B0 never ran.
    const auto w0 = find(1, 0, Phase::kBackwardWeight);
    z[1].erase(z[1].begin() + w0);
    z[1].insert(z[1].begin(), {0, Phase::kBackwardWeight});
    CHECK_THROWS_WITH(pipegear::validate_schedule(z, 2),
                      Catch::Contains("before its forward"));
  }
  SECTION("mixed split and whole backwards are valid") {
    auto g = pipegear::gpipe_schedule(2, 2);
    // stage 1 splits micro-batch 0's backward, stage 0 does not.
    g[1] = {{0, Phase::kForward}, {1, Phase::kForward},
            {1, Phase::kBackward}, {0, Phase::kBackwardInput},
            {0, Phase::kBackwardWeight}};
    CHECK_NOTHROW(pipegear::validate_schedule(g, 2));
  }
}

TEST_CASE("invalid schedules are rejected with the offending cell",
          "[schedule]") {
  auto g = pipegear::gpipe_schedule(2, 3);
  SECTION("missing cell") {
    g[1].pop_back();
    CHECK_THROWS_WITH(pipegear::validate_schedule(g, 3),
                      Catch::Contains("never runs the backward of micro-batch 0"));
  }
  SECTION("duplicate cell") {
    g[0][1] = g[0][0];
    CHECK_THROWS_AS(pipegear::validate_schedule(g, 3), c10::ValueError);
  }
  SECTION("backward before forward") {
    std::swap(g[0][0], g[0].back());
    CHECK_THROWS_WITH(pipegear::validate_schedule(g, 3),
                      Catch::Contains("before its forward"));
  }
  SECTION("deadlock") {
    // stage 0 waits for B1 before running F1, which stage 1 needs first.
    g[0] = {{0, Phase::kForward}, {0, Phase::kBackward}, {1, Phase::kForward},
            {1, Phase::kBackward}, {2, Phase::kForward}, {2, Phase::kBackward}};
    g[1] = {{1, Phase::kForward}, {0, Phase::kForward}, {0, Phase::kBackward},
            {1, Phase::kBackward}, {2, Phase::kForward}, {2, Phase::kBackward}};
    CHECK_THROWS_WITH(pipegear::validate_schedule(g, 3),
                      Catch::Contains("deadlocks"));
  }
  SECTION("micro-batch out of range") {
    g[0][0].micro_batch = 7;
    CHECK_THROWS_AS(pipegear::validate_schedule(g, 3), c10::ValueError);
  }
}

TEST_CASE("render_schedule draws the GPipe clock table", "[schedule]") {
  auto text = pipegear::render_schedule(pipegear::gpipe_schedule(3, 4), 4);
  CHECK(text ==
        " clock  0  1  2  3  4  5  6  7  8  9 10 11\n"
        "stage0 F0 F1 F2 F3             B3 B2 B1 B0\n"
        "stage1    F0 F1 F2 F3       B3 B2 B1 B0\n"
        "stage2       F0 F1 F2 F3 B3 B2 B1 B0\n");
}

TEST_CASE("interleaved 1F1B: valid for every K, v, M; its span; rejections",
          "[schedule][interleaved]") {
  using pipegear::Phase;
  for (int64_t k = 1; k <= 5; ++k) {
    for (int64_t v = 1; v <= 3; ++v) {
      for (int64_t m = 1; m <= 17; ++m) {
        INFO("K=" << k << " v=" << v << " M=" << m);
        auto s = pipegear::interleaved_schedule(k, v, m);
        REQUIRE(s.size() == static_cast<size_t>(k));
        REQUIRE(pipegear::virtual_stages_of(s) == v);
        REQUIRE_NOTHROW(pipegear::validate_schedule(s, m));
        for (const auto& row : s) {
          REQUIRE(row.size() == static_cast<size_t>(2 * v * m));
        }
        if (m % k == 0 && v > 1) {
          // One unit per cell of a virtual stage (1/v of a stage's work):
          // 1F1B over K stages takes v * 2(M + K - 1) such units; the
          // interleaved order shrinks the fill and drain v times.
          CHECK(span_of(s, m) == 2 * m * v + 2 * (k - 1));
        }
      }
    }
  }
  // (Parenthesised: Catch cannot print a Schedule.)
  CHECK((pipegear::interleaved_schedule(3, 1, 5) ==
         pipegear::one_f_one_b_schedule(3, 5)));
  CHECK((pipegear::make_schedule(pipegear::ScheduleKind::kInterleaved, 2, 4,
                                 2) == pipegear::interleaved_schedule(2, 2, 4)));
  CHECK_THROWS_WITH(
      pipegear::make_schedule(pipegear::ScheduleKind::k1F1B, 2, 4, 2),
      Catch::Contains("virtual_stages = 2 needs the 'interleaved' or "
                      "'interleaved-zb' schedule"));
  CHECK_THROWS_AS(pipegear::interleaved_schedule(2, 0, 4), c10::ValueError);

  auto s = pipegear::interleaved_schedule(2, 2, 2);
  SECTION("a chunk's forward before the previous stage's: deadlock") {
    // worker 0 runs chunk 1 of micro-batch 0 (stage 2) first: it needs
    // stage 1 (worker 1, chunk 0), which needs stage 0 (worker 0, later).
    auto& row = s[0];
    const auto it = std::find(row.begin(), row.end(),
                              Cell{0, Phase::kForward, 1});
    std::rotate(row.begin(), it, it + 1);
    CHECK_THROWS_WITH(pipegear::validate_schedule(s, 2),
                      Catch::Contains("deadlocks"));
  }
  SECTION("a missing chunk") {
    auto& row = s[1];
    row.erase(std::find(row.begin(), row.end(), Cell{1, Phase::kBackward, 1}));
    CHECK_THROWS_WITH(pipegear::validate_schedule(s, 2),
                      Catch::Contains("stage 3 never runs the backward of "
                                      "micro-batch 1"));
  }
  SECTION("a negative chunk") {
    s[0][0].chunk = -1;
    CHECK_THROWS_WITH(pipegear::validate_schedule(s, 2),
                      Catch::Contains("names chunk -1"));
  }
}

TEST_CASE("render_schedule names the chunk of interleaved cells",
          "[schedule][interleaved]") {
  auto text = pipegear::render_schedule(pipegear::interleaved_schedule(2, 2, 4), 4);
  INFO(text);
  CHECK(text.find("F0.1") != std::string::npos);
  CHECK(text.find("B3.0") != std::string::npos);
}

namespace {

// The clocks a schedule takes when its cells start as soon as their worker
// is free and their inputs are ready (as schedule_clocks), a whole backward
// taking `backward` units and every other cell 1.
int64_t weighted_span(const pipegear::Schedule& schedule, int64_t m,
                      int64_t backward) {
  const auto k = static_cast<int64_t>(schedule.size());
  const int64_t stages = k * pipegear::virtual_stages_of(schedule);
  // end[phase][stage * m + j]; -1 not yet run. B ends hold kBackward's too.
  std::vector<std::vector<int64_t>> end(3,
                                        std::vector<int64_t>(stages * m, -1));
  auto row = [](Phase p) {
    return p == Phase::kForward ? 0 : p == Phase::kBackwardWeight ? 2 : 1;
  };
  std::vector<int64_t> free(k, 0);
  std::vector<size_t> next(k, 0);
  for (bool progressed = true; progressed;) {
    progressed = false;
    for (int64_t d = 0; d < k; ++d) {
      for (; next[d] < schedule[d].size(); ++next[d]) {
        const auto& c = schedule[d][next[d]];
        const int64_t s = c.chunk * k + d;
        const int64_t j = c.micro_batch;
        const int64_t dep = c.phase == Phase::kForward
            ? (s == 0 ? 0 : end[0][(s - 1) * m + j])
            : c.phase == Phase::kBackwardWeight ? end[1][s * m + j]
            : s == stages - 1                   ? end[0][s * m + j]
                                                : end[1][(s + 1) * m + j];
        if (dep < 0) {
          break;
        }
        const int64_t start = std::max(free[d], dep);
        free[d] = start + (c.phase == Phase::kBackward ? backward : 1);
        end[row(c.phase)][s * m + j] = free[d];
        progressed = true;
      }
    }
  }
  for (int64_t d = 0; d < k; ++d) {
    REQUIRE(next[d] == schedule[d].size());  // no deadlock
  }
  return *std::max_element(free.begin(), free.end());
}

} // namespace

TEST_CASE("interleaved zero-bubble: valid for every K, v, M; its order, span "
          "and memory", "[schedule][interleaved][zb]") {
  for (int64_t k = 1; k <= 8; ++k) {
    for (int64_t v = 1; v <= 4; ++v) {
      for (int64_t m = 1; m <= 40; ++m) {
        INFO("K=" << k << " v=" << v << " M=" << m);
        const auto s = pipegear::interleaved_zb_schedule(k, v, m);
        const auto base = pipegear::interleaved_schedule(k, v, m);
        REQUIRE(s.size() == static_cast<size_t>(k));
        REQUIRE(pipegear::virtual_stages_of(s) == v);
        REQUIRE_NOTHROW(pipegear::validate_schedule(s, m));
        for (int64_t d = 0; d < k; ++d) {
          REQUIRE(s[d].size() == static_cast<size_t>(3 * v * m));
          // Forwards and Bs in interleaved 1F1B's order.
          std::vector<Cell> order;
          for (auto c : s[d]) {
            REQUIRE(c.phase != Phase::kBackward);
            if (c.phase != Phase::kBackwardWeight) {
              c.phase = c.phase == Phase::kForward ? c.phase : Phase::kBackward;
              order.push_back(c);
            }
          }
          REQUIRE((order == base[d]));
        }
        // Every worker holds at most interleaved 1F1B's largest peak.
        const auto peaks = pipegear::peak_activations(s);
        const auto base_peaks = pipegear::peak_activations(base);
        const int64_t cap =
            *std::max_element(base_peaks.begin(), base_peaks.end());
        for (auto p : peaks) {
          CHECK(p <= cap);
        }
        // Unit cells against interleaved 1F1B, its backward two units.
        const int64_t span = span_of(s, m);
        const int64_t unsplit = weighted_span(base, m, 2);
        CHECK(weighted_span(s, m, 2) == span);
        if (k == 1) {
          CHECK(span == 3 * v * m);  // no bubble either way
          CHECK(unsplit == 3 * v * m);
        } else {
          CHECK(span < unsplit);
        }
        if (v == 1) {
          CHECK(cap == std::min(k, m));  // 1F1B's and ZB-H1's peak
        }
        if (m % k == 0) {
          // The lower bound: the last worker waits K - 1 clocks for its
          // first forward, then is never idle.
          CHECK(span == 3 * v * m + k - 1);
          CHECK(unsplit == 3 * v * m + 3 * (k - 1));
          if (v > 1) {
            CHECK(cap == std::min(2 * (k - 1) + (v - 1) * k + 1, v * m));
          }
        }
      }
    }
  }
  CHECK((pipegear::make_schedule(pipegear::ScheduleKind::kInterleavedZB, 3, 6,
                                 2) ==
         pipegear::interleaved_zb_schedule(3, 2, 6)));
  CHECK(pipegear::parse_schedule_kind("interleaved-zb") ==
        pipegear::ScheduleKind::kInterleavedZB);
  CHECK(pipegear::takes_virtual_stages(pipegear::ScheduleKind::kInterleavedZB));
  CHECK(pipegear::takes_virtual_stages(pipegear::ScheduleKind::kInterleaved));
  CHECK_FALSE(pipegear::takes_virtual_stages(pipegear::ScheduleKind::kZBH1));
  CHECK_THROWS_AS(pipegear::interleaved_zb_schedule(2, 0, 4), c10::ValueError);
  CHECK_THROWS_AS(pipegear::interleaved_zb_schedule(0, 2, 4), c10::ValueError);
  CHECK_THROWS_AS(pipegear::interleaved_zb_schedule(2, 2, 0), c10::ValueError);
}

TEST_CASE("render_schedule draws interleaved zero-bubble's B and W cells",
          "[schedule][interleaved][zb]") {
  auto text = pipegear::render_schedule(
      pipegear::interleaved_zb_schedule(2, 2, 4), 4);
  CHECK(text ==
" clock    0    1    2    3    4    5    6    7    8    9   10   11   12   13   14   15   16   17   18   19   20   21   22   23   24\n"
        "stage0 F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 W0.1 F3.0 B1.1 W1.1 F2.1 B0.0 W0.0 F3.1 B1.0 B2.1 W1.0 W2.1 B3.1 B2.0 B3.0 W3.1 W2.0 W3.0\n"
        "stage1      F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 W0.1 F3.0 B1.0 W1.1 F2.1 B2.1 W0.0 F3.1 B3.1 B2.0 B3.0 W1.0 W2.1 W3.1 W2.0 W3.0\n");
}
