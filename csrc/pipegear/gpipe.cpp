#include <pipegear/gpipe.h>

#include <map>
#include <numeric>
#include <set>

#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/StringUtil.h>
#include <torch/cuda.h>
#include <torch/nn/modules/batchnorm.h>

#include <torch/csrc/autograd/function_hook.h>

#include <pipegear/detail/cells.h>
#include <pipegear/nn/deferred_batch_norm.h>

namespace pipegear {

namespace detail {

/// Parameters held by layers of several stages (GPT-2's head reusing the
/// embedding's weight): one parameter, as in the plain model, whose
/// gradient sums every use once per step.
///
/// Every stage computes with the parameter itself: a C++ layer reads its
/// own member (LinearImpl::weight), which cannot be swapped for a replica
/// as the Python GPipe does, so the stages must share its device, and the
/// CPU, where autograd runs a stage's backward on the stage's worker
/// thread, so that running_stage() tells the stages apart. The first stage
/// using the parameter (its owner) accumulates into .grad as usual; a hook
/// moves every other stage's gradient into a buffer of that stage (handing
/// autograd zeros, which add nothing), and add() sums the buffers into
/// .grad in stage order after the drain. Each buffer accumulates in its
/// stage's schedule order, so the sum is the same bit for bit run to run,
/// which two workers adding into one .grad as their timing goes would not
/// give (the Python GPipe's replicas do the same: engine.md, "Tied
/// parameters").
class TiedGrads {
 public:
  struct Tie {
    torch::Tensor param;
    std::string name;  // its name in the owner
    int64_t owner = 0;
    // One buffer per later stage using it; the keys never change after
    // construction and each is written by its stage's worker only.
    std::map<int64_t, torch::Tensor> grads;
    unsigned hook = 0;
    bool hooked = false;
  };

  ~TiedGrads() {
    for (auto& tie : ties_) {
      if (tie->hooked) {
        tie->param.remove_hook(tie->hook);
      }
    }
  }

  /// Finds the parameters held by more than one stage of `parts` and
  /// checks that those stages share the CPU; changes nothing when it
  /// throws. Then call hook().
  void find(const std::vector<torch::nn::Sequential>& parts,
            const std::vector<c10::Device>& devices) {
    struct Use {
      size_t stage;
      std::string name;
    };
    std::map<const c10::TensorImpl*, std::vector<Use>> uses;
    std::vector<const c10::TensorImpl*> order;
    for (size_t s = 0; s < parts.size(); ++s) {
      for (const auto& p : parts[s]->named_parameters()) {
        auto& list = uses[p.value().unsafeGetTensorImpl()];
        if (list.empty()) {
          order.push_back(p.value().unsafeGetTensorImpl());
        }
        if (list.empty() || list.back().stage != s) {
          list.push_back({s, p.key()});
        }
      }
    }
    for (const auto* impl : order) {
      const auto& list = uses[impl];
      if (list.size() < 2) {
        continue;
      }
      const auto& first = list.front();
      for (const auto& use : list) {
        TORCH_CHECK_VALUE(
            devices[use.stage] == devices[first.stage] &&
                devices[use.stage].is_cpu(),
            "parameter '", use.name, "' of stage ", use.stage, " is '",
            first.name, "' of stage ", first.stage, ": the C++ GPipe ties a "
            "parameter across stages on the CPU only (stage ", first.stage,
            " is on ", devices[first.stage], ", stage ", use.stage, " on ",
            devices[use.stage], "); the Python GPipe ties parameters on any "
            "devices");
      }
      auto tie = std::make_unique<Tie>();
      for (size_t s = 0; s < parts.size(); ++s) {
        for (const auto& p : parts[s]->parameters()) {
          if (p.unsafeGetTensorImpl() == impl) {
            tie->param = p;
          }
        }
      }
      tie->name = first.name;
      tie->owner = static_cast<int64_t>(first.stage);
      for (size_t i = 1; i < list.size(); ++i) {
        tie->grads.emplace(static_cast<int64_t>(list[i].stage),
                           torch::Tensor());
      }
      ties_.push_back(std::move(tie));
    }
  }

  bool empty() const { return ties_.empty(); }

  void hook() {
    for (auto& tie : ties_) {
      if (!tie->param.requires_grad()) {
        continue;  // no gradient to sum (requires_grad_ later: refused)
      }
      Tie* t = tie.get();
      tie->hook = tie->param.register_hook([t](const torch::Tensor& grad) {
        const int64_t s = running_stage();
        auto it = t->grads.find(s);
        if (it == t->grads.end()) {
          return torch::Tensor();  // the owner, or outside the pipeline
        }
        it->second = it->second.defined() ? it->second + grad : grad.clone();
        return torch::zeros_like(grad);
      });
      tie->hooked = true;
    }
  }

