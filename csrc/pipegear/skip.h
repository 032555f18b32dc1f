#pragma once
// Skip connections for torch::nn::Sequential layers (docs/skip.md): a layer
// stashes a named tensor, a later layer pops it, whatever stages lie
// between them. The C++ face of Python's pipegear.skip (torchgpipe's API):
//
//   struct DownImpl : torch::nn::Module, pipegear::Skippable {
//     DownImpl() : Skippable(/*stash=*/{"d1"}, /*pop=*/{}) {}
//     torch::Tensor forward(torch::Tensor x) {
//       stash("d1", x);
//       return x * 2;
//     }
//   };
//   TORCH_MODULE(Down);
//
// The same Sequential runs without a pipeline: the layers then hand their
// skips over through the calling thread's SkipTracker.

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

namespace pipegear {

/// Isolates skip names: the same name in two stash/pop pairs (a repeated
/// residual block) is told apart by a namespace per pair. Copies compare
/// equal; two namespaces made apart never do.
class Namespace {
 public:
  Namespace();
  int64_t id() const { return id_; }
  bool operator==(const Namespace& other) const { return id_ == other.id_; }
  bool operator!=(const Namespace& other) const { return id_ != other.id_; }

  /// The namespace of every name a layer did not isolate.
  static Namespace global();

 private:
  explicit Namespace(int64_t id) : id_(id) {}
  int64_t id_;
};

/// A skip's identity: (namespace id, name).
using SkipKey = std::pair<int64_t, std::string>;

/// The stashed tensors not popped yet (undefined for a skip of None).
class SkipTracker {
 public:
  void save(const SkipKey& key, torch::Tensor tensor);
  /// Removes and returns the tensor of `key`; ValueError when none.
  torch::Tensor load(const SkipKey& key);
  bool contains(const SkipKey& key) const { return tensors_.count(key) > 0; }
  size_t size() const { return tensors_.size(); }
  /// The tensors not popped yet (the profiler detaches them).
  std::map<SkipKey, torch::Tensor>& tensors() { return tensors_; }

 private:
  std::map<SkipKey, torch::Tensor> tensors_;
};

/// The calling thread's tracker: the innermost SkipTrackerGuard's, else one
/// of the thread's own.
SkipTracker& current_skip_tracker();

/// Makes `tracker` the calling thread's tracker while alive.
class SkipTrackerGuard {
 public:
  explicit SkipTrackerGuard(SkipTracker& tracker);
  ~SkipTrackerGuard();
  SkipTrackerGuard(const SkipTrackerGuard&) = delete;
  SkipTrackerGuard& operator=(const SkipTrackerGuard&) = delete;

 private:
  SkipTracker* previous_;
};

/// A layer that stashes or pops skips: derive from it next to
/// torch::nn::Module, declare the names in the constructor, and call
/// stash() / pop() in forward. A name stashed or popped without being
/// declared is a ValueError.
class Skippable {
 public:
  Skippable(std::vector<std::string> stash, std::vector<std::string> pop);
  virtual ~Skippable() = default;

  /// Puts the layer's names (or those in `only`) in `ns`.
  void isolate(const Namespace& ns, const std::vector<std::string>& only = {});

  const std::vector<std::string>& stash_names() const { return stash_; }
  const std::vector<std::string>& pop_names() const { return pop_; }
  /// The key of one of the layer's names.
  SkipKey key(const std::string& name) const;

 protected:
  /// Keeps `tensor` (undefined: a skip of None) for the layer popping `name`.
  void stash(const std::string& name, torch::Tensor tensor);
  /// The tensor an earlier layer stashed as `name`.
  torch::Tensor pop(const std::string& name);

 private:
  std::vector<std::string> stash_;
  std::vector<std::string> pop_;
  std::map<std::string, int64_t> namespaces_;
};

/// Checks the skips of `module`'s layers (its direct children, in order):
/// each stash popped once by a later layer, each pop stashed by an earlier
/// one, no name stashed or popped twice in a namespace, no layer both
/// stashing and popping a name. TypeError listing every mismatch.
void verify_skippables(const torch::nn::Sequential& module);

/// The skips crossing the boundaries of one stage: keys, in the order of
/// their ids (StageSkips).
struct StageSkipKeys {
  std::vector<SkipKey> pop;
  std::vector<SkipKey> stash;
  std::vector<int64_t> pop_ids;
  std::vector<int64_t> stash_ids;
};

/// For each stage of `balance` over `module`'s layers: the skips that
/// cross its boundaries, ids numbered in stash order. Runs
/// verify_skippables first.
std::vector<StageSkipKeys> skip_layout(const torch::nn::Sequential& module,
                                       const std::vector<int64_t>& balance);

} // namespace pipegear
