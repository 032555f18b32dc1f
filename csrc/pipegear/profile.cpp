#include <pipegear/profile.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <string>

#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/cuda.h>

#include <pipegear/microbatch.h>
#include <pipegear/partition.h>
#include <pipegear/skip.h>

namespace pipegear {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  if (v.empty()) {
    return 0.0;
  }
  std::sort(v.begin(), v.end());
  const size_t mid = v.size() / 2;
  return v.size() % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

void synchronize(const torch::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize(device.index());
  }
}

std::optional<torch::Device> device_of(const torch::nn::Module& m) {
  for (const auto& p : m.parameters()) {
    return p.device();
  }
  for (const auto& b : m.buffers()) {
    return b.device();
  }
  return std::nullopt;
}

// True when every parameter and buffer of `m` is on `device`.
bool lives_on(const torch::nn::Module& m, const torch::Device& device) {
  for (const auto& p : m.parameters()) {
    if (p.device() != device) {
      return false;
    }
  }
  for (const auto& b : m.buffers()) {
    if (b.device() != device) {
      return false;
    }
  }
  return true;
}

// Puts a layer profiled in place back as it was: the training flag of every
// submodule, the values of the buffers and the gradients of the parameters.
// While it lives, the parameters start with no gradient.
class LayerStateGuard {
 public:
  explicit LayerStateGuard(const std::shared_ptr<torch::nn::Module>& layer)
      : modules_(layer->modules(/*include_self=*/true)) {
    for (const auto& m : modules_) {
      training_.push_back(m->is_training());
    }
    params_ = layer->parameters();
    for (auto& p : params_) {
      grads_.push_back(p.grad());
      p.mutable_grad() = torch::Tensor();
    }
    buffers_ = layer->buffers();
    torch::NoGradGuard no_grad;
    for (const auto& b : buffers_) {
      saved_buffers_.push_back(b.defined() ? b.clone() : torch::Tensor());
    }
  }

  ~LayerStateGuard() {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < buffers_.size(); ++i) {
      if (saved_buffers_[i].defined()) {
        buffers_[i].copy_(saved_buffers_[i]);
      }
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i].mutable_grad() = grads_[i];
    }
    // Module::train recurses, so restore parents before their children.
    for (size_t i = 0; i < modules_.size(); ++i) {
      modules_[i]->train(training_[i]);
    }
  }

  LayerStateGuard(const LayerStateGuard&) = delete;
  LayerStateGuard& operator=(const LayerStateGuard&) = delete;

 private:
  std::vector<std::shared_ptr<torch::nn::Module>> modules_;
  std::vector<bool> training_;
  std::vector<torch::Tensor> params_;
  std::vector<torch::Tensor> grads_;
  std::vector<torch::Tensor> buffers_;
  std::vector<torch::Tensor> saved_buffers_;
};

// Restores the layers in the reverse order they were saved in, so that a
// parameter or submodule shared by two layers ends as it was before both.
class LayerStateGuards {
 public:
  void push(const std::shared_ptr<torch::nn::Module>& layer) {
    guards_.push_back(std::make_unique<LayerStateGuard>(layer));
  }
  ~LayerStateGuards() {
    while (!guards_.empty()) {
      guards_.pop_back();
    }
  }

 private:
  std::vector<std::unique_ptr<LayerStateGuard>> guards_;
};

std::string layer_label(const torch::nn::Sequential& module, size_t i) {
  const auto children = module->named_children();
  const auto& name = children[i].key();
  return "layer " + std::to_string(i) + " ('" + name + "', " +
      children[i].value()->name() + ")";
}

std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

void check_partitions(int64_t partitions, const torch::nn::Sequential& module) {
  TORCH_CHECK_VALUE(module, "the module is empty (a null Sequential)");
  const auto layers = static_cast<int64_t>(module->size());
  TORCH_CHECK_VALUE(partitions >= 1, "partitions must be at least 1, got ",
                    partitions);
  TORCH_CHECK_VALUE(partitions <= layers, "cannot split ", layers,
                    " layers into ", partitions,
                    " partitions: each needs at least one layer");
}

