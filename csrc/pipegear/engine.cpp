// The executor. One persistent worker thread per stage runs that stage's
// cells of a schedule in order; cells hand activations forward and gradients
// backward through per-step mailboxes. Backward is explicit: a backward cell
// calls torch::autograd::backward on its own outputs with the gradients the
// next stage sent, so stages drain in parallel on CPU too.
//
// Cross-device hand-offs use the device-generic c10 API (streams, events,
// record_stream): the receiver copies on a copy stream that waits for the
// sender's event, and its compute stream waits for the copy. On CPU-only
// builds every tensor is on `cpu` and none of that runs, but it compiles.
#include <pipegear/engine.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <unordered_map>
#include <mutex>
#include <optional>
#include <thread>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/ivalue.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

namespace pipegear {

LossReduction parse_loss_reduction(const std::string& name) {
  if (name == "mean") {
    return LossReduction::kMean;
  }
  TORCH_CHECK_VALUE(name == "sum", "reduction must be 'mean' or 'sum', got '",
                    name, "'");
  return LossReduction::kSum;
}

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "gpipe") {
    return ScheduleKind::kGPipe;
  }
  TORCH_CHECK_VALUE(name == "1f1b", "schedule must be 'gpipe' or '1f1b', got '",
                    name, "'");
  return ScheduleKind::k1F1B;
}

namespace detail {
namespace {

using Clock = std::chrono::steady_clock;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             Clock::now().time_since_epoch())
      .count();
}

bool can_require_grad(const torch::Tensor& t) {
  return t.defined() && (t.is_floating_point() || t.is_complex());
}

// Thrown inside a worker when another cell failed: unwinds quietly.
struct Aborted {};

// What one stage hands to the next: tensors plus, on an accelerator, the
// event after which they are ready.
struct Message {
  Batch tensors;
  std::shared_ptr<c10::Event> ready;
};

// Generator states saved before a checkpointed forward, replayed by its
// recomputation.
struct RngState {
  torch::Tensor cpu;
  torch::Tensor device;
};

at::Generator device_generator(c10::Device device) {
  return at::globalContext().defaultGenerator(device);
}

RngState save_rng(c10::Device device) {
  RngState state;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    state.cpu = gen.get_state();
  }
  if (!device.is_cpu()) {
    auto gen = device_generator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    state.device = gen.get_state();
  }
  return state;
}

void restore_rng(c10::Device device, const RngState& state) {
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state.cpu);
  }
  if (!device.is_cpu()) {
    auto gen = device_generator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state.device);
  }
}

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
  out.reserve(leaves.size());
  for (const auto& t : leaves) {
    out.push_back(t.defined() && t.requires_grad() ? Alias::apply(t) : t);
  }
  return out;
}

// Serialises generator rewinds (see backward_cell).
std::mutex& replay_mutex() {
  static std::mutex mutex;
  return mutex;
}

// The autograd-relevant state of one (stage, micro-batch).
struct CellState {
  Batch leaves;   // the stage input, as leaves (kept alone when checkpointed)
  Batch outputs;  // outputs with their graph (absent while checkpointed)
  bool checkpointed = false;
  RngState rng;
};

} // namespace

// Everything one step (one mini-batch) needs across its passes. Module style
// keeps it alive from the fill pass to the drain pass in the autograd node.
struct StepRun {
  int64_t stages = 0;
  int64_t micro_batches = 0;
  std::vector<int64_t> sizes;
  bool grad = false;  // graphs are kept for a backward
  at::ThreadLocalState tls;
  std::vector<uint8_t> checkpointed;  // per micro-batch

  std::vector<Batch> inputs;   // stage-0 micro-batches
  std::vector<Batch> targets;  // step style
  const LossFn* loss_fn = nullptr;
  std::vector<double> loss_weights;

  std::vector<std::vector<CellState>> cells;  // [stage][micro-batch]
  std::vector<Batch> outputs;                 // last stage, per micro-batch
  std::vector<torch::Tensor> losses;          // step style, detached
  std::vector<Batch> output_grads;            // module style drain input
  std::vector<Batch> input_grads;             // stage 0's, per micro-batch

  // Mailboxes, guarded by `mutex`: forward input of (s, j), backward input
  // (gradient of the outputs) of (s, j).
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::vector<std::optional<Message>>> forward_box;
  std::vector<std::vector<std::optional<Message>>> backward_box;
  bool aborted = false;
  std::exception_ptr error;

