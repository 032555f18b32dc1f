#include "testing.h"

#include <atomic>
#include <chrono>
#include <thread>

#include <pipegear/gpipe.h>

using pipegear::CheckpointMode;
using pipegear::GPipe;
using pipegear::GPipeOptions;

namespace {

torch::nn::Sequential mlp(int64_t layers, int64_t width) {
  torch::nn::Sequential seq;
  for (int64_t i = 0; i < layers; ++i) {
    seq->push_back(torch::nn::Linear(width, width));
    seq->push_back(torch::nn::Tanh());
  }
  return seq;
}

torch::nn::Sequential conv() {
  return torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1)),
      torch::nn::ReLU(),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 4, 3).padding(1)),
      torch::nn::ReLU(), torch::nn::Flatten(),
      torch::nn::Linear(4 * 6 * 6, 5));
}


// Compares the pipelined copy of `plain` with `plain` itself, both faces.
void check_transparency(torch::nn::Sequential plain, torch::Tensor x,
                        int64_t k, int64_t chunks, CheckpointMode mode,
                        bool step_style, double tol,
                        pipegear::ScheduleKind schedule =
                            pipegear::ScheduleKind::kGPipe,
                        int64_t virtual_stages = 1) {
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
  auto pipe = GPipe(torch::nn::Sequential(copy),
                    GPipeOptions(even_balance(plain->size(), k * virtual_stages))
                        .chunks(chunks)
                        .checkpoint(mode)
                        .schedule(schedule)
                        .virtual_stages(virtual_stages));
  auto target = torch::randn_like(plain->forward(x));
  auto x1 = x.clone().requires_grad_(true);
  auto x2 = x.clone().requires_grad_(true);
  auto ref = plain->forward(x1);
  auto ref_loss = torch::mse_loss(ref, target);
  ref_loss.backward();
  if (step_style) {
    auto loss = pipe->step(x2, target, [](auto y, auto t) {
      return torch::mse_loss(y, t);
    });
    require_close(loss, ref_loss, tol);
  } else {
    auto y = pipe->forward(x2);
    require_close(y, ref, tol);
    torch::mse_loss(y, target).backward();
  }
  require_close(x2.grad(), x1.grad(), tol);
  auto p1 = plain->parameters();
  auto p2 = pipe->parameters();
  REQUIRE(p1.size() == p2.size());
  for (size_t i = 0; i < p1.size(); ++i) {
    require_close(p2[i].grad(), p1[i].grad(), tol);
  }
}

} // namespace

TEST_CASE("transparency: MLP, float64, every K, chunks, mode and face",
          "[gpipe]") {
  torch::manual_seed(0);
  const auto k = GENERATE(1, 2, 3, 4);
  const auto chunks = GENERATE(1, 2, 3, 4, 7);
  const auto mode = GENERATE(CheckpointMode::kNever, CheckpointMode::kExceptLast,
                             CheckpointMode::kAlways);
  const bool step_style = GENERATE(false, true);
  auto plain = mlp(3, 5);
  plain->to(torch::kFloat64);
  auto x = torch::randn({9, 5}, torch::kFloat64);
  check_transparency(plain, x, k, chunks, mode, step_style, 1e-10);
}

TEST_CASE("transparency: conv model, float32", "[gpipe]") {
  torch::manual_seed(1);
  const auto k = GENERATE(1, 2, 3, 4);
  const auto chunks = GENERATE(1, 4, 7);
  const bool step_style = GENERATE(false, true);
  auto x = torch::randn({8, 3, 6, 6});
  check_transparency(conv(), x, k, chunks, CheckpointMode::kExceptLast,
                     step_style, 1e-5);
}

// A layer using one weight twice and adding a term of the weight alone: W's
// gradients reach that weight from two frontier nodes and from a path that
// never meets the input (summed, not counted twice).
struct TwiceImpl : torch::nn::Cloneable<TwiceImpl> {
  TwiceImpl() { reset(); }
  void reset() override {
    w = register_parameter("w", torch::randn({5, 5}) * 0.3);
  }
  torch::Tensor forward(torch::Tensor x) {
    auto h = torch::tanh(torch::matmul(x, w));
    return torch::matmul(h, w) + w.sum(0);
  }
  torch::Tensor w;
};
TORCH_MODULE(Twice);

