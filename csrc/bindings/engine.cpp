// The pipeline engine for Python: stages are nn.Modules called under the
// GIL on the engine's workers; the caller releases the GIL while it waits.
#include <bindings/bindings.h>

#include <torch/csrc/Exceptions.h>

#include <pipegear/checkpoint.h>
#include <pipegear/engine.h>
#include <pipegear/random.h>
#include <pipegear/schedule.h>

namespace pipegear::bindings {

py::object to_python(const Batch& batch) {
  if (!batch.is_tuple()) {
    return py::cast(batch.front());
  }
  py::tuple out(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    out[i] = py::cast(batch[i]);
  }
  return out;
}

Batch from_python(const py::handle& value, const char* what) {
  if (THPVariable_Check(value.ptr())) {
    return {py::cast<torch::Tensor>(value)};
  }
  if (py::isinstance<py::tuple>(value) || py::isinstance<py::list>(value)) {
    Batch out;
    out.tuple = true;
    for (const auto& item : value) {
      TORCH_CHECK_TYPE(THPVariable_Check(item.ptr()), what,
                       " must be a tensor or a tuple of tensors, got a tuple "
                       "holding ", py::str(py::type::of(item)).cast<std::string>());
      out.push_back(py::cast<torch::Tensor>(item));
    }
    return out;
  }
  TORCH_CHECK_TYPE(false, what, " must be a tensor or a tuple of tensors, got ",
                   py::str(py::type::of(value)).cast<std::string>());
}

namespace {

// A partition (an nn.Module) on a device. `hooks`, when not None, is called
// with "begin" / "end" around the forward cells of a step (DeferredBatchNorm).
class PyStage final : public Stage {
 public:
  PyStage(py::object module, c10::Device device, py::object hooks,
          int64_t index, int64_t first_layer, StageSkips skips)
      : module_(std::move(module)),
        hooks_(std::move(hooks)),
        device_(device),
        index_(index),
        first_layer_(first_layer),
        skips_(std::move(skips)) {}

  ~PyStage() override {
    py::gil_scoped_acquire gil;
    module_ = py::object();
    hooks_ = py::object();
  }

  Batch forward(const Batch& input) override {
    py::gil_scoped_acquire gil;
    keep_thread_state(gil);
    // pipegear's partitions (gpipe.py, _Partition) call set_random_layer
    // before each of their layers; anything else is one layer.
    set_random_layer(0);
    py::object out = module_(to_python(input));
    return from_python(out, ("the output of stage " + std::to_string(index_))
                                .c_str());
  }

  const StageSkips& skips() const override { return skips_; }

  // The partition's _forward_skips(input, popped) -> (output, stashed), the
  // skips as tuples of tensors or None (gpipe.py, _Partition).
  Batch forward_skips(const Batch& input, const std::vector<torch::Tensor>& popped,
                      std::vector<torch::Tensor>& stashed) override {
    py::gil_scoped_acquire gil;
    keep_thread_state(gil);
    set_random_layer(0);
    py::tuple in(popped.size());
    for (size_t i = 0; i < popped.size(); ++i) {
      in[i] = popped[i].defined() ? py::cast(popped[i]) : py::none();
    }
    py::tuple out = module_.attr("_forward_skips")(to_python(input), in);
    const std::string what = "the output of stage " + std::to_string(index_);
    stashed.clear();
    for (const auto& t : py::tuple(out[1])) {
      stashed.push_back(t.is_none() ? torch::Tensor() : py::cast<torch::Tensor>(t));
    }
    return from_python(out[0], what.c_str());
  }

  c10::Device device() const override { return device_; }
  int64_t first_layer() const override { return first_layer_; }

  bool requires_grad() const override {
    py::gil_scoped_acquire gil;
    for (const auto& p : module_.attr("parameters")()) {
      if (p.attr("requires_grad").cast<bool>()) {
        return true;
      }
    }
    return false;
  }

  void begin_forward() override { call_hook("begin"); }
  void end_forward() override { call_hook("end"); }

  void keep_thread_state(py::gil_scoped_acquire& gil) {
    if (!kept_thread_state) {
      gil.inc_ref();  // kept until end_pass()
      kept_thread_state = true;
    }
  }

  void end_pass() noexcept override {
    if (kept_thread_state) {
      py::gil_scoped_acquire gil;
      gil.dec_ref();  // the leaving `gil` deletes the thread state
      kept_thread_state = false;
    }
  }

 private:
  void call_hook(const char* what) {
    if (has_hooks_) {
      py::gil_scoped_acquire gil;
      hooks_(what);
    }
  }

