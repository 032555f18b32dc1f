// A small U-Net whose skips cross ranks, one pipeline stage per process,
// without Python (docs/skip.md). Every rank builds the whole model alike;
// the pipeline keeps this rank's slice and routes each skip straight from
// the rank that stashes it to the rank that pops it. The step is checked
// against the plain model on every rank: the loss and this rank's
// parameter gradients (exit status 1 otherwise).
// Launch 2 processes with torchrun's environment: ./run.sh <build folder>.
#include <iostream>

#include <torch/torch.h>

#include <pipegear/distributed/pipeline.h>
#include <pipegear/skip.h>

namespace {

constexpr int64_t kWidth = 8;

// An encoder level stashes its activation; the decoder of the same depth
// pops it and adds it back.
struct LevelImpl : torch::nn::Cloneable<LevelImpl>, pipegear::Skippable {
  LevelImpl(std::vector<std::string> stash, std::vector<std::string> pop)
      : Skippable(std::move(stash), std::move(pop)) {
    reset();
  }
  void reset() override {
    fc = register_module("fc", torch::nn::Linear(kWidth, kWidth));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (const auto& name : pop_names()) {
      x = x + pop(name);
    }
    auto y = torch::tanh(fc(x));
    for (const auto& name : stash_names()) {
      stash(name, y);
    }
    return y;
  }
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(Level);

torch::nn::Sequential unet() {
  using Names = std::vector<std::string>;
  torch::manual_seed(0);
  return torch::nn::Sequential(
      Level(Names{"e1"}, Names{}), Level(Names{"e2"}, Names{}),
      torch::nn::Linear(kWidth, kWidth),          // rank 0: 0-2
      Level(Names{}, Names{"e2"}), Level(Names{}, Names{"e1"}),
      torch::nn::Linear(kWidth, 1));              // rank 1: 3-5
}

} // namespace

int main() {
  auto group = pipegear::init_process_group_from_env("gloo");
  const int64_t rank = group->getRank();
  at::set_num_threads(1);

  auto data = torch::make_generator<at::CPUGeneratorImpl>(7);
  auto x = torch::randn({10, kWidth}, data);
  auto t = torch::randn({10, 1}, data);

  auto plain = unet();
  auto expected = torch::mse_loss(plain->forward(x), t);
  expected.backward();

  pipegear::DistributedPipeline pipe(
      group, unet(),
      pipegear::DistributedOptions()
          .balance({3, 3})
          .chunks(3)
          .checkpoint(pipegear::CheckpointMode::kAlways)
          .timeout(std::chrono::seconds(60)));
  auto loss = pipe.step(pipe.is_first() ? pipegear::Batch{x} : pipegear::Batch{},
                        pipe.is_last() ? pipegear::Batch{t} : pipegear::Batch{},
                        [](const pipegear::Batch& y, const pipegear::Batch& target) {
                          return torch::mse_loss(y.front(), target.front());
                        });
  bool ok = torch::allclose(loss, expected, 1e-5, 1e-6);
  auto reference = plain->named_parameters();
  int64_t compared = 0;
  for (const auto& p : pipe.module()->named_parameters()) {
    const auto* r = reference.find(p.key());
    ok = ok && r != nullptr && torch::allclose(p.value().grad(), r->grad(), 1e-5, 1e-6);
    ++compared;
  }
  std::cout << "rank " << rank << ": loss " << loss.item<double>() << " (plain "
            << expected.item<double>() << "), " << compared
            << " parameter gradients " << (ok ? "equal" : "DIFFER")
            << " to the plain model's\n";
  return ok && compared > 0 ? 0 : 1;
}
