#pragma once
// How a step-style pipeline applies and combines a loss: the loss function,
// its reduction and what a mean counts (docs/engine.md, "Losses").

#include <cstdint>
#include <functional>
#include <string>

#include <c10/util/Exception.h>
#include <torch/arg.h>

#include <pipegear/microbatch.h>

namespace pipegear {

/// How the micro-batch losses of `step` combine into the mini-batch loss:
/// kMean weighs micro-batch j by count_j / sum(count) (the loss_fn reduces
/// by mean), kSum adds them (the loss_fn reduces by sum). Either way the
/// gradients equal those of loss_fn on the whole batch.
enum class LossReduction : uint8_t { kMean, kSum };

/// "mean" or "sum"; ValueError otherwise.
inline LossReduction parse_loss_reduction(const std::string& name) {
  if (name == "mean") {
    return LossReduction::kMean;
  }
  TORCH_CHECK_VALUE(name == "sum", "reduction must be 'mean' or 'sum', got '",
                    name, "'");
  return LossReduction::kSum;
}

/// loss_fn(output, target) -> scalar, called per micro-batch on the last
/// stage's worker.
using LossFn = std::function<torch::Tensor(const Batch& output,
                                           const Batch& target)>;

/// count(target of one micro-batch) -> how many terms a mean loss averages
/// over for it: the targets that are not ignored (ignore_index), or the sum
/// of their class weights. Called on the calling thread before the step.
using LossCount = std::function<double(const Batch& target)>;

/// How `step` combines the micro-batch losses, so that the loss and the
/// gradients equal those of the loss on the whole batch.
struct StepOptions {
  /// kMean: micro-batch j weighs count_j / sum(count) (count_j: its rows,
  /// or `count` of its target); kSum: the losses add up.
  TORCH_ARG(LossReduction, reduction) = LossReduction::kMean;
  /// What a mean loss averages over; empty: the rows of the micro-batch.
  /// Needed when that differs from the rows (ignored targets, class
  /// weights); not allowed with kSum.
  TORCH_ARG(LossCount, count) = {};
  /// False (an eval-mode module): no micro-batch is checkpointed.
  TORCH_ARG(bool, training) = true;
};

} // namespace pipegear