  /// Before a pass: what a failed drain left in the buffers is dropped
  /// (the parameter keeps what the owner accumulated: zero the gradients
  /// before retrying, as after any failed step). Checks that a parameter
  /// that needed no gradient at construction still needs none.
  void begin() {
    for (auto& tie : ties_) {
      TORCH_CHECK_VALUE(
          tie->hooked || !tie->param.requires_grad(),
          "parameter '", tie->name, "' (of stage ", tie->owner, ", tied "
          "across stages) started requiring gradients after the GPipe was "
          "built; build the GPipe after setting requires_grad");
      for (auto& [stage, grad] : tie->grads) {
        grad = torch::Tensor();
      }
    }
  }

  /// After the drain: each later stage's gradient into .grad, in stage
  /// order.
  void add() {
    torch::NoGradGuard no_grad;
    for (auto& tie : ties_) {
      for (auto& [stage, grad] : tie->grads) {
        if (!grad.defined()) {
          continue;
        }
        auto& total = tie->param.mutable_grad();
        if (total.defined()) {
          total.add_(grad);
        } else {
          total = grad;
        }
        grad = torch::Tensor();
      }
    }
  }

 private:
  std::vector<std::unique_ptr<Tie>> ties_;
};

namespace {

// After the module-style drain (the backward of the pipeline's node).
struct AddTiedGrads : torch::autograd::FunctionPostHook {
  explicit AddTiedGrads(std::shared_ptr<TiedGrads> ties)
      : ties(std::move(ties)) {}
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& grad_inputs,
      const torch::autograd::variable_list& /*grad_outputs*/) override {
    ties->add();
    return grad_inputs;
  }
  std::shared_ptr<TiedGrads> ties;
};

} // namespace
} // namespace detail

void check_balance(const std::vector<int64_t>& balance, int64_t layers) {
  TORCH_CHECK_VALUE(!balance.empty(), "balance must have at least 1 stage");
  for (size_t i = 0; i < balance.size(); ++i) {
    TORCH_CHECK_VALUE(balance[i] >= 1, "every stage needs at least 1 layer, "
                      "balance[", i, "] is ", balance[i], " (balance ",
                      c10::IntArrayRef(balance), ")");
  }
  const auto sum = std::accumulate(balance.begin(), balance.end(), int64_t{0});
  TORCH_CHECK_VALUE(sum == layers, "balance must sum to the ", layers,
                    " layers of the module, got ", sum, " (balance ",
                    c10::IntArrayRef(balance), ")");
}

namespace {

std::vector<c10::Device> resolve_devices(const std::vector<c10::Device>& given,
                                         size_t stages) {
  std::vector<c10::Device> devices = given;
  if (devices.empty()) {
    const auto n = torch::cuda::device_count();
    if (n == 0) {
      devices.assign(stages, c10::Device(c10::kCPU));
    } else {
      for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) {
        devices.emplace_back(c10::kCUDA, static_cast<c10::DeviceIndex>(i));
      }
    }
  }
  TORCH_CHECK_INDEX(devices.size() >= stages, "too few devices: ", stages,
                    " stages need ", stages, " devices, got ", devices.size());
  devices.erase(devices.begin() + static_cast<std::ptrdiff_t>(stages), devices.end());
  for (size_t i = 0; i < devices.size(); ++i) {
    TORCH_CHECK_VALUE(!devices[i].is_meta(), "devices[", i, "] is meta: a "
                      "partition runs on a device that holds data, and meta "
                      "tensors hold none; use cpu or an accelerator");
    if (!devices[i].is_cpu() && !devices[i].is_cuda()) {
      // Another accelerator: it must exist in this process.
      bool available = false;
      try {
        available = torch::empty({0}, torch::TensorOptions().device(devices[i]))
                        .defined();
      } catch (const c10::Error&) {
      }
      TORCH_CHECK_VALUE(available, "devices[", i, "] is ", devices[i], " but ",
                        c10::DeviceTypeName(devices[i].type()),
                        " is not available");
    }
    if (devices[i].is_cuda()) {
      const auto n = static_cast<int64_t>(torch::cuda::device_count());
      TORCH_CHECK_VALUE(n > 0, "devices[", i, "] is ", devices[i],
                        " but CUDA is not available");
      TORCH_CHECK_INDEX(!devices[i].has_index() || devices[i].index() < n,
                        "devices[", i, "] is ", devices[i], " but there are "
                        "only ", n, " CUDA devices");
    }
  }
  return devices;
}

// The BatchNorm layers (at any depth) that update running statistics in
// training.
template <typename BatchNormImpl>
bool tracks_running_stats(const std::shared_ptr<torch::nn::Module>& module) {
  const auto bn = std::dynamic_pointer_cast<BatchNormImpl>(module);
  return bn != nullptr && bn->options.track_running_stats();
}

