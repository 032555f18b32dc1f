#include <pipegear/detail/step.h>

#include <cmath>

#include <torch/autograd.h>

#include <pipegear/detail/random.h>

namespace pipegear::detail {

bool can_require_grad(const torch::Tensor& t) {
  return t.defined() && (t.is_floating_point() || t.is_complex());
}

Batch gather_input_grads(const StepRun& run) {
  const size_t width = run.inputs.empty() ? 0 : run.inputs.front().size();
  Batch out(width);
  for (size_t i = 0; i < width; ++i) {
    std::vector<torch::Tensor> parts;
    for (const auto& g : run.input_grads) {
      if (i < g.size() && g[i].defined()) {
        parts.push_back(g[i]);
      }
    }
    if (!parts.empty() && parts.size() == run.input_grads.size()) {
      out[i] = parts.size() == 1 ? parts.front() : at::cat(parts, 0);
    }
  }
  return out;
}

void backward_into_input(const Batch& input, const StepRun& run) {
  const Batch grads = gather_input_grads(run);
  std::vector<torch::Tensor> outs, gs;
  for (size_t i = 0; i < input.size() && i < grads.size(); ++i) {
    if (input[i].defined() && input[i].requires_grad() && grads[i].defined()) {
      outs.push_back(input[i]);
      gs.push_back(grads[i]);
    }
  }
  if (!outs.empty()) {
    torch::autograd::backward(outs, gs);
  }
}

torch::Tensor weighted_loss(const StepRun& run) {
  torch::Tensor loss = torch::zeros({}, run.losses.front().options());
  for (int64_t j = 0; j < run.micro_batches; ++j) {
    if (run.loss_weights[j] != 0.0) {  // a micro-batch with nothing to count
      loss = loss + run.losses[j] * run.loss_weights[j];
    }
  }
  return loss;
}

std::vector<int64_t> scatter_input(StepRun& run, const Batch& input,
                                   int64_t chunks) {
  run.inputs = scatter(input, chunks);
  run.input_ready.reset();
  for (const auto& t : input) {
    if (t.defined() && !t.device().is_cpu()) {
      run.input_ready = record_ready(t.device());
      break;
    }
  }
  std::vector<int64_t> sizes;
  for (const auto& b : run.inputs) {
    sizes.push_back(b.front().size(0));
  }
  return sizes;
}

void prepare_run(StepRun& run, int64_t stages, std::vector<int64_t> sizes,
                 bool grad, CheckpointMode mode, const at::ThreadLocalState& tls,
                 bool training) {
  const auto m = static_cast<int64_t>(sizes.size());
  run.stages = stages;
  run.micro_batches = m;
  run.sizes = std::move(sizes);
  run.grad = grad;
  run.tls = tls;
  run.checkpointed.resize(m);
  for (int64_t j = 0; j < m; ++j) {
    run.checkpointed[j] = grad && is_checkpointed(mode, j, m);
  }
  run.cells.assign(stages, std::vector<CellState>(m));
  run.outputs.resize(m);
  run.input_grads.resize(m);
  run.events.resize(stages);
  run.rng_seed = draw_step_seed(/*advance=*/training);
}

void prepare_loss(StepRun& run, const Batch& target, const LossFn& loss_fn,
                  const StepOptions& options) {
  const int64_t m = run.micro_batches;
  int64_t total = 0;
  for (auto n : run.sizes) {
    total += n;
  }
  run.targets.assign(m, Batch{});
  if (!target.empty()) {
    const auto nt = batch_size(target);
    TORCH_CHECK_VALUE(nt == total, "the target's batch size must equal the "
                      "input's: input has ", total, ", target has ", nt);
    for (const auto& t : target) {
      auto parts = t.split_with_sizes(run.sizes, 0);
      for (int64_t j = 0; j < m; ++j) {
        run.targets[j].push_back(parts[j]);
      }
    }
    for (auto& t : run.targets) {
      t.tuple = target.tuple;
    }
  }
  run.loss_fn = &loss_fn;
  run.losses.assign(m, torch::Tensor());
  run.loss_weights.assign(m, 1.0);
  if (options.reduction() == LossReduction::kSum) {
    TORCH_CHECK_VALUE(!options.count(), "a count of what the loss averages "
                      "over applies to reduction 'mean' only; a 'sum' loss "
                      "adds the micro-batch losses");
    return;
  }
  std::vector<double> counts(m);
  double sum = 0;
  for (int64_t j = 0; j < m; ++j) {
    counts[j] = options.count() ? options.count()(run.targets[j])
                                : static_cast<double>(run.sizes[j]);
    TORCH_CHECK_VALUE(std::isfinite(counts[j]) && counts[j] >= 0,
                      "count must give a finite number >= 0 for every "
                      "micro-batch, got ", counts[j], " for micro-batch ", j);
    sum += counts[j];
  }
  for (int64_t j = 0; j < m; ++j) {
    // Nothing counted in the whole batch: the loss on the whole batch is
    // 0/0 (NaN); weighing by rows gives NaN the same way.
    run.loss_weights[j] = sum > 0 ? counts[j] / sum
                                  : static_cast<double>(run.sizes[j]) / total;
  }
}

void split_output_grads(StepRun& run, const Batch& grads) {
  run.output_grads.assign(run.micro_batches, Batch{});
  for (const auto& g : grads) {
    if (!g.defined()) {
      for (auto& b : run.output_grads) {
        b.emplace_back();
      }
      continue;
    }
    auto parts = g.split_with_sizes(run.sizes, 0);
    for (int64_t j = 0; j < run.micro_batches; ++j) {
      run.output_grads[j].push_back(parts[j]);
    }
  }
}

} // namespace pipegear::detail