  std::vector<std::vector<TraceEvent>> events;  // per stage, worker-owned

  void post(std::vector<std::vector<std::optional<Message>>>& box, int64_t s,
            int64_t j, Message m) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      box[s][j] = std::move(m);
    }
    cv.notify_all();
  }

  Message take(std::vector<std::vector<std::optional<Message>>>& box,
               int64_t s, int64_t j) {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return aborted || box[s][j].has_value(); });
    if (aborted) {
      throw Aborted{};
    }
    Message m = std::move(*box[s][j]);
    box[s][j].reset();
    return m;
  }

  void fail(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) {
        error = std::move(e);
      }
      aborted = true;
    }
    cv.notify_all();
  }
};

namespace {

struct PassJob {
  std::shared_ptr<StepRun> run;
  // Which cells of each stage's list this pass runs.
  bool forward = true;
  bool backward = true;
};

} // namespace

class EngineCore : public std::enable_shared_from_this<EngineCore> {
 public:
  EngineCore(std::vector<std::shared_ptr<Stage>> stages, EngineOptions options)
      : stages_(std::move(stages)), options_(options) {
    TORCH_CHECK_VALUE(!stages_.empty(), "a pipeline needs at least 1 stage");
    TORCH_CHECK_VALUE(options_.chunks() >= 1, "chunks must be at least 1, got ",
                      options_.chunks());
    TORCH_CHECK_VALUE(options_.worker_threads() >= 0,
                      "worker_threads must be >= 0, got ",
                      options_.worker_threads());
    int64_t cpu_stages = 0;
    for (size_t s = 0; s < stages_.size(); ++s) {
      TORCH_CHECK_VALUE(stages_[s] != nullptr, "stage ", s, " is null");
      cpu_stages += stages_[s]->device().is_cpu();
    }
    threads_per_worker_ = options_.worker_threads() > 0
        ? options_.worker_threads()
        : std::max<int64_t>(1, at::get_num_threads() /
                                   std::max<int64_t>(1, cpu_stages));
    workers_.reserve(stages_.size());
    for (size_t s = 0; s < stages_.size(); ++s) {
      workers_.emplace_back(std::make_unique<Worker>());
    }
    for (size_t s = 0; s < stages_.size(); ++s) {
      workers_[s]->thread = std::thread([this, s] { worker_main(s); });
    }
  }

  ~EngineCore() {
    for (auto& w : workers_) {
      {
        std::lock_guard<std::mutex> lock(w->mutex);
        w->shutdown = true;
      }
      w->cv.notify_all();
    }
    for (auto& w : workers_) {
      if (w->thread.joinable()) {
        w->thread.join();
      }
    }
  }

  int64_t num_stages() const { return static_cast<int64_t>(stages_.size()); }
  const EngineOptions& options() const { return options_; }

  Schedule schedule(int64_t m) const {
    return options_.schedule() == ScheduleKind::kGPipe
        ? gpipe_schedule(num_stages(), m)
        : one_f_one_b_schedule(num_stages(), m);
  }

  Trace last_trace() const {
    std::lock_guard<std::mutex> lock(trace_mutex_);
    return last_trace_;
  }

  // A new step for `input`, deciding the real micro-batch count, whether a
  // graph is kept and which micro-batches are checkpointed.
  std::shared_ptr<StepRun> make_run(const Batch& input,
                                    const at::ThreadLocalState& tls,
                                    bool grad_mode) {
    auto run = std::make_shared<StepRun>();
    run->stages = num_stages();
    run->inputs = scatter(input, options_.chunks());
    const auto m = static_cast<int64_t>(run->inputs.size());
    run->micro_batches = m;
    run->sizes.reserve(m);
    for (const auto& b : run->inputs) {
      run->sizes.push_back(b.front().size(0));
    }
    bool needs = false;
    for (const auto& t : input) {
      needs = needs || t.requires_grad();
    }
    for (const auto& stage : stages_) {
      needs = needs || stage->requires_grad();
    }
    run->grad = grad_mode && needs;
    run->tls = tls;
    run->checkpointed.resize(m);
    for (int64_t j = 0; j < m; ++j) {
      run->checkpointed[j] =
          run->grad && is_checkpointed(options_.checkpoint(), j, m);
    }
    const auto k = num_stages();
    run->cells.assign(k, std::vector<CellState>(m));
    run->outputs.resize(m);
    run->input_grads.resize(m);
    run->forward_box.assign(k, std::vector<std::optional<Message>>(m));
    run->backward_box.assign(k, std::vector<std::optional<Message>>(m));
    run->events.resize(k);
    return run;
  }

