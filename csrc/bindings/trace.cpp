#include <bindings/bindings.h>

#include <sstream>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include <pipegear/trace.h>

namespace pipegear::bindings {
namespace {

std::string phase_string(Phase phase) {
  return phase_name(phase);
}

Phase parse_phase(const std::string& name) {
  for (Phase p : {Phase::kForward, Phase::kBackward, Phase::kBackwardInput,
                  Phase::kBackwardWeight}) {
    if (name == phase_name(p)) {
      return p;
    }
  }
  TORCH_CHECK_VALUE(false, "phase must be 'forward', 'backward', "
                    "'backward_input' or 'backward_weight', got '", name, "'");
}

std::string event_repr(const TraceEvent& e) {
  std::ostringstream out;
  out << "TraceEvent(stage=" << e.stage << ", micro_batch=" << e.micro_batch
      << ", phase='" << phase_string(e.phase)
      << "', recompute=" << (e.recompute ? "True" : "False")
      << ", start_ns=" << e.start_ns << ", end_ns=" << e.end_ns;
  if (e.chunk != 0) {
    out << ", chunk=" << e.chunk;
  }
  out << ")";
  return out.str();
}

// A TraceEvent, or a tuple (stage, micro_batch, phase, recompute, start_ns,
// end_ns[, chunk]) with phase 'forward', 'backward', 'backward_input' or
// 'backward_weight'.
TraceEvent to_event(const py::handle& item, size_t i) {
  if (py::isinstance<TraceEvent>(item)) {
    return item.cast<TraceEvent>();
  }
  TORCH_CHECK_TYPE(py::isinstance<py::sequence>(item) &&
                       !py::isinstance<py::str>(item),
                   "event ", i, " must be a TraceEvent or a tuple (stage, "
                   "micro_batch, phase, recompute, start_ns, end_ns), got ",
                   std::string(py::str(py::type::of(item).attr("__name__"))));
  auto t = item.cast<py::sequence>();
  TORCH_CHECK_VALUE(t.size() == 6 || t.size() == 7, "event ", i,
                    " must have 6 items (stage, micro_batch, phase, "
                    "recompute, start_ns, end_ns) or 7 (and chunk), got ",
                    t.size());
  TraceEvent e;
  try {
    e.stage = t[0].cast<int64_t>();
    e.micro_batch = t[1].cast<int64_t>();
    e.phase = parse_phase(t[2].cast<std::string>());
    e.recompute = t[3].cast<bool>();
    e.start_ns = t[4].cast<int64_t>();
    e.end_ns = t[5].cast<int64_t>();
    if (t.size() == 7) {
      e.chunk = t[6].cast<int64_t>();
    }
  } catch (const py::cast_error&) {
    TORCH_CHECK_TYPE(false, "event ", i, " must be (int, int, str, bool, int, "
                     "int), got ", std::string(py::repr(item)));
  }
  return e;
}

} // namespace

void init_trace(py::module_& m) {
  py::class_<TraceEvent>(
      m, "TraceEvent",
      "One executed cell: stage, micro_batch, phase ('forward', "
      "'backward', 'backward_input' (B) or 'backward_weight' (W; "
      "the last two split one backward)), recompute, start_ns, end_ns "
      "(steady clock), and chunk (interleaved schedules: which of the worker's stages; "
      "stage is then the worker).")
      .def(py::init([](int64_t stage, int64_t micro_batch,
                       const std::string& phase, bool recompute,
                       int64_t start_ns, int64_t end_ns, int64_t chunk) {
             return TraceEvent{stage, micro_batch, parse_phase(phase),
                               recompute, start_ns, end_ns, chunk};
           }),
           py::arg("stage"), py::arg("micro_batch"), py::arg("phase"),
           py::arg("recompute"), py::arg("start_ns"), py::arg("end_ns"),
           py::arg("chunk") = 0)
      .def_readonly("stage", &TraceEvent::stage)
      .def_readonly("micro_batch", &TraceEvent::micro_batch)
      .def_property_readonly(
          "phase", [](const TraceEvent& e) { return phase_string(e.phase); })
      .def_readonly("recompute", &TraceEvent::recompute)
      .def_readonly("start_ns", &TraceEvent::start_ns)
      .def_readonly("end_ns", &TraceEvent::end_ns)
      .def_readonly("chunk", &TraceEvent::chunk)
      .def_property_readonly(
          "duration_ns",
          [](const TraceEvent& e) { return e.end_ns - e.start_ns; })
      // The 6-item tuple form, as before chunks (a TraceEvent passed to
      // Trace keeps its chunk).
      .def("__iter__",
           [](const TraceEvent& e) {
             return py::iter(py::make_tuple(e.stage, e.micro_batch,
                                            phase_string(e.phase),
                                            e.recompute, e.start_ns,
                                            e.end_ns));
           })
      .def("__eq__",
           [](const TraceEvent& a, const TraceEvent& b) {
             return a.stage == b.stage && a.micro_batch == b.micro_batch &&
                 a.phase == b.phase && a.recompute == b.recompute &&
                 a.start_ns == b.start_ns && a.end_ns == b.end_ns &&
                 a.chunk == b.chunk;
           })
      .def("__repr__", &event_repr);

  py::class_<Trace>(
      m, "Trace",
      "The timeline of one pipelined step: the cells each stage ran and "
      "when. Trace(stages, micro_batches, events) with events TraceEvents or "
      "(stage, micro_batch, phase, recompute, start_ns, end_ns[, chunk]) "
      "tuples.")
      .def(py::init<>())
      .def(py::init([](int64_t stages, int64_t micro_batches,
                       const py::iterable& events) {
             std::vector<TraceEvent> parsed;
             size_t i = 0;
             for (const auto& item : events) {
               parsed.push_back(to_event(item, i++));
             }
             return Trace(stages, micro_batches, std::move(parsed));
           }),
           py::arg("stages"), py::arg("micro_batches"), py::arg("events"))
      .def_property_readonly("stages", &Trace::stages)
      .def_property_readonly("micro_batches", &Trace::micro_batches)
      .def_property_readonly("events", &Trace::events)
      .def_property_readonly("makespan", &Trace::makespan,
                             "Seconds from the first start to the last end.")
      .def_property_readonly("bubble_fraction", &Trace::bubble_fraction,
                             "1 - busy time / (stages * makespan).")
      .def_property_readonly("theoretical_bubble_fraction",
                             &Trace::theoretical_bubble_fraction,
                             "GPipe's (K - 1) / (M + K - 1).")
      .def("empty", &Trace::empty)
      .def("__len__", [](const Trace& t) { return t.events().size(); })
      .def("to_chrome_trace", &Trace::to_chrome_trace,
           "Chrome trace JSON (Perfetto, chrome://tracing).")
      .def(
          "save_chrome_trace",
          [](const Trace& t, const py::object& path) {
            const auto p = py::module_::import("os")
                               .attr("fspath")(path)
                               .cast<std::string>();
            try {
              t.save_chrome_trace(p);
            } catch (const c10::Error& e) {
              PyErr_SetString(PyExc_OSError, e.what_without_backtrace());
              throw py::error_already_set();
            }
          },
          py::arg("path"), "Writes to_chrome_trace() to `path` (OSError).")
      .def("__repr__", [](const Trace& t) {
        std::ostringstream out;
        out << "Trace(stages=" << t.stages()
            << ", micro_batches=" << t.micro_batches()
            << ", events=" << t.events().size() << ", makespan=" << t.makespan()
            << ")";
        return out.str();
      });
}

} // namespace pipegear::bindings
