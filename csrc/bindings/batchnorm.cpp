// The core of pipegear.batchnorm.DeferredBatchNorm: the Python module keeps
// its parameters and buffers as torch.nn.BatchNorm does and calls these.
#include <bindings/bindings.h>

#include <memory>
#include <optional>
#include <vector>

#include <pybind11/stl.h>

#include <pipegear/detail/checkpoint_flags.h>
#include <pipegear/nn/deferred_batch_norm.h>

namespace pipegear::bindings {
namespace {

using detail::CheckpointFlagGuard;

// Guards opened by _recomputing_enter() on this thread, innermost last.
thread_local std::vector<std::unique_ptr<CheckpointFlagGuard>> tls_guards;

torch::Tensor value_or_undefined(const std::optional<torch::Tensor>& t) {
  return t.has_value() ? *t : torch::Tensor();
}

std::optional<torch::Tensor> undefined_as_none(const torch::Tensor& t) {
  return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
}

} // namespace

void init_batchnorm(py::module_& m) {
  py::class_<DeferredBatchNormStats>(
      m, "DeferredBatchNormStats",
      "Per-channel sum and sum of squares (float64), element count and "
      "micro-batch count a DeferredBatchNorm gathers over one step.")
      .def(py::init<>())
      .def_property_readonly(
          "sum",
          [](const DeferredBatchNormStats& s) { return undefined_as_none(s.sum); })
      .def_property_readonly("sum_squares",
                             [](const DeferredBatchNormStats& s) {
                               return undefined_as_none(s.sum_squares);
                             })
      .def_readonly("count", &DeferredBatchNormStats::count)
      .def_readonly("micro_batches", &DeferredBatchNormStats::micro_batches)
      .def("empty", &DeferredBatchNormStats::empty)
      .def("reset", &DeferredBatchNormStats::reset)
      .def(
          "assign",
          [](DeferredBatchNormStats& s, const std::optional<torch::Tensor>& sum,
             const std::optional<torch::Tensor>& sum_squares, int64_t count,
             int64_t micro_batches) {
            // The statistics of several replicas summed (replicas.py).
            TORCH_CHECK_VALUE(count >= 0 && micro_batches >= 0,
                              "count and micro_batches must be >= 0, got ",
                              count, " and ", micro_batches);
            s.sum = value_or_undefined(sum);
            s.sum_squares = value_or_undefined(sum_squares);
            s.count = count;
            s.micro_batches = micro_batches;
          },
          py::arg("sum"), py::arg("sum_squares"), py::arg("count"),
          py::arg("micro_batches"))
      .def("__repr__",
           [](const DeferredBatchNormStats& s) {
             return "DeferredBatchNormStats(micro_batches=" +
                 std::to_string(s.micro_batches) +
                 ", count=" + std::to_string(s.count) + ")";
           })
      // Pickling, hence copy.deepcopy and torch.save of a whole module.
      .def(py::pickle(
          [](const DeferredBatchNormStats& s) {
            return py::make_tuple(undefined_as_none(s.sum),
                                  undefined_as_none(s.sum_squares), s.count,
                                  s.micro_batches);
          },
          [](const py::tuple& t) {
            TORCH_CHECK_VALUE(t.size() == 4,
                              "DeferredBatchNormStats state must have 4 "
                              "items, got ", t.size());
            DeferredBatchNormStats s;
            s.sum = value_or_undefined(
                t[0].cast<std::optional<torch::Tensor>>());
            s.sum_squares = value_or_undefined(
                t[1].cast<std::optional<torch::Tensor>>());
            s.count = t[2].cast<int64_t>();
            s.micro_batches = t[3].cast<int64_t>();
            return s;
          }));

  m.def(
      "deferred_batch_norm_forward",
      [](const torch::Tensor& input, const std::optional<torch::Tensor>& weight,
         const std::optional<torch::Tensor>& bias,
         const torch::Tensor& running_mean, const torch::Tensor& running_var,
         DeferredBatchNormStats& stats, bool training, double eps) {
        return deferred_batch_norm_forward(
            input, value_or_undefined(weight), value_or_undefined(bias),
            running_mean, running_var, stats, training, eps);
      },
      py::arg("input"), py::arg("weight"), py::arg("bias"),
      py::arg("running_mean"), py::arg("running_var"), py::arg("stats"),
      py::arg("training"), py::arg("eps"),
      "Normalises `input` as DeferredBatchNorm does; in training also adds "
      "its statistics to `stats` unless recomputing.");

  m.def(
      "deferred_batch_norm_commit",
      [](DeferredBatchNormStats& stats, torch::Tensor running_mean,
         torch::Tensor running_var, torch::Tensor num_batches_tracked,
         std::optional<double> momentum) {
        return deferred_batch_norm_commit(stats, running_mean, running_var,
                                          num_batches_tracked, momentum);
      },
      py::arg("stats"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("num_batches_tracked"), py::arg("momentum"),
      "Folds `stats` into the running statistics in place and resets it; "
      "returns False when `stats` is empty.");

  // Test-only: mark this thread as recomputing a checkpointed forward, as
  // the engine does, until the matching _recomputing_exit().
  m.def("_recomputing_enter", [] {
    tls_guards.push_back(std::make_unique<CheckpointFlagGuard>(
        CheckpointFlagGuard::Flag::kRecomputing));
  });
  m.def("_recomputing_exit", [] {
    TORCH_CHECK_VALUE(!tls_guards.empty(),
                      "_recomputing_exit() without _recomputing_enter()");
    tls_guards.pop_back();
  });
  m.def("_is_recomputing", &is_recomputing);
}

} // namespace pipegear::bindings
