#pragma once

#include <memory>
#include <string>

#include <torch/extension.h>

#include <pipegear/engine.h>
#include <pipegear/stage.h>

namespace pipegear::bindings {

namespace py = pybind11;

/// Registers every topic; defined in register.cpp. One file per topic.
void init_all(py::module_& m);
void init_balance(py::module_& m);    // balance.cpp: partitioner, profiler
void init_batchnorm(py::module_& m);  // batchnorm.cpp: DeferredBatchNorm core
void init_engine(py::module_& m);     // engine.cpp: pipeline, checkpoint flags
void init_trace(py::module_& m);      // trace.cpp: Trace
void init_distributed(py::module_& m);  // distributed.cpp: c10d pipeline

// Shared by the in-process and the distributed pipelines; engine.cpp.

/// One tensor as itself, several as a tuple.
py::object to_python(const Batch& batch);
/// A tensor or a tuple/list of tensors; TypeError naming `what` otherwise.
Batch from_python(const py::handle& value, const char* what);
/// A stage calling the nn.Module `module` under the GIL on `device`;
/// `hooks` (None or a callable taking "begin" / "end") around a step's
/// forward cells (DeferredBatchNorm). Python errors get a PEP 678 note
/// naming stage `index`. `first_layer`: the index of the module's first
/// layer in the whole model; the module calls set_random_layer(i) before
/// its layer i (random.h), or draws from one stream. `skips`: the skip
/// connections crossing its boundaries; with any, the engine calls the
/// module's `_forward_skips(input, popped) -> (output, stashed)`.
std::shared_ptr<Stage> make_py_stage(py::object module, c10::Device device,
                                     py::object hooks, int64_t index,
                                     int64_t first_layer, StageSkips skips = {});
/// StepOptions from the Python arguments: "mean"/"sum", None or a callable
/// count(target of one micro-batch) -> number, the module's training flag.
StepOptions make_step_options(const std::string& reduction,
                              const py::object& count, bool training);
/// A LossFn calling the Python callable `loss_fn` under the GIL (it must
/// outlive the LossFn); TypeError when it is not callable.
LossFn make_loss_fn(const py::object& loss_fn);

} // namespace pipegear::bindings
