#include <pipegear/detail/pipeline_node.h>

#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <pipegear/detail/step.h>

namespace pipegear::detail {
namespace {

struct StepCapsule : torch::CustomClassHolder {
  c10::intrusive_ptr<PendingStep> step;
  bool tuple = false;  // the fill's output is a tuple (also of one tensor)
};

struct PipelineNode : torch::autograd::Function<PipelineNode> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      c10::intrusive_ptr<StepCapsule> capsule, torch::Tensor /*phony*/,
      at::TensorList /*inputs: the step holds their micro-batches*/) {
    Batch out = capsule->step->fill();
    capsule->tuple = out.tuple;
    std::vector<torch::Tensor> non_diff;
    for (auto& t : out) {
      if (!can_require_grad(t)) {
        non_diff.push_back(t);
      }
    }
    if (!non_diff.empty()) {
      ctx->mark_non_differentiable(non_diff);
    }
    ctx->saved_data["step"] = c10::IValue::make_capsule(
        c10::static_intrusive_pointer_cast<torch::CustomClassHolder>(capsule));
    return out;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    auto it = ctx->saved_data.find("step");
    TORCH_CHECK(it != ctx->saved_data.end(),
                "pipegear: backward through the pipeline's output ran a second "
                "time; a step's graph is freed by its first backward "
                "(retain_graph is not supported: run the forward again)");
    auto capsule = c10::static_intrusive_pointer_cast<StepCapsule>(
        it->second.toCapsule());
    ctx->saved_data.erase(it);
    auto step = std::move(capsule->step);
    Batch input_grads = step->drain(grads);
    torch::autograd::variable_list result;
    result.reserve(input_grads.size() + 2);
    result.emplace_back();  // capsule
    result.emplace_back();  // phony
    for (auto& g : input_grads) {
      result.push_back(std::move(g));
    }
    return result;
  }
};

} // namespace

Batch apply_pipeline_node(c10::intrusive_ptr<PendingStep> step,
                          const Batch& inputs) {
  static const torch::Tensor phony = torch::zeros({}).requires_grad_(true);
  auto capsule = c10::make_intrusive<StepCapsule>();
  capsule->step = std::move(step);
  Batch out = PipelineNode::apply(capsule, phony, at::TensorList(inputs));
  out.tuple = capsule->tuple;
  return out;
}

} // namespace pipegear::detail
