#include <bindings/bindings.h>

namespace pipegear::bindings {

void init_all(py::module_& m) {}

} // namespace pipegear::bindings
