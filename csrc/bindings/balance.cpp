#include <bindings/bindings.h>

#include <optional>
#include <vector>

#include <pybind11/stl.h>

#include <pipegear/partition.h>

namespace pipegear::bindings {

void init_balance(py::module_& m) {
  m.def(
      "balance_by_cost",
      [](int64_t partitions, const std::vector<double>& costs,
         const std::optional<std::vector<double>>& memory,
         std::optional<double> capacity) {
        return balance_by_cost(partitions, costs,
                               memory.value_or(std::vector<double>{}),
                               capacity);
      },
      py::arg("partitions"), py::arg("costs"), py::arg("memory") = py::none(),
      py::arg("capacity") = py::none(),
      py::call_guard<py::gil_scoped_release>(),
      "Layers per stage that minimise the largest stage cost, then the "
      "variance of the stage costs, exactly (pipegear::balance_by_cost). "
      "Raises ValueError for bad input.");
}

} // namespace pipegear::bindings