TEST_CASE("transparency: zero-bubble schedules (split backward)",
          "[gpipe][zb]") {
  torch::manual_seed(7);
  const auto schedule = GENERATE(pipegear::ScheduleKind::kZBH1,
                                 pipegear::ScheduleKind::kZBH2);
  const auto k = GENERATE(2, 3, 4);
  const auto chunks = GENERATE(1, 3, 4, 8);
  const auto mode = GENERATE(CheckpointMode::kNever, CheckpointMode::kExceptLast,
                             CheckpointMode::kAlways);
  INFO("K=" << k << " chunks=" << chunks);
  auto plain = mlp(4, 5);
  plain->push_back(Twice());
  plain->to(torch::kFloat64);
  auto x = torch::randn({9, 5}, torch::kFloat64);
  check_transparency(plain, x, k, chunks, mode, /*step_style=*/true, 1e-10,
                     schedule);
}

TEST_CASE("transparency: interleaved 1F1B and interleaved zero-bubble, v "
          "stages per worker", "[gpipe][schedule][interleaved]") {
  torch::manual_seed(9);
  const auto schedule = GENERATE(pipegear::ScheduleKind::kInterleaved,
                                 pipegear::ScheduleKind::kInterleavedZB);
  const auto k = GENERATE(2, 3, 4);
  const auto v = GENERATE(2, 3);
  const auto chunks = GENERATE(1, 3, 4, 8);
  const auto mode = GENERATE(CheckpointMode::kNever, CheckpointMode::kExceptLast,
                             CheckpointMode::kAlways);
  INFO("schedule " << static_cast<int>(schedule) << " K=" << k << " v=" << v
                   << " chunks=" << chunks);
  auto plain = mlp(6, 5);  // 13 layers: up to K * v = 12 partitions
  plain->push_back(Twice());
  plain->to(torch::kFloat64);
  auto x = torch::randn({9, 5}, torch::kFloat64);
  check_transparency(plain, x, k, chunks, mode, /*step_style=*/true, 1e-10,
                     schedule, v);
}

