#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace pipegear {

/// What flows between stages: one tensor, or a tuple of tensors. A tuple of
/// one tensor stays a tuple (`tuple`), so that a layer receives exactly what
/// its predecessor returned whatever the balance puts between them. A
/// vector with one element and `tuple` false is a bare tensor; with two or
/// more elements it is a tuple either way.
struct Batch : std::vector<torch::Tensor> {
  using std::vector<torch::Tensor>::vector;
  Batch() = default;
  /* implicit */ Batch(std::vector<torch::Tensor> tensors, bool tuple = false)
      : std::vector<torch::Tensor>(std::move(tensors)), tuple(tuple) {}

  /// Whether the value is a tuple (also of one tensor).
  bool is_tuple() const { return tuple || size() != 1; }

  /// Set for a tuple of one tensor; ignored for other sizes.
  bool tuple = false;
};

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
