#include <pipegear/detail/checkpoint_flags.h>

#include <c10/util/Exception.h>

namespace pipegear {
namespace {
thread_local bool tls_checkpointing = false;
thread_local bool tls_recomputing = false;
} // namespace

CheckpointMode parse_checkpoint_mode(const std::string& name) {
  if (name == "always") {
    return CheckpointMode::kAlways;
  }
  if (name == "except_last") {
    return CheckpointMode::kExceptLast;
  }
  TORCH_CHECK_VALUE(name == "never",
                    "checkpoint must be 'always', 'except_last' or 'never', "
                    "got '", name, "'");
  return CheckpointMode::kNever;
}

std::string to_string(CheckpointMode mode) {
  switch (mode) {
    case CheckpointMode::kAlways:
      return "always";
    case CheckpointMode::kExceptLast:
      return "except_last";
    case CheckpointMode::kNever:
      return "never";
  }
  return "?";
}

bool is_checkpointed(CheckpointMode mode, int64_t j, int64_t micro_batches) {
  switch (mode) {
    case CheckpointMode::kAlways:
      return true;
    case CheckpointMode::kExceptLast:
      return j + 1 < micro_batches;
    case CheckpointMode::kNever:
      return false;
  }
  return false;
}

bool is_checkpointing() {
  return tls_checkpointing;
}

bool is_recomputing() {
  return tls_recomputing;
}

namespace detail {

CheckpointFlagGuard::CheckpointFlagGuard(Flag flag)
    : flag_(flag),
      previous_(flag == Flag::kCheckpointing ? tls_checkpointing
                                             : tls_recomputing) {
  (flag_ == Flag::kCheckpointing ? tls_checkpointing : tls_recomputing) = true;
}

CheckpointFlagGuard::~CheckpointFlagGuard() {
  (flag_ == Flag::kCheckpointing ? tls_checkpointing : tls_recomputing) =
      previous_;
}

} // namespace detail
} // namespace pipegear
