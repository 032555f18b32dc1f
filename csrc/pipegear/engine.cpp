// The in-process executor: one persistent worker per stage (workers.h) runs
// that stage's cells of a schedule in order (cells.h); cells hand
// activations forward and gradients backward through the step's mailboxes
// (mailbox.h). A pass is one round of the workers; a step is one pass (step
// style) or two (module style: the fill in the forward of one autograd node,
// the drain in its backward, pipeline_node.h).
#include <pipegear/engine.h>

#include <algorithm>
#include <mutex>
#include <tuple>

#include <ATen/Parallel.h>
#include <torch/autograd.h>

#include <pipegear/detail/cells.h>
#include <pipegear/detail/mailbox.h>
#include <pipegear/detail/pipeline_node.h>
#include <pipegear/detail/workers.h>
#include <pipegear/detail/random.h>

namespace pipegear {

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

class EngineCore : public std::enable_shared_from_this<EngineCore> {
 public:
  EngineCore(std::vector<std::shared_ptr<Stage>> stages, EngineOptions options)
      : options_(options) {
    TORCH_CHECK_VALUE(!stages.empty(), "a pipeline needs at least 1 stage");
    TORCH_CHECK_VALUE(options_.chunks() >= 1, "chunks must be at least 1, got ",
                      options_.chunks());
    TORCH_CHECK_VALUE(options_.worker_threads() >= 0,
                      "worker_threads must be >= 0, got ",
                      options_.worker_threads());
    register_random_kernels();
    const int64_t v = options_.virtual_stages();
    TORCH_CHECK_VALUE(v >= 1, "virtual_stages must be at least 1, got ", v);
    TORCH_CHECK_VALUE(v == 1 || takes_virtual_stages(options_.schedule()),
                      "virtual_stages = ", v,
                      " needs the 'interleaved' or 'interleaved-zb' schedule");
    TORCH_CHECK_VALUE(static_cast<int64_t>(stages.size()) % v == 0,
                      "virtual_stages = ", v, " must divide the number of "
                      "stages, got ", stages.size(), " stages");
    workers_count_ = static_cast<int64_t>(stages.size()) / v;
    for (size_t s = 0; s < stages.size(); ++s) {
      TORCH_CHECK_VALUE(stages[s] != nullptr, "stage ", s, " is null");
    }
    skips_ = count_skips(stages);
    // How errors name the skips (cells.h, skip_labels).
    std::vector<std::string> names(skips_);
    std::vector<int64_t> from(skips_, -1), to(skips_, -1);
    for (size_t s = 0; s < stages.size(); ++s) {
      const StageSkips& k = stages[s]->skips();
      for (int64_t id : k.stash) {
        from[id] = static_cast<int64_t>(s);
      }
      for (int64_t id : k.pop) {
        to[id] = static_cast<int64_t>(s);
      }
      for (size_t id = 0; id < k.names.size() && id < names.size(); ++id) {
        if (names[id].empty()) {
          names[id] = k.names[id];
        }
      }
    }
    const auto labels = skip_labels(names, from, to, "stage");
    for (size_t s = 0; s < stages.size(); ++s) {
      TORCH_CHECK_VALUE(stages[s] != nullptr, "stage ", s, " is null");
      runners_.push_back(std::make_unique<CellRunner>(
          stages[s], static_cast<int64_t>(s)));
      runners_.back()->set_skip_labels(labels);
    }
    int64_t cpu_workers = 0;
    for (int64_t d = 0; d < workers_count_; ++d) {
      const auto device = stages[d]->device();
      cpu_workers += device.is_cpu();
      for (int64_t s = d + workers_count_; s < num_stages(); s += workers_count_) {
        TORCH_CHECK_VALUE(stages[s]->device() == device, "stage ", s, " is on ",
                          stages[s]->device(), " but runs on the worker of "
                          "stage ", d, " (virtual_stages = ", v, "), on ",
                          device, ": a worker's stages share one device");
      }
    }
    const int caller_threads = at::get_num_threads();
    const int per_worker = static_cast<int>(
        options_.worker_threads() > 0
            ? options_.worker_threads()
            : std::max<int64_t>(1, caller_threads /
                                       std::max<int64_t>(1, cpu_workers)));
    workers_ = std::make_unique<WorkerPool>(workers_count_, [&](size_t s) {
      if (runners_[s]->stage().device().is_cpu()) {
        // get_num_threads() runs this thread's lazy initialisation first
        // (which applies the process-wide count); without it, the first
        // parallel op of the worker would replace our count by that one.
        (void)at::get_num_threads();
        at::set_num_threads(per_worker);
      }
    });
    if (cpu_workers > 0) {
      // at::set_num_threads also sets the count that threads created later
      // start with (process-wide); the workers' own counts are per thread.
      // Give the process its count back: a library leaves the caller's
      // settings as it found them.
      at::set_num_threads(caller_threads);
    }
  }

