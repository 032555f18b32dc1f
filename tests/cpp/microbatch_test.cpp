#include <numeric>

#include "testing.h"

#include <pipegear/microbatch.h>

using pipegear::Batch;

TEST_CASE("chunk_sizes: balanced, min(batch, chunks) parts, brute force",
          "[microbatch]") {
  for (int64_t batch = 1; batch <= 40; ++batch) {
    for (int64_t chunks = 1; chunks <= 12; ++chunks) {
      auto sizes = pipegear::chunk_sizes(batch, chunks);
      REQUIRE(static_cast<int64_t>(sizes.size()) == std::min(batch, chunks));
      REQUIRE(std::accumulate(sizes.begin(), sizes.end(), int64_t{0}) == batch);
      auto [lo, hi] = std::minmax_element(sizes.begin(), sizes.end());
      REQUIRE(*hi - *lo <= 1);
      REQUIRE(*lo >= 1);
      REQUIRE(std::is_sorted(sizes.rbegin(), sizes.rend()));
    }
  }
  CHECK(pipegear::chunk_sizes(10, 4) == std::vector<int64_t>{3, 3, 2, 2});
}

TEST_CASE("scatter then gather is the identity", "[microbatch]") {
  auto x = torch::randn({7, 3});
  auto y = torch::arange(7);
  for (int64_t chunks : {1, 2, 3, 4, 7, 9}) {
    auto parts = pipegear::scatter({x, y}, chunks);
    REQUIRE(static_cast<int64_t>(parts.size()) == std::min<int64_t>(7, chunks));
    for (const auto& p : parts) {
      REQUIRE(p.size() == 2);
      REQUIRE(p[0].size(0) == p[1].size(0));
    }
    auto back = pipegear::gather(parts);
    CHECK(torch::equal(back[0], x));
    CHECK(torch::equal(back[1], y));
  }
}

TEST_CASE("bad micro-batch input gets a ValueError", "[microbatch]") {
  CHECK_THROWS_AS(pipegear::scatter({}, 2), c10::ValueError);
  CHECK_THROWS_AS(pipegear::scatter({torch::ones({})}, 2), c10::ValueError);
  CHECK_THROWS_AS(pipegear::scatter({torch::ones({4}), torch::ones({5})}, 2),
                  c10::ValueError);
  CHECK_THROWS_AS(pipegear::scatter({torch::ones({0, 2})}, 2), c10::ValueError);
  CHECK_THROWS_AS(pipegear::scatter({torch::ones({4})}, 0), c10::ValueError);
  CHECK_THROWS_WITH(
      pipegear::scatter({torch::ones({4}), torch::ones({5})}, 2),
      Catch::Contains("tensor 0 has 4, tensor 1 has 5"));
}