  // A Python exception from a forward (pybind11's error_already_set) or
  // from a backward run by the autograd engine (torch's python_error) gets
  // the cell as a PEP 678 note, which keeps its type and message intact.
  bool annotate_error(const std::string& context) noexcept override {
    try {
      throw;
    } catch (py::error_already_set& e) {
      py::gil_scoped_acquire gil;
      add_note(e.value().ptr(), context);
      return true;
    } catch (python_error& e) {
      py::gil_scoped_acquire gil;
      // torch's autograd engine also restores the error into this thread's
      // state when it rethrows (for a Python caller); the exception travels
      // as `e`, so the copy left pending here is dropped.
      PyErr_Clear();
      add_note(e.value, context);
      return true;
    } catch (...) {
    }
    return false;
  }

  static void add_note(PyObject* value, const std::string& context) {
    if (value == nullptr || !PyExceptionInstance_Check(value)) {
      return;
    }
    PyObject* r = PyObject_CallMethod(value, "add_note", "s", context.c_str());
    if (r == nullptr) {
      PyErr_Clear();  // Python < 3.11: no notes
    }
    Py_XDECREF(r);
  }

  // pybind11 gives a thread without a Python thread state (an engine
  // worker) a new one at every gil_scoped_acquire and deletes it at the
  // release: tens of µs per cell. A worker keeps the one of its first
  // Python call of a pass until the pass ends (end_pass); the autograd
  // engine's Python nodes, run by the worker's backward cells, use it too.
  static thread_local bool kept_thread_state;

  py::object module_;
  py::object hooks_;
  c10::Device device_;
  int64_t index_;
  int64_t first_layer_;
  StageSkips skips_;
  bool has_hooks_ = !hooks_.is_none();
};

thread_local bool PyStage::kept_thread_state = false;

} // namespace

std::shared_ptr<Stage> make_py_stage(py::object module, c10::Device device,
                                     py::object hooks, int64_t index,
                                     int64_t first_layer, StageSkips skips) {
  return std::make_shared<PyStage>(std::move(module), device, std::move(hooks),
                                   index, first_layer, std::move(skips));
}

LossCount make_loss_count(const py::object& count) {
  if (count.is_none()) {
    return {};
  }
  TORCH_CHECK_TYPE(PyCallable_Check(count.ptr()), "count must be callable, got ",
                   py::str(py::type::of(count)).cast<std::string>());
  // Called on the calling thread before the step; `count` outlives it.
  return [count](const Batch& target) {
    py::gil_scoped_acquire gil;
    py::object n = count(target.empty() ? py::none() : to_python(target));
    if (THPVariable_Check(n.ptr())) {
      auto t = py::cast<torch::Tensor>(n);
      TORCH_CHECK_VALUE(t.numel() == 1, "count must return a number or a "
                        "one-element tensor, got a tensor of shape ", t.sizes());
      return t.item<double>();
    }
    TORCH_CHECK_TYPE(py::isinstance<py::int_>(n) || py::isinstance<py::float_>(n),
                     "count must return a number or a tensor, got ",
                     py::str(py::type::of(n)).cast<std::string>());
    return n.cast<double>();
  };
}

StepOptions make_step_options(const std::string& reduction,
                              const py::object& count, bool training) {
  return StepOptions()
      .reduction(parse_loss_reduction(reduction))
      .count(make_loss_count(count))
      .training(training);
}

namespace {

// Every 50 ms of a wait for a pass: pending signals (Ctrl-C) raise in the
// waiting thread, which Python runs handlers on only when it is the main
// thread. Nothing to do from other threads, or once Python is finalising.
void check_python_signals() {
  if (!Py_IsInitialized() || _Py_IsFinalizing()) {
    return;
  }
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) {
    throw py::error_already_set();
  }
}

} // namespace

LossFn make_loss_fn(const py::object& loss_fn) {
  TORCH_CHECK_TYPE(PyCallable_Check(loss_fn.ptr()),
                   "loss_fn must be callable, got ",
                   py::str(py::type::of(loss_fn)).cast<std::string>());
  return [&loss_fn](const Batch& y, const Batch& t) {
    py::gil_scoped_acquire gil;
    py::object loss = loss_fn(to_python(y), t.empty() ? py::none()
                                                      : to_python(t));
    TORCH_CHECK_TYPE(THPVariable_Check(loss.ptr()),
                     "loss_fn must return a tensor, got ",
                     py::str(py::type::of(loss)).cast<std::string>());
    return py::cast<torch::Tensor>(loss);
  };
}

