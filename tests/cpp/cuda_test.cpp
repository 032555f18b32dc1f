// CUDA checks of the engine: stages on one GPU, and stages split between the
// CPU and a GPU. Every test returns early (with a warning) without a CUDA
// device, so the suite still passes on CPU-only torch.
// Run on a GPU machine: pipegear_tests "[cuda]"  (scripts/gpu_check.sh).
#include "testing.h"

#include <pipegear/gpipe.h>

using pipegear::CheckpointMode;
using pipegear::GPipe;
using pipegear::GPipeOptions;

namespace {

torch::nn::Sequential cuda_mlp() {
  torch::nn::Sequential seq;
  for (int i = 0; i < 4; ++i) {
    seq->push_back(torch::nn::Linear(32, 32));
    seq->push_back(torch::nn::Tanh());
  }
  // float64: tolerances independent of TF32 (which NVIDIA's containers may
  // switch on through the environment).
  seq->to(torch::kFloat64);
  return seq;  // 8 layers
}


// The pipelined copy of `plain` on `devices` against `plain` on
// `ref_device`, module style and step style, every checkpoint mode.
void check_devices(const std::vector<torch::Device>& devices,
                   torch::Device ref_device) {
  const auto balance = even_balance(8, devices.size());
  for (auto mode : {CheckpointMode::kNever, CheckpointMode::kExceptLast,
                    CheckpointMode::kAlways}) {
    for (bool step_style : {false, true}) {
      torch::manual_seed(0);
      auto plain = cuda_mlp();
      auto copy =
          std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
      plain->to(ref_device);
      auto pipe = GPipe(torch::nn::Sequential(copy),
                        GPipeOptions(balance).devices(devices).chunks(4)
                            .checkpoint(mode));
      auto x = torch::randn({16, 32}, torch::kFloat64);
      auto target = torch::randn({16, 32}, torch::kFloat64);

      auto x1 = x.to(ref_device).requires_grad_(true);
      auto ref = plain->forward(x1);
      auto ref_loss = torch::mse_loss(ref, target.to(ref_device));
      ref_loss.backward();

      auto x2 = x.to(devices.front()).requires_grad_(true);
      auto t2 = target.to(devices.back());
      if (step_style) {
        auto loss = pipe->step(x2, t2, [](torch::Tensor y, torch::Tensor t) {
          return torch::mse_loss(y, t);
        });
        require_close(loss, ref_loss);
      } else {
        auto y = pipe->forward(x2);
        REQUIRE(y.device() == devices.back());
        require_close(y, ref);
        torch::mse_loss(y, t2).backward();
      }
      require_close(x2.grad(), x1.grad());
      auto p1 = plain->parameters();
      auto p2 = pipe->parameters();
      REQUIRE(p1.size() == p2.size());
      for (size_t i = 0; i < p1.size(); ++i) {
        require_close(p2[i].grad(), p1[i].grad());
      }
    }
  }
  if (torch::cuda::is_available()) {
    torch::cuda::synchronize();
  }
}

} // namespace

TEST_CASE("two and three stages on cuda:0 are transparent", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device");
    return;
  }
  torch::Device gpu("cuda:0");
  check_devices({gpu, gpu}, gpu);
  check_devices({gpu, gpu, gpu}, gpu);
}

TEST_CASE("stages on cpu and cuda:0 are transparent", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device");
    return;
  }
  torch::Device cpu("cpu");
  torch::Device gpu("cuda:0");
  check_devices({cpu, gpu}, cpu);
  check_devices({gpu, cpu}, cpu);
}

TEST_CASE("cuda:0 -> cpu -> cuda:0 is transparent", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device");
    return;
  }
  // Module style drains stages 0 and 2 on the calling thread, stage 1 on
  // its worker: stage 0 waits for a worker that waits for stage 2.
  torch::Device cpu("cpu");
  torch::Device gpu("cuda:0");
  check_devices({gpu, cpu, gpu}, cpu);
}

TEST_CASE("an input still being computed on the GPU reaches a CPU stage 0 "
          "intact", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device");
    return;
  }
  // The copy of stage 0's input runs on a copy stream; it must wait for the
  // kernels that produce the input on the caller's stream.
  torch::Device cpu("cpu");
  torch::Device gpu("cuda:0");
  torch::manual_seed(5);
  auto plain = cuda_mlp();
  auto copy =
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
  auto pipe = GPipe(torch::nn::Sequential(copy),
                    GPipeOptions({4, 4}).devices({cpu, gpu}).chunks(4));
  auto a = torch::randn({4096, 4096}, gpu);
  auto w = torch::randn({4096, 4096}, gpu) / 64.0;
  torch::cuda::synchronize();
  for (int i = 0; i < 12; ++i) {  // tens of ms of queued GPU work
    a = torch::tanh(torch::mm(a, w));
  }
  // A fresh block, written last.
  auto x = a.narrow(0, 0, 16).narrow(1, 0, 32).to(torch::kFloat64);
  auto y = pipe->forward(x);
  auto ref = plain->forward(x.to(cpu));
  require_close(y, ref);
}

TEST_CASE("training on cuda:0 matches the plain model", "[cuda]") {
  if (!torch::cuda::is_available()) {
    WARN("no CUDA device");
    return;
  }
  torch::Device gpu("cuda:0");
  torch::manual_seed(0);
  auto plain = cuda_mlp();
  auto copy =
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
  plain->to(gpu);
  auto pipe = GPipe(torch::nn::Sequential(copy),
                    GPipeOptions({2, 2, 4}).devices({gpu, gpu, gpu}).chunks(4));
  torch::optim::SGD opt1(plain->parameters(), 0.05);
  torch::optim::SGD opt2(pipe->parameters(), 0.05);
  auto x = torch::randn({32, 32}, torch::dtype(torch::kFloat64).device(gpu));
  auto t = torch::randn({32, 32}, torch::dtype(torch::kFloat64).device(gpu));
  for (int s = 0; s < 20; ++s) {
    opt1.zero_grad();
    torch::mse_loss(plain->forward(x), t).backward();
    opt1.step();
    opt2.zero_grad();
    pipe->step(x, t, [](torch::Tensor y, torch::Tensor t) {
      return torch::mse_loss(y, t);
    });
    opt2.step();
  }
  auto p1 = plain->parameters();
  auto p2 = pipe->parameters();
  for (size_t i = 0; i < p1.size(); ++i) {
    require_close(p2[i], p1[i], 1e-4);
  }
}
