#include <optional>
#include <vector>

#include "testing.h"

#include <pipegear/checkpoint.h>
#include <pipegear/microbatch.h>
#include <pipegear/detail/checkpoint_flags.h>
#include <pipegear/nn/deferred_batch_norm.h>

using pipegear::DeferredBatchNorm;
using pipegear::DeferredBatchNormOptions;
using Guard = pipegear::detail::CheckpointFlagGuard;

namespace {

// An input of `dim` dimensions (N, C, *) with a per-channel offset, so that
// the running mean is far from its initial 0.
torch::Tensor make_input(int64_t batch, int64_t channels, int64_t dim) {
  std::vector<int64_t> shape{batch, channels};
  for (int64_t d = 2; d < dim; ++d) {
    shape.push_back(3);
  }
  std::vector<int64_t> offset_shape(dim, 1);
  offset_shape[1] = channels;
  auto offset = torch::arange(channels, torch::kFloat).view(offset_shape);
  return torch::randn(shape) * 2.0 + offset;
}

// torch::nn::BatchNorm{1,2,3}d for an input of `dim` dimensions.
torch::nn::AnyModule reference_batch_norm(int64_t dim,
                                          torch::nn::BatchNormOptions o) {
  if (dim <= 3) {
    return torch::nn::AnyModule(torch::nn::BatchNorm1d(o));
  }
  if (dim == 4) {
    return torch::nn::AnyModule(torch::nn::BatchNorm2d(o));
  }
  return torch::nn::AnyModule(torch::nn::BatchNorm3d(o));
}

torch::Tensor buffer(const torch::nn::Module& m, const std::string& name) {
  return m.named_buffers()[name];
}

bool close(const torch::Tensor& a, const torch::Tensor& b, double tol = 1e-6) {
  return torch::allclose(a, b, tol, tol);
}

// One pipelined step as the engine runs it: reset, the forward of every
// micro-batch (the checkpointed ones recomputed afterwards, during which no
// statistics may be gathered), commit.
std::vector<torch::Tensor> pipelined_step(DeferredBatchNorm& dbn,
                                          const torch::Tensor& x,
                                          int64_t chunks,
                                          bool recompute) {
  dbn->reset_accumulated();
  std::vector<torch::Tensor> outputs;
  auto parts = pipegear::scatter({x}, chunks);
  for (const auto& part : parts) {
    outputs.push_back(dbn(part[0]));
  }
  if (recompute) {
    Guard guard(Guard::Flag::kRecomputing);
    for (size_t j = 0; j + 1 < parts.size(); ++j) {
      auto again = dbn(parts[j][0]);
      REQUIRE(close(again, outputs[j]));
    }
  }
  dbn->commit();
  return outputs;
}

} // namespace

TEST_CASE("running statistics equal BatchNorm on the whole mini-batch",
          "[batchnorm]") {
  const int64_t chunks = GENERATE(1, 2, 4, 5);
  const int64_t batch = GENERATE(10, 12);
  const int64_t dim = GENERATE(2, 3, 4, 5);
  const bool cumulative = GENERATE(false, true);
  const bool recompute = GENERATE(false, true);
  CAPTURE(chunks, batch, dim, cumulative, recompute);
  torch::manual_seed(chunks * 100 + batch + dim);

  const std::optional<double> momentum =
      cumulative ? std::nullopt : std::optional<double>(0.1);
  const int64_t c = 3;
  auto dbn = DeferredBatchNorm(
      DeferredBatchNormOptions(c).momentum(momentum).chunks(chunks));
  auto bn = reference_batch_norm(
      dim, torch::nn::BatchNormOptions(c).momentum(momentum));

  for (int step = 0; step < 4; ++step) {
    auto x = make_input(batch, c, dim);
    pipelined_step(dbn, x, chunks, recompute);
    bn.forward(x);
    REQUIRE(dbn->accumulated_micro_batches() == 0);
    REQUIRE(close(dbn->running_mean, buffer(*bn.ptr(), "running_mean")));
    REQUIRE(close(dbn->running_var, buffer(*bn.ptr(), "running_var")));
    REQUIRE(dbn->num_batches_tracked.item<int64_t>() == step + 1);
    REQUIRE(buffer(*bn.ptr(), "num_batches_tracked").item<int64_t>() ==
            step + 1);
  }

  // Same running statistics, hence the same evaluation.
  dbn->eval();
  bn.ptr()->eval();
  auto x = make_input(batch, c, dim);
  REQUIRE(close(dbn(x), bn.forward(x)));
}

