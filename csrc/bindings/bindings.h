#pragma once

#include <torch/extension.h>

namespace pipegear::bindings {

namespace py = pybind11;

/// Registers every topic; defined in register.cpp.
void init_all(py::module_& m);

} // namespace pipegear::bindings
