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
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>

#include <ATen/Parallel.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <pipegear/detail/cells.h>
#include <pipegear/random.h>

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

Schedule make_schedule(ScheduleKind kind, int64_t stages,
                       int64_t micro_batches) {
  return kind == ScheduleKind::kGPipe
      ? gpipe_schedule(stages, micro_batches)
      : one_f_one_b_schedule(stages, micro_batches);
}

namespace {

std::mutex& interrupt_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::function<void()>& interrupt_hook() {
  static std::function<void()> hook;
  return hook;
}

std::function<void()> interrupt_check() {
  std::lock_guard<std::mutex> lock(interrupt_mutex());
  return interrupt_hook();
}

} // namespace

void set_interrupt_check(std::function<void()> check) {
  std::lock_guard<std::mutex> lock(interrupt_mutex());
  interrupt_hook() = std::move(check);
}

namespace detail {
// A step of the in-process engine: the shared StepRun plus the mailboxes
// between the worker threads and the first failure.
struct LocalRun : StepRun {
  // Mailboxes, guarded by `mutex`: forward input of (s, j), backward input
  // (gradient of the outputs) of (s, j).
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::vector<std::optional<Message>>> forward_box;
  std::vector<std::vector<std::optional<Message>>> backward_box;
  bool aborted = false;
  std::exception_ptr error;


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

// Hands messages between the workers of one process through the run's
// mailboxes.
struct MailboxTransport final : Transport {
  explicit MailboxTransport(LocalRun& run) : run(run) {}
  Message recv_forward(int64_t s, int64_t j) override {
    return run.take(run.forward_box, s, j);
  }
  void send_forward(int64_t s, int64_t j, Message m) override {
    run.post(run.forward_box, s + 1, j, std::move(m));
  }
  Message recv_backward(int64_t s, int64_t j) override {
    return run.take(run.backward_box, s, j);
  }
  void send_backward(int64_t s, int64_t j, Message m) override {
    run.post(run.backward_box, s - 1, j, std::move(m));
  }
  LocalRun& run;
};

} // namespace

namespace {

struct PassJob {
  std::shared_ptr<LocalRun> run;
  // Which cells of each stage's list this pass runs.
  bool forward = true;
  bool backward = true;
};

} // namespace

class EngineCore : public std::enable_shared_from_this<EngineCore> {
 public:
  EngineCore(std::vector<std::shared_ptr<Stage>> stages, EngineOptions options)
      : options_(options) {
    TORCH_CHECK_VALUE(!stages.empty(), "a pipeline needs at least 1 stage");
    register_random_kernels();
    TORCH_CHECK_VALUE(options_.chunks() >= 1, "chunks must be at least 1, got ",
                      options_.chunks());
    TORCH_CHECK_VALUE(options_.worker_threads() >= 0,
                      "worker_threads must be >= 0, got ",
                      options_.worker_threads());
    int64_t cpu_stages = 0;
    for (size_t s = 0; s < stages.size(); ++s) {
      TORCH_CHECK_VALUE(stages[s] != nullptr, "stage ", s, " is null");
      cpu_stages += stages[s]->device().is_cpu();
      runners_.push_back(std::make_unique<CellRunner>(
          stages[s], static_cast<int64_t>(s)));
    }
    threads_per_worker_ = options_.worker_threads() > 0
        ? options_.worker_threads()
        : std::max<int64_t>(1, at::get_num_threads() /
                                   std::max<int64_t>(1, cpu_stages));
    workers_.reserve(runners_.size());
    for (size_t s = 0; s < runners_.size(); ++s) {
      workers_.emplace_back(std::make_unique<Worker>());
    }
    for (size_t s = 0; s < runners_.size(); ++s) {
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

  int64_t num_stages() const { return static_cast<int64_t>(runners_.size()); }
  const EngineOptions& options() const { return options_; }

  Schedule schedule(int64_t m) const {
    return make_schedule(options_.schedule(), num_stages(), m);
  }

  Trace last_trace() const {
    std::lock_guard<std::mutex> lock(trace_mutex_);
    return last_trace_;
  }

  // A new step for `input`, deciding the real micro-batch count, whether a
  // graph is kept and which micro-batches are checkpointed.
  std::shared_ptr<LocalRun> make_run(const Batch& input,
                                     const at::ThreadLocalState& tls,
                                     bool grad_mode, bool training) {
    auto run = std::make_shared<LocalRun>();
    std::vector<int64_t> sizes = scatter_input(*run, input, options_.chunks());
    bool needs = false;
    for (const auto& t : input) {
      needs = needs || t.requires_grad();
    }
    for (const auto& runner : runners_) {
      needs = needs || runner->stage().requires_grad();
    }
    prepare_run(*run, num_stages(), std::move(sizes), grad_mode && needs,
                call_checkpoint(options_.checkpoint(), training), tls);
    const auto k = num_stages();
    const auto m = run->micro_batches;
    run->forward_box.assign(k, std::vector<std::optional<Message>>(m));
    run->backward_box.assign(k, std::vector<std::optional<Message>>(m));
    return run;
  }

  // Runs one pass of `run` on the workers and waits; rethrows the first
  // failure with its stage and micro-batch. Stages in `inline_stages` run on
  // the calling thread instead, in clock order (see drain()).
  void run_pass(const std::shared_ptr<LocalRun>& run, bool forward,
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
    wait_pass(*run);
    if (run->error) {
      std::rethrow_exception(run->error);
    }
    if (forward) {
      for (auto& runner : runners_) {
        runner->end_forward();
      }
    }
  }

  // Module style, fill pass.
  Batch fill(const std::shared_ptr<LocalRun>& run) {
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
  Batch drain(const std::shared_ptr<LocalRun>& run, const Batch& grads) {
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
          inline_stages[s] = !runners_[s]->stage().device().is_cpu();
        }
        break;
      }
    }
    run_pass(run, /*forward=*/false, /*backward=*/true, inline_stages);
    publish_trace(*run);
    return gather_input_grads(*run);
  }

