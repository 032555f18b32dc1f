#include <pipegear/skip.h>

#include <algorithm>
#include <atomic>
#include <sstream>
#include <tuple>

namespace pipegear {

Namespace::Namespace() {
  static std::atomic<int64_t> next{1};
  id_ = next++;
}

Namespace Namespace::global() { return Namespace(0); }

void SkipTracker::save(const SkipKey& key, torch::Tensor tensor) {
  tensors_[key] = std::move(tensor);
}

torch::Tensor SkipTracker::load(const SkipKey& key) {
  auto it = tensors_.find(key);
  TORCH_CHECK_VALUE(it != tensors_.end(), "pop(\"", key.second,
                    "\") found no tensor stashed under that name: no layer "
                    "ran before it that stashed it");
  torch::Tensor t = std::move(it->second);
  tensors_.erase(it);
  return t;
}

namespace {

thread_local SkipTracker* current_tracker = nullptr;

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

} // namespace

SkipTracker& current_skip_tracker() {
  if (current_tracker == nullptr) {
    thread_local SkipTracker own;
    return own;
  }
  return *current_tracker;
}

SkipTrackerGuard::SkipTrackerGuard(SkipTracker& tracker)
    : previous_(current_tracker) {
  current_tracker = &tracker;
}

SkipTrackerGuard::~SkipTrackerGuard() { current_tracker = previous_; }

Skippable::Skippable(std::vector<std::string> stash, std::vector<std::string> pop)
    : stash_(std::move(stash)), pop_(std::move(pop)) {}

void Skippable::isolate(const Namespace& ns, const std::vector<std::string>& only) {
  for (const auto& names : {only.empty() ? stash_ : only,
                            only.empty() ? pop_ : std::vector<std::string>{}}) {
    for (const auto& name : names) {
      namespaces_[name] = ns.id();
    }
  }
}

SkipKey Skippable::key(const std::string& name) const {
  auto it = namespaces_.find(name);
  return {it == namespaces_.end() ? Namespace::global().id() : it->second, name};
}

void Skippable::stash(const std::string& name, torch::Tensor tensor) {
  TORCH_CHECK_VALUE(contains(stash_, name), "stash(\"", name, "\") in a layer "
                    "that did not declare it: Skippable's stash names are {",
                    c10::Join(", ", stash_), "}");
  current_skip_tracker().save(key(name), std::move(tensor));
}

torch::Tensor Skippable::pop(const std::string& name) {
  TORCH_CHECK_VALUE(contains(pop_, name), "pop(\"", name, "\") in a layer "
                    "that did not declare it: Skippable's pop names are {",
                    c10::Join(", ", pop_), "}");
  return current_skip_tracker().load(key(name));
}

namespace {

// Every mismatch of the skips of `module`'s layers; empty when they match.
std::vector<std::string> skip_problems(const torch::nn::Sequential& module) {
  std::map<SkipKey, size_t> stashed, popped;
  std::vector<std::string> problems;
  for (size_t i = 0; i < module->size(); ++i) {
    const auto* layer = dynamic_cast<const Skippable*>(module->ptr(i).get());
    if (layer == nullptr) {
      continue;
    }
    const std::string at = "'" + std::to_string(i) + "'";
    for (const auto& name : layer->stash_names()) {
      if (contains(layer->pop_names(), name)) {
        problems.push_back(at + " declared '" + name +
                           "' both as stashable and as poppable");
        continue;
      }
      const SkipKey k = layer->key(name);
      if (stashed.count(k)) {
        problems.push_back(at + " redeclared '" + name + "' as stashable "
                           "(stashed by '" + std::to_string(stashed[k]) +
                           "'); isolate each pair in its own Namespace");
      } else {
        stashed[k] = i;
      }
    }
    for (const auto& name : layer->pop_names()) {
      if (contains(layer->stash_names(), name)) {
        continue;
      }
      const SkipKey k = layer->key(name);
      if (popped.count(k)) {
        problems.push_back(at + " redeclared '" + name + "' as poppable "
                           "(popped by '" + std::to_string(popped[k]) +
                           "'); isolate each pair in its own Namespace");
      } else if (!stashed.count(k)) {
        problems.push_back(at + " declared '" + name + "' as poppable but it "
                           "was not stashed by an earlier layer");
      } else {
        popped[k] = i;
      }
    }
  }
  for (const auto& [k, i] : stashed) {
    if (!popped.count(k)) {
      problems.push_back("no module declared '" + k.second + "' as poppable "
                         "but stashed (by '" + std::to_string(i) + "')");
    }
  }
  return problems;
}

} // namespace

void verify_skippables(const torch::nn::Sequential& module) {
  const auto problems = skip_problems(module);
  if (problems.empty()) {
    return;
  }
  std::ostringstream out;
  out << "skip connections do not match (stash and pop pairs in a namespace):\n";
  for (const auto& p : problems) {
    out << "\n* " << p;
  }
  TORCH_CHECK_TYPE(false, out.str());
}

std::vector<StageSkipKeys> skip_layout(const torch::nn::Sequential& module,
                                       const std::vector<int64_t>& balance) {
  verify_skippables(module);
  std::vector<size_t> stage_of;
  for (size_t s = 0; s < balance.size(); ++s) {
    stage_of.insert(stage_of.end(), balance[s], s);
  }
  TORCH_CHECK_VALUE(stage_of.size() == module->size(), "balance sums to ",
                    stage_of.size(), " but the module has ", module->size(),
                    " layers");
  std::map<SkipKey, size_t> stash_at;
  // (stash layer, pop layer, key) of every skip crossing a boundary.
  std::vector<std::tuple<size_t, size_t, SkipKey>> crossing;
  for (size_t i = 0; i < module->size(); ++i) {
    const auto* layer = dynamic_cast<const Skippable*>(module->ptr(i).get());
    if (layer == nullptr) {
      continue;
    }
    for (const auto& name : layer->pop_names()) {
      const SkipKey k = layer->key(name);
      if (stage_of[stash_at.at(k)] != stage_of[i]) {
        crossing.emplace_back(stash_at.at(k), i, k);
      }
    }
    for (const auto& name : layer->stash_names()) {
      stash_at[layer->key(name)] = i;
    }
  }
  std::sort(crossing.begin(), crossing.end());
  std::vector<StageSkipKeys> layout(balance.size());
  for (size_t id = 0; id < crossing.size(); ++id) {
    const auto& [from, to, k] = crossing[id];
    layout[stage_of[from]].stash.push_back(k);
    layout[stage_of[from]].stash_ids.push_back(static_cast<int64_t>(id));
    layout[stage_of[to]].pop.push_back(k);
    layout[stage_of[to]].pop_ids.push_back(static_cast<int64_t>(id));
  }
  return layout;
}

} // namespace pipegear