TEST_CASE("interleaved zero-bubble: dropout and DeferredBatchNorm as under "
          "GPipe; the trace's B and W cells name their worker",
          "[gpipe][schedule][interleaved][zb]") {
  // The same partitions (K * v) under GPipe draw the same dropout masks and
  // commit the same running statistics; the gradients sum in another order.
  torch::manual_seed(11);
  torch::nn::Sequential model(
      torch::nn::Linear(6, 6), torch::nn::Dropout(0.3),
      torch::nn::BatchNorm1d(torch::nn::BatchNorm1dOptions(6)),
      torch::nn::Tanh(), torch::nn::Linear(6, 6), torch::nn::Dropout(0.2),
      torch::nn::BatchNorm1d(torch::nn::BatchNorm1dOptions(6)),
      torch::nn::Linear(6, 3));
  model->to(torch::kFloat64);
  const auto mode = GENERATE(CheckpointMode::kNever, CheckpointMode::kAlways);
  auto make = [&](pipegear::ScheduleKind schedule, int64_t v) {
    auto copy =
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
    return GPipe(torch::nn::Sequential(copy), GPipeOptions({2, 2, 2, 2})
                                                  .chunks(4)
                                                  .checkpoint(mode)
                                                  .deferred_batch_norm(true)
                                                  .schedule(schedule)
                                                  .virtual_stages(v));
  };
  auto ref = make(pipegear::ScheduleKind::kGPipe, 1);
  auto pipe = make(pipegear::ScheduleKind::kInterleavedZB, 2);
  auto mse = [](auto y, auto t) { return torch::mse_loss(y, t); };
  for (int step = 0; step < 2; ++step) {
    auto x = torch::randn({12 - step, 6}, torch::kFloat64);
    auto t = torch::randn({12 - step, 3}, torch::kFloat64);
    auto x1 = x.clone().requires_grad_(true);
    auto x2 = x.clone().requires_grad_(true);
    torch::manual_seed(100 + step);
    auto l1 = ref->step(x1, t, mse);
    torch::manual_seed(100 + step);
    auto l2 = pipe->step(x2, t, mse);
    require_close(l2, l1, 1e-12);
    require_close(x2.grad(), x1.grad(), 1e-12);
  }
  auto p1 = ref->parameters();
  auto p2 = pipe->parameters();
  REQUIRE(p1.size() == p2.size());
  for (size_t i = 0; i < p1.size(); ++i) {
    require_close(p2[i].grad(), p1[i].grad(), 1e-12);
  }
  auto b1 = ref->buffers();
  auto b2 = pipe->buffers();
  REQUIRE(b1.size() == b2.size());
  for (size_t i = 0; i < b1.size(); ++i) {
    require_close(b2[i].to(torch::kFloat64), b1[i].to(torch::kFloat64), 1e-12);
  }
  const auto trace = pipe->last_trace();
  CHECK(trace.stages() == 2);
  int64_t b = 0, w = 0, on_chunk1 = 0;
  for (const auto& e : trace.events()) {
    CHECK(e.stage < 2);
    CHECK(e.chunk < 2);
    CHECK(e.phase != pipegear::Phase::kBackward);
    b += e.phase == pipegear::Phase::kBackwardInput && !e.recompute;
    w += e.phase == pipegear::Phase::kBackwardWeight;
    on_chunk1 += e.chunk == 1 && !e.recompute;
  }
  CHECK(b == 4 * 4);  // 4 stages, 4 micro-batches
  CHECK(w == 4 * 4);
  CHECK(on_chunk1 == 2 * 3 * 4);  // stages 2 and 3: F, B, W of 4
  CHECK(trace.to_chrome_trace().find("\"name\":\"W3.1\"") !=
        std::string::npos);
  CHECK_THROWS_WITH(pipe->forward(torch::randn({4, 6}, torch::kFloat64)),
                    Catch::Contains("module-style forward needs a fill/drain"));
}

TEST_CASE("interleaved: options are checked, the trace has a row per worker",
          "[gpipe][interleaved]") {
  auto opts = [](std::vector<int64_t> b) {
    return GPipeOptions(std::move(b)).chunks(4);
  };
  CHECK_THROWS_WITH(GPipe(mlp(2, 3), opts({1, 1, 1, 1}).virtual_stages(2)),
                    Catch::Contains("virtual_stages = 2 needs the "
                                    "'interleaved' or 'interleaved-zb' "
                                    "schedule"));
  CHECK_THROWS_WITH(
      GPipe(mlp(2, 3), opts({2, 1, 1}).virtual_stages(2).schedule(
                           pipegear::ScheduleKind::kInterleaved)),
      Catch::Contains("must divide the number of partitions"));
  CHECK_THROWS_WITH(
      GPipe(mlp(2, 3), opts({1, 1, 1, 1})
                           .virtual_stages(2)
                           .schedule(pipegear::ScheduleKind::kInterleaved)
                           .devices({torch::kCPU, torch::kCPU, torch::kCPU,
                                     torch::Device("meta")})),
      Catch::Contains("meta"));
  auto pipe = GPipe(mlp(2, 3), opts({1, 1, 1, 1}).virtual_stages(2).schedule(
                                   pipegear::ScheduleKind::kInterleaved));
  auto x = torch::randn({8, 3});
  pipe->step(x, torch::randn({8, 3}), [](auto y, auto t) {
    return torch::mse_loss(y, t);
  });
  const auto trace = pipe->last_trace();
  CHECK(trace.stages() == 2);
  int64_t cells = 0;
  for (const auto& e : trace.events()) {
    CHECK(e.stage < 2);
    cells += !e.recompute;
  }
  CHECK(cells == 4 * 2 * 4);  // 4 stages, F and B, 4 micro-batches
}

