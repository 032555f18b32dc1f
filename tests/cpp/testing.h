#pragma once
// Include this instead of catch.hpp: c10's logging defines CHECK too, so
// torch goes first and Catch2's macros win.
#include <torch/torch.h>

#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace pipegear::testing {

/// a and b have the same shape and are close (compared on the CPU).
inline void require_close(const torch::Tensor& a, const torch::Tensor& b,
                          double tol = 1e-5) {
  REQUIRE(a.defined());
  REQUIRE(b.defined());
  REQUIRE(a.sizes() == b.sizes());
  auto ac = a.detach().to(torch::kCPU);
  auto bc = b.detach().to(torch::kCPU);
  INFO("max abs diff " << (ac - bc).abs().max().item<double>());
  REQUIRE(torch::allclose(ac, bc, tol, tol));
}

/// `layers` layers in `k` stages, the first ones one layer longer.
inline std::vector<int64_t> even_balance(int64_t layers, int64_t k) {
  std::vector<int64_t> b(k, layers / k);
  for (int64_t i = 0; i < layers % k; ++i) {
    ++b[i];
  }
  return b;
}

/// Collects the warnings raised through c10 (TORCH_WARN) on this thread
/// while alive, instead of printing them.
class CollectWarnings : public c10::WarningHandler {
 public:
  CollectWarnings() : previous_(c10::WarningUtils::get_warning_handler()) {
    c10::WarningUtils::set_warning_handler(this);
  }
  ~CollectWarnings() override {
    c10::WarningUtils::set_warning_handler(previous_);
  }
  CollectWarnings(const CollectWarnings&) = delete;
  CollectWarnings& operator=(const CollectWarnings&) = delete;
  void process(const c10::Warning& warning) override {
    messages.push_back(warning.msg());
  }
  std::vector<std::string> messages;

 private:
  c10::WarningHandler* previous_;
};

} // namespace pipegear::testing

using pipegear::testing::CollectWarnings;
using pipegear::testing::even_balance;
using pipegear::testing::require_close;
