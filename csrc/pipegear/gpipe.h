#pragma once

#include <memory>
#include <vector>

#include <string>
#include <type_traits>

#include <torch/enum.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/loss.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/input-archive.h>

#include <pipegear/engine.h>

namespace pipegear {

/// StepOptions::count for a class-index target of a cross entropy or NLL
/// loss: the targets other than `ignore_index`, or the sum of `weight` over
/// them when class weights are given (what the mean divides by). A floating
/// (probability) target counts its rows.
LossCount count_class_targets(int64_t ignore_index, torch::Tensor weight = {});

/// The StepOptions that make a pipeline reduce like the torch::nn loss
/// module `loss`: ValueError for reduction kNone.
template <typename LossImpl>
StepOptions loss_step_options(const LossImpl& loss) {
  const std::string name = torch::enumtype::get_enum_name(loss.options.reduction());
  // torch's enum names: kMean, kSum, kBatchMean (KLDivLoss), kNone.
  TORCH_CHECK_VALUE(name == "kMean" || name == "kSum" || name == "kBatchMean",
                    "a pipeline needs a loss that reduces to a scalar; the "
                    "loss module's reduction is ", name);
  StepOptions options;
  options.reduction(name == "kSum" ? LossReduction::kSum : LossReduction::kMean);
  if constexpr (std::is_same_v<LossImpl, torch::nn::CrossEntropyLossImpl> ||
                std::is_same_v<LossImpl, torch::nn::NLLLossImpl>) {
    if (name == "kMean") {
      options.count(count_class_targets(loss.options.ignore_index(),
                                        loss.options.weight()));
    }
  }
  return options;
}

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
  /// kGPipe serves both faces; k1F1B, kZBH1, kZBH2, kInterleaved and
  /// kInterleavedZB only step().
  TORCH_ARG(ScheduleKind, schedule) = ScheduleKind::kGPipe;
  /// kInterleaved and kInterleavedZB (takes_virtual_stages): partitions per
  /// worker (v). balance then has K * v entries and worker d runs
  /// partitions d, d + K, ...; `devices` has one device per worker (K) or
  /// per partition (the partitions of a worker on one device).
  TORCH_ARG(int64_t, virtual_stages) = 1;
  /// Intra-op threads per CPU stage worker; 0 splits them evenly.
  TORCH_ARG(int64_t, worker_threads) = 0;
};

/// GPipe pipeline parallelism over a torch::nn::Sequential (arXiv 1811.06965).
/// The layers are split into K = balance.size() contiguous stages and stage i
/// is placed on devices[i]. Each layer is registered on the pipeline under
/// its name in the Sequential ("0", "1", ... or the names given to
/// push_back), so parameters(), named_parameters() and buffers have the
/// plain model's names, and torch::save(pipe) loads into the plain
/// Sequential, into a pipeline of another balance, and back. train()/eval(),
/// zero_grad() and torch::optim work as on any module. Do not move the
/// pipeline with to() afterwards: its stages are placed (load() puts loaded
/// tensors back on the stages' devices).
///
///   auto pipe = pipegear::GPipe(model, pipegear::GPipeOptions({2, 2}).chunks(4));
///   auto y = pipe->forward(x);                                // module style
///   torch::mse_loss(y, t).backward();
///   auto loss = pipe->step(x, t, torch::nn::MSELoss());      // step style
///
/// A plain BatchNorm (track_running_stats) in a pipeline with chunks > 1
/// updates its running statistics once per micro-batch (a warning says so
/// at construction; deferred_batch_norm(true) gives those of the whole
/// mini-batch); recomputations of checkpointed micro-batches do not update
/// them again.
namespace detail {
class TiedGrads;
} // namespace detail

class GPipeImpl : public torch::nn::Module {
 public:
  GPipeImpl(torch::nn::Sequential module, GPipeOptions options);

  /// Module style on one tensor: the output of the last stage, on its device.
  torch::Tensor forward(torch::Tensor input);
  /// Module style on a tuple of tensors.
  Batch forward_batch(const Batch& input);

