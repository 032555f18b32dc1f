// Trains an MLP with one pipeline stage per process, without Python.
// Launch K processes with torchrun's environment (RANK, WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT), e.g. ./run.sh, or
//   torchrun --nproc_per_node=2 --no-python ./train_distributed
// Each rank builds only its own layers (layer factories), rank 0 feeds the
// data, the last rank holds the targets; every rank steps its own optimizer.
// Then a language model whose head is tied to its embedding across the
// first and the last rank (the Sequential form), checked on every rank
// against the plain model trained on the same batches; once with one stage
// per rank, once interleaved (two stages per rank).
#include <iostream>
#include <set>

#include <torch/torch.h>

#include <pipegear/distributed/pipeline.h>
#include <pipegear/gpipe.h>

namespace {

// The ends of a language model, tied as C++ users tie them: the head
// registers the embedding's weight as its own parameter.
struct EmbedImpl : torch::nn::Module {
  explicit EmbedImpl(torch::Tensor w) { weight = register_parameter("weight", w); }
  torch::Tensor forward(torch::Tensor ids) { return torch::embedding(weight, ids); }
  torch::Tensor weight;
};
TORCH_MODULE(Embed);

struct HeadImpl : torch::nn::Module {
  explicit HeadImpl(torch::Tensor w) { weight = register_parameter("weight", w); }
  torch::Tensor forward(torch::Tensor x) { return x.matmul(weight.t()); }
  torch::Tensor weight;
};
TORCH_MODULE(Head);

constexpr int64_t kVocab = 13, kWidth = 8;

// embed, (Linear, Tanh) x world, head: built alike on every rank.
torch::nn::Sequential language_model(int64_t world) {
  torch::manual_seed(11);
  auto w = torch::randn({kVocab, kWidth}, torch::kFloat64);
  torch::nn::Sequential m;
  m->push_back(Embed(w));
  for (int64_t i = 0; i < world; ++i) {
    m->push_back(torch::nn::Linear(kWidth, kWidth));
    m->push_back(torch::nn::Tanh());
  }
  m->push_back(Head(w));
  m->to(torch::kFloat64);
  return m;
}

std::vector<torch::Tensor> unique_parameters(const torch::nn::Module& m) {
  // The plain C++ model lists the tied weight under both names: an
  // optimizer must see it once.
  std::vector<torch::Tensor> out;
  std::set<const void*> seen;
  for (const auto& p : m.parameters()) {
    if (seen.insert(p.unsafeGetTensorImpl()).second) {
      out.push_back(p);
    }
  }
  return out;
}

// Trains the tied model 5 AdamW steps through the pipeline (step style)
// and, on this rank, the plain model, then (one stage per rank) takes the
// gradients of one module-style step; returns the largest difference of
// this rank's parameters and gradients from the plain model's.
// `interleaved`: 2K stages, rank r running stages r and r + K.
double tied_language_model(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                           bool interleaved) {
  const int64_t world = group->getSize();
  const int64_t v = interleaved ? 2 : 1;
  std::vector<int64_t> balance(world * v, 2 / v);
  balance.front() += 1;
  balance.back() += 1;
  pipegear::DistributedPipeline pipe(
      group, language_model(world),
      pipegear::DistributedOptions()
          .balance(balance)
          .chunks(3)
          .checkpoint(pipegear::CheckpointMode::kAlways)
          .schedule(interleaved ? pipegear::ScheduleKind::kInterleaved
                                : pipegear::ScheduleKind::kGPipe)
          .virtual_stages(v)
          .timeout(std::chrono::seconds(30)));
  auto plain = language_model(world);
  torch::optim::AdamW ours(pipe.module()->parameters(),
                           torch::optim::AdamWOptions(0.01));
  torch::optim::AdamW theirs(unique_parameters(*plain),
                             torch::optim::AdamWOptions(0.01));
  auto ce = torch::nn::CrossEntropyLoss();
  auto loss_fn = [&](const pipegear::Batch& y, const pipegear::Batch& t) {
    return ce->forward(y.front().flatten(0, 1), t.front().flatten());
  };
  // A mean over the targets that are not ignored (the padding).
  const auto options = pipegear::StepOptions().count(
      pipegear::count_class_targets(-100));
  auto data = torch::make_generator<at::CPUGeneratorImpl>(3);
  double loss_error = 0;
  for (int step = 0; step < 5; ++step) {
    auto ids = torch::randint(kVocab, {7, 5}, data);
    auto target = torch::randint(kVocab, {7, 5}, data);
    target.index_put_({6, torch::indexing::Slice(3)}, -100);
    auto loss = pipe.step(
        pipe.is_first() ? pipegear::Batch{ids} : pipegear::Batch{},
        pipe.is_last() ? pipegear::Batch{target} : pipegear::Batch{}, loss_fn,
        options);
    ours.step();
    ours.zero_grad();
    auto ref = loss_fn({plain->forward(ids)}, {target});
    ref.backward();
    theirs.step();
    theirs.zero_grad();
    loss_error = std::max(loss_error, (loss - ref).abs().item<double>());
  }
  // This rank's layers are named by their index in the model, as the
  // plain Sequential's.
  double error = loss_error;
  const auto reference = plain->named_parameters();
  for (const auto& p : pipe.module()->named_parameters()) {
    error = std::max(error,
                     (p.value() - reference[p.key()]).abs().max().item<double>());
  }
  if (interleaved) {
    return error;  // module style needs the fill/drain schedule
  }
  // Module style: the last rank's loss.backward() (the others' backward())
  // runs the drain; the tied gradient is summed when it returns.
  auto ids = torch::randint(kVocab, {7, 5}, data);
  auto target = torch::randint(kVocab, {7, 5}, data);
  auto out = pipe.forward(pipe.is_first() ? pipegear::Batch{ids} : pipegear::Batch{});
  if (pipe.is_last()) {
    loss_fn(out, {target}).backward();
  } else {
    pipe.backward();
  }
  loss_fn({plain->forward(ids)}, {target}).backward();
  for (const auto& p : pipe.module()->named_parameters()) {
    error = std::max(error, (p.value().grad() - reference[p.key()].grad())
                                .abs().max().item<double>());
  }
  return error;
}

} // namespace