TEST_CASE("zero-bubble: an input that needs no gradient, parameter-only "
          "outputs, the trace's B and W cells", "[gpipe][zb]") {
  torch::manual_seed(8);
  auto plain = torch::nn::Sequential(torch::nn::Linear(4, 4),
                                     torch::nn::Tanh(), torch::nn::Linear(4, 4));
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
  auto pipe = GPipe(torch::nn::Sequential(copy),
                    GPipeOptions({1, 2}).chunks(4).schedule(
                        pipegear::ScheduleKind::kZBH1));
  auto x = torch::randn({8, 4});  // no gradient: stage 0's B computes nothing
  auto t = torch::randn({8, 4});
  auto ref = torch::mse_loss(plain->forward(x), t);
  ref.backward();
  auto loss = pipe->step(x, t, [](auto y, auto tt) {
    return torch::mse_loss(y, tt);
  });
  require_close(loss, ref);
  auto p1 = plain->parameters();
  auto p2 = pipe->parameters();
  for (size_t i = 0; i < p1.size(); ++i) {
    require_close(p2[i].grad(), p1[i].grad());
  }
  int64_t b = 0, w = 0;
  for (const auto& e : pipe->last_trace().events()) {
    CHECK(e.phase != pipegear::Phase::kBackward);
    b += e.phase == pipegear::Phase::kBackwardInput && !e.recompute;
    w += e.phase == pipegear::Phase::kBackwardWeight;
  }
  CHECK(b == 8);
  CHECK(w == 8);
  CHECK_THROWS_WITH(pipe->forward(x),
                    Catch::Contains("module-style forward needs a fill/drain"));
}

TEST_CASE("several optimizer steps keep the parameters equal", "[gpipe]") {
  torch::manual_seed(2);
  auto plain = mlp(4, 6);
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
  auto pipe = GPipe(torch::nn::Sequential(copy), GPipeOptions({3, 3, 2}).chunks(4));
  torch::optim::Adam o1(plain->parameters(), 1e-2);
  torch::optim::Adam o2(pipe->parameters(), 1e-2);
  for (int step = 0; step < 5; ++step) {
    auto x = torch::randn({10, 6});
    auto t = torch::randn({10, 6});
    o1.zero_grad();
    o2.zero_grad();
    torch::mse_loss(plain->forward(x), t).backward();
    pipe->step(x, t, [](auto y, auto t) { return torch::mse_loss(y, t); });
    o1.step();
    o2.step();
  }
  auto p1 = plain->parameters();
  auto p2 = pipe->parameters();
  for (size_t i = 0; i < p1.size(); ++i) {
    require_close(p2[i], p1[i], 1e-5);
  }
}

TEST_CASE("eval and no-grad forwards keep no graph", "[gpipe]") {
  auto pipe = GPipe(mlp(2, 4), GPipeOptions({2, 2}).chunks(3));
  auto x = torch::randn({6, 4});
  {
    torch::NoGradGuard no_grad;
    auto y = pipe->forward(x);
    CHECK_FALSE(y.requires_grad());
    CHECK_FALSE(y.grad_fn());
  }
  {
    torch::InferenceMode guard;
    auto y = pipe->forward(x);
    CHECK(y.is_inference());
  }
  auto y = pipe->forward(x);
  CHECK(y.requires_grad());
  CHECK(y.grad_fn());
  CHECK(pipe->last_trace().events().size() == 6u);
}

namespace {

// Throws in its forward (or its backward) at the n-th call of a step.
struct FaultImpl : torch::nn::Module {
  std::atomic<int> forward_calls{0}, backward_calls{0};
  int fail_forward_at = -1, fail_backward_at = -1;

  struct Fn : torch::autograd::Function<Fn> {
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx,
                                 torch::Tensor x, FaultImpl* self) {
      ctx->saved_data["self"] = reinterpret_cast<int64_t>(self);
      return x.clone();
    }
    static torch::autograd::variable_list backward(
        torch::autograd::AutogradContext* ctx,
        torch::autograd::variable_list g) {
      auto* self = reinterpret_cast<FaultImpl*>(ctx->saved_data["self"].toInt());
      if (self->backward_calls++ == self->fail_backward_at) {
        throw std::runtime_error("injected backward fault");
      }
      return {g[0], torch::Tensor()};
    }
  };

