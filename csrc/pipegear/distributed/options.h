#pragma once
// The options of a distributed pipeline (DistributedPipeline, pipeline.h).
// A header of their own so that the pipeline's internal layers
// (distributed/detail/) read them without the executor's header.

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

#include <c10/core/Device.h>
#include <torch/arg.h>

#include <pipegear/checkpoint.h>
#include <pipegear/schedule.h>

namespace pipegear {

struct DistributedOptions {
  /// Layers per stage: K * v entries for K ranks and v = virtual_stages
  /// (stage s runs on rank s % K). Required by the Sequential and factory
  /// constructors; with ready-made stages it is optional and only checked
  /// for agreement between ranks.
  TORCH_ARG(std::vector<int64_t>, balance) = {};
  /// Micro-batches per mini-batch (M); a smaller batch gives fewer.
  TORCH_ARG(int64_t, chunks) = 1;
  TORCH_ARG(CheckpointMode, checkpoint) = CheckpointMode::kExceptLast;
  /// kGPipe serves both faces; the others only step().
  TORCH_ARG(ScheduleKind, schedule) = ScheduleKind::kGPipe;
  /// Stages per rank (v): rank r runs stages r, r + K, ..., r + (v-1)K of
  /// the K * v, each a slice of its own (interleaved schedules only, Gloo
  /// only, 2 ranks or more, no skip connections).
  TORCH_ARG(int64_t, virtual_stages) = 1;
  /// Replace BatchNorm layers of this rank's slice by DeferredBatchNorm
  /// (Sequential and factory constructors).
  TORCH_ARG(bool, deferred_batch_norm) = false;
  /// Where this rank's slice runs (Sequential and factory constructors).
  /// Default: cpu for Gloo, the current CUDA device for NCCL.
  TORCH_ARG(std::optional<c10::Device>, device) = std::nullopt;
  /// Bound of every wait for a peer within a step (activations, gradients,
  /// the loss, the end of a pass): a peer that died or hangs makes the call
  /// throw after at most this long instead of blocking forever.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(30);
  /// Bound of the wait for the other ranks to start the next step: between
  /// steps a rank may be busy for long (saving a checkpoint, evaluating,
  /// loading data) while the others wait. The default is torch's default
  /// timeout of a process group (30 min); a rank that does not come within
  /// it is taken as lost, and the others throw.
  TORCH_ARG(std::chrono::milliseconds, idle_timeout) = std::chrono::minutes(30);
  /// Skip connections between ranks (docs/skip.md): for skip id i,
  /// elements 2i and 2i + 1 are the rank that stashes it and the rank that
  /// pops it (the Python face works them out from the layers). Every rank
  /// passes the same list; the stage's skips() use these ids.
  TORCH_ARG(std::vector<int64_t>, skip_routes) = {};
};

} // namespace pipegear
