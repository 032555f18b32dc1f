#pragma once
// GPipe across processes: one stage per rank of a c10d ProcessGroup, the
// activations and gradients exchanged with point-to-point send/recv.

#include <chrono>
#include <memory>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <pipegear/engine.h>
#include <pipegear/stage.h>
#include <pipegear/trace.h>

namespace pipegear {

namespace detail {
class C10dTransport;
} // namespace detail

/// One rank's share of a pipeline: rank r of the group runs stage r of K =
/// world size. Every rank calls step() with the same options; rank 0 passes
/// the input, the last rank the target (others pass empty batches).
///
///   DistributedPipeline pipe(pg, stage, EngineOptions().chunks(4));
///   auto loss = pipe.step(rank == 0 ? Batch{x} : Batch{},
///                         rank == K - 1 ? Batch{t} : Batch{}, loss_fn);
///
/// Every wait (header, activations, gradients, loss) is bounded by
/// `timeout`: a peer that died or hangs makes step() throw instead of
/// blocking forever. After such an error the group is unusable.
class DistributedPipeline {
 public:
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      std::shared_ptr<Stage> stage, EngineOptions options,
                      std::chrono::milliseconds timeout =
                          std::chrono::seconds(30));
  ~DistributedPipeline();
  DistributedPipeline(const DistributedPipeline&) = delete;
  DistributedPipeline& operator=(const DistributedPipeline&) = delete;

  /// Runs this rank's row of the schedule (forward and backward cells) on
  /// the calling thread. Parameter gradients accumulate in this rank's
  /// stage. Returns the mini-batch loss (detached) on every rank. Batch
  /// size, shapes and dtypes may change from one step to the next.
  torch::Tensor step(const Batch& input, const Batch& target,
                     const LossFn& loss_fn,
                     LossReduction reduction = LossReduction::kMean);

  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_; }
  const EngineOptions& options() const { return options_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  /// This rank's cells of the last step (stage = rank).
  const std::vector<TraceEvent>& last_events() const { return events_; }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  std::shared_ptr<Stage> stage_;
  EngineOptions options_;
  std::chrono::milliseconds timeout_;
  int64_t rank_;
  int64_t world_;
  std::vector<TraceEvent> events_;
};

} // namespace pipegear
