#pragma once
// Internal (never installed): the machinery behind random.h, for the
// engine's cells: a cell's random streams and the step seed.

#include <cstdint>
#include <memory>
#include <optional>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <pipegear/random.h>

namespace pipegear {
namespace detail {

/// The step's seed: one 64-bit draw from the calling thread's default CPU
/// generator (torch.manual_seed seeds it). Every training step draws
/// exactly one, so the caller's random stream after a step does not depend
/// on the schedule, the checkpoint mode or the timing. With `advance`
/// false (an eval-mode forward) the draw is made from a copy: the caller's
/// stream is left as it was, as a plain model without random layers in
/// eval mode leaves it.
uint64_t draw_step_seed(bool advance = true);

/// Registers the interception of random operators (idempotent; the first
/// call scans the dispatcher's operators, ~10 ms).
void register_random_kernels();

/// The random streams of one cell on the calling thread. `first_layer` is
/// the global index of the stage's first layer when the stage knows it
/// (streams then do not depend on the balance); else pass a key unique to
/// the stage (stream_key_of_stage).
class CellRandomness {
 public:
  CellRandomness(uint64_t step_seed, int64_t first_layer, int64_t micro_batch);
  ~CellRandomness();
  CellRandomness(const CellRandomness&) = delete;
  CellRandomness& operator=(const CellRandomness&) = delete;

  struct Streams;

 private:
  std::unique_ptr<Streams> streams_;
  Streams* previous_;
  std::optional<c10::impl::IncludeDispatchKeyGuard> include_;
};

/// The key of stage `index`'s streams when its layers' global indices are
/// unknown: far from any layer index.
int64_t stream_key_of_stage(int64_t index);

/// The layer key of the loss of a step-style last stage.
constexpr int64_t kLossLayer = int64_t{1} << 40;

} // namespace detail
} // namespace pipegear