// Python's GPipe warns the same way (gpipe.py, _prepare_batch_norm).
void warn_plain_batch_norm(const torch::nn::Module& model, int64_t chunks) {
  for (const auto& m : model.named_modules("", /*include_self=*/false)) {
    if (tracks_running_stats<torch::nn::BatchNorm1dImpl>(m.value()) ||
        tracks_running_stats<torch::nn::BatchNorm2dImpl>(m.value()) ||
        tracks_running_stats<torch::nn::BatchNorm3dImpl>(m.value())) {
      TORCH_WARN("pipegear::GPipe: the BatchNorm layer '", m.key(),
                 "' with running statistics is pipelined with chunks=", chunks,
                 ": its running statistics will be updated once per "
                 "micro-batch; pass GPipeOptions::deferred_batch_norm(true) "
                 "for the statistics of the whole mini-batch");
      return;  // once per pipeline
    }
  }
}

} // namespace

GPipeImpl::GPipeImpl(torch::nn::Sequential module, GPipeOptions options)
    : options_(std::move(options)) {
  TORCH_CHECK_VALUE(module && !module->is_empty(),
                    "the module to pipeline must be a non-empty Sequential");
  const auto layers = static_cast<int64_t>(module->size());
  check_balance(options_.balance(), layers);
  TORCH_CHECK_VALUE(options_.chunks() >= 1, "chunks must be at least 1, got ",
                    options_.chunks());
  const int64_t v = options_.virtual_stages();
  const auto stage_count = static_cast<int64_t>(options_.balance().size());
  TORCH_CHECK_VALUE(v >= 1, "virtual_stages must be at least 1, got ", v);
  TORCH_CHECK_VALUE(stage_count % v == 0, "virtual_stages = ", v,
                    " must divide the number of partitions (balance has ",
                    stage_count, " entries)");
  if (v > 1 && static_cast<int64_t>(options_.devices().size()) != stage_count) {
    // A device per worker: worker d's stages d, d + K, ... all sit there.
    const auto per_worker = resolve_devices(options_.devices(), stage_count / v);
    for (int64_t s = 0; s < stage_count; ++s) {
      devices_.push_back(per_worker[s % (stage_count / v)]);
    }
  } else {
    devices_ = resolve_devices(options_.devices(), options_.balance().size());
  }

  // A layer used twice, or a parameter shared by two stages, would be moved
  // to two devices and updated by two workers at once.
  std::set<const torch::nn::Module*> seen_layers;
  for (int64_t i = 0; i < layers; ++i) {
    TORCH_CHECK_VALUE(seen_layers.insert(module->ptr(i).get()).second,
                      "layer ", i, " appears more than once in the module; "
                      "a pipeline needs distinct layers");
  }
  // The Sequential's own names ("0", "1", ... or those given to push_back),
  // so that the pipeline's parameters are named as the plain model's.
  std::vector<std::string> names;
  {
    std::map<const torch::nn::Module*, std::string> name_of;
    for (const auto& child : module->named_children()) {
      name_of.emplace(child.value().get(), child.key());
    }
    for (int64_t i = 0; i < layers; ++i) {
      const auto it = name_of.find(module->ptr(i).get());
      TORCH_CHECK_VALUE(it != name_of.end(), "layer ", i, " of the module is "
                        "not registered as its child; build the Sequential "
                        "with its constructor or push_back");
      names.push_back(it->second);
    }
  }
  if (options_.deferred_batch_norm()) {
    module = convert_deferred_batch_norm(module, options_.chunks());
  } else if (options_.chunks() > 1) {
    warn_plain_batch_norm(*module, options_.chunks());
  }

  // TypeError for mismatched skips, before anything moves.
  auto skip_keys = skip_layout(module, options_.balance());
  std::vector<std::shared_ptr<Stage>> stages;
  std::vector<torch::nn::Sequential> parts;
  int64_t offset = 0;
  for (size_t s = 0; s < options_.balance().size(); ++s) {
    torch::nn::Sequential part;
    for (int64_t l = offset; l < offset + options_.balance()[s]; ++l) {
      part->push_back(names[l], *(module->begin() + l));
    }
    offset += options_.balance()[s];
    parts.push_back(part);
  }
  auto ties = std::make_shared<detail::TiedGrads>();
  ties->find(parts, devices_);
  // Checked everything before moving anything: a rejected module is intact.
  for (int64_t l = 0; l < layers; ++l) {
    register_module(names[l], module->ptr(l));
  }
  int64_t first_layer = 0;
  for (size_t s = 0; s < parts.size(); ++s) {
    auto& part = parts[s];
    part->to(devices_[s]);
    partitions_->push_back(part);
    stages.push_back(
        std::make_shared<SequentialStage>(part, devices_[s], first_layer,
                                          std::move(skip_keys[s])));
    first_layer += static_cast<int64_t>(part->size());
  }
  partitions_->train(is_training());
  ties->hook();
  if (!ties->empty()) {
    ties_ = std::move(ties);
  }
  engine_ = std::make_unique<Engine>(
      std::move(stages), EngineOptions()
                             .chunks(options_.chunks())
                             .checkpoint(options_.checkpoint())
                             .schedule(options_.schedule())
                             .virtual_stages(options_.virtual_stages())
                             .worker_threads(options_.worker_threads()));
}

