#include <chrono>
#include <stdexcept>
#include <thread>

#include "testing.h"

#include <pipegear/partition.h>
#include <pipegear/profile.h>

namespace {

// Sleeps a known time in forward, then scales by a parameter (so that a
// backward runs through it).
struct SleepImpl : torch::nn::Cloneable<SleepImpl> {
  explicit SleepImpl(int64_t milliseconds) : milliseconds(milliseconds) {
    reset();
  }
  void reset() override {
    weight = register_parameter("weight", torch::ones({1}));
  }
  torch::Tensor forward(torch::Tensor x) {
    std::this_thread::sleep_for(std::chrono::milliseconds(milliseconds));
    return x * weight;
  }
  int64_t milliseconds;
  torch::Tensor weight;
};
TORCH_MODULE(Sleep);

torch::nn::Sequential sleepy(const std::vector<int64_t>& milliseconds) {
  torch::nn::Sequential model;
  for (auto ms : milliseconds) {
    model->push_back(Sleep(ms));
  }
  return model;
}

} // namespace

TEST_CASE("balance_by_time recovers the optimal split of known times",
          "[profile]") {
  // 80, 40, 40, 80 ms: the optimum [1, 2, 1] (80 ms per stage) beats the
  // next best by 40 ms, more than a loaded machine's sleep overshoots.
  auto model = sleepy({80, 40, 40, 80});
  const auto sample = torch::ones({2, 3});
  auto options = pipegear::BalanceByTimeOptions().repeats(3);
  CHECK(pipegear::balance_by_time(3, model, sample, options) ==
        std::vector<int64_t>{1, 2, 1});

  const auto profiles = pipegear::profile_layers(
      model, sample, pipegear::ProfileOptions().repeats(3));
  REQUIRE(profiles.size() == 4);
  for (size_t i = 0; i < profiles.size(); ++i) {
    const double want = (i == 0 || i == 3) ? 0.080 : 0.040;
    CHECK(profiles[i].forward_seconds >= want);
    CHECK(profiles[i].forward_seconds < want + 0.04);
    CHECK(profiles[i].backward_seconds >= 0.0);
    CHECK(profiles[i].backward_seconds < 0.04);
    CHECK(profiles[i].parameter_bytes == 4);
    CHECK(profiles[i].activation_bytes == 2 * 3 * 4);
  }
}

TEST_CASE("profile_layers stops starting rounds after the timeout",
          "[profile]") {
  auto model = sleepy({20, 20});
  const auto start = std::chrono::steady_clock::now();
  pipegear::profile_layers(model, torch::ones({1}),
                           pipegear::ProfileOptions().repeats(100).timeout(
                               0.05));
  const double seconds = std::chrono::duration<double>(
      std::chrono::steady_clock::now() - start).count();
  // Warm-up + rounds until 50 ms have passed: about 3 rounds of 40 ms, far
  // from the 4 s of 100 rounds.
  CHECK(seconds < 1.0);
}

TEST_CASE("profiling leaves the model as it was", "[profile]") {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(4, 8),
                              torch::nn::BatchNorm1d(8),
                              torch::nn::ReLU(),
                              torch::nn::Linear(8, 2));
  // An existing gradient on layer 0 only, and mixed training flags.
  model->forward(torch::randn({5, 4})).sum().backward();
  model[3]->as<torch::nn::Linear>()->weight.mutable_grad() = torch::Tensor();
  model[3]->as<torch::nn::Linear>()->bias.mutable_grad() = torch::Tensor();
  model->eval();
  model[1]->train();

  std::vector<torch::Tensor> params, grads, buffers;
  for (const auto& p : model->parameters()) {
    params.push_back(p.detach().clone());
    grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  }
  for (const auto& b : model->buffers()) {
    buffers.push_back(b.clone());
  }
  std::vector<bool> training;
  for (const auto& m : model->modules()) {
    training.push_back(m->is_training());
  }

  const auto sample = torch::randn({6, 4});
  pipegear::profile_layers(model, sample,
                           pipegear::ProfileOptions().repeats(2));
  pipegear::balance_by_size(2, model, sample,
                            pipegear::BalanceBySizeOptions().chunks(2));

  const auto after = model->parameters();
  REQUIRE(after.size() == params.size());
  for (size_t i = 0; i < after.size(); ++i) {
    CHECK(torch::equal(after[i], params[i]));
    REQUIRE(after[i].grad().defined() == grads[i].defined());
    if (grads[i].defined()) {
      CHECK(torch::equal(after[i].grad(), grads[i]));
    }
  }
  const auto buffers_after = model->buffers();
  for (size_t i = 0; i < buffers.size(); ++i) {
    CHECK(torch::equal(buffers_after[i], buffers[i]));
  }
  const auto modules_after = model->modules();
  for (size_t i = 0; i < modules_after.size(); ++i) {
    CHECK(modules_after[i]->is_training() == training[i]);
  }
  CHECK_FALSE(sample.requires_grad());
}

