#include <pipegear/detail/cells.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <typeinfo>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>

#include <c10/util/Type.h>

#include <pipegear/detail/checkpoint_flags.h>
#include <pipegear/detail/random.h>
#include <pipegear/errors.h>

namespace pipegear::detail {
namespace {

using CheckpointFlagGuard = pipegear::detail::CheckpointFlagGuard;

using Clock = std::chrono::steady_clock;

} // namespace

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             Clock::now().time_since_epoch())
      .count();
}

namespace {

thread_local int64_t tls_running_stage = -1;

// Sets running_stage() for the duration of a cell (restored after, for a
// cell that would run inside another's backward).
class RunningStage {
 public:
  explicit RunningStage(int64_t stage) : previous_(tls_running_stage) {
    tls_running_stage = stage;
  }
  ~RunningStage() { tls_running_stage = previous_; }
  RunningStage(const RunningStage&) = delete;
  RunningStage& operator=(const RunningStage&) = delete;

 private:
  int64_t previous_;
};

} // namespace

int64_t running_stage() { return tls_running_stage; }

namespace {

// Identity whose output is not a leaf: a stage's first layer may then work
// in place on its input (nn.ReLU(inplace=True)), which autograd forbids on
// the leaf itself.
struct Alias : torch::autograd::Function<Alias> {
  static torch::Tensor forward(torch::autograd::AutogradContext*,
                               const torch::Tensor& x) {
    return x.detach();
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext*, torch::autograd::variable_list g) {
    return g;
  }
};

Batch alias_leaves(const Batch& leaves) {
  Batch out;
  out.tuple = leaves.tuple;
  out.reserve(leaves.size());
  for (const auto& t : leaves) {
    out.push_back(t.defined() && t.requires_grad() ? Alias::apply(t) : t);
  }
  return out;
}

// The leaves of a recomputation that modifies its input in place: copies
// (through autograd, so the leaves get their gradients), since the leaves'
// memory may be another stage's too (a same-device message is not copied)
// and that stage may still read it.
Batch copied_leaves(const Batch& leaves) {
  Batch out;
  out.tuple = leaves.tuple;
  out.reserve(leaves.size());
  for (const auto& t : leaves) {
    out.push_back(t.defined() ? t.clone() : t);
  }
  return out;
}

// Inference tensors have no version counter (and no graph to protect).
int64_t version_of(const torch::Tensor& t) {
  return t.defined() && !t.is_inference() ? static_cast<int64_t>(t._version()) : 0;
}

std::vector<int64_t> versions_of(const Batch& b) {
  std::vector<int64_t> v;
  v.reserve(b.size());
  for (const auto& t : b) {
    v.push_back(version_of(t));
  }
  return v;
}

bool any_shared(const std::vector<int64_t>& shared) {
  return std::any_of(shared.begin(), shared.end(),
                     [](int64_t id) { return id >= 0; });
}

// Whether a and b may share memory (when the layout makes it hard to tell,
// they may).
bool overlap(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.defined() || !b.defined() || !a.has_storage() || !b.has_storage() ||
      a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) {
    return false;
  }
  return at::get_overlap_status(a, b) != at::MemOverlapStatus::No;
}

// Marks the first `count` tensors of `t` that share memory with each other
// (`return x, x`; a pipeline input holding one tensor twice): the next
// stage receives each as a tensor of its own (a copy between devices or
// ranks, or in a checkpointed forward), so an in-place change of one would
// not reach the other as it does in the model. Marks already set stay.
void mark_shared_in_message(const Batch& t, size_t count,
                            std::vector<int64_t>& marks) {
  for (size_t a = 0; a < count; ++a) {
    for (size_t b = a + 1; b < count; ++b) {
      if (overlap(t[a], t[b])) {
        marks[a] = marks[a] >= 0 ? marks[a] : kSharedInMessage;
        marks[b] = marks[b] >= 0 ? marks[b] : kSharedInMessage;
      }
    }
  }
}

/// Inside a handler: rethrows the current exception as a StageError with
/// `context`, the original nested, when it is a std::exception; anything
/// else unchanged.
[[noreturn]] void rethrow_in_context(const std::string& context) {
  try {
    throw;
  } catch (const std::exception& e) {
    std::throw_with_nested(StageError(context + ": " +
                                      c10::demangle(typeid(e).name()) + ": " +
                                      e.what()));
  }
}

// The guard that makes `device` current for a cell (none on the CPU).
std::optional<c10::Device> accelerator(c10::Device device) {
  return device.is_cpu() ? std::nullopt : std::optional<c10::Device>(device);
}

