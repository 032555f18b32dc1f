#pragma once

#include <cstdint>
#include <string>

namespace pipegear {

/// When a cell keeps only its input and recomputes its forward right before
/// its backward (GPipe's re-materialisation, arXiv 1811.06965 section 2.3).
enum class CheckpointMode : uint8_t {
  kAlways,      ///< every micro-batch
  kExceptLast,  ///< every micro-batch but the last (its backward follows at once)
  kNever,       ///< keep every activation
};

/// "always", "except_last" or "never"; ValueError for anything else.
CheckpointMode parse_checkpoint_mode(const std::string& name);
std::string to_string(CheckpointMode mode);

/// Whether micro-batch `j` of `micro_batches` (the real count of this step)
/// is checkpointed under `mode`.
bool is_checkpointed(CheckpointMode mode, int64_t j, int64_t micro_batches);

/// True on the thread running a checkpointed forward (the first pass, which
/// keeps no graph). Layers with side effects act in this pass.
bool is_checkpointing();

/// True on the thread recomputing a checkpointed forward before its
/// backward. Layers with side effects (BatchNorm statistics, counters) must
/// not act again here.
bool is_recomputing();

} // namespace pipegear
