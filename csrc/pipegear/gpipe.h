#pragma once

#include <memory>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>

#include <pipegear/engine.h>

namespace pipegear {

struct GPipeOptions {
  /* implicit */ GPipeOptions(std::vector<int64_t> balance)
      : balance_(std::move(balance)) {}

  /// Layers per stage; sums to the number of layers of the Sequential.
  TORCH_ARG(std::vector<int64_t>, balance);
  /// Device of stage i. Empty: cuda:0..K-1 when CUDA is available, else cpu
  /// for every stage. Stages may share a device.
  TORCH_ARG(std::vector<c10::Device>, devices) = {};
  /// Micro-batches per mini-batch (M).
  TORCH_ARG(int64_t, chunks) = 1;
  TORCH_ARG(CheckpointMode, checkpoint) = CheckpointMode::kExceptLast;
  /// Replace BatchNorm layers by DeferredBatchNorm (running statistics of
  /// the whole mini-batch).
  TORCH_ARG(bool, deferred_batch_norm) = false;
  TORCH_ARG(ScheduleKind, schedule) = ScheduleKind::kGPipe;
  /// Intra-op threads per CPU stage worker; 0 splits them evenly.
  TORCH_ARG(int64_t, worker_threads) = 0;
};

/// GPipe pipeline parallelism over a torch::nn::Sequential (arXiv 1811.06965).
/// The layers are split into K = balance.size() contiguous stages, stage i is
/// placed on devices[i] and registered as `partitions[i]`, so parameters(),
/// train()/eval(), zero_grad(), serialization and torch::optim work as on any
/// module. Do not move the pipeline with to() afterwards: its stages are
/// placed.
///
///   auto pipe = pipegear::GPipe(model, pipegear::GPipeOptions({2, 2}).chunks(4));
///   auto y = pipe->forward(x);                  // module style
///   torch::mse_loss(y, t).backward();
///   auto loss = pipe->step(x, t, torch::mse_loss);  // step style
class GPipeImpl : public torch::nn::Module {
 public:
  GPipeImpl(torch::nn::Sequential module, GPipeOptions options);

  /// Module style on one tensor: the output of the last stage, on its device.
  torch::Tensor forward(torch::Tensor input);
  /// Module style on a tuple of tensors.
  Batch forward_batch(const Batch& input);

  /// Step style: loss_fn(output, target) per micro-batch on the last stage,
  /// forward and backward of the whole schedule; returns the mini-batch
  /// loss. Gradients equal those of loss_fn(model(input), target).
  torch::Tensor step(torch::Tensor input, torch::Tensor target,
                     std::function<torch::Tensor(torch::Tensor, torch::Tensor)>
                         loss_fn,
                     LossReduction reduction = LossReduction::kMean);

  const GPipeOptions& options() const { return options_; }
  const std::vector<int64_t>& balance() const { return options_.balance(); }
  const std::vector<c10::Device>& devices() const { return devices_; }
  const torch::nn::ModuleList& partitions() const { return partitions_; }
  /// The timeline of the last step.
  Trace last_trace() const { return engine_->last_trace(); }
  /// The schedule the engine runs for `micro_batches`, as an ASCII table.
  std::string schedule_table(int64_t micro_batches) const;
  Engine& engine() { return *engine_; }

 private:
  GPipeOptions options_;
  std::vector<c10::Device> devices_;
  torch::nn::ModuleList partitions_;
  std::unique_ptr<Engine> engine_;
};

TORCH_MODULE(GPipe);

/// Checks a balance for a model of `layers` layers: non-empty, entries >= 1,
/// summing to `layers`. Throws ValueError with the numbers.
void check_balance(const std::vector<int64_t>& balance, int64_t layers);

} // namespace pipegear