// Runs f; an exception leaving it names "pipegear: in stage s, <where()>": a
// c10::Error as context, a Python error through the stage's annotate_error
// (a note), any other std::exception as a StageError with the original
// nested (errors.h). Aborted (another cell failed) passes untouched.
template <typename Where, typename F>
void in_context(Stage& stage, int64_t index, const Where& where, F f) {
  try {
    f();
  } catch (c10::Error& e) {
    e.add_context("pipegear: in stage " + std::to_string(index) + ", " + where());
    throw;
  } catch (const Aborted&) {
    throw;
  } catch (...) {
    const std::string context =
        "pipegear: in stage " + std::to_string(index) + ", " + where();
    if (stage.annotate_error(context)) {
      throw;  // the stage's own error (a Python one), now with the context
    }
    rethrow_in_context(context);
  }
}

[[noreturn]] void no_skips() {
  TORCH_CHECK_VALUE(false, "this pipeline's transport does not carry skip "
                    "connections between stages");
}

} // namespace

std::vector<std::string> skip_labels(const std::vector<std::string>& names,
                                     const std::vector<int64_t>& from,
                                     const std::vector<int64_t>& to,
                                     const std::string& unit) {
  std::vector<std::string> labels(std::max(from.size(), to.size()));
  for (size_t id = 0; id < labels.size(); ++id) {
    const bool named = id < names.size() && !names[id].empty();
    std::string& l = labels[id];
    l = "skip " + (named ? "'" + names[id] + "'" : std::to_string(id));
    const int64_t a = id < from.size() ? from[id] : -1;
    const int64_t b = id < to.size() ? to[id] : -1;
    if (a >= 0 && b >= 0) {
      l += " (stashed by " + unit + " " + std::to_string(a) + ", popped by " +
          unit + " " + std::to_string(b) + ")";
    }
  }
  return labels;
}

Message Transport::recv_skip(int64_t, int64_t) { no_skips(); }
void Transport::send_skip(int64_t, int64_t, Message) { no_skips(); }
Message Transport::recv_skip_grad(int64_t, int64_t) { no_skips(); }
void Transport::send_skip_grad(int64_t, int64_t, Message) { no_skips(); }

Batch CellRunner::call_stage(const Batch& x,
                             std::vector<torch::Tensor>& stashed) {
  const StageSkips& skips = stage_->skips();
  if (skips.empty()) {
    return stage_->forward(x);
  }
  const size_t inputs = x.size() - skips.pop.size();
  Batch input(std::vector<torch::Tensor>(x.begin(), x.begin() + inputs),
              x.tuple);
  std::vector<torch::Tensor> popped(x.begin() + inputs, x.end());
  stashed.clear();
  Batch y = stage_->forward_skips(input, popped, stashed);
  TORCH_CHECK_VALUE(stashed.size() == skips.stash.size(), "stage ", index_,
                    " stashed ", stashed.size(), " skip tensors, ",
                    skips.stash.size(), " expected");
  return y;
}

void CellRunner::receive_popped(Transport& transport, int64_t j, Batch& x,
                                std::vector<int64_t>& shared) {
  for (int64_t id : stage_->skips().pop) {
    Message m = transport.recv_skip(id, j);
    shared.push_back(m.shared.empty() ? -1 : m.shared.front());
    Batch b = copier_.receive(std::move(m), stage_->device(), true);
    x.push_back(b.front());
  }
}

void CellRunner::send_stashed(Transport& transport, int64_t j, Batch& y,
                              std::vector<int64_t>& shared) {
  const auto& ids = stage_->skips().stash;
  const size_t first = y.size() - ids.size();
  for (size_t i = 0; i < ids.size(); ++i) {
    Message m = make_message(Batch({y[first + i]}, true), stage_->device());
    if (shared[first + i] >= 0) {
      m.shared = {shared[first + i]};
    }
    transport.send_skip(ids[i], j, std::move(m));
  }
  y.resize(first);
  shared.resize(first);
}

std::string CellRunner::skip_label(int64_t id) const {
  if (id >= 0 && id < static_cast<int64_t>(skip_labels_.size()) &&
      !skip_labels_[id].empty()) {
    return skip_labels_[id];
  }
  return "skip " + std::to_string(id);
}

