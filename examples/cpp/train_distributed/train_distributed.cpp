// Trains an MLP with one pipeline stage per process, without Python.
// Launch K processes with torchrun's environment (RANK, WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT), e.g. ./run.sh, or
//   torchrun --nproc_per_node=2 --no-python ./train_distributed
// Each rank builds only its own layers (layer factories), rank 0 feeds the
// data, the last rank holds the targets; every rank steps its own optimizer.
#include <iostream>

#include <torch/torch.h>

#include <pipegear/distributed/pipeline.h>

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
  return last < first ? 0 : 1;
}
