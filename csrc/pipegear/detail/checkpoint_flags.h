#pragma once
// Internal (never installed): how the engine sets the flags that
// is_checkpointing() / is_recomputing() (checkpoint.h) read.

#include <cstdint>

#include <pipegear/checkpoint.h>

namespace pipegear {
namespace detail {

/// Sets the flag of `is_checkpointing()` / `is_recomputing()` for a scope.
class CheckpointFlagGuard {
 public:
  enum class Flag : uint8_t { kCheckpointing, kRecomputing };
  explicit CheckpointFlagGuard(Flag flag);
  ~CheckpointFlagGuard();
  CheckpointFlagGuard(const CheckpointFlagGuard&) = delete;
  CheckpointFlagGuard& operator=(const CheckpointFlagGuard&) = delete;

 private:
  Flag flag_;
  bool previous_;
};

} // namespace detail
} // namespace pipegear
