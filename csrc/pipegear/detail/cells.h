#pragma once
// Internal (never installed): the logic of one stage's cells, shared by the
// in-process engine (engine.cpp, mailboxes between worker threads) and the
// distributed pipeline (distributed/, c10d point-to-point): forward,
// checkpointing and recomputation, the cell's random streams, the loss on
// the last stage, backward. A Transport says where a cell's input comes
// from and where its output goes.

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <pipegear/detail/copy.h>
#include <pipegear/detail/step.h>
#include <pipegear/schedule.h>
#include <pipegear/stage.h>

namespace pipegear::detail {

int64_t now_ns();

/// The index of the stage whose cell this thread is running, -1 outside a
/// cell (set by CellRunner::run). Autograd runs a CPU graph on the thread
/// that called backward, so hooks of CPU parameters can tell which stage's
/// backward they are in (tied parameters of the C++ GPipe, gpipe.cpp).
int64_t running_stage();

// Thrown inside a worker when another cell failed: unwinds quietly.
struct Aborted {};

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
  // Skip connections (StageSkips): skip `id` of micro-batch j goes straight
  // from the stashing stage to the popping one, its gradient straight
  // back. A transport without skips refuses them.
  /// The tensor of skip `id` for micro-batch j, for its popping stage.
  virtual Message recv_skip(int64_t id, int64_t j);
  virtual void send_skip(int64_t id, int64_t j, Message m);
  /// The gradient of skip `id` of micro-batch j, for its stashing stage.
  virtual Message recv_skip_grad(int64_t id, int64_t j);
  virtual void send_skip_grad(int64_t id, int64_t j, Message m);
};

/// How errors name each of a pipeline's skips: "skip 'name' (stashed by
/// <unit> a, popped by <unit> b)", by id. `names` by id (empty or missing:
/// the id), `from`/`to` the stashing and popping stage or rank (-1: unknown).
std::vector<std::string> skip_labels(const std::vector<std::string>& names,
                                     const std::vector<int64_t>& from,
                                     const std::vector<int64_t>& to,
                                     const std::string& unit);

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
  /// B of a split backward: the gradients of the stage input only (sent
  /// on as backward() sends them), keeping in the cell what W needs.
  void backward_input(StepRun& run, Transport& transport, int64_t j);
  /// W of a split backward: the parameters' gradients from what B kept,
  /// then frees the cell.
  void backward_weight(StepRun& run, int64_t j);

  /// How errors name skip `id` (the name, the stages it joins), by id;
  /// without one a skip is "skip <id>".
  void set_skip_labels(std::vector<std::string> labels) {
    skip_labels_ = std::move(labels);
  }

  Stage& stage() { return *stage_; }
  const std::shared_ptr<Stage>& stage_ptr() const { return stage_; }
  int64_t index() const { return index_; }

 private:
  bool is_last(const StepRun& run) const { return index_ + 1 == run.stages; }
  Batch apply(StepRun& run, int64_t j, const Batch& x);
  // `shared`: per tensor of x, the skip it shares memory with or -1;
  // `ran`: the tensors the stage's layers got (x or a copy of it).
  Batch apply_checkpointed(StepRun& run, int64_t j, const Batch& x,
                           const std::vector<int64_t>& shared, Batch& ran);
  // ValueError when the forward modified in place (versions differ from
  // `before`) a tensor of `ran` that shares memory with a skip.
  void check_shared_unmodified(const Batch& ran,
                               const std::vector<int64_t>& before,
                               const std::vector<int64_t>& shared, int64_t j) const;
  std::string skip_label(int64_t id) const;
  std::vector<int64_t> outgoing_shared(const Batch& y, const Batch& ran,
                                       const std::vector<int64_t>& shared) const;
  // Skips (StageSkips): a stage's popped skips are extra leaves after its
  // input, its stashed skips extra outputs after its output; these move
  // them between the cell's Batch and the transport.
  Batch call_stage(const Batch& x, std::vector<torch::Tensor>& stashed);
  void receive_popped(Transport& transport, int64_t j, Batch& x,
                      std::vector<int64_t>& shared);
  void send_stashed(Transport& transport, int64_t j, Batch& y,
                    std::vector<int64_t>& shared);
  void receive_stash_grads(Transport& transport, int64_t j, Batch& grads);
  void send_pop_grads(Transport& transport, int64_t j, Batch& input_grads);
  // The first half of a backward (whole, or B): recomputes a checkpointed
  // cell (its trace event as `phase`), receives the output gradients (the
  // stashed skips' too); returns the outputs that take one, with their
  // gradients; `start`: when the wait for them ended.
  std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>>
  output_gradients(StepRun& run, Transport& transport, int64_t j,
                   int64_t& start, Phase phase);
  // The last half: the leaves' gradients, sent to the previous stage (or
  // kept as the input's), the popped skips' to their stashing stage.
  static Batch leaf_grads(const Batch& leaves);
  void send_input_grads(StepRun& run, Transport& transport, int64_t j,
                        Batch input_grads);
  int64_t stream_key() const;

  std::shared_ptr<Stage> stage_;
  int64_t index_;
  Copier copier_;
  // Whether a checkpointed forward must run on a copy of its input (the
  // stage's layers modify it in place); learnt from the stage's first
  // checkpointed forward, which always runs on a copy.
  bool probed_input_ = false;
  bool copy_input_ = false;
  std::vector<std::string> skip_labels_;
};

} // namespace pipegear::detail
