// Randomness by construction (random.h): a recomputation draws exactly what
// its forward drew, and the same seed gives the same numbers whatever the
// timing, the checkpoint mode, the schedule or the balance.
#include "testing.h"

#include <chrono>
#include <map>
#include <random>
#include <thread>

#include <pipegear/pipegear.h>

using pipegear::CheckpointMode;
using pipegear::GPipe;
using pipegear::GPipeOptions;
using pipegear::ScheduleKind;

namespace {

// Many small draws with random sleeps between them: a draw of another
// thread from a shared generator would land between two of ours.
struct JitteryDropoutImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) {
    thread_local std::mt19937 jitter(std::random_device{}());
    for (int i = 0; i < 20; ++i) {
      if (jitter() % 4 == 0) {
        std::this_thread::sleep_for(std::chrono::microseconds(jitter() % 200));
      }
      x = torch::dropout(x, 0.01, is_training());
    }
    return x;
  }
};
TORCH_MODULE(JitteryDropout);

// Random numbers drawn by a factory inside a layer (not a module's own).
struct NoiseImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) {
    return x + 0.1 * torch::rand_like(x) + 0.1 * torch::randn(x.sizes(), x.options());
  }
};
TORCH_MODULE(Noise);

torch::nn::Sequential random_model() {
  torch::manual_seed(0);
  torch::nn::Sequential m;
  for (int i = 0; i < 4; ++i) {
    m->push_back(torch::nn::Linear(8, 8));
    m->push_back(torch::nn::Dropout(0.3));
    m->push_back(Noise());
    m->push_back(JitteryDropout());
  }
  m->to(torch::kFloat64);
  return m;
}

struct Outcome {
  torch::Tensor value;  // loss or output
  std::vector<torch::Tensor> grads;
  torch::Tensor input_grad;
  torch::Tensor next_draw;  // the caller's generator after the step

  bool operator==(const Outcome& o) const {
    if (!torch::equal(value, o.value) || !torch::equal(input_grad, o.input_grad) ||
        !torch::equal(next_draw, o.next_draw) || grads.size() != o.grads.size()) {
      return false;
    }
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!torch::equal(grads[i], o.grads[i])) {
        return false;
      }
    }
    return true;
  }
};

Outcome run(std::vector<int64_t> balance, int64_t chunks, CheckpointMode mode,
            ScheduleKind schedule, bool module_face, uint64_t seed) {
  auto model = random_model();
  auto pipe = GPipe(model, GPipeOptions(balance)
                               .devices(std::vector<c10::Device>(
                                   balance.size(), torch::kCPU))
                               .chunks(chunks)
                               .checkpoint(mode)
                               .schedule(schedule)
                               // one thread each: GEMMs sum in one order
                               .worker_threads(1));
  torch::manual_seed(seed);
  auto x = torch::rand({12, 8}, torch::kFloat64).requires_grad_(true);
  auto t = torch::zeros({12, 8}, torch::kFloat64);
  Outcome out;
  if (module_face) {
    auto y = pipe->forward(x);
    torch::mse_loss(y, t).backward();
    out.value = y.detach();
  } else {
    out.value = pipe->step(x, t, [](auto o, auto tt) { return torch::mse_loss(o, tt); });
  }
  for (const auto& p : pipe->parameters()) {
    out.grads.push_back(p.grad().clone());
  }
  out.input_grad = x.grad().clone();
  out.next_draw = torch::rand({4});
  return out;
}

} // namespace