// The plain model's aliasing cannot cross stages: a skip travels as a
// tensor of its own (a copy between devices or ranks, a copy in a
// checkpointed forward), so an in-place change of memory that a skip
// shares with another tensor that left its stage would reach one and not
// the other. The stage that would make it refuses (design decision 16).
void CellRunner::check_shared_unmodified(const Batch& ran,
                                         const std::vector<int64_t>& before,
                                         const std::vector<int64_t>& shared,
                                         int64_t j) const {
  const auto& pops = stage_->skips().pop;
  const size_t inputs = ran.size() - std::min(ran.size(), pops.size());
  // Same-device aliases share a version counter: every alias of the
  // memory looks modified, so all of them are named.
  std::string what;
  int64_t id = -1;
  int64_t count = 0;
  for (size_t i = 0; i < ran.size() && i < shared.size(); ++i) {
    if (shared[i] < 0 || version_of(ran[i]) == before[i]) {
      continue;
    }
    what += (what.empty() ? "" : ", ") +
        (i < inputs ? "its input (tensor " + std::to_string(i) + ")"
                    : "the popped tensor of " + skip_label(pops[i - inputs]));
    id = id >= 0 ? id : shared[i];
    ++count;
  }
  if (count > 1) {
    what += " (one of them at least: aliases share a version counter)";
  }
  TORCH_CHECK_VALUE(
      what.empty() || id != kSharedInMessage, "stage ", index_,
      " modified in place ", what, " in the forward of micro-batch ", j,
      ": memory that tensors of its input share with each other (",
      index_ == 0 ? std::string("the pipeline's input holds one tensor twice")
                  : "stage " + std::to_string(index_ - 1) +
                        " returned tensors sharing memory, such as `return x, x`",
      "). Without a pipeline every alias would see the change; between "
      "stages each travels as a tensor of its own, so outputs or gradients "
      "would differ from the model's. Return a copy (`x.clone()`) or do not "
      "modify the tensor in place (docs/engine.md, \"What flows between "
      "stages\")");
  TORCH_CHECK_VALUE(
      what.empty(), "stage ", index_, " modified in place ", what,
      " in the forward of micro-batch ", j, ": memory that ", skip_label(id),
      " shares with another tensor leaving its stashing stage (its output "
      "or another skip). Without a pipeline every alias would see the "
      "change; across stages the skip travels as a tensor of its own, so "
      "outputs or gradients would differ from the model's. Stash a copy "
      "(`yield stash(name, x.clone())`; C++: `stash(name, x.clone())`) or do "
      "not modify the tensor in place (docs/skip.md, \"In-place operations\")");
}

// Per tensor the stage sends (its output, then its stashes: y), the skip
// whose memory it shares, or -1: a stash sharing memory with another
// tensor leaving the stage, that tensor, and anything sharing memory with
// an input that came marked (a layer passing it on).
std::vector<int64_t> CellRunner::outgoing_shared(
    const Batch& y, const Batch& ran, const std::vector<int64_t>& shared) const {
  const auto& stash = stage_->skips().stash;
  std::vector<int64_t> out(y.size(), -1);
  if (any_shared(shared)) {
    for (size_t o = 0; o < y.size(); ++o) {
      for (size_t i = 0; i < ran.size() && i < shared.size() && out[o] < 0; ++i) {
        if (shared[i] >= 0 && overlap(y[o], ran[i])) {
          out[o] = shared[i];
        }
      }
    }
  }
  const size_t first = y.size() - std::min(y.size(), stash.size());
  mark_shared_in_message(y, first, out);
  for (size_t s = first; s < y.size(); ++s) {
    for (size_t o = 0; o < y.size(); ++o) {
      if (o != s && overlap(y[s], y[o])) {
        const int64_t id = stash[s - first];
        out[s] = out[s] >= 0 ? out[s] : id;
        out[o] = out[o] >= 0 ? out[o] : id;
      }
    }
  }
  return out;
}

void CellRunner::receive_stash_grads(Transport& transport, int64_t j,
                                     Batch& grads) {
  for (int64_t id : stage_->skips().stash) {
    Batch b = copier_.receive(transport.recv_skip_grad(id, j),
                              stage_->device(), false);
    grads.push_back(b.front());
  }
}

void CellRunner::send_pop_grads(Transport& transport, int64_t j,
                                Batch& input_grads) {
  const auto& ids = stage_->skips().pop;
  const size_t first = input_grads.size() - ids.size();
  for (size_t i = 0; i < ids.size(); ++i) {
    transport.send_skip_grad(
        ids[i], j,
        make_message(Batch({input_grads[first + i]}, true), stage_->device()));
  }
  input_grads.resize(first);
}

