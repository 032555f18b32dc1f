// The distributed pipeline for Python: this rank's stage is an nn.Module
// called under the GIL on the calling thread; the GIL is released while the
// rank computes and waits for its peers. A torch.distributed ProcessGroup
// arrives as c10d::ProcessGroup through torch's own pybind11 registration.
#include <bindings/bindings.h>

#include <chrono>
#include <optional>
#include <string>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>

#include <pipegear/checkpoint.h>
#include <pipegear/distributed/pipeline.h>

namespace pipegear::bindings {

namespace {

// A Python callable as a hook the executor calls on the stepping thread,
// without the GIL; None: no hook.
std::function<void()> python_hook(const py::object& hook, const char* name) {
  if (hook.is_none()) {
    return nullptr;
  }
  // The object is released under the GIL whichever thread drops the last
  // copy.
  std::shared_ptr<py::object> fn(new py::object(hook), [](py::object* o) {
    py::gil_scoped_acquire gil;
    delete o;
  });
  return [fn, name] {
    py::gil_scoped_acquire gil;
    try {
      (*fn)();
    } catch (py::error_already_set& e) {
      // The Python error must not leave the GIL's scope.
      TORCH_CHECK(false, "pipegear: the ", name, " hook failed: ", e.what());
    }
  };
}

} // namespace

void init_distributed(py::module_& m) {
  py::class_<DistributedPipeline, std::shared_ptr<DistributedPipeline>>(
      m, "_DistributedPipeline")
      .def(py::init([](const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                       const std::vector<py::object>& modules,
                       const std::string& device,
                       const std::vector<py::object>& hooks, int64_t chunks,
                       const std::string& checkpoint,
                       const std::string& schedule, double timeout,
                       double idle_timeout, std::vector<int64_t> balance,
                       std::vector<int64_t> skip_pop,
                       std::vector<int64_t> skip_stash,
                       std::vector<int64_t> skip_routes,
                       const c10::intrusive_ptr<c10d::ProcessGroup>& dp_group,
                       std::vector<torch::Tensor> dp_parameters,
                       std::vector<torch::Tensor> dp_buffers, int64_t bucket_bytes,
                       std::vector<std::string> skip_names, int64_t virtual_stages) {
             TORCH_CHECK_VALUE(group, "process_group is None");
             TORCH_CHECK_VALUE(timeout > 0, "timeout must be positive, got ",
                               timeout);
             TORCH_CHECK_VALUE(idle_timeout > 0,
                               "idle_timeout must be positive, got ", idle_timeout);
             TORCH_CHECK_VALUE(!modules.empty() && modules.size() == hooks.size(),
                               "one module and one hook per virtual stage, got ",
                               modules.size(), " and ", hooks.size());
             // Stage c * K + rank per module (interleaved: K * v stages).
             const int64_t rank = group->getRank();
             std::vector<std::shared_ptr<Stage>> stages;
             for (size_t c = 0; c < modules.size(); ++c) {
               const int64_t index =
                   static_cast<int64_t>(c) * group->getSize() + rank;
               int64_t first_layer = balance.empty() ? -1 : 0;
               for (int64_t s = 0; s < index && s < static_cast<int64_t>(balance.size());
                    ++s) {
                 first_layer += balance[s];
               }
               StageSkips skips;
               if (c == 0) {  // none with several stages per rank
                 skips.pop = std::move(skip_pop);
                 skips.stash = std::move(skip_stash);
                 skips.names = std::move(skip_names);
               }
               stages.push_back(make_py_stage(modules[c], c10::Device(device),
                                              hooks[c], index, first_layer,
                                              std::move(skips)));
             }
             auto options = DistributedOptions()
                                .balance(std::move(balance))
                                .chunks(chunks)
                                .checkpoint(parse_checkpoint_mode(checkpoint))
                                .schedule(parse_schedule_kind(schedule))
                                .timeout(std::chrono::milliseconds(
                                    static_cast<int64_t>(timeout * 1000.0)))
                                .idle_timeout(std::chrono::milliseconds(
                                    static_cast<int64_t>(idle_timeout * 1000.0)))
                                .skip_routes(std::move(skip_routes))
                                .virtual_stages(virtual_stages);
             // The constructor agrees on the options with the other ranks
             // (a collective): no GIL while it waits.
             py::gil_scoped_release no_gil;
             if (dp_group) {
               // The C++ face's replicas (the Python face has its own).
               TORCH_CHECK_VALUE(stages.size() == 1, "the C++ face's replicas "
                                 "run one stage per rank");
               return std::make_shared<DistributedPipeline>(
                   group, dp_group, std::move(stages.front()),
                   std::move(dp_parameters), std::move(dp_buffers),
                   std::move(options), bucket_bytes);
             }
             return std::make_shared<DistributedPipeline>(group, std::move(stages),
                                                          std::move(options));
           }),
           py::arg("group"), py::arg("modules"), py::arg("device"),
           py::arg("hooks"), py::arg("chunks"), py::arg("checkpoint"),
           py::arg("schedule"), py::arg("timeout"), py::arg("idle_timeout"),
           py::arg("balance"), py::arg("skip_pop") = std::vector<int64_t>{},
           py::arg("skip_stash") = std::vector<int64_t>{},
           py::arg("skip_routes") = std::vector<int64_t>{},
           py::arg("dp_group") = nullptr,
           py::arg("dp_parameters") = std::vector<torch::Tensor>{},
           py::arg("dp_buffers") = std::vector<torch::Tensor>{},
           py::arg("bucket_bytes") = int64_t{25} << 20,
           py::arg("skip_names") = std::vector<std::string>{},
           py::arg("virtual_stages") = 1)
      .def(
          "step",
          [](DistributedPipeline& p, const py::object& input,
             const py::object& target, const py::object& loss_fn,
             const std::string& reduction, const py::object& count,
             bool training, const std::optional<std::string>& error,
             const std::string& error_type) {
            // A mistake found before the step, the caller's (`error`, a
            // ValueError or a TypeError) or in the arguments this rank uses,
            // must fail the step on every rank: raised here, it would leave
            // the others waiting.
            std::exception_ptr mistake;
            Batch in;
            Batch tgt;
            LossFn fn;
            StepOptions options;
            try {
              TORCH_CHECK_VALUE(error_type == "ValueError" || error_type == "TypeError",
                                "error_type must be 'ValueError' or 'TypeError', got '",
                                error_type, "'");
              if (error) {
                TORCH_CHECK_TYPE(error_type != "TypeError", *error);
                TORCH_CHECK_VALUE(false, *error);
              }
              if (p.is_first() && !input.is_none()) {
                in = from_python(input, "the input");
              }
              if (p.is_last()) {
                if (!target.is_none()) {
                  tgt = from_python(target, "the target");
                }
                if (!loss_fn.is_none()) {
                  fn = make_loss_fn(loss_fn);
                }
              }
              options = make_step_options(reduction, count, training);
            } catch (const c10::Error&) {
              mistake = std::current_exception();
            }
            py::gil_scoped_release no_gil;
            if (mistake) {
              p.fail_step(mistake);
            }
            return p.step(in, tgt, fn, options);
          },
          py::arg("input"), py::arg("target"), py::arg("loss_fn"),
          py::arg("reduction") = "mean", py::arg("count") = py::none(),
          py::arg("training") = true, py::arg("error") = py::none(),
          py::arg("error_type") = "ValueError")
      .def(
          "forward",
          [](DistributedPipeline& p, const py::object& input, bool training) {
            std::exception_ptr mistake;
            Batch in;
            try {
              if (p.is_first() && !input.is_none()) {
                in = from_python(input, "the input");
              }
            } catch (const c10::Error&) {
              mistake = std::current_exception();
            }
            Batch out;
            {
              py::gil_scoped_release no_gil;
              if (mistake) {
                p.fail_forward(mistake);
              }
              out = p.forward(in, training);
            }
            return to_python(out);
          },
          py::arg("input"), py::arg("training") = true)
      .def("backward",
           [](DistributedPipeline& p) {
             py::gil_scoped_release no_gil;
             p.backward();
           })
      .def(
          "set_after_backward",
          [](DistributedPipeline& p, const py::object& hook) {
            p.set_after_backward(python_hook(hook, "after-backward"));
          },
          py::arg("hook"))
      .def(
          "set_before_last_backward",
          [](DistributedPipeline& p, const py::object& hook) {
            p.set_before_last_backward(python_hook(hook, "before-last-backward"));
          },
          py::arg("hook"))
      .def_property_readonly("rank", &DistributedPipeline::rank)
      .def_property_readonly("world_size", &DistributedPipeline::world_size)
      .def_property_readonly("replica", &DistributedPipeline::replica)
      .def_property_readonly("replicas", &DistributedPipeline::replicas)
      .def_property_readonly("broken", &DistributedPipeline::broken)
      .def_property_readonly("last_events", [](const DistributedPipeline& p) {
        py::list out;
        for (const auto& e : p.last_events()) {
          out.append(py::make_tuple(e.micro_batch,
                                    e.phase == Phase::kForward        ? "F"
                                    : e.phase == Phase::kBackwardWeight ? "W"
                                                                       : "B",
                                    e.recompute, e.start_ns, e.end_ns, e.stage));
        }
        return out;
      });
}

} // namespace pipegear::bindings
