#pragma once
// Internal (never installed): one step (one mini-batch) of a pipeline, the
// state both pipelines share: micro-batches, which are checkpointed, the
// random seed, targets and loss weights, per-cell autograd state, outputs
// and input gradients; and the step-level operations on it (scatter, loss
// weights, gather of outputs and gradients).

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/ThreadLocalState.h>

#include <pipegear/checkpoint.h>
#include <pipegear/detail/copy.h>
#include <pipegear/loss.h>
#include <pipegear/microbatch.h>
#include <pipegear/trace.h>

namespace pipegear::detail {

/// Floating or complex: a tensor that can require a gradient.
bool can_require_grad(const torch::Tensor& t);

// What a split backward's B keeps for its W (cells.cpp).
struct WeightGrads;

// The autograd-relevant state of one (stage, micro-batch).
struct CellState {
  Batch leaves;   // the stage input, as leaves (kept alone when checkpointed)
  Batch outputs;  // outputs with their graph (absent while checkpointed)
  bool checkpointed = false;
  // Between a B and its W: the parts of the graph the weight gradients
  // still need, with the gradients B left at their door.
  std::shared_ptr<WeightGrads> weight_grads;
};

// Everything one step (one mini-batch) needs across its passes. Module style
// keeps it alive from the fill pass to the drain pass in the autograd node.
struct StepRun {
  int64_t stages = 0;
  int64_t micro_batches = 0;
  std::vector<int64_t> sizes;
  bool grad = false;  // graphs are kept for a backward
  uint64_t rng_seed = 0;  // the step's seed (random.h)
  at::ThreadLocalState tls;
  std::vector<uint8_t> checkpointed;  // per micro-batch

  std::vector<Batch> inputs;   // stage-0 micro-batches
  // On an accelerator: recorded on the caller's stream after the input was
  // made; stage 0's cells wait for it (see scatter_input).
  std::shared_ptr<ReadyEvent> input_ready;
  std::vector<Batch> targets;  // step style
  const LossFn* loss_fn = nullptr;
  std::vector<double> loss_weights;

  std::vector<std::vector<CellState>> cells;  // [stage][micro-batch]
  std::vector<Batch> outputs;                 // last stage, per micro-batch
  std::vector<torch::Tensor> losses;          // step style, detached
  std::vector<Batch> output_grads;            // module style drain input
  std::vector<Batch> input_grads;             // stage 0's, per micro-batch

  std::vector<std::vector<TraceEvent>> events;  // per stage, worker-owned
};

/// Splits `input` into `run.inputs` (at most `chunks` micro-batches) and,
/// when it lives on an accelerator, records `run.input_ready` on the
/// calling thread's current stream of that device, so that stage 0's worker
/// (on its own stream) never reads an input the caller's stream is still
/// computing. Returns the micro-batch sizes.
std::vector<int64_t> scatter_input(StepRun& run, const Batch& input,
                                   int64_t chunks);

/// Stage 0's input gradients of all micro-batches, concatenated per input
/// position (undefined where some micro-batch has none).
Batch gather_input_grads(const StepRun& run);

/// Step style: sends the gathered input gradients on into the graph of
/// `input` (the caller's tensors that require a gradient).
void backward_into_input(const Batch& input, const StepRun& run);

/// Step style: the mini-batch loss, sum over micro-batches of loss x weight.
torch::Tensor weighted_loss(const StepRun& run);

/// Sizes the per-step state for `sizes.size()` micro-batches of K stages,
/// decides which micro-batches are checkpointed (only when `grad`) and
/// draws the step's random seed from the calling thread's generator.
/// `training` false (an eval-mode module): the seed is drawn without
/// advancing the caller's generator (draw_step_seed).
void prepare_run(StepRun& run, int64_t stages, std::vector<int64_t> sizes,
                 bool grad, CheckpointMode mode, const at::ThreadLocalState& tls,
                 bool training = true);

/// The checkpoint mode of a call: `mode`, or kNever for an eval-mode module.
inline CheckpointMode call_checkpoint(CheckpointMode mode, bool training) {
  return training ? mode : CheckpointMode::kNever;
}

/// Step style, on the rank or thread holding the target: splits `target`
/// like the input (its batch size must equal the input's) and weighs the
/// micro-batch losses as `options` say (StepOptions). ValueError for a
/// count with kSum, a count that is negative or not finite.
void prepare_loss(StepRun& run, const Batch& target, const LossFn& loss_fn,
                  const StepOptions& options);

/// Module style, the drain: splits the gradients of the gathered outputs
/// into `run.output_grads`, per micro-batch (an undefined gradient stays
/// undefined in every micro-batch).
void split_output_grads(StepRun& run, const Batch& grads);

} // namespace pipegear::detail
