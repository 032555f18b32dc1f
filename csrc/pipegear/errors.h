#pragma once
// The exceptions a pipeline adds to the ones its layers throw.

#include <stdexcept>

namespace pipegear {

/// A C++ exception other than c10::Error thrown by a layer or a loss (say a
/// std::runtime_error), as the caller of the pipeline receives it: what()
/// reads "pipegear: in stage s, micro-batch j, forward: <type>: <what>", and
/// the original exception is nested in it (std::rethrow_if_nested). A
/// c10::Error keeps its type and gets the same context added instead.
class StageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

} // namespace pipegear