  // Runs one pass of `run` on the workers and waits; rethrows the first
  // failure with its stage and micro-batch. Stages in `inline_stages` run on
  // the calling thread instead, in clock order (see drain()).
  void run_pass(const std::shared_ptr<StepRun>& run, bool forward,
                bool backward, const std::vector<bool>& inline_stages = {}) {
    std::lock_guard<std::mutex> pass_lock(pass_mutex_);
    const auto sched = schedule(run->micro_batches);
    {
      std::lock_guard<std::mutex> lock(done_mutex_);
      pending_ = 0;
      for (int64_t s = 0; s < num_stages(); ++s) {
        pending_ += !is_inline(inline_stages, s);
      }
    }
    for (int64_t s = 0; s < num_stages(); ++s) {
      if (is_inline(inline_stages, s)) {
        continue;
      }
      auto& w = *workers_[s];
      {
        std::lock_guard<std::mutex> lock(w.mutex);
        w.job = PassJob{run, forward, backward};
      }
      w.cv.notify_all();
    }
    if (!inline_stages.empty()) {
      run_inline(run, sched, forward, backward, inline_stages);
    }
    {
      std::unique_lock<std::mutex> lock(done_mutex_);
      done_cv_.wait(lock, [&] { return pending_ == 0; });
    }
    if (run->error) {
      std::rethrow_exception(run->error);
    }
  }

  // Module style, fill pass.
  Batch fill(const std::shared_ptr<StepRun>& run) {
    run_pass(run, /*forward=*/true, /*backward=*/false);
    return gather(run->outputs);
  }

  // Module style, drain pass, called from the autograd engine with the
  // gradients of the gathered outputs. The autograd engine runs this node on
  // the thread of the gradients' device; a worker calling
  // torch::autograd::backward for a graph on that same accelerator would
  // queue its nodes behind us on that thread, so on accelerators the drain
  // runs the accelerator stages' cells on this thread (a reentrant backward,
  // which the autograd engine runs in place).
  Batch drain(const std::shared_ptr<StepRun>& run, const Batch& grads) {
    TORCH_CHECK(run->grad, "pipegear: backward of a step that kept no graph");
    std::vector<int64_t> sizes = run->sizes;
    run->output_grads.assign(run->micro_batches, Batch{});
    for (const auto& g : grads) {
      if (!g.defined()) {
        for (auto& b : run->output_grads) {
          b.emplace_back();
        }
        continue;
      }
      auto parts = g.split_with_sizes(sizes, 0);
      for (int64_t j = 0; j < run->micro_batches; ++j) {
        run->output_grads[j].push_back(parts[j]);
      }
    }
    std::vector<bool> inline_stages;
    for (const auto& g : grads) {
      if (g.defined() && !g.device().is_cpu()) {
        inline_stages.assign(num_stages(), false);
        for (int64_t s = 0; s < num_stages(); ++s) {
          inline_stages[s] = !stages_[s]->device().is_cpu();
        }
        break;
      }
    }
    run_pass(run, /*forward=*/false, /*backward=*/true, inline_stages);
    publish_trace(*run);
    return gather_input_grads(*run);
  }

  Batch gather_input_grads(const StepRun& run) {
    const size_t width = run.inputs.front().size();
    Batch out(width);
    for (size_t i = 0; i < width; ++i) {
      std::vector<torch::Tensor> parts;
      for (const auto& g : run.input_grads) {
        if (i < g.size() && g[i].defined()) {
          parts.push_back(g[i]);
        }
      }
      if (parts.size() == run.input_grads.size()) {
        out[i] = parts.size() == 1 ? parts.front() : at::cat(parts, 0);
      }
    }
    return out;
  }