TEST_CASE("training output and gradients are per-micro-batch BatchNorm",
          "[batchnorm]") {
  const int64_t chunks = GENERATE(1, 2, 4, 5);
  const int64_t batch = 12;
  CAPTURE(chunks);
  torch::manual_seed(chunks);
  const int64_t c = 4;
  auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(c).chunks(chunks));
  auto bn = torch::nn::BatchNorm2d(torch::nn::BatchNormOptions(c));
  {
    torch::NoGradGuard no_grad;
    auto w = torch::rand({c}) + 0.5;
    auto b = torch::randn({c});
    dbn->weight.copy_(w);
    bn->weight.copy_(w);
    dbn->bias.copy_(b);
    bn->bias.copy_(b);
  }
  auto x = make_input(batch, c, 4);
  auto x_dbn = x.clone().requires_grad_();
  auto x_bn = x.clone().requires_grad_();
  auto grad = torch::randn_like(x);

  auto outputs = pipelined_step(dbn, x_dbn, chunks, /*recompute=*/false);
  auto y_dbn = torch::cat(outputs);
  std::vector<torch::Tensor> expected;
  for (const auto& part : pipegear::scatter({x_bn}, chunks)) {
    expected.push_back(bn(part[0]));
  }
  auto y_bn = torch::cat(expected);
  REQUIRE(close(y_dbn, y_bn, 1e-5));

  y_dbn.backward(grad);
  y_bn.backward(grad);
  REQUIRE(dbn->weight.grad().defined());
  REQUIRE(dbn->weight.grad().abs().sum().item<double>() > 0);
  REQUIRE(close(dbn->weight.grad(), bn->weight.grad(), 1e-5));
  REQUIRE(close(dbn->bias.grad(), bn->bias.grad(), 1e-5));
  REQUIRE(close(x_dbn.grad(), x_bn.grad(), 1e-5));
}

TEST_CASE("statistics are committed after `chunks` micro-batches",
          "[batchnorm]") {
  auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(2).chunks(3));
  auto x = make_input(6, 2, 2);
  dbn(x.slice(0, 0, 2));
  dbn(x.slice(0, 2, 4));
  REQUIRE(dbn->accumulated_micro_batches() == 2);
  REQUIRE(dbn->num_batches_tracked.item<int64_t>() == 0);
  REQUIRE(close(dbn->running_mean, torch::zeros({2})));
  dbn(x.slice(0, 4, 6));
  REQUIRE(dbn->accumulated_micro_batches() == 0);
  REQUIRE(dbn->num_batches_tracked.item<int64_t>() == 1);
  REQUIRE_FALSE(dbn->commit());  // nothing left: the engine's commit no-ops

  auto bn = torch::nn::BatchNorm1d(2);
  bn(x);
  REQUIRE(close(dbn->running_mean, bn->running_mean));
  REQUIRE(close(dbn->running_var, bn->running_var));
}

TEST_CASE("a step with fewer micro-batches than chunks commits on commit()",
          "[batchnorm]") {
  // A batch of 3 in 4 chunks gives 3 micro-batches: no automatic commit.
  auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(2).chunks(4));
  auto bn = torch::nn::BatchNorm1d(2);
  auto x = make_input(3, 2, 3);
  for (const auto& part : pipegear::scatter({x}, 4)) {
    dbn(part[0]);
  }
  REQUIRE(dbn->accumulated_micro_batches() == 3);
  REQUIRE(dbn->num_batches_tracked.item<int64_t>() == 0);
  REQUIRE(dbn->commit());
  bn(x);
  REQUIRE(dbn->num_batches_tracked.item<int64_t>() == 1);
  REQUIRE(close(dbn->running_mean, bn->running_mean));
  REQUIRE(close(dbn->running_var, bn->running_var));
}

TEST_CASE("reset_accumulated drops a failed step", "[batchnorm]") {
  auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(3).chunks(4));
  auto bn = torch::nn::BatchNorm1d(3);
  // A step that fails after two micro-batches.
  auto failed = make_input(8, 3, 2) + 10.0;
  dbn(failed.slice(0, 0, 2));
  dbn(failed.slice(0, 2, 4));
  REQUIRE(dbn->accumulated_micro_batches() == 2);

  auto x = make_input(8, 3, 2);
  pipelined_step(dbn, x, 4, /*recompute=*/true);
  bn(x);
  REQUIRE(dbn->num_batches_tracked.item<int64_t>() == 1);
  REQUIRE(close(dbn->running_mean, bn->running_mean));
  REQUIRE(close(dbn->running_var, bn->running_var));
}

TEST_CASE("recomputation gathers no statistics", "[batchnorm]") {
  auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(2).chunks(2));
  auto x = make_input(4, 2, 2);
  dbn(x.slice(0, 0, 2));
  {
    Guard guard(Guard::Flag::kRecomputing);
    REQUIRE(pipegear::is_recomputing());
    dbn(x.slice(0, 0, 2));
    dbn(x.slice(0, 0, 2));
  }
  REQUIRE_FALSE(pipegear::is_recomputing());
  REQUIRE(dbn->accumulated_micro_batches() == 1);
  // The first forward of a checkpointed micro-batch does count.
  {
    Guard guard(Guard::Flag::kCheckpointing);
    dbn(x.slice(0, 2, 4));
  }
  REQUIRE(dbn->accumulated_micro_batches() == 0);
  REQUIRE(dbn->num_batches_tracked.item<int64_t>() == 1);
}

