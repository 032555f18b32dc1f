#pragma once
// Internal (never installed): a module-style step as one autograd node. The
// fill pass is the node's forward, the drain pass its backward; both
// pipelines hand the node a PendingStep.

#include <c10/util/intrusive_ptr.h>

#include <pipegear/microbatch.h>

namespace pipegear::detail {

/// A module-style step between its fill and its drain, held by the autograd
/// node that stands for the pipeline (or, distributed, for this rank's share).
struct PendingStep : c10::intrusive_ptr_target {
  /// The fill: the outputs of the node.
  virtual Batch fill() = 0;
  /// The drain, given the gradients of those outputs: the gradients of the
  /// node's `inputs`, in order (undefined where none). Called at most once.
  virtual Batch drain(const Batch& grads) = 0;
};

/// Runs `step->fill()` as the forward of one autograd node and returns its
/// outputs; the node's backward runs `step->drain()`. The node depends on
/// `inputs` and on a requires-grad scalar, so it is part of the graph even
/// when only parameters need gradients. A second backward is a clear error.
Batch apply_pipeline_node(c10::intrusive_ptr<PendingStep> step,
                          const Batch& inputs);

} // namespace pipegear::detail
