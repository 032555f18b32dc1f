#pragma once
// Internal (never installed): one rank's side of the data-parallel replicas
// of a distributed pipeline (a pp x dp mesh; docs/distributed.md,
// "Replicas"). The ranks running the same stage in every replica form the
// stage's dp group; together they
//   - check at construction that they run the same configuration, and take
//     replica 0's parameters and buffers (broadcast);
//   - last stages, before a step: exchange what their mean loss counts, so
//     that each replica weighs its loss by its share of the global batch;
//   - after this rank's last backward cell: start summing the step's
//     gradients over the group, in buckets, while the others still drain;
//   - after the step: agree on its outcome (every rank raises if a replica
//     failed, naming the rank's coordinates), wait for the sums, return the
//     loss of the global batch.
// The Python face has the same logic in python/pipegear/replicas.py.

#include <chrono>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <pipegear/distributed/options.h>
#include <pipegear/loss.h>
#include <pipegear/microbatch.h>

namespace pipegear::detail {

class Replicas {
 public:
  /// Collective over `dp` (agreement, then the broadcast). `stage`: this
  /// rank's stage (its rank in the pipeline); `params` / `buffers`: this
  /// rank's, in module order; `bucket_bytes`: the size of a bucket.
  Replicas(c10::intrusive_ptr<c10d::ProcessGroup> dp, int64_t stage, int64_t stages,
           std::vector<torch::Tensor> params, std::vector<torch::Tensor> buffers,
           const DistributedOptions& options, int64_t bucket_bytes);

  int64_t replica() const { return replica_; }
  int64_t replicas() const { return replicas_; }
  bool broken() const { return broken_; }
  /// "(dp=d, pp=p)".
  static std::string where(int64_t dp, int64_t pp);

  /// Before a step: sets every gradient aside (only the step's is summed).
  void begin();
  /// Last stages, before the step: every replica's count (what its mean
  /// loss averages over) and failure before the step. Returns this
  /// replica's share of the global count; sets `other` to another
  /// replica's failure (a ValueError naming it), if any.
  double exchange_count(double local, const std::exception_ptr& mine,
                        std::exception_ptr& other);
  /// Starts summing this step's gradients over the group, bucket by
  /// bucket, without waiting (once per step).
  void start();
  /// After this rank's step: agrees on the outcome with the other
  /// replicas, waits for the sums, restores what begin() set aside.
  /// `error`: this rank's failure (rethrown), `origin`: the pipeline rank
  /// that caused it (-1: unknown). Returns the loss of the global batch
  /// (the sum of the replicas' weighted losses); raises when any replica
  /// failed.
  torch::Tensor end(const torch::Tensor& loss, const std::exception_ptr& error,
                    int64_t origin, bool grad);

 private:
  struct Pending {
    std::vector<size_t> params;  // indices into params_
    torch::Tensor flat;
    c10::intrusive_ptr<c10d::Work> work;
  };
  std::vector<torch::Tensor> gather(const torch::Tensor& mine,
                                    std::chrono::milliseconds timeout,
                                    const std::string& what);
  void wait(const c10::intrusive_ptr<c10d::Work>& work,
            std::chrono::milliseconds timeout, const std::string& what);
  [[noreturn]] void lost(const std::string& what, const std::string& error);
  void restore(std::vector<torch::Tensor>& stash);

  c10::intrusive_ptr<c10d::ProcessGroup> dp_;
  int64_t stage_;
  int64_t stages_;
  int64_t replica_;
  int64_t replicas_;
  std::chrono::milliseconds timeout_;
  std::chrono::milliseconds idle_timeout_;
  std::vector<torch::Tensor> params_;
  std::vector<std::vector<size_t>> buckets_;  // last layers first
  std::vector<torch::Tensor> stash_;
  std::vector<Pending> pending_;
  bool started_ = false;
  bool broken_ = false;
};

/// What a mean loss averages over for `target` split into `chunks`
/// micro-batches as the engine splits it: `options.count()` of each, else
/// the rows. 0 for a sum.
double local_count(const Batch& target, int64_t chunks, const StepOptions& options);

} // namespace pipegear::detail