torch::Tensor GPipeImpl::forward(torch::Tensor input) {
  auto out = forward_batch({std::move(input)});
  TORCH_CHECK_VALUE(out.size() == 1, "the last stage returned ", out.size(),
                    " tensors; use forward_batch for tuples");
  return out.front();
}

Batch GPipeImpl::forward_batch(const Batch& input) {
  if (!ties_) {
    return engine_->forward(input, is_training());
  }
  ties_->begin();
  auto out = engine_->forward(input, is_training());
  // The outputs share one node, the pipeline's: its backward is the drain.
  for (const auto& t : out) {
    if (t.defined() && t.grad_fn()) {
      t.grad_fn()->add_post_hook(
          std::make_unique<detail::AddTiedGrads>(ties_));
      break;
    }
  }
  return out;
}

torch::Tensor GPipeImpl::step(
    torch::Tensor input, torch::Tensor target,
    TensorLoss loss_fn, StepOptions options) {
  TORCH_CHECK_VALUE(static_cast<bool>(loss_fn),
                    "step needs a loss function, got none");
  LossFn fn = [&loss_fn](const Batch& output, const Batch& t) {
    TORCH_CHECK_VALUE(output.size() == 1, "the last stage returned ",
                      output.size(), " tensors; the loss takes one");
    return loss_fn(output.front(), t.empty() ? torch::Tensor() : t.front());
  };
  Batch targets;
  if (target.defined()) {
    TORCH_CHECK_VALUE(target.dim() >= 1, "the target is 0-dimensional; "
                      "micro-batching splits dim 0");
    targets.push_back(std::move(target));
  }
  if (ties_) {
    ties_->begin();
  }
  auto loss = engine_->step({std::move(input)}, targets, fn,
                            options.training(is_training()));
  if (ties_) {
    ties_->add();
  }
  return loss;
}

LossCount count_class_targets(int64_t ignore_index, torch::Tensor weight) {
  return [ignore_index, weight](const Batch& target) -> double {
    TORCH_CHECK_VALUE(!target.empty() && target.front().defined(),
                      "a cross entropy loss needs a target, got none");
    const auto& t = target.front();
    if (t.is_floating_point()) {
      return static_cast<double>(t.size(0));  // class probabilities
    }
    const auto valid = t != ignore_index;
    if (!weight.defined()) {
      return valid.sum().item<double>();
    }
    const auto classes = t.masked_select(valid);
    return weight.to(t.device()).index_select(0, classes).sum().item<double>();
  };
}

void GPipeImpl::train(bool on) {
  torch::nn::Module::train(on);
  partitions_->train(on);
}

void GPipeImpl::load(torch::serialize::InputArchive& archive) {
  torch::nn::Module::load(archive);
  for (size_t s = 0; s < devices_.size(); ++s) {
    partitions_[s]->to(devices_[s]);
  }
}

void GPipeImpl::pretty_print(std::ostream& stream) const {
  stream << "pipegear::GPipe(balance=" << c10::IntArrayRef(options_.balance())
         << ", devices=[";
  for (size_t s = 0; s < devices_.size(); ++s) {
    stream << (s == 0 ? "" : ", ") << devices_[s];
  }
  stream << "], chunks=" << options_.chunks()
         << ", checkpoint=" << to_string(options_.checkpoint()) << ")";
}

void GPipeImpl::to(torch::Device device, torch::Dtype dtype,
                   bool non_blocking) {
  check_stays(device);
  torch::nn::Module::to(device, dtype, non_blocking);
}

void GPipeImpl::to(torch::Device device, bool non_blocking) {
  check_stays(device);
  torch::nn::Module::to(device, non_blocking);
}

void GPipeImpl::check_stays(torch::Device device) const {
  for (const auto& d : devices_) {
    TORCH_CHECK_TYPE(
        d.type() == device.type() &&
            (!device.has_index() || !d.has_index() || d.index() == device.index()),
        "to(", device, ") would move the layers of this GPipe off the devices "
        "its stages are placed on (", c10::Join(", ", devices_),
        "); build a new GPipe with GPipeOptions(balance).devices({...}) to use "
        "other devices. Casts of the dtype (to(torch::kFloat64)) work");
  }
}

std::string GPipeImpl::schedule_table(int64_t micro_batches) const {
  return render_schedule(engine_->schedule(micro_batches), micro_batches);
}

} // namespace pipegear