  torch::Tensor forward(torch::Tensor x) {
    if (!pipegear::is_recomputing() && forward_calls++ == fail_forward_at) {
      TORCH_CHECK_VALUE(false, "injected forward fault");
    }
    return Fn::apply(x, this);
  }
};
TORCH_MODULE(Fault);

} // namespace

TEST_CASE("a failing cell reaches the caller and the next step works",
          "[gpipe]") {
  const auto mode = GENERATE(CheckpointMode::kNever, CheckpointMode::kAlways);
  const int fail_at = GENERATE(0, 2);
  const bool in_backward = GENERATE(false, true);
  torch::manual_seed(3);
  Fault fault;
  torch::nn::Sequential model(torch::nn::Linear(4, 4), torch::nn::Tanh(), fault,
                              torch::nn::Linear(4, 4));
  auto pipe = GPipe(model, GPipeOptions({2, 1, 1}).chunks(4).checkpoint(mode));
  auto x = torch::randn({8, 4});
  auto fn = [](auto y, auto t) { return torch::mse_loss(y, t); };
  (in_backward ? fault->fail_backward_at : fault->fail_forward_at) = fail_at;
  auto start = std::chrono::steady_clock::now();
  if (in_backward) {
    CHECK_THROWS_WITH(pipe->step(x, x, fn),
                      Catch::Contains("injected backward fault"));
  } else {
    CHECK_THROWS_WITH(pipe->step(x, x, fn),
                      Catch::Contains("injected forward fault") &&
                          Catch::Contains("stage 1, micro-batch " +
                                          std::to_string(fail_at)));
  }
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  fault->fail_forward_at = fault->fail_backward_at = -1;
  pipe->zero_grad();
  auto loss = pipe->step(x, x, fn);
  model->zero_grad();
  auto ref = torch::mse_loss(model->forward(x), x);
  require_close(loss, ref, 1e-6);
}

TEST_CASE("recomputation: call counts and exact dropout replay", "[gpipe]") {
  struct CountImpl : torch::nn::Module {
    int calls = 0, recomputes = 0;
    torch::Tensor forward(torch::Tensor x) {
      ++calls;
      recomputes += pipegear::is_recomputing();
      return x;
    }
  };
  TORCH_MODULE(Count);
  const auto mode = GENERATE(CheckpointMode::kNever, CheckpointMode::kExceptLast,
                             CheckpointMode::kAlways);
  Count count;
  auto make = [](Count c) {
    torch::manual_seed(11);
    return torch::nn::Sequential(torch::nn::Linear(4, 4), c,
                                 torch::nn::Dropout(0.5), torch::nn::Linear(4, 4));
  };
  auto model = make(count);
  auto pipe = GPipe(model, GPipeOptions({1, 3}).chunks(4).checkpoint(mode));
  auto x = torch::randn({8, 4});
  torch::manual_seed(7);
  auto y = pipe->forward(x);
  y.sum().backward();
  const int expected_recomputes =
      mode == CheckpointMode::kNever ? 0 : mode == CheckpointMode::kAlways ? 4 : 3;
  CHECK(count->recomputes == expected_recomputes);
  CHECK(count->calls == 4 + expected_recomputes);

  // Same seed under `never`: bitwise equal outputs and gradients.
  auto grads = pipe->parameters();
  std::vector<torch::Tensor> g1;
  for (auto& p : grads) {
    g1.push_back(p.grad().clone());
  }
  auto ref = GPipe(make(Count()),
                   GPipeOptions({1, 3}).chunks(4).checkpoint(CheckpointMode::kNever));
  torch::manual_seed(7);
  auto y2 = ref->forward(x);
  y2.sum().backward();
  CHECK(torch::equal(y, y2));
  auto p2 = ref->parameters();
  for (size_t i = 0; i < p2.size(); ++i) {
    CHECK(torch::equal(g1[i], p2[i].grad()));
  }
}

