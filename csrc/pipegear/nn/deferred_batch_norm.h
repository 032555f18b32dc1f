#pragma once

#include <cstdint>
#include <optional>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

namespace pipegear {

/// What a DeferredBatchNorm gathers over the micro-batches of one step: the
/// per-channel sum and sum of squares of its inputs (detached, float64) and
/// the number of elements per channel. Shared by the C++ module and the
/// Python one (pipegear.batchnorm.DeferredBatchNorm holds one as `_stats`).
struct DeferredBatchNormStats {
  torch::Tensor sum;          ///< (C,) float64; undefined while empty
  torch::Tensor sum_squares;  ///< (C,) float64; undefined while empty
  int64_t count = 0;          ///< elements per channel accumulated so far
  int64_t micro_batches = 0;  ///< micro-batches accumulated so far

  bool empty() const { return micro_batches == 0; }
  /// Drops everything accumulated.
  void reset();
};

/// The normalisation of a DeferredBatchNorm as a function.
///
/// training: normalises `input` (N, C, *) with its own batch statistics (no
/// running statistics are passed to torch::batch_norm, so the gradients are
/// those of BatchNorm on this micro-batch) and, unless `is_recomputing()`,
/// adds the input's statistics to `stats`. Not training: normalises with
/// `running_mean` / `running_var` and leaves `stats` alone.
/// `weight` and `bias` may be undefined (affine=false). Throws ValueError for
/// an input that is not 2D to 5D, whose channels differ from running_mean's,
/// or that has a single value per channel in training.
torch::Tensor deferred_batch_norm_forward(const torch::Tensor& input,
                                          const torch::Tensor& weight,
                                          const torch::Tensor& bias,
                                          const torch::Tensor& running_mean,
                                          const torch::Tensor& running_var,
                                          DeferredBatchNormStats& stats,
                                          bool training,
                                          double eps);

/// Folds the statistics of `stats` into the running statistics, in place, as
/// BatchNorm does for one mini-batch: num_batches_tracked += 1, factor =
/// momentum or 1 / num_batches_tracked (cumulative average) when nullopt,
/// running_mean = (1 - factor) running_mean + factor mean, and likewise
/// running_var with the unbiased variance. Then resets `stats`. Returns
/// false, changing nothing, when `stats` is empty.
bool deferred_batch_norm_commit(DeferredBatchNormStats& stats,
                                torch::Tensor& running_mean,
                                torch::Tensor& running_var,
                                torch::Tensor& num_batches_tracked,
                                std::optional<double> momentum);

/// Options of DeferredBatchNorm: those of torch::nn::BatchNormOptions (always
/// tracking running statistics) plus `chunks`, the number of micro-batches
/// of a step.
struct DeferredBatchNormOptions {
  /* implicit */ DeferredBatchNormOptions(int64_t num_features)
      : num_features_(num_features) {}

  /// C in an input of shape (N, C, *).
  TORCH_ARG(int64_t, num_features);
  TORCH_ARG(double, eps) = 1e-5;
  /// nullopt: cumulative moving average, as torch::nn::BatchNorm.
  TORCH_ARG(std::optional<double>, momentum) = 0.1;
  TORCH_ARG(bool, affine) = true;
  /// The statistics are committed by themselves after this many training
  /// micro-batches (so the module also works outside the engine).
  TORCH_ARG(int64_t, chunks) = 1;
};

/// BatchNorm whose running statistics are those of the whole mini-batch,
/// not of each micro-batch (torchgpipe's DeferredBatchNorm, arXiv 2004.09910
/// section 4.4).
///
/// In training, each micro-batch is normalised with its own statistics, as
/// a plain BatchNorm run on that micro-batch would; the running statistics
/// are updated once per step, from statistics accumulated over all the
/// step's micro-batches, so after any number of steps they equal those of a
/// torch::nn::BatchNorm fed the whole mini-batches. Recomputations of a
/// checkpointed forward (is_recomputing()) accumulate nothing.
///
/// Standalone, the statistics are committed after `chunks` micro-batches.
/// Inside a pipeline (a SequentialStage turns auto_commit off) the engine
/// calls reset_accumulated() before the first forward cell of a step and
/// commit() once the forward cells of every stage succeeded, so a failed
/// step commits nothing and a step with fewer micro-batches still commits. Parameters and buffers are
/// named as torch::nn::BatchNorm's, so their state dicts match.
///
///   auto bn = pipegear::DeferredBatchNorm(
///       pipegear::DeferredBatchNormOptions(16).chunks(4));
///   for (auto& part : x.chunk(4)) y.push_back(bn(part));  // one commit
class DeferredBatchNormImpl
    : public torch::nn::Cloneable<DeferredBatchNormImpl> {
 public:
  explicit DeferredBatchNormImpl(DeferredBatchNormOptions options);
  DeferredBatchNormImpl(int64_t num_features)
      : DeferredBatchNormImpl(DeferredBatchNormOptions(num_features)) {}

  /// (Re)creates the parameters and buffers from the options.
  void reset() override;
  /// weight = 1, bias = 0, running statistics and counters zeroed.
  void reset_parameters();
  void reset_running_stats();

  /// See the class comment; input of shape (N, C), (N, C, L), (N, C, H, W)
  /// or (N, C, D, H, W).
  torch::Tensor forward(const torch::Tensor& input);

  /// Folds the accumulated statistics into the running ones; a no-op when
  /// nothing was accumulated. Returns whether it committed.
  bool commit();
  /// Drops the statistics accumulated since the last commit.
  void reset_accumulated();
  /// Micro-batches accumulated since the last commit.
  int64_t accumulated_micro_batches() const { return stats_.micro_batches; }
  /// Whether forward() commits by itself after `chunks` micro-batches
  /// (default true); a pipeline stage turns it off and commits itself.
  bool auto_commit() const { return auto_commit_; }
  void set_auto_commit(bool on) { auto_commit_ = on; }

  void pretty_print(std::ostream& stream) const override;

  DeferredBatchNormOptions options;
  torch::Tensor weight;
  torch::Tensor bias;
  torch::Tensor running_mean;
  torch::Tensor running_var;
  torch::Tensor num_batches_tracked;

 private:
  DeferredBatchNormStats stats_;
  bool auto_commit_ = true;
};

TORCH_MODULE(DeferredBatchNorm);

/// A copy of `module` in which every torch::nn::BatchNorm1d/2d/3d that
/// tracks running statistics is replaced by a DeferredBatchNorm with the
/// same parameters, buffers, eps, momentum, device, dtype and training mode.
/// The other layers are shared, not copied; names are kept. Top level only:
/// a torch::nn::Sequential cannot hold another (its forward is a template),
/// and layers inside custom modules are left alone.
///
///   auto pipe_model = pipegear::convert_deferred_batch_norm(model, 4);
torch::nn::Sequential convert_deferred_batch_norm(
    const torch::nn::Sequential& module,
    int64_t chunks = 1);

} // namespace pipegear