TEST_CASE("balance_by_size counts parameters and one micro-batch's output",
          "[profile]") {
  torch::nn::Sequential model(torch::nn::Linear(8, 8),
                              torch::nn::Linear(8, 8),
                              torch::nn::Linear(8, 8),
                              torch::nn::Linear(8, 256));
  const auto sample = torch::randn({4, 8});
  const auto profiles = pipegear::profile_layers(model, sample);
  CHECK(profiles[0].parameter_bytes == (8 * 8 + 8) * 4);
  CHECK(profiles[3].parameter_bytes == (8 * 256 + 256) * 4);
  CHECK(profiles[0].activation_bytes == 4 * 8 * 4);
  CHECK(profiles[3].activation_bytes == 4 * 256 * 4);

  // chunks=2: micro-batches of 2 samples.
  std::vector<double> sizes;
  for (const auto& p : profiles) {
    sizes.push_back(3.0 * p.parameter_bytes + p.activation_bytes / 2.0);
  }
  const auto options =
      pipegear::BalanceBySizeOptions().chunks(2).param_scale(3.0);
  const auto balance = pipegear::balance_by_size(2, model, sample, options);
  CHECK(balance == pipegear::balance_by_cost(2, sizes));
  CHECK(balance == std::vector<int64_t>{3, 1});
}

TEST_CASE("a failing layer is named in a ValueError", "[profile]") {
  torch::nn::Sequential model(
      {{"embed", torch::nn::AnyModule(torch::nn::Linear(4, 4))},
       {"relu", torch::nn::AnyModule(torch::nn::ReLU())},
       {"broken", torch::nn::AnyModule(torch::nn::Functional(
                      [](torch::Tensor) -> torch::Tensor {
                        throw std::runtime_error("shape mismatch 7 != 9");
                      }))}});
  const auto sample = torch::randn({2, 4});
  CHECK_THROWS_AS(pipegear::profile_layers(model, sample), c10::ValueError);
  CHECK_THROWS_WITH(pipegear::profile_layers(model, sample),
                    Catch::Contains("layer 2 ('broken'") &&
                        Catch::Contains("shape mismatch 7 != 9"));
  CHECK_THROWS_WITH(pipegear::balance_by_time(2, model, sample),
                    Catch::Contains("layer 2 ('broken'"));
  // A layer that does not fit its input: torch's own message is kept.
  torch::nn::Sequential wrong(torch::nn::Linear(4, 4), torch::nn::Linear(5, 2));
  CHECK_THROWS_WITH(pipegear::profile_layers(wrong, sample),
                    Catch::Contains("layer 1 ('1', torch::nn::Linear"));
  // No gradient is left behind although layer 1 failed mid-profile.
  for (const auto& p : wrong->parameters()) {
    CHECK_FALSE(p.grad().defined());
  }
}

TEST_CASE("profiling: bad arguments get a ValueError", "[profile]") {
  auto model = sleepy({0, 0});
  const auto sample = torch::ones({2});
  CHECK_THROWS_WITH(pipegear::balance_by_time(3, model, sample),
                    Catch::Contains("cannot split 2 layers into 3"));
  CHECK_THROWS_AS(pipegear::balance_by_time(0, model, sample), c10::ValueError);
  CHECK_THROWS_AS(pipegear::balance_by_size(3, model, sample), c10::ValueError);
  CHECK_THROWS_WITH(
      pipegear::profile_layers(model, sample,
                               pipegear::ProfileOptions().repeats(0)),
      Catch::Contains("repeats must be at least 1, got 0"));
  CHECK_THROWS_AS(
      pipegear::profile_layers(model, sample,
                               pipegear::ProfileOptions().timeout(0)),
      c10::ValueError);
  CHECK_THROWS_AS(pipegear::profile_layers(torch::nn::Sequential(), sample),
                  c10::ValueError);
  CHECK_THROWS_AS(pipegear::profile_layers(model, torch::Tensor()),
                  c10::ValueError);
  CHECK_THROWS_WITH(
      pipegear::balance_by_size(1, model, sample,
                                pipegear::BalanceBySizeOptions().chunks(0)),
      Catch::Contains("chunks must be at least 1, got 0"));
  CHECK_THROWS_AS(
      pipegear::balance_by_size(
          1, model, sample,
          pipegear::BalanceBySizeOptions().param_scale(-1.0)),
      c10::ValueError);
}

TEST_CASE("profiling on CUDA copies a CPU model there", "[profile][cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("skipped: no CUDA device");
    return;
  }
  torch::nn::Sequential model(torch::nn::Linear(4, 4), torch::nn::ReLU(),
                              torch::nn::Linear(4, 2));
  const auto profiles = pipegear::profile_layers(
      model, torch::randn({3, 4}),
      pipegear::ProfileOptions().device(torch::Device(torch::kCUDA, 0)));
  CHECK(profiles.size() == 3);
  for (const auto& p : model->parameters()) {
    CHECK(p.device().is_cpu());
    CHECK_FALSE(p.grad().defined());
  }
}