void CellRunner::run(StepRun& run, Transport& transport,
                     const std::vector<Cell>& cells, size_t i, bool forward,
                     bool backward) {
  const Cell& cell = cells[i];
  const bool is_forward = cell.phase == Phase::kForward;
  if ((is_forward && !forward) || (!is_forward && !backward)) {
    return;
  }
  c10::OptionalDeviceGuard device_guard(accelerator(stage_->device()));
  RunningStage running(index_);
  // The first forward of this stage (of this chunk, when the worker runs
  // several stages).
  auto is_fwd = [&](const Cell& c) {
    return c.phase == Phase::kForward && c.chunk == cell.chunk;
  };
  // Built only when a cell fails: the per-cell path formats nothing.
  const auto where = [&] {
    return "micro-batch " + std::to_string(cell.micro_batch) + ", " +
        phase_name(cell.phase);
  };
  in_context(*stage_, index_, where, [&] {
    if (cell.phase == Phase::kBackwardInput) {
      this->backward_input(run, transport, cell.micro_batch);
      return;
    }
    if (cell.phase == Phase::kBackwardWeight) {
      this->backward_weight(run, cell.micro_batch);
      return;
    }
    if (!is_forward) {
      this->backward(run, transport, cell.micro_batch);
      return;
    }
    if (std::none_of(cells.begin(), cells.begin() + i, is_fwd)) {
      stage_->begin_forward();
    }
    this->forward(run, transport, cell.micro_batch);
  });
}

void CellRunner::end_forward() {
  c10::OptionalDeviceGuard device_guard(accelerator(stage_->device()));
  in_context(*stage_, index_,
             [] { return std::string("committing the step (end_forward)"); },
             [&] { stage_->end_forward(); });
}

int64_t CellRunner::stream_key() const {
  const int64_t first = stage_->first_layer();
  return first >= 0 ? first : stream_key_of_stage(index_);
}

namespace {

// What a zero-weight micro-batch (nothing in it counts, say every target
// ignored) hands its backward: zero gradients for the outputs, even where
// its loss is NaN (0/0).
torch::Tensor zero_loss(const Batch& y) {
  torch::Tensor out;
  for (const auto& t : y) {
    if (can_require_grad(t)) {
      auto z = (t * 0).sum();
      out = out.defined() ? out + z : z;
    }
  }
  return out;
}

} // namespace

// Runs the stage on x; on the last stage of a step-style run, also applies
// the loss and returns {weight * loss} (what its backward differentiates).
// Call inside the cell's CellRandomness.
Batch CellRunner::apply(StepRun& run, int64_t j, const Batch& x) {
  const int64_t s = index_;
  std::vector<torch::Tensor> stashed;
  Batch y = call_stage(x, stashed);
  TORCH_CHECK_VALUE(!y.empty(), "stage ", s, " returned no tensor");
  for (size_t i = 0; i < y.size(); ++i) {
    TORCH_CHECK_VALUE(y[i].defined(), "stage ", s,
                      " returned an undefined tensor at position ", i);
  }
  if (!is_last(run)) {
    y.insert(y.end(), stashed.begin(), stashed.end());  // send_stashed
    return y;
  }
  // The outputs are gathered (module style) or matched with the target
  // rows (step style) by micro-batch: they must keep its batch size.
  const int64_t n = run.sizes[j];
  for (size_t i = 0; i < y.size(); ++i) {
    TORCH_CHECK_VALUE(
        y[i].dim() >= 1 && y[i].size(0) == n, "stage ", s,
        " (the last) returned ",
        y[i].dim() == 0 ? std::string("a 0-dimensional tensor")
                        : "a tensor of batch size " + std::to_string(y[i].size(0)),
        y.size() > 1 ? " at position " + std::to_string(i) : std::string(),
        " for micro-batch ", j, " of ", n,
        " rows; the pipeline's output must keep the batch size (dim 0) of "
        "its input, since micro-batches are gathered along it");
  }
  if (run.loss_fn == nullptr) {
    return y;
  }
  set_random_layer(kLossLayer - stream_key());
  auto loss = (*run.loss_fn)(y, run.targets[j]);
  TORCH_CHECK_VALUE(loss.defined() && loss.numel() == 1,
                    "loss_fn must return a scalar tensor, got ",
                    loss.defined() ? loss.sizes() : c10::IntArrayRef{});
  run.losses[j] = loss.detach().reshape({});
  if (run.grad && c10::GradMode::is_enabled()) {
    TORCH_CHECK_VALUE(loss.requires_grad(),
                "loss_fn returned a loss that does not require grad (it has "
                "no grad_fn), while the model's parameters or input do: the "
                "loss must be computed from the output without detaching it");
  }
  if (run.loss_weights[j] == 0.0) {
    auto zero = zero_loss(y);
    return {zero.defined() ? zero : loss.reshape({}) * 0.0};
  }
  return {loss.reshape({}) * run.loss_weights[j]};
}

