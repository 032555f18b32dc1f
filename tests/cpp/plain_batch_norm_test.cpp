// A plain (not deferred) BatchNorm in a C++ pipeline: the warning, and its
// running statistics, which count each micro-batch once: recomputations of
// checkpointed micro-batches update nothing (stage.cpp, HideRunningStats).
#include "testing.h"

#include <string>
#include <vector>

#include <pipegear/gpipe.h>

using pipegear::CheckpointMode;
using pipegear::GPipe;
using pipegear::GPipeOptions;

namespace {

// Two BatchNorm layers, in different stages for the balances used below.
torch::nn::Sequential two_batch_norms() {
  return torch::nn::Sequential(
      torch::nn::Linear(4, 6), torch::nn::BatchNorm1d(6), torch::nn::ReLU(),
      torch::nn::Linear(6, 6), torch::nn::BatchNorm1d(6), torch::nn::Tanh(),
      torch::nn::Linear(6, 3));
}

} // namespace

TEST_CASE("plain BatchNorm: one warning per pipeline, none when deferred or "
          "with one chunk", "[gpipe][batchnorm]") {
  {
    CollectWarnings warnings;
    auto pipe = GPipe(two_batch_norms(), GPipeOptions({3, 4}).chunks(4));
    REQUIRE(warnings.messages.size() == 1);  // two BatchNorm layers, once
    CHECK_THAT(warnings.messages[0],
               Catch::Contains("BatchNorm layer '1'") &&
                   Catch::Contains("chunks=4") &&
                   Catch::Contains("once per micro-batch") &&
                   Catch::Contains("deferred_batch_norm(true)"));
    auto again = GPipe(two_batch_norms(), GPipeOptions({3, 4}).chunks(2));
    CHECK(warnings.messages.size() == 2);  // per pipeline, not per process
  }
  {
    CollectWarnings warnings;
    auto deferred = GPipe(two_batch_norms(), GPipeOptions({3, 4}).chunks(4)
                                          .deferred_batch_norm(true));
    auto one_chunk = GPipe(two_batch_norms(), GPipeOptions({3, 4}).chunks(1));
    auto no_stats = torch::nn::Sequential(torch::nn::BatchNorm1d(
        torch::nn::BatchNorm1dOptions(3).track_running_stats(false)));
    auto untracked = GPipe(no_stats, GPipeOptions({1}).chunks(4));
    CHECK(warnings.messages.empty());
  }
}

TEST_CASE("plain BatchNorm counts each micro-batch once: recomputations do not "
          "update running statistics", "[gpipe][batchnorm]") {
  const auto mode = GENERATE(CheckpointMode::kAlways, CheckpointMode::kExceptLast,
                             CheckpointMode::kNever);
  const bool step_style = GENERATE(false, true);
  CAPTURE(pipegear::to_string(mode), step_style);
  torch::manual_seed(2);
  auto plain = two_batch_norms();
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
  CollectWarnings warnings;  // the expected BatchNorm warning
  auto pipe = GPipe(torch::nn::Sequential(copy),
                    GPipeOptions({2, 3, 2}).chunks(4).checkpoint(mode));
  const auto x = torch::randn({8, 4});
  const auto t = torch::randn({8, 3});
  if (step_style) {
    pipe->step(x, t, torch::nn::MSELoss(torch::nn::MSELossOptions().reduction(
                         torch::kSum)));
  } else {
    torch::mse_loss(pipe->forward(x), t, at::Reduction::Sum).backward();
  }
  // The reference: the plain model run on the 4 micro-batches in order, so
  // the running statistics take 4 momentum steps, as in the pipeline.
  for (const auto& part : x.split(2)) {
    torch::mse_loss(plain->forward(part), t.narrow(0, 0, 2), at::Reduction::Sum);
  }
  for (const char* bn : {"1", "4"}) {
    INFO("BatchNorm " << bn);
    auto got = pipe->named_buffers();
    auto want = plain->named_buffers();
    const std::string prefix = std::string(bn) + ".";
    CHECK(got[prefix + "num_batches_tracked"].item<int64_t>() == 4);
    require_close(got[prefix + "running_mean"], want[prefix + "running_mean"],
                  1e-6);
    require_close(got[prefix + "running_var"], want[prefix + "running_var"],
                  1e-6);
  }
}

TEST_CASE("a recomputed BatchNorm computes exactly what its forward did",
          "[gpipe][batchnorm]") {
  // The same gradients whether micro-batches are recomputed or kept: the
  // recomputation normalises with the micro-batch's own statistics, with
  // the running statistics hidden.
  CollectWarnings warnings;  // the expected BatchNorm warning
  std::vector<std::vector<torch::Tensor>> grads;
  for (auto mode : {CheckpointMode::kNever, CheckpointMode::kAlways}) {
    torch::manual_seed(3);
    auto pipe = GPipe(two_batch_norms(), GPipeOptions({3, 4}).chunks(4).checkpoint(mode));
    pipe->step(torch::randn({8, 4}), torch::randn({8, 3}), torch::nn::MSELoss());
    grads.emplace_back();
    for (const auto& p : pipe->parameters()) {
      grads.back().push_back(p.grad());
    }
  }
  for (size_t i = 0; i < grads[0].size(); ++i) {
    INFO("parameter " << i);
    REQUIRE(torch::equal(grads[0][i], grads[1][i]));
  }
}

TEST_CASE("InstanceNorm with running statistics is not updated by "
          "recomputations either; eval-mode layers keep theirs",
          "[gpipe][batchnorm]") {
  torch::manual_seed(4);
  auto make = [] {
    return torch::nn::Sequential(
        torch::nn::Conv1d(2, 3, 1),
        torch::nn::InstanceNorm1d(
            torch::nn::InstanceNorm1dOptions(3).track_running_stats(true)),
        torch::nn::BatchNorm1d(3), torch::nn::Flatten(),
        torch::nn::Linear(3 * 5, 1));
  };
  auto plain = make();
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
  CollectWarnings warnings;  // the expected BatchNorm warning
  auto pipe = GPipe(torch::nn::Sequential(copy),
                    GPipeOptions({2, 3}).chunks(2).checkpoint(
                        CheckpointMode::kAlways));
  // A BatchNorm in eval mode inside a training pipeline.
  pipe->named_children()["2"]->eval();
  plain[2]->eval();
  const auto x = torch::randn({4, 2, 5});
  pipe->step(x, torch::randn({4, 1}), torch::nn::MSELoss());
  for (const auto& part : x.split(2)) {
    plain->forward(part);
  }
  auto got = pipe->named_buffers();
  auto want = plain->named_buffers();
  for (const auto& b : want) {
    INFO(b.key());
    require_close(got[b.key()], b.value(), 1e-6);
  }
  CHECK(got["2.num_batches_tracked"].item<int64_t>() == 0);
}