  void publish_trace(const StepRun& run) {
    std::vector<TraceEvent> all;
    for (const auto& e : run.events) {
      all.insert(all.end(), e.begin(), e.end());
    }
    std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
      return a.start_ns < b.start_ns;
    });
    std::lock_guard<std::mutex> lock(trace_mutex_);
    last_trace_ = Trace(run.stages, run.micro_batches, std::move(all));
  }

 private:
  struct Worker {
    std::thread thread;
    std::mutex mutex;
    std::condition_variable cv;
    std::optional<PassJob> job;
    bool shutdown = false;
    // Per destination/source accelerator: this worker's copy stream.
    std::unordered_map<c10::Device, c10::Stream> copy_streams;
  };

  static bool is_inline(const std::vector<bool>& inline_stages, int64_t s) {
    return !inline_stages.empty() && inline_stages[s];
  }

  void worker_main(size_t s) {
    auto& w = *workers_[s];
    const auto device = stages_[s]->device();
    if (device.is_cpu()) {
      at::init_num_threads();
      at::set_num_threads(static_cast<int>(threads_per_worker_));
    }
    while (true) {
      PassJob job;
      {
        std::unique_lock<std::mutex> lock(w.mutex);
        w.cv.wait(lock, [&] { return w.shutdown || w.job.has_value(); });
        if (w.shutdown) {
          return;
        }
        job = std::move(*w.job);
        w.job.reset();
      }
      {
        at::ThreadLocalStateGuard tls(job.run->tls);
        const auto sched = schedule(job.run->micro_batches);
        const auto& cells = sched[s];
        for (size_t i = 0; i < cells.size(); ++i) {
          if (!run_cell(*job.run, static_cast<int64_t>(s), cells, i,
                        job.forward, job.backward)) {
            break;
          }
        }
      }
      job.run.reset();
      {
        std::lock_guard<std::mutex> lock(done_mutex_);
        --pending_;
      }
      done_cv_.notify_all();
    }
  }

  void run_inline(const std::shared_ptr<StepRun>& run, const Schedule& sched,
                  bool forward, bool backward,
                  const std::vector<bool>& inline_stages) {
    const auto clocks = schedule_clocks(sched, run->micro_batches);
    struct Item {
      int64_t clock, stage;
      size_t index;
    };
    std::vector<Item> order;
    for (int64_t s = 0; s < num_stages(); ++s) {
      if (inline_stages[s]) {
        for (size_t i = 0; i < sched[s].size(); ++i) {
          order.push_back({clocks[s][i], s, i});
        }
      }
    }
    std::sort(order.begin(), order.end(), [](const Item& a, const Item& b) {
      return std::tie(a.clock, a.stage) < std::tie(b.clock, b.stage);
    });
    at::ThreadLocalStateGuard tls(run->tls);
    for (const auto& item : order) {
      if (!run_cell(*run, item.stage, sched[item.stage], item.index, forward,
                    backward)) {
        break;
      }
    }
  }

  // Runs cell `i` of stage `s` if the pass includes its phase; false once
  // the step has failed (the rest of the pass is skipped).
  bool run_cell(StepRun& run, int64_t s, const std::vector<Cell>& cells,
                size_t i, bool forward, bool backward) {
    const Cell& cell = cells[i];
    const bool is_forward = cell.phase == Phase::kForward;
    if ((is_forward && !forward) || (!is_forward && !backward)) {
      return true;
    }
    try {
      const auto device = stages_[s]->device();
      c10::OptionalDeviceGuard device_guard;
      if (!device.is_cpu()) {
        device_guard.reset_device(device);
      }
      if (is_forward) {
        const bool first = std::none_of(cells.begin(), cells.begin() + i,
                                        [](const Cell& c) {
                                          return c.phase == Phase::kForward;
                                        });
        if (first) {
          stages_[s]->begin_forward();
        }
        forward_cell(run, s, cell.micro_batch);
        const bool last = std::none_of(cells.begin() + i + 1, cells.end(),
                                       [](const Cell& c) {
                                         return c.phase == Phase::kForward;
                                       });
        if (last) {
          stages_[s]->end_forward();
        }
      } else {
        backward_cell(run, s, cell.micro_batch);
      }
      return true;
    } catch (const Aborted&) {
      return false;
    } catch (c10::Error& e) {
      e.add_context(describe(s, cell));
      run.fail(std::current_exception());
    } catch (const std::exception& e) {
      // Foreign exceptions (a Python error, a std::runtime_error) keep their
      // type: the stage implementation adds its own context where it can.
      run.fail(std::current_exception());
    } catch (...) {
      run.fail(std::current_exception());
    }
    return false;
  }

  static std::string describe(int64_t s, const Cell& cell) {
    return "pipegear: in stage " + std::to_string(s) + ", micro-batch " +
        std::to_string(cell.micro_batch) + ", " +
        (cell.phase == Phase::kForward ? "forward" : "backward");
  }

  bool is_last(int64_t s) const { return s + 1 == num_stages(); }

  // Runs stage s on x; on the last stage of a step-style run, also applies
  // the loss and returns {weight * loss} (what its backward differentiates).
  Batch apply_stage(StepRun& run, int64_t s, int64_t j, const Batch& x) {
    Batch y = stages_[s]->forward(x);
    TORCH_CHECK_VALUE(!y.empty(), "stage ", s, " returned no tensor");
    for (size_t i = 0; i < y.size(); ++i) {
      TORCH_CHECK_VALUE(y[i].defined(), "stage ", s, " returned an undefined tensor at position ", i);
    }
    if (is_last(s) && run.loss_fn != nullptr) {
      auto loss = (*run.loss_fn)(y, run.targets[j]);
      TORCH_CHECK_VALUE(loss.defined() && loss.numel() == 1,
                        "loss_fn must return a scalar tensor, got ",
                        loss.defined() ? loss.sizes() : c10::IntArrayRef{});
      run.losses[j] = loss.detach().reshape({});
      return {loss.reshape({}) * run.loss_weights[j]};
    }
    return y;
  }

  // Moves a received message onto `device`, making the stage's leaves.
  Batch receive(size_t s, Message m, c10::Device device, bool as_leaves) {
    Batch out;
    out.reserve(m.tensors.size());
    for (auto& t : m.tensors) {
      if (!t.defined()) {
        out.emplace_back();
        continue;
      }
      const bool grad = as_leaves && t.requires_grad();
      torch::Tensor r = t.device() == device
          ? t.detach()
          : copy_to(s, t.detach(), device, m.ready);
      out.push_back(grad ? r.requires_grad_(true) : r);
    }
    return out;
  }

  torch::Tensor copy_to(size_t s, const torch::Tensor& t, c10::Device dst,
                        const std::shared_ptr<c10::Event>& ready) {
    const c10::Device src = t.device();
    if (src.is_cpu() && dst.is_cpu()) {
      return t;
    }
    // The copy runs on a copy stream of the accelerator side.
    const c10::Device side = dst.is_cpu() ? src : dst;
    c10::impl::VirtualGuardImpl impl(side.type());
    auto& streams = workers_[s]->copy_streams;
    auto it = streams.find(side);
    if (it == streams.end()) {
      it = streams.emplace(side, impl.getStreamFromGlobalPool(side)).first;
    }
    const c10::Stream copy_stream = it->second;
    if (ready) {
      ready->block(copy_stream);
    }
    torch::Tensor r;
    {
      c10::StreamGuard guard(copy_stream);
      r = t.to(dst, /*non_blocking=*/true);
    }
    if (!src.is_cpu()) {
      t.record_stream(copy_stream);  // not reused before the copy is done
    }
    c10::Event copied(side.type());
    copied.record(copy_stream);
    if (dst.is_cpu()) {
      copied.synchronize();
    } else {
      const auto compute = impl.getStream(dst);
      copied.block(compute);
      r.record_stream(compute);
    }
    return r;
  }

  Message make_message(Batch tensors, c10::Device device) {
    Message m{std::move(tensors), nullptr};
    if (!device.is_cpu()) {
      c10::impl::VirtualGuardImpl impl(device.type());
      m.ready = std::make_shared<c10::Event>(device.type());
      m.ready->record(impl.getStream(device));
    }
    return m;
  }

  void forward_cell(StepRun& run, int64_t s, int64_t j) {
    const auto device = stages_[s]->device();
    Message in = s == 0 ? Message{run.inputs[j], nullptr}
                        : run.take(run.forward_box, s, j);
    const int64_t start = now_ns();  // the trace shows work, not waiting
    Batch x = receive(s, std::move(in), device, true);
    auto& cell = run.cells[s][j];
    Batch y;
    bool y_requires_grad = false;
    if (run.checkpointed[j]) {
      cell.checkpointed = true;
      cell.rng = save_rng(device);
      {
        torch::NoGradGuard no_grad;
        CheckpointFlagGuard flag(CheckpointFlagGuard::Flag::kCheckpointing);
        y = apply_stage(run, s, j, x);
      }
      y_requires_grad = stages_[s]->requires_grad() ||
          std::any_of(x.begin(), x.end(),
                      [](const auto& t) { return t.requires_grad(); });
      cell.leaves = std::move(x);
    } else {
      y = apply_stage(run, s, j, run.grad ? alias_leaves(x) : x);
      if (run.grad) {
        cell.leaves = std::move(x);
        cell.outputs = y;
      }
    }
    if (is_last(s)) {
      if (run.loss_fn == nullptr) {
        for (auto& t : y) {
          t = t.detach();
        }
        run.outputs[j] = std::move(y);
      }
    } else {
      Batch send;
      send.reserve(y.size());
      for (const auto& t : y) {
        const bool grad = run.grad && can_require_grad(t) &&
            (run.checkpointed[j] ? y_requires_grad : t.requires_grad());
        send.push_back(grad ? t.detach().requires_grad_(true) : t.detach());
      }
      run.post(run.forward_box, s + 1, j, make_message(std::move(send), device));
    }
    run.events[s].push_back(
        {s, j, Phase::kForward, false, start, now_ns()});
  }

  void backward_cell(StepRun& run, int64_t s, int64_t j) {
    const auto device = stages_[s]->device();
    auto& cell = run.cells[s][j];
    if (cell.checkpointed) {
      const int64_t recompute_start = now_ns();
      // Recompute first: it needs no gradient, so it overlaps the wait.
      // Every recomputation rewinds the (shared) CPU generator, so two of
      // them must not overlap, or one would rewind the other's draws.
      std::lock_guard<std::mutex> replay(replay_mutex());
      const RngState current = save_rng(device);
      restore_rng(device, cell.rng);
      try {
        CheckpointFlagGuard flag(CheckpointFlagGuard::Flag::kRecomputing);
        cell.outputs = apply_stage(run, s, j, alias_leaves(cell.leaves));
      } catch (...) {
        restore_rng(device, current);
        throw;
      }
      restore_rng(device, current);
      run.events[s].push_back(
          {s, j, Phase::kBackward, true, recompute_start, now_ns()});
    }
    Batch grads;
    int64_t start = now_ns();
    if (!is_last(s)) {
      Message m = run.take(run.backward_box, s, j);
      start = now_ns();
      grads = receive(s, std::move(m), device, false);
    } else if (run.loss_fn != nullptr) {
      grads = {torch::ones_like(cell.outputs.front())};
    } else {
      grads = run.output_grads[j];
      for (auto& g : grads) {
        if (g.defined() && g.device() != device) {
          g = copy_to(s, g, device, nullptr);
        }
      }
    }
    std::vector<torch::Tensor> outs, gs;
    for (size_t i = 0; i < cell.outputs.size() && i < grads.size(); ++i) {
      if (cell.outputs[i].requires_grad() && grads[i].defined()) {
        outs.push_back(cell.outputs[i]);
        gs.push_back(grads[i]);
      }
    }
    if (!outs.empty()) {
      torch::autograd::backward(outs, gs);
    }
    Batch input_grads;
    input_grads.reserve(cell.leaves.size());
    for (const auto& leaf : cell.leaves) {
      input_grads.push_back(leaf.requires_grad() ? leaf.grad() : torch::Tensor());
    }
    cell = CellState{};
    if (s == 0) {
      run.input_grads[j] = std::move(input_grads);
    } else {
      run.post(run.backward_box, s - 1, j,
               make_message(std::move(input_grads), device));
    }
    run.events[s].push_back({s, j, Phase::kBackward, false, start, now_ns()});
  }

  using CheckpointFlagGuard = pipegear::detail::CheckpointFlagGuard;

  std::vector<std::shared_ptr<Stage>> stages_;
  EngineOptions options_;
  int64_t threads_per_worker_ = 1;
  std::vector<std::unique_ptr<Worker>> workers_;

  std::mutex pass_mutex_;  // one pass at a time
  std::mutex done_mutex_;
  std::condition_variable done_cv_;
  int64_t pending_ = 0;

  mutable std::mutex trace_mutex_;
  Trace last_trace_;
};

