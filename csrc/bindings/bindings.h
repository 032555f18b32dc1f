#pragma once

#include <torch/extension.h>

namespace pipegear::bindings {

namespace py = pybind11;

/// Registers every topic; defined in register.cpp. One file per topic.
void init_all(py::module_& m);
void init_balance(py::module_& m);    // balance.cpp: partitioner, profiler
void init_batchnorm(py::module_& m);  // batchnorm.cpp: DeferredBatchNorm core
void init_engine(py::module_& m);     // engine.cpp: pipeline, checkpoint flags
void init_trace(py::module_& m);      // trace.cpp: Trace

} // namespace pipegear::bindings
