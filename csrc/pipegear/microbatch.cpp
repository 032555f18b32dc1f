#include <pipegear/microbatch.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace pipegear {

std::vector<int64_t> chunk_sizes(int64_t batch, int64_t chunks) {
  TORCH_CHECK_VALUE(batch >= 1, "a batch needs at least 1 sample, got ",
                    batch);
  TORCH_CHECK_VALUE(chunks >= 1, "chunks must be at least 1, got ", chunks);
  const int64_t parts = std::min(batch, chunks);
  std::vector<int64_t> sizes(parts, batch / parts);
  for (int64_t i = 0; i < batch % parts; ++i) {
    ++sizes[i];
  }
  return sizes;
}

int64_t batch_size(const Batch& input) {
  TORCH_CHECK_VALUE(!input.empty(),
                    "the input must be a tensor or a non-empty tuple of "
                    "tensors, got an empty tuple");
  int64_t size = -1;
  for (size_t i = 0; i < input.size(); ++i) {
    const auto& t = input[i];
    TORCH_CHECK_VALUE(t.defined(), "input tensor ", i, " is undefined");
    TORCH_CHECK_VALUE(t.dim() >= 1, "input tensor ", i,
                      " is 0-dimensional; micro-batching splits dim 0");
    if (size < 0) {
      size = t.size(0);
    }
    TORCH_CHECK_VALUE(t.size(0) == size,
                      "every input tensor must have the same batch size "
                      "(dim 0): tensor 0 has ",
                      size, ", tensor ", i, " has ", t.size(0));
  }
  TORCH_CHECK_VALUE(size >= 1, "a batch needs at least 1 sample, got ", size);
  return size;
}

std::vector<Batch> scatter(const Batch& input, int64_t chunks) {
  const auto sizes = chunk_sizes(batch_size(input), chunks);
  std::vector<Batch> out(sizes.size());
  for (auto& b : out) {
    b.tuple = input.tuple;
  }
  for (const auto& t : input) {
    auto parts = t.split_with_sizes(sizes, 0);
    for (size_t j = 0; j < parts.size(); ++j) {
      out[j].push_back(std::move(parts[j]));
    }
  }
  return out;
}

Batch gather(const std::vector<Batch>& outputs) {
  TORCH_CHECK_VALUE(!outputs.empty(), "nothing to gather");
  if (outputs.size() == 1) {
    return outputs.front();
  }
  const size_t width = outputs.front().size();
  Batch out;
  out.tuple = outputs.front().tuple;
  out.reserve(width);
  std::vector<torch::Tensor> column(outputs.size());
  for (size_t i = 0; i < width; ++i) {
    for (size_t j = 0; j < outputs.size(); ++j) {
      TORCH_CHECK_VALUE(outputs[j].size() == width, "micro-batch ", j,
                        " gave ", outputs[j].size(), " outputs, micro-batch 0 gave ",
                        width);
      column[j] = outputs[j][i];
    }
    out.push_back(at::cat(column, 0));
  }
  return out;
}

} // namespace pipegear