  int64_t num_stages() const { return static_cast<int64_t>(runners_.size()); }
  int64_t num_workers() const { return workers_count_; }
  // The stage of row d's cell c (d itself unless interleaved).
  int64_t stage_of(size_t d, const Cell& c) const {
    return c.chunk * workers_count_ + static_cast<int64_t>(d);
  }
  const EngineOptions& options() const { return options_; }

  Schedule schedule(int64_t m) const {
    return make_schedule(options_.schedule(), workers_count_, m,
                         options_.virtual_stages());
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
                call_checkpoint(options_.checkpoint(), training), tls, training);
    run->size_boxes(skips_);
    return run;
  }

  // Runs one pass of `run` on the workers and waits; rethrows the first
  // failure with its stage and micro-batch. Stages in `inline_stages` run on
  // the calling thread instead, in clock order (see drain()). While it
  // waits, the interrupt check runs every 50 ms; when it throws, the pass
  // fails with its exception.
  void run_pass(const std::shared_ptr<LocalRun>& run, bool forward,
                bool backward, const std::vector<bool>& inline_stages = {}) {
    std::lock_guard<std::mutex> pass_lock(pass_mutex_);
    const auto sched = schedule(run->micro_batches);
    workers_->start(
        [&, run](size_t s) {
          {
            at::ThreadLocalStateGuard tls(run->tls);
            const auto& cells = sched[s];
            for (size_t i = 0; i < cells.size(); ++i) {
              if (!run_cell(*run, stage_of(s, cells[i]), cells, i, forward,
                            backward)) {
                break;
              }
            }
          }
          for (int64_t t = static_cast<int64_t>(s); t < num_stages();
               t += workers_count_) {
            runners_[t]->stage().end_pass();
          }
        },
        inline_stages);
    if (!inline_stages.empty()) {
      run_inline(run, sched, forward, backward, inline_stages);
    }
    const auto check = interrupt_check();
    workers_->wait([&] {
      if (check) {
        try {
          check();
        } catch (...) {
          run->fail(std::current_exception());
        }
      }
    });
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
    split_output_grads(*run, grads);
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

  void publish_trace(const LocalRun& run) {
    std::vector<TraceEvent> all;
    for (const auto& e : run.events) {
      all.insert(all.end(), e.begin(), e.end());
    }
    // Interleaved: a row of the timeline is a worker (what is busy or
    // idle), not one of its stages; the chunk says which.
    for (auto& e : all) {
      e.chunk = e.stage / workers_count_;
      e.stage %= workers_count_;
    }
    std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
      return a.start_ns < b.start_ns;
    });
    std::lock_guard<std::mutex> lock(trace_mutex_);
    last_trace_ = Trace(workers_count_, run.micro_batches, std::move(all));
  }

 private:
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
      if (!run_cell(*run, stage_of(item.stage, sched[item.stage][item.index]),
                    sched[item.stage], item.index, forward, backward)) {
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
  int64_t skips_ = 0;  // skip connections between stages (count_skips)
  EngineOptions options_;
  int64_t workers_count_ = 0;  // K: num_stages() / virtual_stages
  std::unique_ptr<WorkerPool> workers_;  // after runners_: joined first
  std::mutex pass_mutex_;  // one pass at a time

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

int64_t Engine::num_workers() const {
  return core_->num_workers();
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
                    "('gpipe'); '1f1b', 'zb-h1', 'zb-h2', 'interleaved' and "
                    "'interleaved-zb' run only through step()");
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
