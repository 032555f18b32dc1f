#include <pipegear/stage.h>

#include <c10/util/Type.h>
#include <torch/nn/modules/container/any.h>

#include <pipegear/nn/deferred_batch_norm.h>
#include <pipegear/random.h>

namespace pipegear {
namespace {

Batch to_batch(torch::nn::AnyValue&& value, size_t layer) {
  if (auto* t = value.try_get<torch::Tensor>()) {
    return {*t};
  }
  if (auto* v = value.try_get<std::vector<torch::Tensor>>()) {
    return Batch(*v, /*tuple=*/true);
  }
  TORCH_CHECK_TYPE(false, "layer ", layer,
                   " returned a value of type ",
                   c10::demangle(value.type_info().name()),
                   "; a pipeline stage passes a torch::Tensor or a "
                   "std::vector<torch::Tensor> between layers");
}

template <typename F>
void for_each_deferred_batch_norm(const torch::nn::Sequential& layers, F f) {
  for (const auto& module : layers->modules(/*include_self=*/false)) {
    if (auto bn = std::dynamic_pointer_cast<DeferredBatchNormImpl>(module)) {
      f(*bn);
    }
  }
}

} // namespace

SequentialStage::SequentialStage(torch::nn::Sequential layers,
                                 c10::Device device, int64_t first_layer)
    : layers_(std::move(layers)), device_(device), first_layer_(first_layer) {
  // The engine commits once every stage's forward succeeded (end_forward).
  for_each_deferred_batch_norm(
      layers_, [](DeferredBatchNormImpl& bn) { bn.set_auto_commit(false); });
}

Batch SequentialStage::forward(const Batch& input) {
  torch::nn::AnyValue value = input.is_tuple()
      ? torch::nn::AnyValue(std::vector<torch::Tensor>(input))
      : torch::nn::AnyValue(input.front());
  size_t i = 0;
  for (auto& layer : *layers_) {
    set_random_layer(static_cast<int64_t>(i));
    value = layer.any_forward(std::move(value));
    ++i;
  }
  return to_batch(std::move(value), i - 1);
}

bool SequentialStage::requires_grad() const {
  for (const auto& p : layers_->parameters()) {
    if (p.requires_grad()) {
      return true;
    }
  }
  return false;
}

void SequentialStage::begin_forward() {
  for_each_deferred_batch_norm(
      layers_, [](DeferredBatchNormImpl& bn) { bn.reset_accumulated(); });
}

void SequentialStage::end_forward() {
  for_each_deferred_batch_norm(layers_,
                               [](DeferredBatchNormImpl& bn) { bn.commit(); });
}

} // namespace pipegear
