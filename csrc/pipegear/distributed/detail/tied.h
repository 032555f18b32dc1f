#pragma once
// Internal (never installed): parameters tied across the ranks of a C++
// DistributedPipeline built from one Sequential on every rank (GPT-2's
// head reusing the embedding's weight, on the first and the last rank).
// Each rank holding one keeps its own copy; they start from the first
// holder's value and their gradients are summed after every drain, so the
// copies stay equal and each sees the gradient of every use, as the one
// parameter of the plain model does.

#include <cstdint>
#include <string>
#include <vector>

#include <torch/nn/modules/container/sequential.h>

#include <pipegear/distributed/detail/link.h>

namespace pipegear::detail {

struct TiedParameter {
  torch::Tensor local;         // this rank's copy; undefined where none
  std::vector<int64_t> sizes;  // every rank knows them (it built the model)
  c10::ScalarType dtype;
  std::vector<int64_t> ranks;  // the ranks holding it, ascending
  std::string name;            // "<layer index>.<name>" on its first rank
};

/// The parameters of `model` held by layers of more than one rank under
/// `balance` (one entry per stage; stage s on rank s % `world`), in the
/// order the model first holds them; `local` set where `rank` holds one.
std::vector<TiedParameter> find_tied_parameters(
    const torch::nn::Sequential& model, const std::vector<int64_t>& balance,
    int64_t rank, int64_t world);

/// The collectives of the ties: every rank of the group takes part in each
/// (a rank holding no copy adds zeros), in the same order on every rank.
class TiedAcrossRanks {
 public:
  TiedAcrossRanks(Link& link, std::vector<TiedParameter> ties)
      : link_(link), ties_(std::move(ties)) {}

  bool empty() const { return ties_.empty(); }

  /// At construction: the ranks agree on the ties (their number and sizes:
  /// a rank whose model differs gets a ValueError naming it), then every
  /// copy takes the first holder's value.
  void start();

  /// Before a step's cells: sets each copy's gradient aside, so that the
  /// sum after the drain adds only this step's (a gradient accumulated
  /// over earlier steps was summed then already).
  void begin();

  /// After the drain, on every rank: `ok` (the pass succeeded on every
  /// rank) sums each copy's gradient of the step over the ranks (a rank
  /// holding no copy, or a copy without a gradient, adds zeros); then adds
  /// back what begin() set aside. `!ok` sums nothing (no collective).
  void end(bool ok);

 private:
  void sum(torch::Tensor& t, const std::string& what);

  Link& link_;
  std::vector<TiedParameter> ties_;
  std::vector<torch::Tensor> stashed_;  // begin()'s, one per tie
};

} // namespace pipegear::detail