// A checkpointed forward: no graph, and an input the recomputation can
// start from again. Layers that modify the stage input in place (x.mul_(2),
// ReLU(inplace=True) first) would change what the recomputation sees, so
// the first checkpointed forward of a stage runs on a copy and tells
// whether later ones need one; a stage that starts modifying its input
// later is caught by the version counter.
Batch CellRunner::apply_checkpointed(StepRun& run, int64_t j, const Batch& x,
                                     const std::vector<int64_t>& shared,
                                     Batch& ran) {
  torch::NoGradGuard no_grad;
  CheckpointFlagGuard flag(CheckpointFlagGuard::Flag::kCheckpointing);
  const bool probe = !probed_input_;
  if (probe || copy_input_) {
    ran = x;
    for (auto& t : ran) {
      if (t.defined()) {
        t = t.clone();
      }
    }
    const Batch& copy = ran;
    Batch y = apply(run, j, copy);
    // On a copy the change would not reach the skip's other tensors.
    check_shared_unmodified(copy, std::vector<int64_t>(copy.size(), 0), shared, j);
    if (probe) {
      probed_input_ = true;
      for (size_t i = 0; i < copy.size(); ++i) {
        copy_input_ = copy_input_ ||
            (copy[i].defined() && copy[i]._version() != 0);
      }
    }
    return y;
  }
  const std::vector<int64_t> versions = versions_of(x);
  ran = x;
  Batch y = apply(run, j, x);
  check_shared_unmodified(x, versions, shared, j);
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i].defined() && static_cast<int64_t>(x[i]._version()) != versions[i]) {
      copy_input_ = true;  // from the next step on
      TORCH_CHECK_VALUE(false, "stage ", index_, " modified its input (tensor ",
                        i, ") in place during the checkpointed forward of "
                        "micro-batch ", j, ", which its earlier checkpointed "
                        "forwards did not; its recomputation would start "
                        "from the modified input. The stage's input is "
                        "copied from now on: run the step again");
    }
  }
  return y;
}

void CellRunner::forward(StepRun& run, Transport& transport, int64_t j) {
  const int64_t s = index_;
  const auto device = stage_->device();
  Message in = s == 0 ? Message{run.inputs[j], run.input_ready}
                      : transport.recv_forward(s, j);
  const int64_t start = now_ns();  // the trace shows work, not waiting
  // Per tensor of x, the skip whose memory it shares (-1: none).
  std::vector<int64_t> shared = std::move(in.shared);
  shared.resize(in.tensors.size(), -1);
  Batch x = copier_.receive(std::move(in), device, true);
  if (s == 0) {
    mark_shared_in_message(x, x.size(), shared);  // the pipeline's input
  }
  receive_popped(transport, j, x, shared);
  auto& cell = run.cells[s][j];
  Batch y;
  Batch ran;  // what the layers got: x, its aliases or a copy
  bool y_requires_grad = false;
  CellRandomness randomness(run.rng_seed, stream_key(), j);
  if (run.checkpointed[j]) {
    cell.checkpointed = true;
    y = apply_checkpointed(run, j, x, shared, ran);
    y_requires_grad = stage_->requires_grad() ||
        std::any_of(x.begin(), x.end(),
                    [](const auto& t) { return t.requires_grad(); });
    cell.leaves = std::move(x);
  } else {
    ran = run.grad ? alias_leaves(x) : x;
    const bool marked = any_shared(shared);
    const std::vector<int64_t> versions = marked ? versions_of(ran)
                                                 : std::vector<int64_t>();
    y = apply(run, j, ran);
    if (marked) {
      check_shared_unmodified(ran, versions, shared, j);
    }
    if (run.grad) {
      cell.leaves = std::move(x);
      cell.outputs = y;
    }
  }
  if (is_last(run)) {
    if (run.loss_fn == nullptr) {
      for (auto& t : y) {
        t = t.detach();
      }
      run.outputs[j] = std::move(y);
    }
  } else {
    std::vector<int64_t> out_shared = outgoing_shared(y, ran, shared);
    ran = Batch();
    Batch send;
    send.tuple = y.tuple;
    send.reserve(y.size());
    for (const auto& t : y) {
      const bool grad = run.grad && can_require_grad(t) &&
          (run.checkpointed[j] ? y_requires_grad : t.requires_grad());
      send.push_back(!t.defined() ? t
                     : grad ? t.detach().requires_grad_(true) : t.detach());
    }
    send_stashed(transport, j, send, out_shared);
    Message m = make_message(std::move(send), device);
    if (any_shared(out_shared)) {
      m.shared = std::move(out_shared);
    }
    transport.send_forward(s, j, std::move(m));
  }
  run.events[s].push_back({s, j, Phase::kForward, false, start, now_ns()});
}

