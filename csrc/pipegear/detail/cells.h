#pragma once
// Internal (never installed): the logic of one stage's cells, shared by the
// in-process engine (engine.cpp, mailboxes between worker threads) and the
// distributed pipeline (distributed/, c10d point-to-point). A Transport says
// where a cell's input comes from and where its output goes.

#include <memory>
#include <unordered_map>
#include <vector>

#include <ATen/ThreadLocalState.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/util/intrusive_ptr.h>

#include <pipegear/engine.h>

namespace pipegear::detail {

int64_t now_ns();
bool can_require_grad(const torch::Tensor& t);

// Thrown inside a worker when another cell failed: unwinds quietly.
struct Aborted {};

// What one stage hands to the next: tensors plus, on an accelerator, the
// event after which they are ready.
struct Message {
  Batch tensors;
  std::shared_ptr<c10::Event> ready;
};

// The autograd-relevant state of one (stage, micro-batch).
struct CellState {
  Batch leaves;   // the stage input, as leaves (kept alone when checkpointed)
  Batch outputs;  // outputs with their graph (absent while checkpointed)
  bool checkpointed = false;
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
  std::shared_ptr<c10::Event> input_ready;
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


/// A module-style step between its fill and its drain, held by the autograd
/// node that stands for the pipeline (or, distributed, for this rank's share).
struct PendingStep : c10::intrusive_ptr_target {
  /// The fill: the outputs of the node.
  virtual Batch fill() = 0;
  /// The drain, given the gradients of those outputs: the gradients of the
  /// node's `inputs`, in order (undefined where none). Called at most once.
  virtual Batch drain(const Batch& grads) = 0;
};

/// Runs `step->fill()` as the forward of one autograd node and returns its
/// outputs; the node's backward runs `step->drain()`. The node depends on
/// `inputs` and on a requires-grad scalar, so it is part of the graph even
/// when only parameters need gradients. A second backward is a clear error.
Batch apply_pipeline_node(c10::intrusive_ptr<PendingStep> step,
                          const Batch& inputs);

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
void prepare_run(StepRun& run, int64_t stages, std::vector<int64_t> sizes,
                 bool grad, CheckpointMode mode, const at::ThreadLocalState& tls);

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

/// Where the cells of stage s get their inputs and send their outputs.
/// recv_* block until the message arrives (or throw Aborted / a timeout).
class Transport {
 public:
  virtual ~Transport() = default;
  /// The input of F(s, j), s > 0.
  virtual Message recv_forward(int64_t s, int64_t j) = 0;
  /// The output of F(s, j), for stage s + 1.
  virtual void send_forward(int64_t s, int64_t j, Message m) = 0;
  /// The gradients of the outputs of (s, j), s < K - 1.
  virtual Message recv_backward(int64_t s, int64_t j) = 0;
  /// The gradients of the inputs of (s, j), for stage s - 1.
  virtual void send_backward(int64_t s, int64_t j, Message m) = 0;
};

/// Runs the cells of one stage: forward (checkpointed or not), backward
/// (with recomputation), device copies, trace events. Not thread-safe: one
/// thread runs a stage's cells.
class CellRunner {
 public:
  CellRunner(std::shared_ptr<Stage> stage, int64_t index)
      : stage_(std::move(stage)), index_(index) {}

  /// Runs cells[i] if the pass includes its phase, with the stage's
  /// begin_forward hook before its first forward cell. Exceptions
  /// propagate; a c10::Error gets the stage and micro-batch.
  void run(StepRun& run, Transport& transport, const std::vector<Cell>& cells,
           size_t i, bool forward, bool backward);
  /// The stage's end_forward hook (DeferredBatchNorm commits), on the
  /// stage's device. Called once per step by the owner of the pass, and
  /// only when every stage's forward cells succeeded: a failed step must
  /// leave running statistics as they were, whatever the timing of the
  /// failure.
  void end_forward();
  void forward(StepRun& run, Transport& transport, int64_t j);
  void backward(StepRun& run, Transport& transport, int64_t j);

  Stage& stage() { return *stage_; }
  const std::shared_ptr<Stage>& stage_ptr() const { return stage_; }
  int64_t index() const { return index_; }
  /// Copies a tensor onto `dst` on this runner's copy stream, ordered after
  /// `ready` (device-generic; plain on CPU).
  torch::Tensor copy_to(const torch::Tensor& t, c10::Device dst,
                        const std::shared_ptr<c10::Event>& ready);
  /// An event recorded on the calling thread's current stream of
  /// `device`; null on the CPU.
  static std::shared_ptr<c10::Event> record_ready(c10::Device device);
  /// Wraps outputs in a Message, with an event on accelerators.
  static Message make_message(Batch tensors, c10::Device device);

 private:
  bool is_last(const StepRun& run) const { return index_ + 1 == run.stages; }
  Batch apply(StepRun& run, int64_t j, const Batch& x);
  Batch apply_checkpointed(StepRun& run, int64_t j, const Batch& x);
  Batch receive(Message m, c10::Device device, bool as_leaves);
  int64_t stream_key() const;

  std::shared_ptr<Stage> stage_;
  int64_t index_;
  // Whether a checkpointed forward must run on a copy of its input (the
  // stage's layers modify it in place); learnt from the stage's first
  // checkpointed forward, which always runs on a copy.
  bool probed_input_ = false;
  bool copy_input_ = false;
  std::unordered_map<c10::Device, c10::Stream> copy_streams_;
};

} // namespace pipegear::detail