  using TensorLoss = std::function<torch::Tensor(torch::Tensor, torch::Tensor)>;

  /// Step style: loss_fn(output, target) per micro-batch on the last stage,
  /// forward and backward of the whole schedule; returns the mini-batch
  /// loss. Gradients equal those of loss_fn(model(input), target) when
  /// `options` say how loss_fn reduces (StepOptions: kMean or kSum, and
  /// what a mean counts). A torch::nn loss module says it itself: use the
  /// overload below.
  torch::Tensor step(torch::Tensor input, torch::Tensor target,
                     TensorLoss loss_fn, StepOptions options);
  torch::Tensor step(torch::Tensor input, torch::Tensor target,
                     TensorLoss loss_fn,
                     LossReduction reduction = LossReduction::kMean) {
    return step(std::move(input), std::move(target), std::move(loss_fn),
                StepOptions().reduction(reduction));
  }

  /// Step style with a torch::nn loss module (torch::nn::MSELoss,
  /// torch::nn::CrossEntropyLoss(...).reduction(torch::kSum), ...): the
  /// reduction comes from its options (kNone is a ValueError), and a mean
  /// CrossEntropyLoss / NLLLoss counts what the loss on the whole batch
  /// counts (targets other than ignore_index, weighed by the class weight).
  template <typename LossImpl>
  torch::Tensor step(torch::Tensor input, torch::Tensor target,
                     torch::nn::ModuleHolder<LossImpl> loss) {
    return step(std::move(input), std::move(target),
                [loss](torch::Tensor o, torch::Tensor t) mutable {
                  return loss->forward(o, t);
                },
                loss_step_options(*loss));
  }

  const GPipeOptions& options() const { return options_; }
  const std::vector<int64_t>& balance() const { return options_.balance(); }
  const std::vector<c10::Device>& devices() const { return devices_; }
  /// One Sequential per stage holding its layers (the same modules, under
  /// the same names). Not registered on the pipeline: its children are the
  /// layers themselves, so each parameter has one name, the plain model's.
  const torch::nn::ModuleList& partitions() const { return partitions_; }
  /// The timeline of the last step.
  Trace last_trace() const { return engine_->last_trace(); }
  /// The schedule the engine runs for `micro_batches`, as an ASCII table.
  std::string schedule_table(int64_t micro_batches) const;
  Engine& engine() { return *engine_; }

  /// Also sets the mode of the partitions() containers.
  void train(bool on = true) override;
  /// Module::load, then every stage's layers back onto its device: torch
  /// puts a loaded tensor on the device it was saved from when that differs
  /// (a pipeline saved on the CPU, loaded into one on GPUs).
  void load(torch::serialize::InputArchive& archive) override;
  /// Dtype casts work; a device other than the stages' is a TypeError (the
  /// stage workers run each stage where it was placed): build a new GPipe
  /// with other devices. A move to where every stage already is changes
  /// nothing.
  void to(torch::Device device, torch::Dtype dtype,
          bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;
  using torch::nn::Module::to;
  /// pipegear::GPipe(balance=[2, 1], devices=[cpu, cpu], chunks=4,
  /// checkpoint=except_last), as the Python repr.
  void pretty_print(std::ostream& stream) const override;

 private:
  void check_stays(torch::Device device) const;

  GPipeOptions options_;
  std::vector<c10::Device> devices_;
  torch::nn::ModuleList partitions_;
  // Parameters held by layers of several stages (gpipe.cpp); null when
  // there are none.
  std::shared_ptr<detail::TiedGrads> ties_;
  std::unique_ptr<Engine> engine_;
};

TORCH_MODULE(GPipe);

/// Checks a balance for a model of `layers` layers: non-empty, entries >= 1,
/// summing to `layers`. Throws ValueError with the numbers.
void check_balance(const std::vector<int64_t>& balance, int64_t layers);

} // namespace pipegear