void CellRunner::backward(StepRun& run, Transport& transport, int64_t j) {
  int64_t start = 0;
  auto [outs, gs] = output_gradients(run, transport, j, start, Phase::kBackward);
  if (!outs.empty()) {
    torch::autograd::backward(outs, gs);
  }
  auto& cell = run.cells[index_][j];
  Batch input_grads = leaf_grads(cell.leaves);
  cell = CellState{};
  send_input_grads(run, transport, j, std::move(input_grads));
  run.events[index_].push_back(
      {index_, j, Phase::kBackward, false, start, now_ns()});
}

Batch CellRunner::leaf_grads(const Batch& leaves) {
  Batch grads;
  grads.reserve(leaves.size());
  for (const auto& leaf : leaves) {
    grads.push_back(leaf.requires_grad() ? leaf.grad() : torch::Tensor());
  }
  return grads;
}

void CellRunner::send_input_grads(StepRun& run, Transport& transport, int64_t j,
                                  Batch input_grads) {
  // The popped skips' gradients (the last ones) go to their stashing stage.
  send_pop_grads(transport, j, input_grads);
  if (index_ == 0) {
    run.input_grads[j] = std::move(input_grads);
  } else {
    transport.send_backward(index_, j,
                            make_message(std::move(input_grads), stage_->device()));
  }
}

// ---- split backward (B and W) ---------------------------------------------
//
// B runs the autograd engine with the stage-input leaves as its only
// `inputs`: the engine then executes only the nodes on a path to them, and
// each asks should_compute_output before computing a gradient, so the
// weight gradients (dW = dY^T X of a Linear) are skipped. The nodes B runs
// that also have an edge towards the parameters (the "frontier": an
// AddmmBackward whose mat2 leads to a weight) get a pre-hook that keeps
// the gradients they receive. After B, their edges towards the input are
// cut (B was their last use): what hangs below the frontier is then the
// parameters' side of the graph only. W runs the engine once from every
// frontier node with its kept gradients, accumulating into the
// parameters: each frontier node now computes only its parameter-side
// outputs, and a node reached from several frontier nodes (a bias used
// twice) sums them as the whole backward would. Without the cut, a pass
// from one frontier node would also flow into the next one along the input
// chain, which leads to parameters too, counting its share twice.

struct WeightGrads {
  // (frontier node, slot) per kept gradient, and the outputs whose whole
  // graph leads to parameters only (nothing to the input), with theirs.
  torch::autograd::edge_list roots;
  torch::autograd::variable_list grads;
  // The kept gradients, filled by the pre-hooks during B.
  std::vector<std::pair<torch::autograd::Edge,
                        std::shared_ptr<torch::autograd::variable_list>>>
      frontier;
};

namespace {

using torch::autograd::Edge;
using torch::autograd::Node;

// Keeps the gradients a frontier node receives during B (the first call
// only: W runs the node again).
struct KeepGradients : torch::autograd::FunctionPreHook {
  explicit KeepGradients(std::shared_ptr<torch::autograd::variable_list> kept)
      : kept_(std::move(kept)) {}
  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& grads) override {
    if (kept_->empty()) {
      *kept_ = grads;
    }
    return grads;
  }

 private:
  std::shared_ptr<torch::autograd::variable_list> kept_;
};

// Which nodes of the graph below `roots` lead to one of `targets` (the
// input leaves' accumulators). Iterative: graphs of deep stages overflow a
// recursive walk.
//
// `alive` gets a reference to every node visited: B cuts the frontier's
// edges towards the input, which may drop the last reference to a node on
// the input side (one no saved tensor keeps), and the release after B
// still walks them.
std::unordered_map<Node*, bool> reaches(
    const std::vector<Edge>& roots, const std::unordered_set<Node*>& targets,
    std::vector<c10::intrusive_ptr<Node>>& alive) {
  std::unordered_map<Node*, bool> reach;
  std::vector<std::pair<Node*, size_t>> stack;
  for (const auto& root : roots) {
    Node* r = root.function.get();
    if (r == nullptr || reach.count(r)) {
      continue;
    }
    reach[r] = targets.count(r) > 0;
    alive.push_back(c10::intrusive_ptr<Node>::reclaim_copy(r));
    stack.emplace_back(r, 0);
    while (!stack.empty()) {
      auto& [node, next] = stack.back();
      if (next < node->next_edges().size()) {
        Node* child = node->next_edges()[next++].function.get();
        if (child != nullptr && !reach.count(child)) {
          reach[child] = targets.count(child) > 0;
          alive.push_back(c10::intrusive_ptr<Node>::reclaim_copy(child));
          stack.emplace_back(child, 0);
        }
        continue;
      }
      bool any = reach[node];
      for (const auto& e : node->next_edges()) {
        if (e.function != nullptr) {
          // A child still on the stack (a cycle cannot occur in autograd
          // graphs) has its final value here.
          any = any || reach[e.function.get()];
        }
      }
      reach[node] = any;
      stack.pop_back();
    }
  }
  return reach;
}

} // namespace

