#pragma once

#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <torch/nn/modules/container/sequential.h>

#include <pipegear/microbatch.h>
#include <pipegear/skip.h>

namespace pipegear {

/// The skip connections that cross into or out of a stage (docs/skip.md):
/// the pipeline-wide ids of the skips it pops (tensors stashed by an
/// earlier stage) and of those it stashes (for a later stage), in the
/// order `Stage::forward_skips` takes and returns their tensors. Skips
/// between layers of one stage stay inside the stage and are not listed.
struct StageSkips {
  std::vector<int64_t> pop;
  std::vector<int64_t> stash;
  /// Optional, for error messages: skip names by id (any number of the
  /// pipeline's skips; an empty or missing entry is "skip <id>").
  std::vector<std::string> names;
  bool empty() const { return pop.empty() && stash.empty(); }
};

/// One partition g_i of the model, placed on one device. The engine runs a
/// stage's cells on the stage's own worker thread; a stage never sees
/// threads, schedules or other stages. Implementations: SequentialStage (a
/// slice of a torch::nn::Sequential, no GIL) and the Python bindings' stage
/// (an nn.Module called under the GIL).
class Stage {
 public:
  virtual ~Stage() = default;

  /// Runs the partition's layers on `input`, which is already on device().
  virtual Batch forward(const Batch& input) = 0;

  /// The skips crossing the stage's boundaries; none by default.
  virtual const StageSkips& skips() const;

  /// The forward of a stage with skips(): `popped` holds the popped
  /// skips' tensors in skips().pop order (undefined for a skip of None);
  /// returns the output and leaves in `stashed` one tensor per
  /// skips().stash entry, in that order. By default: forward(input).
  virtual Batch forward_skips(const Batch& input,
                              const std::vector<torch::Tensor>& popped,
                              std::vector<torch::Tensor>& stashed);

  /// The device holding the stage's parameters and running its cells.
  virtual c10::Device device() const = 0;

  /// Whether any parameter requires a gradient. Decides whether the outputs
  /// of a checkpointed forward (run without a graph) will need gradients.
  virtual bool requires_grad() const = 0;

  /// Called on the stage's worker before its first forward cell of a step.
  /// DeferredBatchNorm layers drop what an earlier, failed step left.
  virtual void begin_forward() {}

  /// Called once per step after the forward cells of every stage
  /// succeeded (in-process: on the calling thread; distributed: on each
  /// rank once all ranks agree), never after a failed step.
  /// DeferredBatchNorm layers commit the statistics of the mini-batch.
  virtual void end_forward() {}

  /// Called on an engine worker after it ran its cells of one pass (even
  /// a failed one), before the caller is told the pass is over. The Python
  /// stage drops the thread state it kept for the pass here.
  virtual void end_pass() noexcept {}

  /// Called inside the handler of an exception that is not a c10::Error
  /// (those get `context` added by the engine), on the thread that caught
  /// it; `context` names the stage, micro-batch and phase. Returns whether
  /// the stage annotated it (the Python stage adds `context` to a Python
  /// exception as a PEP 678 note); otherwise the engine rethrows a
  /// std::exception as a StageError (errors.h). Must not throw.
  virtual bool annotate_error(const std::string& /*context*/) noexcept {
    return false;
  }

  /// The index of the stage's first layer in the whole model, or -1 when
  /// unknown. Keys the layers' random streams (random.h): with it, the
  /// same seed gives the same random numbers whatever the balance.
  virtual int64_t first_layer() const { return -1; }
};

/// Checks the skip layout of a pipeline's stages: the ids are 0..n-1, each
/// stashed by one stage and popped by one later stage. Returns n;
/// ValueError naming the skip and stages otherwise.
int64_t count_skips(const std::vector<std::shared_ptr<Stage>>& stages);

/// A contiguous slice of a torch::nn::Sequential. Between layers a value is a
/// torch::Tensor or a std::vector<torch::Tensor> (a tuple); a layer takes
/// whichever its predecessor returned.
class SequentialStage final : public Stage {
 public:
  /// `first_layer`: the index of `layers`' first layer in the whole model
  /// (keys the random streams; -1 when unknown). `skips`: the skips
  /// (skip.h) crossing the stage's boundaries (skip_layout).
  SequentialStage(torch::nn::Sequential layers, c10::Device device,
                  int64_t first_layer = -1, StageSkipKeys skips = {});

  Batch forward(const Batch& input) override;
  const StageSkips& skips() const override { return skips_; }
  Batch forward_skips(const Batch& input,
                      const std::vector<torch::Tensor>& popped,
                      std::vector<torch::Tensor>& stashed) override;
  c10::Device device() const override { return device_; }
  bool requires_grad() const override;
  void begin_forward() override;
  void end_forward() override;
  int64_t first_layer() const override { return first_layer_; }

  const torch::nn::Sequential& layers() const { return layers_; }

 private:
  Batch run_layers(const Batch& input);

  torch::nn::Sequential layers_;
  c10::Device device_;
  int64_t first_layer_;
  StageSkipKeys skip_keys_;
  StageSkips skips_;
  // Whether a layer is Skippable: the stage's forward then hands skips
  // over in a tracker of its own.
  bool has_skippables_ = false;
  // The plain norm layers that track running statistics (BatchNorm,
  // InstanceNorm): hidden from them while a forward is recomputed
  // (stage.cpp).
  std::vector<std::shared_ptr<torch::nn::Module>> norm_layers_;
};

} // namespace pipegear