namespace {

// Keeps a step alive inside the autograd node between fill and drain.
struct StepHolder : torch::CustomClassHolder {
  std::shared_ptr<EngineCore> core;
  std::shared_ptr<StepRun> run;
};

// The whole pipeline as one autograd node: forward = fill, backward = drain.
// `phony` (a requires-grad scalar) makes the node part of the graph when
// only parameters, not inputs, need gradients.
struct PipelineFunction : torch::autograd::Function<PipelineFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      c10::intrusive_ptr<StepHolder> holder, torch::Tensor phony,
      at::TensorList /*inputs: the run holds their micro-batches*/) {
    Batch out = holder->core->fill(holder->run);
    std::vector<torch::Tensor> non_diff;
    for (auto& t : out) {
      if (!can_require_grad(t)) {
        non_diff.push_back(t);
      }
    }
    if (!non_diff.empty()) {
      ctx->mark_non_differentiable(non_diff);
    }
    ctx->saved_data["step"] = c10::IValue::make_capsule(
        c10::static_intrusive_pointer_cast<torch::CustomClassHolder>(holder));
    return out;
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    auto holder = c10::static_intrusive_pointer_cast<StepHolder>(
        ctx->saved_data["step"].toCapsule());
    ctx->saved_data.erase("step");
    Batch input_grads = holder->core->drain(holder->run, grads);
    holder->run.reset();
    torch::autograd::variable_list result;
    result.reserve(input_grads.size() + 2);
    result.emplace_back();  // holder
    result.emplace_back();  // phony
    for (auto& g : input_grads) {
      result.push_back(std::move(g));
    }
    return result;
  }
};