TEST_CASE("randomness: recomputed masks equal the forward's, under jitter",
          "[random]") {
  // Two stages on one device, each drawing many times with sleeps between
  // draws; every micro-batch is recomputed (always). A mask drawn anew by
  // the recomputation would zero other elements of the input gradient.
  for (auto schedule : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
    for (bool module_face : {true, false}) {
      if (module_face && schedule == ScheduleKind::k1F1B) {
        continue;
      }
      for (int trial = 0; trial < 5; ++trial) {
        torch::nn::Sequential model(JitteryDropout{}, JitteryDropout{});
        auto pipe = GPipe(model, GPipeOptions({1, 1})
                                     .devices({torch::kCPU, torch::kCPU})
                                     .chunks(10)
                                     .checkpoint(CheckpointMode::kAlways)
                                     .schedule(schedule));
        auto x = torch::rand({10, 40}).add_(0.5).requires_grad_(true);
        torch::Tensor y;
        if (module_face) {
          y = pipe->forward(x);
          y.norm().backward();
        } else {
          // loss_fn sees each micro-batch's output twice: after the forward
          // and after the recomputation (the target's rows name the
          // micro-batch). Both must be the same, and the input gradient of
          // a sum is zero exactly where the forward's masks dropped.
          std::map<int64_t, std::vector<torch::Tensor>> seen;
          auto rows = torch::arange(10, torch::kFloat).reshape({10, 1});
          pipe->step(x, rows, [&](auto o, auto t) {
            seen[t[0][0].template item<int64_t>()].push_back(o.detach().clone());
            return o.sum();
          });
          std::vector<torch::Tensor> firsts;
          for (auto& [j, outs] : seen) {
            REQUIRE(outs.size() == 2);
            REQUIRE(torch::equal(outs[0], outs[1]));
            firsts.push_back(outs[0]);
          }
          y = torch::cat(firsts);
        }
        INFO("schedule " << static_cast<int>(schedule) << ", module face "
                         << module_face << ", trial " << trial);
        REQUIRE(x.grad().defined());
        REQUIRE(torch::equal(y != 0, x.grad() != 0));
      }
    }
  }
}

TEST_CASE("randomness: the same seed gives bit-identical results", "[random]") {
  const auto ref = run({4, 4, 8}, 4, CheckpointMode::kExceptLast,
                       ScheduleKind::kGPipe, false, 7);
  for (int i = 0; i < 49; ++i) {  // 50 runs in all
    REQUIRE(run({4, 4, 8}, 4, CheckpointMode::kExceptLast, ScheduleKind::kGPipe,
                false, 7) == ref);
  }
  // Another seed draws other masks.
  REQUIRE_FALSE(run({4, 4, 8}, 4, CheckpointMode::kExceptLast,
                    ScheduleKind::kGPipe, false, 8) == ref);
}

TEST_CASE("randomness: checkpoint modes, schedules and balances agree",
          "[random]") {
  // Bit for bit, for one schedule: the order in which micro-batches' weight
  // gradients accumulate is the schedule's, so schedules agree only up to
  // rounding.
  for (bool module_face : {false, true}) {
    for (auto schedule : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
      if (module_face && schedule == ScheduleKind::k1F1B) {
        continue;
      }
      const auto ref = run({16}, 4, CheckpointMode::kNever, schedule,
                           module_face, 11);
      for (auto mode : {CheckpointMode::kNever, CheckpointMode::kExceptLast,
                        CheckpointMode::kAlways}) {
        for (const auto& balance : std::vector<std::vector<int64_t>>{
                 {16}, {8, 8}, {3, 5, 8}, {4, 4, 4, 4}}) {
          INFO("module face " << module_face << ", schedule "
                              << static_cast<int>(schedule) << ", mode "
                              << pipegear::to_string(mode) << ", K "
                              << balance.size());
          REQUIRE(run(balance, 4, mode, schedule, module_face, 11) == ref);
        }
      }
    }
  }
  // Across schedules: the same masks, so equal up to rounding.
  const auto a = run({8, 8}, 4, CheckpointMode::kAlways, ScheduleKind::kGPipe,
                     false, 11);
  const auto b = run({8, 8}, 4, CheckpointMode::kAlways, ScheduleKind::k1F1B,
                     false, 11);
  REQUIRE(torch::equal(a.value, b.value));
  for (size_t i = 0; i < a.grads.size(); ++i) {
    require_close(a.grads[i], b.grads[i], 1e-12);
  }
}