int main() {
  auto group = pipegear::init_process_group_from_env("gloo");
  const int64_t rank = group->getRank();
  const int64_t world = group->getSize();
  at::set_num_threads(1);

  // 2K + 1 layers: Linear, (ReLU, Linear) * K; each built only where it runs.
  const int64_t width = 64;
  std::vector<pipegear::LayerFactory> layers;
  layers.push_back([width] {
    torch::manual_seed(1);
    return torch::nn::AnyModule(torch::nn::Linear(16, width));
  });
  for (int64_t i = 0; i < world; ++i) {
    layers.push_back([] { return torch::nn::AnyModule(torch::nn::ReLU()); });
    const bool out = i + 1 == world;
    layers.push_back([i, out, width] {
      torch::manual_seed(2 + i);
      return torch::nn::AnyModule(torch::nn::Linear(width, out ? 1 : width));
    });
  }
  std::vector<int64_t> balance(world, 2);
  balance.front() += 1;

  pipegear::DistributedPipeline pipe(
      group, layers,
      pipegear::DistributedOptions()
          .balance(balance)
          .chunks(4)
          .checkpoint(pipegear::CheckpointMode::kExceptLast)
          .timeout(std::chrono::seconds(30)));
  torch::optim::SGD optimizer(pipe.module()->parameters(), /*lr=*/0.05);
  std::cout << "rank " << rank << "/" << world << ": "
            << pipe.module()->size() << " layers\n";

  auto data = torch::make_generator<at::CPUGeneratorImpl>(7);
  auto teacher = torch::randn({16, 1}, data);
  auto loss_fn = [](const pipegear::Batch& y, const pipegear::Batch& t) {
    return torch::mse_loss(y.front(), t.front());
  };
  double first = 0, last = 0;
  for (int step = 1; step <= 30; ++step) {
    // Shapes may change per step: the last batch is smaller.
    const int64_t n = step == 30 ? 20 : 32;
    auto x = torch::randn({n, 16}, data);
    auto y = torch::tanh(x.matmul(teacher));
    optimizer.zero_grad();
    auto loss = pipe.step(pipe.is_first() ? pipegear::Batch{x} : pipegear::Batch{},
                          pipe.is_last() ? pipegear::Batch{y} : pipegear::Batch{},
                          loss_fn);
    optimizer.step();
    last = loss.item<double>();  // the same on every rank
    if (step == 1) {
      first = last;
    }
    if (rank == 0 && (step == 1 || step % 10 == 0)) {
      std::cout << "step " << step << "  loss " << last << "\n";
    }
  }

  // Module style, for evaluation: the output on the last rank.
  {
    torch::NoGradGuard no_grad;
    auto x = torch::randn({8, 16}, data);
    auto out = pipe.forward(pipe.is_first() ? pipegear::Batch{x} : pipegear::Batch{});
    if (pipe.is_last()) {
      std::cout << "eval output " << out.front().sizes() << "\n";
    }
  }
  if (rank == 0) {
    std::cout << "loss " << first << " -> " << last << "\n";
  }

  const double tied_error = tied_language_model(group, /*interleaved=*/false);
  std::cout << "rank " << rank << ": tied language model, largest difference "
            << "from the plain model (5 AdamW steps, then a module-style "
            << "backward) " << tied_error << "\n";
  const double interleaved_error = tied_language_model(group, /*interleaved=*/true);
  std::cout << "rank " << rank << ": the same interleaved (stages " << rank
            << " and " << rank + world << "), largest difference "
            << interleaved_error << "\n";
  return last < first && tied_error < 1e-12 && interleaved_error < 1e-12 ? 0 : 1;
}
