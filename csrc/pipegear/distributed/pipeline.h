#pragma once
// GPipe across processes: one stage per rank of a c10d ProcessGroup, the
// activations and gradients exchanged with point-to-point send/recv. See
// docs/distributed.md.

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>

#include <pipegear/checkpoint.h>
#include <pipegear/distributed/options.h>
#include <pipegear/engine.h>
#include <pipegear/stage.h>
#include <pipegear/trace.h>

namespace pipegear {

/// Builds one layer; only the factories of this rank's stage are called, so
/// no process materialises the whole model.
using LayerFactory = std::function<torch::nn::AnyModule()>;

namespace detail {
class DistributedCore;
} // namespace detail

/// One rank's share of a pipeline: rank r of the group runs stage r of K =
/// world size (interleaved schedules: stages r, r + K, ... of K * v), on the
/// calling thread, with the cell logic of the in-process engine
/// (checkpointing, recomputation, DeferredBatchNorm hooks).
///
/// Step style (every rank calls it; rank 0 passes the input, the last rank
/// the target and the loss; others pass empty batches):
///
///   auto pg = pipegear::init_process_group_from_env();   // torchrun's env
///   DistributedPipeline pipe(pg, model, DistributedOptions().balance({2, 2})
///                                           .chunks(4));
///   auto loss = pipe.step(first ? Batch{x} : Batch{},
///                         last ? Batch{t} : Batch{}, loss_fn);
///
/// Module style (fill/drain schedule only):
///
///   Batch y = pipe.forward(first ? Batch{x} : Batch{});
///   if (last) loss_fn(y, {t}).backward();  // y: the model's output
///   else y[0].backward();                  // y: a placeholder scalar
///
/// A failure on one rank (an exception, a timeout, a peer that died) makes
/// every rank's call throw: the failing rank sends the peers waiting for it
/// a "poison" message carrying its error, so they fail at once, then
/// receives and discards what it is still owed. After an exception raised by
/// a layer or a loss (the transport is intact) the next step runs normally;
/// after a timeout or a lost connection the pipeline refuses further steps
/// (broken()): destroy the process group and restart.
class DistributedPipeline {
 public:
  /// This rank's stage, ready-made (any Stage implementation).
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      std::shared_ptr<Stage> stage,
                      DistributedOptions options = {});
  /// This rank's stages, ready-made, one per virtual stage
  /// (options.virtual_stages() of them): stages[c] is stage c * K + rank
  /// of the pipeline.
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      std::vector<std::shared_ptr<Stage>> stages,
                      DistributedOptions options);
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      std::shared_ptr<Stage> stage, EngineOptions options,
                      std::chrono::milliseconds timeout =
                          std::chrono::seconds(30));
  /// The whole model: only this rank's slice (balance[rank] layers, named
  /// by their index in `model`; interleaved, the slices of its stages
  /// rank, rank + K, ...) is kept, moved to the device and run. Skip
  /// connections (skip.h) between ranks are routed from the whole model
  /// (skip_layout; TypeError when they do not match).
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      const torch::nn::Sequential& model,
                      DistributedOptions options);
  /// One factory per layer: only this rank's are called.
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      const std::vector<LayerFactory>& layers,
                      DistributedOptions options);
  /// One replica of R on a pp x dp mesh (docs/distributed.md, "Replicas"):
  /// `group` runs this replica's pipeline (rank r = stage r), `dp_group`
  /// holds the ranks running this rank's stage in every replica (replica
  /// d = rank d; see init_mesh_from_env). Replica 0's parameters and
  /// buffers are broadcast at construction; step() returns the loss of
  /// the global batch (every replica's), the step's gradients summed over
  /// the replicas (started after this rank's last backward cell, in
  /// buckets of `bucket_bytes`), and raises on every rank of the mesh when
  /// any fails. Step style only.
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      c10::intrusive_ptr<c10d::ProcessGroup> dp_group,
                      const std::vector<LayerFactory>& layers,
                      DistributedOptions options,
                      int64_t bucket_bytes = int64_t{25} << 20);
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      c10::intrusive_ptr<c10d::ProcessGroup> dp_group,
                      const torch::nn::Sequential& model,
                      DistributedOptions options,
                      int64_t bucket_bytes = int64_t{25} << 20);
  /// A ready-made stage as a replica: `parameters` and `buffers` are the
  /// stage's (what the replicas make equal and sum the gradients of).
  DistributedPipeline(c10::intrusive_ptr<c10d::ProcessGroup> group,
                      c10::intrusive_ptr<c10d::ProcessGroup> dp_group,
                      std::shared_ptr<Stage> stage,
                      std::vector<torch::Tensor> parameters,
                      std::vector<torch::Tensor> buffers, DistributedOptions options,
                      int64_t bucket_bytes = int64_t{25} << 20);
  ~DistributedPipeline();
  DistributedPipeline(const DistributedPipeline&) = delete;
  DistributedPipeline& operator=(const DistributedPipeline&) = delete;

  /// Step style: this rank's row of the schedule (forward and backward
  /// cells) on the calling thread. `input` is used on rank 0, `target` and
  /// `loss_fn` on the last rank. Parameter gradients accumulate in this
  /// rank's stage; input gradients flow back to `input` on rank 0. Returns
  /// the mini-batch loss (detached) on every rank. Batch size, shapes and
  /// dtypes may change from one step to the next.
  torch::Tensor step(const Batch& input, const Batch& target,
                     const LossFn& loss_fn, const StepOptions& options = {});
  torch::Tensor step(const Batch& input, const Batch& target,
                     const LossFn& loss_fn, LossReduction reduction) {
    return step(input, target, loss_fn, StepOptions().reduction(reduction));
  }

  /// Takes part in a step that this rank cannot run because of a mistake
  /// found before it (its target or loss do not fit, say): every rank's
  /// step() throws at once, before any cell runs, and the group stays
  /// usable. This rank throws `error` itself; the others throw naming this
  /// rank and `error`'s message. Call it where step() would be called.
  [[noreturn]] void fail_step(std::exception_ptr error);
  /// The same in module style, where forward() would be called.
  [[noreturn]] void fail_forward(std::exception_ptr error);

  /// Module style, fill pass: every rank calls it, `input` is used on rank
  /// 0. The last rank gets the gathered output; the other ranks get one
  /// placeholder scalar (zero). With grad mode on, both hang off one
  /// autograd node whose backward runs this rank's drain pass: the last rank
  /// calls backward on its loss, the others on the placeholder (or call
  /// backward()). Every rank must run the drain before the next forward.
  /// `training` false (eval mode) checkpoints nothing on this rank.
  Batch forward(const Batch& input, bool training = true);

  /// Runs the drain of the last forward on a rank other than the last
  /// (backward on the placeholder it returned). Throws on the last rank.
  void backward();

  int64_t rank() const;
  int64_t world_size() const;
  /// This rank's replica and the number of replicas (0 and 1 without).
  int64_t replica() const;
  int64_t replicas() const;
  bool is_first() const { return rank() == 0; }
  bool is_last() const { return rank() + 1 == world_size(); }
  const DistributedOptions& options() const;
  std::chrono::milliseconds timeout() const { return options().timeout(); }
  /// This rank's stage (its first, when it runs several).
  const std::shared_ptr<Stage>& stage() const;
  /// This rank's stages, one per virtual stage.
  const std::vector<std::shared_ptr<Stage>>& stages() const;
  /// This rank's slice, all its stages' layers (Sequential and factory
  /// constructors; null otherwise). Its parameters() are what this rank's
  /// optimizer updates.
  torch::nn::Sequential module() const;
  /// Called on the calling thread in every step with a graph, as soon as
  /// this rank's last backward cell has run (its parameters' gradients of
  /// the step are complete) while the other ranks may still drain: where a
  /// data-parallel reduction of this stage's gradients starts (replicas).
  /// If it throws, this rank's step fails (on every rank). Empty: none.
  void set_after_backward(std::function<void()> hook);
  /// Called on the calling thread just before this rank's last backward
  /// cell of a step with a graph: from then on every gradient accumulated
  /// into a parameter is its last of the step (a reduction may start
  /// bucket by bucket within the cell). Empty: none.
  void set_before_last_backward(std::function<void()> hook);
  /// True after a failure that left the transport in an unknown state.
  bool broken() const;
  /// This rank's cells of the last step (TraceEvent::stage: the
  /// pipeline's stage, the rank unless interleaved), by start time.
  std::vector<TraceEvent> last_events() const;

 private:
  std::shared_ptr<detail::DistributedCore> core_;
};

/// This rank's groups of a pp x dp mesh (init_mesh_from_env).
struct MeshGroups {
  c10::intrusive_ptr<c10d::ProcessGroup> pp;  // this replica's pipeline
  c10::intrusive_ptr<c10d::ProcessGroup> dp;  // this stage's replicas
  int64_t replica = 0;
  int64_t replicas = 1;
  int64_t stage = 0;
};

/// The groups of replicas of a `stages`-stage pipeline from torchrun's
/// environment: global rank g is replica g / stages, stage g % stages
/// (WORLD_SIZE must be a multiple of stages). Each rank makes only its own
/// two groups, over one TCPStore served by rank 0.
MeshGroups init_mesh_from_env(int64_t stages, const std::string& backend = "gloo",
                              std::chrono::milliseconds timeout =
                                  std::chrono::seconds(60));

/// Creates a process group from torchrun's environment (RANK, WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT): a TCPStore served by rank 0 and a Gloo
/// backend ("gloo"), or NCCL ("nccl", only in builds of torch with NCCL).
/// GLOO_SOCKET_IFNAME picks the network interface, as in torch.
c10::intrusive_ptr<c10d::ProcessGroup> init_process_group_from_env(
    const std::string& backend = "gloo",
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

} // namespace pipegear
