#include <pipegear/stage.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <c10/util/Type.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/instancenorm.h>

#include <pipegear/checkpoint.h>
#include <pipegear/nn/deferred_batch_norm.h>
#include <pipegear/random.h>

namespace pipegear {
namespace {

Batch to_batch(torch::nn::AnyValue&& value, size_t layer) {
  if (auto* t = value.try_get<torch::Tensor>()) {
    return {*t};
  }
  if (auto* v = value.try_get<std::vector<torch::Tensor>>()) {
    return Batch(*v, /*tuple=*/true);
  }
  TORCH_CHECK_TYPE(false, "layer ", layer,
                   " returned a value of type ",
                   c10::demangle(value.type_info().name()),
                   "; a pipeline stage passes a torch::Tensor or a "
                   "std::vector<torch::Tensor> between layers");
}

template <typename F>
void for_each_deferred_batch_norm(const torch::nn::Sequential& layers, F f) {
  for (const auto& module : layers->modules(/*include_self=*/false)) {
    if (auto bn = std::dynamic_pointer_cast<DeferredBatchNormImpl>(module)) {
      f(*bn);
    }
  }
}

// The running_mean, running_var and num_batches_tracked members of `module`
// when it is a NormImpl (a torch::nn BatchNorm or InstanceNorm) that tracks
// running statistics; else nothing is added.
template <typename NormImpl>
bool add_running_stats(torch::nn::Module& module,
                       std::vector<torch::Tensor*>& out) {
  auto* norm = dynamic_cast<NormImpl*>(&module);
  if (norm == nullptr) {
    return false;
  }
  if (norm->options.track_running_stats()) {
    out.insert(out.end(), {&norm->running_mean, &norm->running_var,
                           &norm->num_batches_tracked});
  }
  return true;
}

void add_running_stats(torch::nn::Module& module,
                       std::vector<torch::Tensor*>& out) {
  add_running_stats<torch::nn::BatchNorm1dImpl>(module, out) ||
      add_running_stats<torch::nn::BatchNorm2dImpl>(module, out) ||
      add_running_stats<torch::nn::BatchNorm3dImpl>(module, out) ||
      add_running_stats<torch::nn::InstanceNorm1dImpl>(module, out) ||
      add_running_stats<torch::nn::InstanceNorm2dImpl>(module, out) ||
      add_running_stats<torch::nn::InstanceNorm3dImpl>(module, out);
}

// While a checkpointed forward is recomputed, the norm layers in training
// mode see no running statistics: they normalise with the batch's own
// statistics either way (so the recomputation computes exactly what the
// forward did), and with undefined tensors there is nothing to update,
// neither running_mean/var nor num_batches_tracked (torch's BatchNorm skips
// the count when it is undefined). A layer in eval mode normalises with its
// running statistics, updates nothing, and keeps them. Only the modules'
// tensor members are swapped; the registered buffers (state_dict,
// named_buffers) are untouched. A stage's layers run on one thread at a
// time.
class HideRunningStats {
 public:
  explicit HideRunningStats(
      const std::vector<std::shared_ptr<torch::nn::Module>>& layers) {
    for (const auto& layer : layers) {
      if (layer->is_training()) {
        add_running_stats(*layer, members_);
      }
    }
    saved_.reserve(members_.size());
    for (auto* member : members_) {
      saved_.push_back(std::exchange(*member, torch::Tensor()));
    }
  }
  ~HideRunningStats() {
    for (size_t i = 0; i < members_.size(); ++i) {
      *members_[i] = std::move(saved_[i]);
    }
  }
  HideRunningStats(const HideRunningStats&) = delete;
  HideRunningStats& operator=(const HideRunningStats&) = delete;