TEST_CASE("bad GPipe arguments get typed errors", "[gpipe]") {
  auto model = mlp(2, 3);
  CHECK_THROWS_AS(GPipe(model, GPipeOptions({1, 2})), c10::ValueError);
  CHECK_THROWS_WITH(GPipe(model, GPipeOptions({1, 2})),
                    Catch::Contains("sum to the 4 layers") &&
                        Catch::Contains("got 3"));
  CHECK_THROWS_AS(GPipe(model, GPipeOptions({0, 4})), c10::ValueError);
  CHECK_THROWS_AS(GPipe(model, GPipeOptions({2, 2}).chunks(0)), c10::ValueError);
  CHECK_THROWS_AS(GPipe(model, GPipeOptions({2, 2}).devices({torch::kCPU})),
                  c10::IndexError);
  torch::nn::Linear shared(3, 3);
  CHECK_THROWS_AS(GPipe(torch::nn::Sequential(shared, shared), GPipeOptions({1, 1})),
                  c10::ValueError);
  CHECK_THROWS_AS(GPipe(torch::nn::Sequential(), GPipeOptions({1})),
                  c10::ValueError);
  auto pipe = GPipe(model, GPipeOptions({2, 2}).chunks(2));
  CHECK_THROWS_AS(pipe->forward(torch::ones({})), c10::ValueError);
  CHECK_THROWS_AS(pipe->step(torch::ones({4, 3}), torch::ones({3, 3}),
                             [](auto y, auto t) { return (y - t).sum(); }),
                  c10::ValueError);
}

TEST_CASE("schedule table of a pipeline", "[gpipe]") {
  auto pipe = GPipe(mlp(2, 3), GPipeOptions({2, 2}).chunks(2));
  CHECK(pipe->schedule_table(2) ==
        " clock  0  1  2  3  4  5\n"
        "stage0 F0 F1       B1 B0\n"
        "stage1    F0 F1 B1 B0\n");
}

TEST_CASE("a failure in a later stage commits no running statistics",
          "[gpipe][batchnorm]") {
  // Stage 0 ends all its forward cells before stage 1 fails on the last
  // micro-batch: the failed step must leave stage 0's statistics alone.
  struct SlowFaultImpl : torch::nn::Module {
    int calls = 0;
    torch::Tensor forward(torch::Tensor x) {
      if (++calls == 3) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        TORCH_CHECK_VALUE(false, "injected in stage 1");
      }
      return x;
    }
  };
  torch::manual_seed(4);
  torch::nn::Sequential model(
      torch::nn::Linear(3, 3),
      torch::nn::BatchNorm1d(torch::nn::BatchNorm1dOptions(3)),
      std::make_shared<SlowFaultImpl>());
  auto pipe = GPipe(model, GPipeOptions({2, 1}).chunks(3).deferred_batch_norm(true));
  std::vector<torch::Tensor> before;
  for (const auto& b : pipe->buffers()) {
    before.push_back(b.clone());
  }
  auto x = torch::randn({6, 3});
  CHECK_THROWS_WITH(pipe->forward(x), Catch::Contains("injected in stage 1"));
  auto after = pipe->buffers();
  REQUIRE(after.size() == before.size());
  for (size_t i = 0; i < after.size(); ++i) {
    CHECK(torch::equal(after[i], before[i]));
  }
  auto y = pipe->forward(x);  // calls == 4, 5, 6: succeeds and commits
  CHECK(pipe->buffers().back().item<int64_t>() == 1);  // num_batches_tracked
}

TEST_CASE("a second backward through the output is a clear error", "[gpipe]") {
  auto pipe = GPipe(mlp(2, 3), GPipeOptions({2, 2}).chunks(2));
  auto y = pipe->forward(torch::randn({4, 3})).sum();
  y.backward({}, /*retain_graph=*/true);
  CHECK_THROWS_WITH(y.backward(), Catch::Contains("ran a second time"));
}