TEST_CASE("eval uses the running statistics and gathers nothing",
          "[batchnorm]") {
  auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(3).chunks(2));
  {
    torch::NoGradGuard no_grad;
    dbn->running_mean.copy_(torch::tensor({1.0, -2.0, 0.5}));
    dbn->running_var.copy_(torch::tensor({4.0, 0.25, 1.0}));
  }
  dbn->eval();
  auto x = make_input(5, 3, 4);
  auto expected = torch::batch_norm(x, dbn->weight, dbn->bias,
                                    dbn->running_mean, dbn->running_var,
                                    false, 0.0, 1e-5, false);
  REQUIRE(close(dbn(x), expected));
  REQUIRE(dbn->accumulated_micro_batches() == 0);
  REQUIRE(dbn->num_batches_tracked.item<int64_t>() == 0);
}

TEST_CASE("parameters and buffers are named as torch::nn::BatchNorm's",
          "[batchnorm]") {
  for (bool affine : {true, false}) {
    auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(3).affine(affine));
    auto bn = torch::nn::BatchNorm2d(
        torch::nn::BatchNormOptions(3).affine(affine));
    REQUIRE(dbn->named_parameters().keys() == bn->named_parameters().keys());
    REQUIRE(dbn->named_buffers().keys() == bn->named_buffers().keys());
    REQUIRE(dbn->num_batches_tracked.scalar_type() == torch::kLong);
  }
  auto affine_free = DeferredBatchNorm(DeferredBatchNormOptions(3).affine(false));
  auto x = make_input(4, 3, 2);
  auto y = affine_free(x);
  REQUIRE(close(y.mean(0), torch::zeros({3}), 1e-5));
}

TEST_CASE("convert_deferred_batch_norm keeps parameters and buffers",
          "[batchnorm]") {
  torch::manual_seed(0);
  torch::nn::Sequential model(
      torch::nn::Linear(6, 4), torch::nn::BatchNorm1d(4),
      torch::nn::BatchNorm1d(torch::nn::BatchNormOptions(4)
                                 .track_running_stats(false)),
      torch::nn::ReLU(), torch::nn::Linear(4, 2));
  // Some history, so that nothing is at its initial value.
  for (int i = 0; i < 3; ++i) {
    model->forward(torch::randn({8, 6}));
  }
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) {
      p.add_(torch::randn_like(p) * 0.1);
    }
  }
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
      model->clone());
  auto converted = pipegear::convert_deferred_batch_norm(model, 4);

  REQUIRE(converted->size() == model->size());
  REQUIRE(converted[1]->as<pipegear::DeferredBatchNormImpl>() != nullptr);
  REQUIRE(converted[2]->as<torch::nn::BatchNorm1dImpl>() != nullptr);
  REQUIRE(converted[1]->as<pipegear::DeferredBatchNormImpl>()->options.chunks() ==
          4);
  // The other layers are shared, not copied.
  REQUIRE(converted->ptr(0) == model->ptr(0));

  auto before = model->named_parameters();
  auto after = converted->named_parameters();
  REQUIRE(before.keys() == after.keys());
  for (const auto& item : before) {
    REQUIRE(torch::equal(item.value(), after[item.key()]));
  }
  auto buffers_before = model->named_buffers();
  auto buffers_after = converted->named_buffers();
  REQUIRE(buffers_before.keys() == buffers_after.keys());
  for (const auto& item : buffers_before) {
    REQUIRE(torch::equal(item.value(), buffers_after[item.key()]));
    REQUIRE(item.value().scalar_type() ==
            buffers_after[item.key()].scalar_type());
  }

  // Pipelined over 4 micro-batches, the converted model tracks what the
  // original tracks on whole mini-batches.
  for (int step = 0; step < 3; ++step) {
    auto x = torch::randn({12, 6});
    for (const auto& part : pipegear::scatter({x}, 4)) {
      converted->forward(part[0]);
    }
    reference->forward(x);
  }
  auto tracked = converted->named_buffers();
  for (const auto& item : reference->named_buffers()) {
    CAPTURE(item.key());
    REQUIRE(close(item.value().to(torch::kDouble),
                  tracked[item.key()].to(torch::kDouble)));
  }
}

TEST_CASE("DeferredBatchNorm reports bad inputs and options", "[batchnorm]") {
  auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(3));
  REQUIRE_THROWS_AS(dbn(torch::randn({4, 5})), c10::ValueError);
  REQUIRE_THROWS_AS(dbn(torch::randn({4})), c10::ValueError);
  REQUIRE_THROWS_AS(dbn(torch::randn({2, 3, 2, 2, 2, 2})), c10::ValueError);
  REQUIRE_THROWS_AS(dbn(torch::randn({1, 3})), c10::ValueError);
  REQUIRE_THROWS_AS(DeferredBatchNorm(DeferredBatchNormOptions(3).chunks(0)),
                    c10::ValueError);
  REQUIRE_THROWS_AS(DeferredBatchNorm(DeferredBatchNormOptions(0)),
                    c10::ValueError);
  REQUIRE_THROWS_WITH(dbn(torch::randn({4, 5})),
                      Catch::Contains("3 features") &&
                          Catch::Contains("5 channels"));
}