std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>>
CellRunner::output_gradients(StepRun& run, Transport& transport, int64_t j,
                             int64_t& start, Phase phase) {
  const int64_t s = index_;
  const auto device = stage_->device();
  auto& cell = run.cells[s][j];
  if (cell.checkpointed) {
    const int64_t recompute_start = now_ns();
    // Recompute first: it needs no gradient, so it overlaps the wait. The
    // cell's own random streams draw what its forward drew.
    CellRandomness randomness(run.rng_seed, stream_key(), j);
    CheckpointFlagGuard flag(CheckpointFlagGuard::Flag::kRecomputing);
    // A stage that modifies its input in place ran its forward on a copy
    // (apply_checkpointed); its recomputation does too, or it would write
    // memory that the stage before it (an output passed on) or a skip's
    // stasher may still read in its own recomputation.
    cell.outputs = apply(run, j, copy_input_ ? copied_leaves(cell.leaves)
                                             : alias_leaves(cell.leaves));
    run.events[s].push_back({s, j, phase, true, recompute_start, now_ns()});
  }
  Batch grads;
  start = now_ns();
  if (!is_last(run)) {
    Message m = transport.recv_backward(s, j);
    start = now_ns();
    grads = copier_.receive(std::move(m), device, false);
    // The stashed skips' gradients are output gradients (B's, when split).
    receive_stash_grads(transport, j, grads);
  } else if (run.loss_fn != nullptr) {
    grads = {torch::ones_like(cell.outputs.front())};
  } else {
    grads = run.output_grads[j];
    for (auto& g : grads) {
      if (g.defined() && g.device() != device) {
        g = copier_.copy_to(g, device, nullptr);
      }
    }
  }
  std::vector<torch::Tensor> outs, gs;
  for (size_t i = 0; i < cell.outputs.size() && i < grads.size(); ++i) {
    if (cell.outputs[i].defined() && cell.outputs[i].requires_grad() &&
        grads[i].defined()) {
      outs.push_back(cell.outputs[i]);
      gs.push_back(grads[i]);
    }
  }
  return {std::move(outs), std::move(gs)};
}

void CellRunner::backward_input(StepRun& run, Transport& transport,
                                int64_t j) {
  namespace impl = torch::autograd::impl;
  const int64_t s = index_;
  int64_t start = 0;
  auto [outs, gs] = output_gradients(run, transport, j, start,
                                     Phase::kBackwardInput);
  auto& cell = run.cells[s][j];

  std::vector<torch::Tensor> inputs;
  std::unordered_set<Node*> targets;
  for (const auto& leaf : cell.leaves) {
    if (leaf.defined() && leaf.requires_grad()) {
      inputs.push_back(leaf);
      targets.insert(impl::gradient_edge(leaf).function.get());
    }
  }
  std::vector<Edge> root_edges;
  root_edges.reserve(outs.size());
  for (const auto& t : outs) {
    root_edges.push_back(impl::gradient_edge(t));
  }
  std::vector<c10::intrusive_ptr<Node>> alive;  // until this cell ends
  const auto reach = reaches(root_edges, targets, alive);

  auto w = std::make_shared<WeightGrads>();
  std::vector<torch::Tensor> input_outs, input_gs;
  for (size_t i = 0; i < outs.size(); ++i) {
    if (reach.at(root_edges[i].function.get())) {
      input_outs.push_back(outs[i]);
      input_gs.push_back(gs[i]);
    } else {
      w->roots.push_back(root_edges[i]);
      w->grads.push_back(gs[i]);
    }
  }
  std::vector<Node*> frontier;
  for (const auto& [node, leads_to_input] : reach) {
    if (!leads_to_input) {
      continue;
    }
    for (const auto& e : node->next_edges()) {
      if (e.function != nullptr && !reach.at(e.function.get())) {
        frontier.push_back(node);
        break;
      }
    }
  }
  // In the graph's order (highest sequence number first), so that nothing
  // in W depends on the hash map's order.
  std::sort(frontier.begin(), frontier.end(), [](Node* a, Node* b) {
    return a->sequence_nr() > b->sequence_nr();
  });
  for (Node* node : frontier) {
    auto kept = std::make_shared<torch::autograd::variable_list>();
    node->add_pre_hook(std::make_unique<KeepGradients>(kept));
    // Held here, the node keeps the graph below it alive for W; what lies
    // between the outputs and the frontier is freed with them.
    w->frontier.emplace_back(
        Edge(c10::intrusive_ptr<Node>::reclaim_copy(node), 0), std::move(kept));
  }
  const bool keep_for_w = !frontier.empty() || !w->roots.empty();
  if (!input_outs.empty()) {
    torch::autograd::backward(input_outs, input_gs,
                              /*retain_graph=*/keep_for_w,
                              /*create_graph=*/false, inputs);
  }
  for (Node* node : frontier) {
    for (auto& e : node->next_edges()) {
      if (e.function != nullptr && reach.at(e.function.get())) {
        e = Edge();  // towards the input: done by B
      }
    }
  }
  // What only the input gradient needed is freed now, as a whole backward
  // (retain_graph false) would: the nodes B ran that W does not run again
  // may outlive this cell (a saved tensor keeps its grad_fn, and so its
  // graph, alive; a loss function may hold its result), and with their
  // saved tensors each micro-batch's would stay until the step ends.
  const std::unordered_set<Node*> kept_nodes(frontier.begin(), frontier.end());
  for (const auto& [node, leads_to_input] : reach) {
    if (leads_to_input && !kept_nodes.count(node) && !targets.count(node)) {
      node->release_variables();
    }
  }
  Batch input_grads = leaf_grads(cell.leaves);
  cell = CellState{};
  if (keep_for_w) {
    cell.weight_grads = std::move(w);
  }
  send_input_grads(run, transport, j, std::move(input_grads));
  run.events[s].push_back({s, j, Phase::kBackwardInput, false, start, now_ns()});
}

