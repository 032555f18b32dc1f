#include <pipegear/nn/deferred_batch_norm.h>

#include <ATen/Context.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/torch.h>

#include <pipegear/checkpoint.h>

namespace pipegear {
namespace {

// Every dimension but the channels: those BatchNorm reduces over.
std::vector<int64_t> reduced_dims(const torch::Tensor& input) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) {
    dims.push_back(d);
  }
  return dims;
}

void accumulate(DeferredBatchNormStats& stats, const torch::Tensor& input) {
  torch::NoGradGuard no_grad;
  // float64: sum of squares minus squared mean loses nothing that matters
  // at the 1e-6 BatchNorm agrees to.
  auto x = input.detach().to(torch::kDouble);
  auto dims = reduced_dims(input);
  auto sum = x.sum(dims);
  auto sum_squares = x.square().sum(dims);
  if (stats.empty()) {
    stats.sum = sum;
    stats.sum_squares = sum_squares;
  } else {
    // Out of place: a clone of the module may share the previous tensors.
    stats.sum = stats.sum.to(sum.device()) + sum;
    stats.sum_squares = stats.sum_squares.to(sum.device()) + sum_squares;
  }
  stats.count += input.numel() / input.size(1);
  stats.micro_batches += 1;
}

// Copies BatchNorm `bn`'s state into a new DeferredBatchNorm.
template <typename BatchNormImpl>
DeferredBatchNorm from_batch_norm(const BatchNormImpl& bn, int64_t chunks) {
  const auto& o = bn.options;
  auto dbn = DeferredBatchNorm(DeferredBatchNormOptions(o.num_features())
                                   .eps(o.eps())
                                   .momentum(o.momentum())
                                   .affine(o.affine())
                                   .chunks(chunks));
  // set_data, not Module::to: to(dtype) would turn num_batches_tracked into
  // a floating tensor too.
  torch::NoGradGuard no_grad;
  if (o.affine()) {
    dbn->weight.set_data(bn.weight.detach().clone());
    dbn->bias.set_data(bn.bias.detach().clone());
    dbn->weight.set_requires_grad(bn.weight.requires_grad());
    dbn->bias.set_requires_grad(bn.bias.requires_grad());
  }
  dbn->running_mean.set_data(bn.running_mean.detach().clone());
  dbn->running_var.set_data(bn.running_var.detach().clone());
  dbn->num_batches_tracked.set_data(bn.num_batches_tracked.detach().clone());
  dbn->train(bn.is_training());
  return dbn;
}

template <typename BatchNormImpl>
std::optional<DeferredBatchNorm> try_convert(
    const std::shared_ptr<torch::nn::Module>& module,
    int64_t chunks) {
  auto bn = std::dynamic_pointer_cast<BatchNormImpl>(module);
  if (bn == nullptr || !bn->options.track_running_stats()) {
    return std::nullopt;
  }
  return from_batch_norm(*bn, chunks);
}

} // namespace

void DeferredBatchNormStats::reset() {
  sum = torch::Tensor();
  sum_squares = torch::Tensor();
  count = 0;
  micro_batches = 0;
}

torch::Tensor deferred_batch_norm_forward(const torch::Tensor& input,
                                          const torch::Tensor& weight,
                                          const torch::Tensor& bias,
                                          const torch::Tensor& running_mean,
                                          const torch::Tensor& running_var,
                                          DeferredBatchNormStats& stats,
                                          bool training,
                                          double eps) {
  TORCH_CHECK_VALUE(input.defined(), "DeferredBatchNorm got an undefined input");
  TORCH_CHECK_VALUE(input.dim() >= 2 && input.dim() <= 5,
                    "DeferredBatchNorm expects a 2D to 5D input (N, C, *), "
                    "got ", input.dim(), "D input of shape ", input.sizes());
  TORCH_CHECK_VALUE(running_mean.defined() && running_var.defined(),
                    "DeferredBatchNorm needs running_mean and running_var");
  const int64_t channels = running_mean.numel();
  TORCH_CHECK_VALUE(input.size(1) == channels, "DeferredBatchNorm of ",
                    channels, " features got an input of ", input.size(1),
                    " channels (shape ", input.sizes(), ")");
  const bool cudnn = at::globalContext().userEnabledCuDNN();
  if (!training) {
    return torch::batch_norm(input, weight, bias, running_mean, running_var,
                             /*training=*/false, /*momentum=*/0.0, eps, cudnn);
  }
  TORCH_CHECK_VALUE(input.numel() / channels > 1,
                    "Expected more than 1 value per channel when training, "
                    "got input size ", input.sizes());
  // No running statistics: the output and its gradient are exactly those of
  // BatchNorm on this micro-batch, and nothing is updated behind our back.
  auto output = torch::batch_norm(input, weight, bias, torch::Tensor(),
                                  torch::Tensor(), /*training=*/true,
                                  /*momentum=*/0.0, eps, cudnn);
  if (!is_recomputing()) {
    accumulate(stats, input);
  }
  return output;
}