 private:
  std::vector<torch::Tensor*> members_;
  std::vector<torch::Tensor> saved_;
};

} // namespace

const StageSkips& Stage::skips() const {
  static const StageSkips none;
  return none;
}

Batch Stage::forward_skips(const Batch& input,
                           const std::vector<torch::Tensor>& popped,
                           std::vector<torch::Tensor>& stashed) {
  TORCH_CHECK_VALUE(popped.empty() && skips().stash.empty(),
                    "a stage with skips must implement forward_skips");
  stashed.clear();
  return forward(input);
}

int64_t count_skips(const std::vector<std::shared_ptr<Stage>>& stages) {
  // [skip] -> stage that stashes / pops it, -1 while none.
  std::vector<int64_t> stasher, popper;
  const auto grow = [](std::vector<int64_t>& v, int64_t id) {
    if (static_cast<int64_t>(v.size()) <= id) {
      v.resize(id + 1, -1);
    }
  };
  for (size_t s = 0; s < stages.size(); ++s) {
    const StageSkips& k = stages[s]->skips();
    for (const auto& [ids, owner, what] :
         {std::tuple(&k.stash, &stasher, "stashed"),
          std::tuple(&k.pop, &popper, "popped")}) {
      for (int64_t id : *ids) {
        TORCH_CHECK_VALUE(id >= 0, "stage ", s, " lists skip ", id,
                          "; skip ids are >= 0");
        grow(stasher, id);
        grow(popper, id);
        TORCH_CHECK_VALUE((*owner)[id] < 0, "skip ", id, " is ", what,
                          " by stage ", (*owner)[id], " and by stage ", s,
                          "; a skip is ", what, " once");
        (*owner)[id] = static_cast<int64_t>(s);
      }
    }
  }
  for (size_t id = 0; id < stasher.size(); ++id) {
    TORCH_CHECK_VALUE(stasher[id] >= 0 || popper[id] >= 0, "skip ids must be "
                      "0..n-1 without gaps; no stage lists skip ", id);
    TORCH_CHECK_VALUE(stasher[id] >= 0, "skip ", id, " is popped by stage ",
                      popper[id], " but no stage stashes it");
    TORCH_CHECK_VALUE(popper[id] >= 0, "skip ", id, " is stashed by stage ",
                      stasher[id], " but no stage pops it");
    TORCH_CHECK_VALUE(stasher[id] < popper[id], "skip ", id,
                      " is stashed by stage ", stasher[id],
                      " and popped by stage ", popper[id],
                      "; a skip goes from a stage to a later one");
  }
  return static_cast<int64_t>(stasher.size());
}

SequentialStage::SequentialStage(torch::nn::Sequential layers,
                                 c10::Device device, int64_t first_layer,
                                 StageSkipKeys skips)
    : layers_(std::move(layers)),
      device_(device),
      first_layer_(first_layer),
      skip_keys_(std::move(skips)) {
  skips_.pop = skip_keys_.pop_ids;
  skips_.stash = skip_keys_.stash_ids;
  TORCH_CHECK_VALUE(skips_.pop.size() == skip_keys_.pop.size() &&
                        skips_.stash.size() == skip_keys_.stash.size(),
                    "StageSkipKeys needs one id per key");
  for (const auto& [ids, keys] : {std::pair(&skips_.pop, &skip_keys_.pop),
                                  std::pair(&skips_.stash, &skip_keys_.stash)}) {
    for (size_t i = 0; i < ids->size(); ++i) {
      const auto id = static_cast<size_t>(std::max<int64_t>((*ids)[i], 0));
      skips_.names.resize(std::max(skips_.names.size(), id + 1));
      skips_.names[id] = (*keys)[i].second;
    }
  }
  for (const auto& layer : *layers_) {
    has_skippables_ = has_skippables_ ||
        dynamic_cast<const Skippable*>(layer.ptr().get()) != nullptr;
  }
  // The engine commits once every stage's forward succeeded (end_forward).
  for_each_deferred_batch_norm(
      layers_, [](DeferredBatchNormImpl& bn) { bn.set_auto_commit(false); });
  // DeferredBatchNorm needs none of this: it gathers nothing while
  // recomputing (is_recomputing()).
  for (const auto& m : layers_->modules(/*include_self=*/false)) {
    std::vector<torch::Tensor*> members;
    add_running_stats(*m, members);
    if (!members.empty()) {
      norm_layers_.push_back(m);
    }
  }
}

Batch SequentialStage::forward(const Batch& input) {
  if (!has_skippables_) {
    return run_layers(input);
  }
  SkipTracker tracker;  // skips between this stage's own layers
  SkipTrackerGuard guard(tracker);
  return run_layers(input);
}

Batch SequentialStage::forward_skips(const Batch& input,
                                     const std::vector<torch::Tensor>& popped,
                                     std::vector<torch::Tensor>& stashed) {
  SkipTracker tracker;
  for (size_t i = 0; i < skip_keys_.pop.size() && i < popped.size(); ++i) {
    tracker.save(skip_keys_.pop[i], popped[i]);
  }
  SkipTrackerGuard guard(tracker);
  Batch out = run_layers(input);
  stashed.clear();
  for (const auto& key : skip_keys_.stash) {
    TORCH_CHECK_VALUE(tracker.contains(key), "skip '", key.second,
                      "' was declared but not stashed by its layer");
    stashed.push_back(tracker.load(key));
  }
  return out;
}

Batch SequentialStage::run_layers(const Batch& input) {
  // A recomputation must not count the micro-batch a second time in the
  // running statistics of plain norm layers.
  std::optional<HideRunningStats> hidden;
  if (!norm_layers_.empty() && is_recomputing()) {
    hidden.emplace(norm_layers_);
  }
  torch::nn::AnyValue value = input.is_tuple()
      ? torch::nn::AnyValue(std::vector<torch::Tensor>(input))
      : torch::nn::AnyValue(input.front());
  size_t i = 0;
  for (auto& layer : *layers_) {
    set_random_layer(static_cast<int64_t>(i));
    value = layer.any_forward(std::move(value));
    ++i;
  }
  return to_batch(std::move(value), i - 1);
}

bool SequentialStage::requires_grad() const {
  for (const auto& p : layers_->parameters()) {
    if (p.requires_grad()) {
      return true;
    }
  }
  return false;
}

void SequentialStage::begin_forward() {
  for_each_deferred_batch_norm(
      layers_, [](DeferredBatchNormImpl& bn) { bn.reset_accumulated(); });
}

void SequentialStage::end_forward() {
  for_each_deferred_batch_norm(layers_,
                               [](DeferredBatchNormImpl& bn) { bn.commit(); });
}

} // namespace pipegear
