#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include <pipegear/checkpoint.h>
#include <pipegear/loss.h>
#include <pipegear/microbatch.h>
#include <pipegear/schedule.h>
#include <pipegear/stage.h>
#include <pipegear/trace.h>

namespace pipegear {

/// A function the thread that waits for a pass (the caller of forward,
/// step or of the backward) runs every 50 ms: the Python bindings check
/// for pending signals there, so Ctrl-C raises KeyboardInterrupt. When it
/// throws, the step fails with that exception once the running cells end
/// (workers stop at their next cell). Process-wide; empty: none.
void set_interrupt_check(std::function<void()> check);

struct EngineOptions {
  /// Micro-batches per mini-batch (M); a smaller batch gives fewer.
  TORCH_ARG(int64_t, chunks) = 1;
  TORCH_ARG(CheckpointMode, checkpoint) = CheckpointMode::kExceptLast;
  /// kGPipe serves both faces; the others only `step` (they interleave
  /// phases).
  TORCH_ARG(ScheduleKind, schedule) = ScheduleKind::kGPipe;
  /// Stages per worker (v). Above 1 (takes_virtual_stages(schedule)), the
  /// K * v stages run on K workers, worker d running stages d, d + K, ...;
  /// those stages must share a device.
  TORCH_ARG(int64_t, virtual_stages) = 1;
  /// Intra-op threads of each CPU stage's worker; 0 splits the caller's
  /// at::get_num_threads() evenly between the CPU stages (at least 1 each).
  TORCH_ARG(int64_t, worker_threads) = 0;
};

namespace detail {
class EngineCore;
} // namespace detail

/// Executes schedules over K stages with one persistent worker thread per
/// stage (per v stages when interleaved; created once, joined by the
/// destructor). Model-agnostic: it runs
/// cells. Thread-safe: concurrent calls are serialised.
///
///   auto engine = std::make_shared<Engine>(stages, EngineOptions().chunks(4));
///   auto y = engine->forward({x});          // module style: y[0] has grad_fn
///   auto loss = engine->step({x}, {t}, fn); // step style: backward included
class Engine {
 public:
  Engine(std::vector<std::shared_ptr<Stage>> stages, EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  /// Module style. Runs the fill pass and returns the gathered outputs of
  /// the last stage, on its device. When a gradient is needed, the outputs
  /// hang off one autograd node whose backward runs the drain pass on the
  /// workers; input gradients flow back to `input`, parameter gradients
  /// accumulate in .grad. No-grad forwards keep no graph; `training` false
  /// (an eval-mode module) checkpoints nothing.
  Batch forward(const Batch& input, bool training = true);

  /// Step style. Runs the whole schedule with loss_fn applied per
  /// micro-batch on the last stage and returns the mini-batch loss
  /// (detached). `target` is split like `input` (it may be empty).
  torch::Tensor step(const Batch& input, const Batch& target,
                     const LossFn& loss_fn, const StepOptions& options = {});
  torch::Tensor step(const Batch& input, const Batch& target,
                     const LossFn& loss_fn, LossReduction reduction) {
    return step(input, target, loss_fn, StepOptions().reduction(reduction));
  }

  /// The timeline of the last completed step (forward and backward cells);
  /// one row per worker (an interleaved worker's stages share its row).
  Trace last_trace() const;

  int64_t num_stages() const;
  /// Worker threads: num_stages() / options().virtual_stages().
  int64_t num_workers() const;
  const EngineOptions& options() const;
  /// The schedule for `micro_batches` micro-batches.
  Schedule schedule(int64_t micro_batches) const;

 private:
  std::shared_ptr<detail::EngineCore> core_;
};

} // namespace pipegear