namespace {

// A frontier node's pre-hooks, set aside while W runs it again: the
// gradients B kept are what they made of the node's incoming gradients
// already (the engine runs a node's tensor pre-hooks, retain_grad's and
// then its own pre-hooks, ours last), so running them again would apply a
// user's hook on the tensor (`h.register_hook(lambda g: 2 * g)`) twice.
class PreHooksAside {
 public:
  explicit PreHooksAside(const std::vector<Edge>& nodes) {
    for (const auto& e : nodes) {
      Node* n = e.function.get();
      aside_.push_back({n, std::move(n->tensor_pre_hooks()),
                        std::move(n->retains_grad_hooks()),
                        std::move(n->pre_hooks())});
      n->tensor_pre_hooks().clear();
      n->retains_grad_hooks().clear();
      n->pre_hooks().clear();
    }
  }
  ~PreHooksAside() {
    for (auto& a : aside_) {
      a.node->tensor_pre_hooks() = std::move(a.tensor);
      a.node->retains_grad_hooks() = std::move(a.retains);
      a.node->pre_hooks() = std::move(a.own);
    }
  }
  PreHooksAside(const PreHooksAside&) = delete;
  PreHooksAside& operator=(const PreHooksAside&) = delete;

 private:
  struct Aside {
    Node* node;
    std::vector<std::unique_ptr<torch::autograd::FunctionPreHook>> tensor;
    std::unordered_map<size_t, std::unique_ptr<torch::autograd::FunctionPreHook>>
        retains;
    std::vector<std::unique_ptr<torch::autograd::FunctionPreHook>> own;
  };
  std::vector<Aside> aside_;
};

} // namespace

void CellRunner::backward_weight(StepRun& run, int64_t j) {
  const int64_t s = index_;
  const int64_t start = now_ns();
  auto w = std::move(run.cells[s][j].weight_grads);
  run.cells[s][j] = CellState{};
  if (w != nullptr) {
    std::vector<Edge> frontier;
    for (const auto& [node, kept] : w->frontier) {
      frontier.push_back(node);
      for (size_t i = 0; i < kept->size(); ++i) {
        if ((*kept)[i].defined()) {
          w->roots.emplace_back(node.function, static_cast<uint32_t>(i));
          w->grads.push_back((*kept)[i]);
        }
      }
    }
    w->frontier.clear();
    if (!w->roots.empty()) {
      PreHooksAside aside(frontier);
      torch::autograd::Engine::get_default_engine().execute(
          w->roots, w->grads, /*keep_graph=*/false, /*create_graph=*/false,
          /*accumulate_grad=*/true);
    }
  }
  run.events[s].push_back({s, j, Phase::kBackwardWeight, false, start, now_ns()});
}

} // namespace pipegear::detail
