#include "testing.h"

#include <pipegear/schedule.h>

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
