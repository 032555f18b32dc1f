// The one registration file of pipegear._C; each topic has its own file with
// a `void init_<topic>(pybind11::module_&)` declared in bindings.h.
#include <bindings/bindings.h>

#include <pipegear/version.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "pipegear: GPipe pipeline parallelism on a LibTorch engine";
  m.attr("__version__") = pipegear::kVersion;
  pipegear::bindings::init_all(m);
}