// Runs the layers of `module` one after the other on `sample`: one warm-up
// round, then up to `repeats` timed rounds (none when `timed` is false, and
// then without autograd).
std::vector<LayerProfile> run_profile(torch::nn::Sequential module,
                                      const torch::Tensor& sample,
                                      std::optional<torch::Device> device,
                                      int64_t repeats,
                                      double timeout,
                                      bool timed) {
  TORCH_CHECK_VALUE(module && !module->is_empty(),
                    "cannot profile an empty Sequential: it has no layers");
  TORCH_CHECK_VALUE(sample.defined(), "the sample is an undefined tensor");
  TORCH_CHECK_VALUE(repeats >= 1, "repeats must be at least 1, got ",
                    repeats);
  TORCH_CHECK_VALUE(timeout > 0, "timeout must be a positive number of "
                    "seconds, got ", timeout);
  const torch::Device on =
      device.value_or(device_of(*module).value_or(sample.device()));
  const size_t n = module->size();

  std::vector<torch::nn::AnyModule> layers;
  LayerStateGuards guards;
  std::vector<LayerProfile> profiles(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& layer = *(module->begin() + i);
    for (const auto& p : layer.ptr()->parameters()) {
      profiles[i].parameter_bytes += p.numel() * p.element_size();
    }
    if (lives_on(*layer.ptr(), on)) {
      guards.push(layer.ptr());
      layers.push_back(layer);
    } else {
      try {
        layers.push_back(layer.clone(on));
      } catch (const std::exception& e) {
        TORCH_CHECK_VALUE(false, "cannot profile ", layer_label(module, i),
                          " on ", on, ": it is elsewhere and cannot be "
                          "copied there: ", message_of(e));
      }
    }
    layers.back().ptr()->train(true);
  }

  const torch::Tensor input = sample.detach().to(on).requires_grad_(
      sample.requires_grad() && sample.is_floating_point());
  std::vector<std::vector<double>> forward(n), backward(n);
  auto round = [&](bool record) {
    torch::Tensor x = input;
    // Skips (skip.h): each layer's backward stops at its layer, so a
    // stashed tensor is detached once its layer ran (a leaf of its own for
    // the layer popping it, as in a pipeline); their bytes are counted on
    // the stashing and the popping layer.
    SkipTracker skips;
    SkipTrackerGuard skip_guard(skips);
    const auto nbytes = [](const torch::Tensor& t) {
      return t.defined() ? t.numel() * t.element_size() : int64_t{0};
    };
    for (size_t i = 0; i < n; ++i) {
      torch::Tensor y;
      std::map<SkipKey, int64_t> held_before;
      for (const auto& [key, t] : skips.tensors()) {
        held_before[key] = nbytes(t);
      }
      try {
        if (i > 0) {
          x = x.detach().requires_grad_(timed && x.is_floating_point());
        }
        synchronize(on);
        auto start = Clock::now();
        y = layers[i].forward(x);
        TORCH_CHECK_VALUE(y.defined(), "it returned an undefined tensor");
        synchronize(on);
        const double forward_seconds = seconds_since(start);
        int64_t skip_bytes = 0;
        for (auto& [key, t] : skips.tensors()) {
          if (!held_before.count(key)) {
            skip_bytes += nbytes(t);
            if (t.defined()) {
              t = t.detach().requires_grad_(timed && t.is_floating_point());
            }
          }
        }
        for (const auto& [key, bytes] : held_before) {
          skip_bytes += skips.contains(key) ? 0 : bytes;
        }
        if (!record) {
          profiles[i].skip_bytes = skip_bytes;
        }
        double backward_seconds = 0.0;
        if (y.requires_grad()) {
          auto grad = torch::ones_like(y);
          synchronize(on);
          start = Clock::now();
          torch::autograd::backward({y}, {grad});
          synchronize(on);
          backward_seconds = seconds_since(start);
          for (auto& p : layers[i].ptr()->parameters()) {
            p.mutable_grad() = torch::Tensor();
          }
        }
        if (record) {
          forward[i].push_back(forward_seconds);
          backward[i].push_back(backward_seconds);
        } else {
          profiles[i].activation_bytes = y.numel() * y.element_size();
        }
      } catch (const std::exception& e) {
        TORCH_CHECK_VALUE(false, layer_label(module, i), " failed while "
                          "profiling: ", message_of(e));
      }
      x = y.detach();
    }
  };

  const auto start = Clock::now();
  if (!timed) {
    torch::NoGradGuard no_grad;
    round(false);
    return profiles;
  }
  round(false);
  for (int64_t r = 0; r < repeats; ++r) {
    if (r > 0 && seconds_since(start) >= timeout) {
      break;
    }
    round(true);
  }
  for (size_t i = 0; i < n; ++i) {
    profiles[i].forward_seconds = median(forward[i]);
    profiles[i].backward_seconds = median(backward[i]);
  }
  return profiles;
}

} // namespace

std::vector<LayerProfile> profile_layers(torch::nn::Sequential module,
                                         const torch::Tensor& sample,
                                         const ProfileOptions& options) {
  return run_profile(std::move(module), sample, options.device(),
                     options.repeats(), options.timeout(), /*timed=*/true);
}

std::vector<int64_t> balance_by_time(int64_t partitions,
                                     torch::nn::Sequential module,
                                     const torch::Tensor& sample,
                                     const BalanceByTimeOptions& options) {
  check_partitions(partitions, module);
  const auto profiles =
      run_profile(module, sample, options.device(), options.repeats(),
                  options.timeout(), /*timed=*/true);
  std::vector<double> costs;
  for (const auto& p : profiles) {
    costs.push_back(p.forward_seconds + p.backward_seconds);
  }
  return balance_by_cost(partitions, costs);
}

std::vector<int64_t> balance_by_size(int64_t partitions,
                                     torch::nn::Sequential module,
                                     const torch::Tensor& sample,
                                     const BalanceBySizeOptions& options) {
  check_partitions(partitions, module);
  const double scale = options.param_scale();
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale >= 0,
                    "param_scale must be a finite number >= 0, got ", scale);
  TORCH_CHECK_VALUE(sample.defined(), "the sample is an undefined tensor");
  const auto micro_batch = scatter({sample}, options.chunks()).front().front();
  const auto profiles = run_profile(module, micro_batch, options.device(),
                                    /*repeats=*/1, /*timeout=*/1.0,
                                    /*timed=*/false);
  std::vector<double> costs;
  for (const auto& p : profiles) {
    costs.push_back(static_cast<double>(p.parameter_bytes) * scale +
                    static_cast<double>(p.activation_bytes) +
                    static_cast<double>(p.skip_bytes));
  }
  return balance_by_cost(partitions, costs);
}

} // namespace pipegear