bool deferred_batch_norm_commit(DeferredBatchNormStats& stats,
                                torch::Tensor& running_mean,
                                torch::Tensor& running_var,
                                torch::Tensor& num_batches_tracked,
                                std::optional<double> momentum) {
  if (stats.empty()) {
    return false;
  }
  TORCH_CHECK_VALUE(running_mean.defined() && running_var.defined() &&
                        num_batches_tracked.defined(),
                    "DeferredBatchNorm needs running_mean, running_var and "
                    "num_batches_tracked to commit");
  TORCH_CHECK_VALUE(stats.count > 1,
                    "DeferredBatchNorm accumulated ", stats.count,
                    " value per channel; the unbiased variance needs 2");
  torch::NoGradGuard no_grad;
  const auto n = static_cast<double>(stats.count);
  auto mean = stats.sum / n;
  auto var = (stats.sum_squares / n - mean.square()).clamp_min(0.0);
  auto unbiased_var = var * (n / (n - 1.0));

  num_batches_tracked.add_(1);
  const double factor = momentum.has_value()
      ? *momentum
      : 1.0 / num_batches_tracked.item<double>();
  auto blend = [factor](torch::Tensor& running, const torch::Tensor& batch) {
    auto updated = running.to(torch::kDouble) * (1.0 - factor) +
        batch.to(running.device()) * factor;
    running.copy_(updated);
  };
  blend(running_mean, mean);
  blend(running_var, unbiased_var);
  stats.reset();
  return true;
}

DeferredBatchNormImpl::DeferredBatchNormImpl(DeferredBatchNormOptions options)
    : options(std::move(options)) {
  reset();
}

void DeferredBatchNormImpl::reset() {
  const int64_t c = options.num_features();
  TORCH_CHECK_VALUE(c >= 1, "DeferredBatchNorm needs num_features >= 1, got ",
                    c);
  TORCH_CHECK_VALUE(options.chunks() >= 1,
                    "DeferredBatchNorm needs chunks >= 1, got ",
                    options.chunks());
  TORCH_CHECK_VALUE(options.eps() > 0, "DeferredBatchNorm needs eps > 0, got ",
                    options.eps());
  if (options.affine()) {
    weight = register_parameter("weight", torch::empty({c}));
    bias = register_parameter("bias", torch::empty({c}));
  } else {
    weight = register_parameter("weight", torch::Tensor(), false);
    bias = register_parameter("bias", torch::Tensor(), false);
  }
  running_mean = register_buffer("running_mean", torch::zeros({c}));
  running_var = register_buffer("running_var", torch::ones({c}));
  num_batches_tracked =
      register_buffer("num_batches_tracked", torch::tensor(int64_t{0}));
  stats_.reset();
  reset_parameters();
}

void DeferredBatchNormImpl::reset_running_stats() {
  torch::NoGradGuard no_grad;
  running_mean.zero_();
  running_var.fill_(1);
  num_batches_tracked.zero_();
  stats_.reset();
}

void DeferredBatchNormImpl::reset_parameters() {
  reset_running_stats();
  if (options.affine()) {
    torch::nn::init::ones_(weight);
    torch::nn::init::zeros_(bias);
  }
}

torch::Tensor DeferredBatchNormImpl::forward(const torch::Tensor& input) {
  auto output =
      deferred_batch_norm_forward(input, weight, bias, running_mean,
                                  running_var, stats_, is_training(),
                                  options.eps());
  if (auto_commit_ && is_training() &&
      stats_.micro_batches >= options.chunks()) {
    commit();
  }
  return output;
}

bool DeferredBatchNormImpl::commit() {
  return deferred_batch_norm_commit(stats_, running_mean, running_var,
                                    num_batches_tracked, options.momentum());
}

void DeferredBatchNormImpl::reset_accumulated() {
  stats_.reset();
}

void DeferredBatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << std::boolalpha << "pipegear::DeferredBatchNorm("
         << options.num_features() << ", eps=" << options.eps()
         << ", momentum=";
  if (options.momentum().has_value()) {
    stream << *options.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << options.affine() << ", chunks=" << options.chunks()
         << ")";
}

torch::nn::Sequential convert_deferred_batch_norm(
    const torch::nn::Sequential& module,
    int64_t chunks) {
  TORCH_CHECK_VALUE(chunks >= 1, "chunks must be at least 1, got ", chunks);
  TORCH_CHECK_VALUE(!module.is_empty(),
                    "convert_deferred_batch_norm got an empty module holder");
  torch::nn::Sequential converted;
  const auto names = module->named_children().keys();
  size_t i = 0;
  for (const auto& item : *module) {
    const auto& name = names.at(i++);
    auto ptr = item.ptr();
    auto dbn = try_convert<torch::nn::BatchNorm1dImpl>(ptr, chunks);
    if (!dbn) {
      dbn = try_convert<torch::nn::BatchNorm2dImpl>(ptr, chunks);
    }
    if (!dbn) {
      dbn = try_convert<torch::nn::BatchNorm3dImpl>(ptr, chunks);
    }
    if (dbn) {
      converted->push_back(name, torch::nn::AnyModule(*dbn));
    } else {
      converted->push_back(name, item);
    }
  }
  return converted;
}

} // namespace pipegear