void init_engine(py::module_& m) {
  set_interrupt_check(&check_python_signals);

  m.def("is_checkpointing", &pipegear::is_checkpointing,
        "True inside a checkpointed forward (the pass that keeps no graph).");
  m.def("is_recomputing", &pipegear::is_recomputing,
        "True while a checkpointed forward is recomputed before its backward.");
  m.def("set_random_layer", &pipegear::set_random_layer, py::arg("layer"),
        "Inside a cell: the draws from here on belong to the stage's layer "
        "`layer` (its own random stream); nothing outside a cell.");

  m.def(
      "render_schedule",
      [](const std::string& kind, int64_t stages, int64_t micro_batches,
         int64_t virtual_stages) {
        auto s = make_schedule(parse_schedule_kind(kind), stages, micro_batches,
                               virtual_stages);
        return render_schedule(s, micro_batches);
      },
      py::arg("schedule"), py::arg("stages"), py::arg("micro_batches"),
      py::arg("virtual_stages") = 1);

  m.def(
      "schedule_cells",
      [](const std::string& kind, int64_t stages, int64_t micro_batches,
         int64_t virtual_stages) {
        auto s = make_schedule(parse_schedule_kind(kind), stages, micro_batches,
                               virtual_stages);
        std::vector<std::vector<std::tuple<int64_t, std::string, int64_t>>> out;
        for (const auto& row : s) {
          out.emplace_back();
          for (const auto& c : row) {
            out.back().emplace_back(c.micro_batch, phase_name(c.phase), c.chunk);
          }
        }
        return out;
      },
      py::arg("schedule"), py::arg("stages"), py::arg("micro_batches"),
      py::arg("virtual_stages") = 1,
      "The schedule as data: per row (stage, or worker when interleaved), "
      "its cells in order as (micro_batch, phase, chunk).");

  m.def(
      "peak_activations",
      [](const std::string& kind, int64_t stages, int64_t micro_batches,
         int64_t virtual_stages) {
        return peak_activations(make_schedule(parse_schedule_kind(kind),
                                              stages, micro_batches,
                                              virtual_stages));
      },
      py::arg("schedule"), py::arg("stages"), py::arg("micro_batches"),
      py::arg("virtual_stages") = 1,
      "Micro-batches alive on each row (stage, or worker when interleaved, "
      "in micro-batches of one of its stages) at its peak.");

  py::class_<Engine, std::shared_ptr<Engine>>(m, "_Pipeline")
      .def(py::init([](const std::vector<py::tuple>& stages, int64_t chunks,
                       const std::string& checkpoint,
                       const std::string& schedule, int64_t worker_threads,
                       int64_t virtual_stages) {
             std::vector<std::shared_ptr<Stage>> built;
             int64_t first_layer = 0;
             for (size_t i = 0; i < stages.size(); ++i) {
               const auto& s = stages[i];
               TORCH_CHECK_VALUE(s.size() == 3 || s.size() == 5 || s.size() == 6,
                                 "stage ", i,
                                 " must be (module, device, hooks[, popped "
                                 "skip ids, stashed skip ids[, skip names]])");
               StageSkips skips;
               if (s.size() >= 5) {
                 skips.pop = s[3].cast<std::vector<int64_t>>();
                 skips.stash = s[4].cast<std::vector<int64_t>>();
               }
               if (s.size() == 6) {
                 skips.names = s[5].cast<std::vector<std::string>>();
               }
               built.push_back(make_py_stage(
                   s[0], c10::Device(s[1].cast<std::string>()), s[2],
                   static_cast<int64_t>(i), first_layer, std::move(skips)));
               first_layer += static_cast<int64_t>(py::len(s[0]));
             }
             return std::make_shared<Engine>(
                 std::move(built), EngineOptions()
                                       .chunks(chunks)
                                       .checkpoint(parse_checkpoint_mode(checkpoint))
                                       .schedule(parse_schedule_kind(schedule))
                                       .virtual_stages(virtual_stages)
                                       .worker_threads(worker_threads));
           }),
           py::arg("stages"), py::arg("chunks"), py::arg("checkpoint"),
           py::arg("schedule"), py::arg("worker_threads"),
           py::arg("virtual_stages") = 1)
      .def(
          "forward",
          [](Engine& e, const py::object& input, bool training) {
            Batch in = from_python(input, "the input");
            Batch out;
            {
              py::gil_scoped_release no_gil;
              out = e.forward(in, training);
            }
            return to_python(out);
          },
          py::arg("input"), py::arg("training") = true)
      .def(
          "step",
          [](Engine& e, const py::object& input, const py::object& target,
             const py::object& loss_fn, const std::string& reduction,
             const py::object& count, bool training) {
            Batch in = from_python(input, "the input");
            Batch tgt = target.is_none() ? Batch{} : from_python(target, "the target");
            LossFn fn = make_loss_fn(loss_fn);
            const auto options = make_step_options(reduction, count, training);
            py::gil_scoped_release no_gil;
            return e.step(in, tgt, fn, options);
          },
          py::arg("input"), py::arg("target"), py::arg("loss_fn"),
          py::arg("reduction") = "mean", py::arg("count") = py::none(),
          py::arg("training") = true)
      .def_property_readonly("last_trace", &Engine::last_trace)
      .def_property_readonly("num_stages", &Engine::num_stages)
      .def("schedule_table", [](const Engine& e, int64_t micro_batches) {
        return render_schedule(e.schedule(micro_batches), micro_batches);
      });
}

} // namespace pipegear::bindings
