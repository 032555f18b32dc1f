#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace pipegear {

/// What flows between stages: a tensor (one element) or a tuple of tensors.
using Batch = std::vector<torch::Tensor>;

/// Sizes of the micro-batches a batch of `batch` samples splits into when
/// `chunks` are asked for: min(batch, chunks) parts whose sizes differ by at
/// most one, larger ones first. `chunk_sizes(10, 4) == {3, 3, 2, 2}`,
/// `chunk_sizes(3, 4) == {1, 1, 1}`. Throws ValueError for batch < 1 or
/// chunks < 1.
std::vector<int64_t> chunk_sizes(int64_t batch, int64_t chunks);

/// The batch size shared by every tensor of `input` (its size along dim 0).
/// Throws ValueError for an empty tuple, an undefined or 0-dim tensor, or
/// tensors whose batch sizes differ.
int64_t batch_size(const Batch& input);

/// Splits every tensor of `input` along dim 0 into the micro-batches of
/// `chunk_sizes(batch_size(input), chunks)`. The parts are views.
std::vector<Batch> scatter(const Batch& input, int64_t chunks);

/// Concatenates micro-batch outputs back along dim 0, tensor by tensor.
/// A single micro-batch is returned as it is (no copy).
Batch gather(const std::vector<Batch>& outputs);

} // namespace pipegear
