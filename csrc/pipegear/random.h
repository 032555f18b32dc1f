#pragma once
// Random numbers of a pipeline: every cell draws from streams of its own.
//
// A cell (one stage, one micro-batch) runs inside a CellRandomness scope.
// While it is active, every random operator called on that thread without an
// explicit generator (dropout, torch.rand, bernoulli_, ...) draws from a
// generator that belongs to the cell: one per (layer, device), seeded from
// (the step's seed, the layer's global index, the micro-batch). The
// recomputation of a checkpointed cell opens the same scope again, so it
// draws exactly what its forward drew, whatever other stages do meanwhile;
// two runs from the same seed draw the same numbers whatever the timing,
// the checkpoint mode or (when layers are keyed by their global index) the
// balance. docs/engine.md, "Randomness", and docs/design.md, decision 13.

#include <cstdint>

namespace pipegear {

/// Inside a cell: the random draws from here on belong to layer `layer` of
/// the stage (its index within the stage). Stages call it before each
/// layer; a Stage implementation that does not gets one stream per cell.
void set_random_layer(int64_t layer);

} // namespace pipegear