  // Waits for the workers of the pass. Every 50 ms the interrupt check
  // runs (Python: pending signals, Ctrl-C); when it throws, the pass is
  // aborted (workers stop at their next cell) and the error is the pass's.
  void wait_pass(LocalRun& run) {
    const auto check = interrupt_check();
    std::unique_lock<std::mutex> lock(done_mutex_);
    while (!done_cv_.wait_for(lock, std::chrono::milliseconds(50),
                              [&] { return pending_ == 0; })) {
      if (!check) {
        continue;
      }
      lock.unlock();
      try {
        check();
      } catch (...) {
        run.fail(std::current_exception());
      }
      lock.lock();
    }
  }

  void publish_trace(const LocalRun& run) {
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
  };

  static bool is_inline(const std::vector<bool>& inline_stages, int64_t s) {
    return !inline_stages.empty() && inline_stages[s];
  }

  void worker_main(size_t s) {
    auto& w = *workers_[s];
    const auto device = runners_[s]->stage().device();
    if (device.is_cpu()) {
      // get_num_threads() runs this thread's lazy initialisation first
      // (which applies the process-wide count); without it, the first
      // parallel op of the worker would replace our count by that one.
      (void)at::get_num_threads();
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
      runners_[s]->stage().end_pass();
      job.run.reset();
      {
        std::lock_guard<std::mutex> lock(done_mutex_);
        --pending_;
      }
      done_cv_.notify_all();
    }
  }

  void run_inline(const std::shared_ptr<LocalRun>& run, const Schedule& sched,
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

  // Runs cell `i` of stage `s`; false once the step has failed (the rest
  // of the pass is skipped).
  bool run_cell(LocalRun& run, int64_t s, const std::vector<Cell>& cells,
                size_t i, bool forward, bool backward) {
    try {
      MailboxTransport transport(run);
      runners_[s]->run(run, transport, cells, i, forward, backward);
      return true;
    } catch (const Aborted&) {
      return false;
    } catch (...) {
      // A c10::Error carries the stage and micro-batch; foreign exceptions
      // (a Python error) keep their type, the stage adds its own context.
      run.fail(std::current_exception());
    }
    return false;
  }

  std::vector<std::unique_ptr<CellRunner>> runners_;
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

// A module-style step of the in-process engine.
struct LocalStep : PendingStep {
  std::shared_ptr<EngineCore> core;
  std::shared_ptr<LocalRun> run;

  Batch fill() override { return core->fill(run); }
  Batch drain(const Batch& grads) override {
    auto taken = std::move(run);  // freed with the drain
    return core->drain(taken, grads);
  }
};

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

Batch Engine::forward(const Batch& input, bool training) {
  TORCH_CHECK_VALUE(options().schedule() == ScheduleKind::kGPipe,
                    "module-style forward needs a fill/drain schedule "
                    "('gpipe'); the '1f1b' schedule runs only through step()");
  const auto tls = at::ThreadLocalState();
  auto run = core_->make_run(input, tls, c10::GradMode::is_enabled(), training);
  if (!run->grad) {
    Batch out = core_->fill(run);
    core_->publish_trace(*run);
    return out;
  }
  auto step = c10::make_intrusive<detail::LocalStep>();
  step->core = core_;
  step->run = std::move(run);
  return detail::apply_pipeline_node(std::move(step), input);
}

torch::Tensor Engine::step(const Batch& input, const Batch& target,
                           const LossFn& loss_fn, const StepOptions& options) {
  TORCH_CHECK_VALUE(static_cast<bool>(loss_fn),
                    "step needs a loss function, got none");
  const auto tls = at::ThreadLocalState();
  auto run = core_->make_run(input, tls, c10::GradMode::is_enabled(),
                             options.training());
  detail::prepare_loss(*run, target, loss_fn, options);
  core_->run_pass(run, /*forward=*/true, /*backward=*/run->grad);
  core_->publish_trace(*run);
  if (run->grad) {
    // Gradients of the input, if it asked for them, flow on from here.
    detail::backward_into_input(input, *run);
  }
  return detail::weighted_loss(*run);
}

} // namespace pipegear
