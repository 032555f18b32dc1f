// Trains a small MLP with a 2-stage pipeline from C++: balance by profiling,
// the schedule table, then a few SGD steps in step style.
#include <iostream>

#include <torch/torch.h>

#include <pipegear/pipegear.h>

int main() {
  torch::manual_seed(0);
  torch::nn::Sequential model(
      torch::nn::Linear(16, 128), torch::nn::ReLU(),
      torch::nn::Linear(128, 128), torch::nn::ReLU(),
      torch::nn::Linear(128, 1));
  auto sample = torch::randn({32, 16});
  auto balance = pipegear::balance_by_time(
      2, model, sample, pipegear::BalanceByTimeOptions().repeats(3));
  std::cout << "balance: " << c10::IntArrayRef(balance) << "\n";

  auto pipe = pipegear::GPipe(model, pipegear::GPipeOptions(balance).chunks(4));
  std::cout << pipe->schedule_table(4);
  // Past GPipe's bubble: GPipeOptions(balance).schedule(
  // pipegear::ScheduleKind::kZBH1) splits each backward into B and W.
  std::cout << pipegear::render_schedule(pipegear::zb_h1_schedule(2, 4), 4);

  torch::optim::SGD optimizer(pipe->parameters(), /*lr=*/0.05);
  auto teacher = torch::randn({16, 1});
  float first = 0, last = 0;
  for (int step = 1; step <= 20; ++step) {
    auto x = torch::randn({32, 16});
    auto y = x.matmul(teacher);
    optimizer.zero_grad();
    auto loss = pipe->step(x, y, [](torch::Tensor out, torch::Tensor t) {
      return torch::mse_loss(out, t);
    });
    optimizer.step();
    last = loss.item<float>();
    if (step == 1) {
      first = last;
    }
    if (step % 5 == 0 || step == 1) {
      std::cout << "step " << step << "  loss " << last << "\n";
    }
  }
  std::cout << "bubble fraction " << pipe->last_trace().bubble_fraction()
            << "\n";
  return last < first ? 0 : 1;
}