torch::Tensor phony() {
  static const torch::Tensor p = torch::zeros({}).requires_grad_(true);
  return p;
}

} // namespace
} // namespace detail

Engine::Engine(std::vector<std::shared_ptr<Stage>> stages,
               EngineOptions options)
    : core_(std::make_shared<detail::EngineCore>(std::move(stages), options)) {}

Engine::~Engine() = default;

int64_t Engine::num_stages() const {
  return core_->num_stages();
}

const EngineOptions& Engine::options() const {
  return core_->options();
}

Schedule Engine::schedule(int64_t micro_batches) const {
  return core_->schedule(micro_batches);
}

Trace Engine::last_trace() const {
  return core_->last_trace();
}

Batch Engine::forward(const Batch& input) {
  TORCH_CHECK_VALUE(options().schedule() == ScheduleKind::kGPipe,
                    "module-style forward needs a fill/drain schedule "
                    "('gpipe'); the '1f1b' schedule runs only through step()");
  const auto tls = at::ThreadLocalState();
  auto run = core_->make_run(input, tls, c10::GradMode::is_enabled());
  if (!run->grad) {
    Batch out = core_->fill(run);
    core_->publish_trace(*run);
    return out;
  }
  auto holder = c10::make_intrusive<detail::StepHolder>();
  holder->core = core_;
  holder->run = std::move(run);
  return detail::PipelineFunction::apply(holder, detail::phony(),
                                         at::TensorList(input));
}

