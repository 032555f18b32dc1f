#include <bindings/bindings.h>

namespace pipegear::bindings {

void init_all(py::module_& m) {
  init_trace(m);
  init_balance(m);
  init_batchnorm(m);
  init_engine(m);
  init_distributed(m);
}

} // namespace pipegear::bindings
