#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

namespace pipegear {

/// What profile_layers() measured for one layer of a Sequential.
struct LayerProfile {
  /// Median wall time of the layer's forward, in seconds.
  double forward_seconds = 0.0;
  /// Median wall time of the backward through the layer (to its parameters
  /// and, past the first layer, its input), in seconds; 0 when the output
  /// needs no gradient.
  double backward_seconds = 0.0;
  /// Bytes of the layer's parameters (a parameter shared by two layers
  /// counts for both).
  int64_t parameter_bytes = 0;
  /// Bytes of the layer's output for the sample.
  int64_t activation_bytes = 0;
  /// Bytes of the skip tensors the layer stashes and pops (skip.h): a skip
  /// is held on the stage that stashes it and the stage that pops it only.
  int64_t skip_bytes = 0;
};

/// Options of profile_layers().
struct ProfileOptions {
  /// Where to profile; by default where the module's parameters are (the
  /// sample's device for a module without any).
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
  /// Measured rounds, after one warm-up round; each time is their median.
  TORCH_ARG(int64_t, repeats) = 5;
  /// Seconds after which no new round starts. The warm-up and the first
  /// measured round always run, so a single round longer than this is the
  /// only way to exceed it.
  TORCH_ARG(double, timeout) = 60.0;
};

/// Profiles every layer of `module` on `sample`, the layers one after the
/// other as in training: each takes the previous one's output, detached (so
/// that a backward stops at its layer) and requiring a gradient if floating
/// point (the first takes the sample as it is). Each layer is timed in
/// training mode; on CUDA the device is synchronised around each timing.
///
/// The module is left as it was: a layer on the profiling device runs in
/// place and gets back its training flags, buffers (BatchNorm's running
/// statistics) and gradients (none are left behind, existing ones are kept);
/// parameters are not written, as no optimizer steps. A layer elsewhere
/// runs as a temporary `clone(device)`, which the torch::nn layers and any
/// torch::nn::Cloneable support; the sample is moved to the device.
///
/// Every layer must take and return one tensor. Throws ValueError for an
/// empty module, an undefined sample, repeats < 1, timeout <= 0, a layer
/// that cannot be cloned to the device, or a layer that throws (naming the
/// layer's index, name and type, with the original message).
///
///   auto profiles = pipegear::profile_layers(model, torch::randn({32, 128}),
///       pipegear::ProfileOptions().repeats(10));
std::vector<LayerProfile> profile_layers(
    torch::nn::Sequential module,
    const torch::Tensor& sample,
    const ProfileOptions& options = {});

/// Options of balance_by_time(); see ProfileOptions.
struct BalanceByTimeOptions {
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
  TORCH_ARG(int64_t, repeats) = 5;
  TORCH_ARG(double, timeout) = 60.0;
};

/// A balance of `module` into `partitions` stages by time: each layer costs
/// its profiled forward + backward time (profile_layers()), and
/// balance_by_cost() splits those costs exactly. Profile with a sample of
/// one micro-batch: that is what each stage runs at a time.
///
///   auto balance = pipegear::balance_by_time(4, model,
///                                            torch::randn({8, 128}));
///
/// Throws ValueError for partitions < 1 or more than the layers (before
/// profiling), and as profile_layers() does.
std::vector<int64_t> balance_by_time(
    int64_t partitions,
    torch::nn::Sequential module,
    const torch::Tensor& sample,
    const BalanceByTimeOptions& options = {});

/// Options of balance_by_size().
struct BalanceBySizeOptions {
  /// The sample is one mini-batch, split into this many micro-batches; one
  /// micro-batch's activations count.
  TORCH_ARG(int64_t, chunks) = 1;
  /// Bytes held per byte of parameter: 2 for plain SGD (weights and
  /// gradients), 3 with momentum, 4 to 5 for Adam.
  TORCH_ARG(double, param_scale) = 2.0;
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
};

/// A balance of `module` into `partitions` stages by memory: each layer
/// costs parameter_bytes * param_scale + the bytes of its output and of
/// the skips it stashes or pops (skip_bytes) for one
/// micro-batch of the sample (one forward, no timing, no gradients), and
/// balance_by_cost() splits those costs exactly.
///
/// Throws ValueError for partitions < 1 or more than the layers, chunks < 1,
/// a negative or non-finite param_scale, and as profile_layers() does.
std::vector<int64_t> balance_by_size(
    int64_t partitions,
    torch::nn::Sequential module,
    const torch::Tensor& sample,
    const BalanceBySizeOptions& options = {});

} // namespace pipegear