torch::Tensor Engine::step(const Batch& input, const Batch& target,
                           const LossFn& loss_fn, LossReduction reduction) {
  TORCH_CHECK_VALUE(static_cast<bool>(loss_fn),
                    "step needs a loss function, got none");
  const auto tls = at::ThreadLocalState();
  auto run = core_->make_run(input, tls, c10::GradMode::is_enabled());
  const auto m = run->micro_batches;
  if (target.empty()) {
    run->targets.assign(m, Batch{});
  } else {
    const auto n = batch_size(input);
    const auto nt = batch_size(target);
    TORCH_CHECK_VALUE(nt == n, "the target's batch size must equal the "
                      "input's: input has ", n, ", target has ", nt);
    run->targets = scatter(target, options().chunks());
  }
  run->loss_fn = &loss_fn;
  run->losses.resize(m);
  const double total = static_cast<double>(batch_size(input));
  for (int64_t j = 0; j < m; ++j) {
    run->loss_weights.push_back(reduction == LossReduction::kMean
                                    ? run->sizes[j] / total
                                    : 1.0);
  }
  core_->run_pass(run, /*forward=*/true, /*backward=*/run->grad);
  core_->publish_trace(*run);
  torch::Tensor loss = torch::zeros({}, run->losses.front().options());
  for (int64_t j = 0; j < m; ++j) {
    loss = loss + run->losses[j] * run->loss_weights[j];
  }
  if (run->grad) {
    // Gradients of the input, if it asked for them, flow on from here.
    Batch grads = core_->gather_input_grads(*run);
    std::vector<torch::Tensor> outs, gs;
    for (size_t i = 0; i < input.size(); ++i) {
      if (input[i].requires_grad() && grads[i].defined()) {
        outs.push_back(input[i]);
        gs.push_back(grads[i]);
      }
    }
    if (!outs.empty()) {
      torch::autograd::backward(outs, gs);
    }
  }
  return loss;
}

} // namespace pipegear
