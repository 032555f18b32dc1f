// Models the transparency tests do not build, as users write them: every
// one equals the plain model or gets a clear error (never a silent wrong
// number). docs/errors.md lists the errors.
#include "testing.h"

#include <map>
#include <stdexcept>
#include <thread>

#include <ATen/Parallel.h>

#include <pipegear/pipegear.h>

using pipegear::CheckpointMode;
using pipegear::GPipe;
using pipegear::GPipeOptions;
using pipegear::ScheduleKind;

namespace {

GPipeOptions cpu_options(std::vector<int64_t> balance, int64_t chunks,
                         CheckpointMode mode = CheckpointMode::kExceptLast,
                         ScheduleKind schedule = ScheduleKind::kGPipe) {
  std::vector<c10::Device> devices(balance.size(), torch::kCPU);
  return GPipeOptions(std::move(balance))
      .devices(devices)
      .chunks(chunks)
      .checkpoint(mode)
      .schedule(schedule);
}

torch::nn::Sequential classifier(int64_t classes) {
  torch::manual_seed(3);
  torch::nn::Sequential m(torch::nn::Linear(6, 16), torch::nn::Tanh(),
                          torch::nn::Linear(16, classes));
  m->to(torch::kFloat64);
  return m;
}

// Loss and parameter gradients of the plain model and of a pipe over a
// deep copy of it, for `loss` (a torch::nn loss module).
template <typename Loss>
void expect_transparent(Loss loss, const torch::Tensor& x,
                        const torch::Tensor& t, int64_t classes) {
  for (auto mode : {CheckpointMode::kNever, CheckpointMode::kExceptLast,
                    CheckpointMode::kAlways}) {
    for (auto schedule : {ScheduleKind::kGPipe, ScheduleKind::k1F1B}) {
      for (int64_t chunks : {3, 4}) {
        auto plain = classifier(classes);
        auto ref = loss->forward(plain->forward(x), t);
        ref.backward();
        auto model = classifier(classes);
        auto pipe = GPipe(model, cpu_options({2, 1}, chunks, mode, schedule));
        auto got = pipe->step(x, t, loss);
        INFO("mode " << pipegear::to_string(mode) << ", chunks " << chunks);
        require_close(got, ref, 1e-12);
        auto a = plain->parameters();
        auto b = pipe->parameters();
        for (size_t i = 0; i < a.size(); ++i) {
          require_close(b[i].grad(), a[i].grad(), 1e-12);
        }
      }
    }
  }
}

} // namespace

TEST_CASE("user models: a sum loss module is summed, not averaged",
          "[user]") {
  auto x = torch::randn({10, 6}, torch::kFloat64);
  auto t = torch::randint(0, 5, {10});
  expect_transparent(
      torch::nn::CrossEntropyLoss(
          torch::nn::CrossEntropyLossOptions().reduction(torch::kSum)),
      x, t, 5);
  expect_transparent(
      torch::nn::MSELoss(torch::nn::MSELossOptions().reduction(torch::kSum)), x,
      torch::randn({10, 5}, torch::kFloat64), 5);
  expect_transparent(torch::nn::MSELoss(), x,
                     torch::randn({10, 5}, torch::kFloat64), 5);
}

TEST_CASE("user models: a mean over ignored targets counts the rest",
          "[user]") {
  auto x = torch::randn({10, 6}, torch::kFloat64);
  // The first micro-batches are mostly padding.
  auto t = torch::tensor({-100, -100, -100, 2, -100, -100, 1, 0, 3, 4, },
                         torch::kLong);
  expect_transparent(torch::nn::CrossEntropyLoss(), x, t, 5);
  auto weight = torch::tensor({1.0, 2.0, 0.5, 3.0, 1.5}, torch::kFloat64);
  expect_transparent(
      torch::nn::CrossEntropyLoss(
          torch::nn::CrossEntropyLossOptions().weight(weight).ignore_index(3)),
      x, torch::tensor({3, 3, 3, 3, 0, 1, 2, 4, 0, 1}, torch::kLong), 5);
  // A micro-batch with nothing to count (all ignored) adds nothing.
  expect_transparent(torch::nn::NLLLoss(), x,
                     torch::tensor({-100, -100, -100, 2, 1, 0, 1, 0, 3, 4},
                                   torch::kLong),
                     5);
  CHECK_THROWS_AS(
      pipegear::loss_step_options(*torch::nn::MSELoss(
          torch::nn::MSELossOptions().reduction(torch::kNone))),
      c10::ValueError);
}

TEST_CASE("user models: a loss that needs no gradient is an error", "[user]") {
  auto model = classifier(5);
  auto pipe = GPipe(model, cpu_options({2, 1}, 4, CheckpointMode::kNever));
  auto x = torch::randn({8, 6}, torch::kFloat64);
  auto t = torch::randint(0, 5, {8});
  CHECK_THROWS_WITH(
      pipe->step(x, t, [](auto o, auto tt) {
        return torch::nn::functional::cross_entropy(o.detach(), tt);
      }),
      Catch::Contains("does not require grad"));
}

namespace {

struct ScaleInPlaceImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) { return x.mul_(2); }
};
TORCH_MODULE(ScaleInPlace);

} // namespace

TEST_CASE("user models: in-place first layers of checkpointed stages are exact",
          "[user]") {
  auto build = [] {
    torch::manual_seed(4);
    torch::nn::Sequential m(torch::nn::Linear(6, 8), ScaleInPlace(),
                            torch::nn::Linear(8, 8),
                            torch::nn::ReLU(torch::nn::ReLUOptions(true)),
                            torch::nn::Linear(8, 2));
    m->to(torch::kFloat64);
    return m;
  };
  auto x = torch::randn({8, 6}, torch::kFloat64);
  auto t = torch::randn({8, 2}, torch::kFloat64);
  auto plain = build();
  auto ref = torch::mse_loss(plain->forward(x), t);
  ref.backward();
  for (auto mode : {CheckpointMode::kExceptLast, CheckpointMode::kAlways}) {
    for (const auto& balance :
         std::vector<std::vector<int64_t>>{{1, 2, 2}, {1, 1, 1, 2}}) {
      auto model = build();
      auto pipe = GPipe(model, cpu_options(balance, 4, mode));
      for (int step = 0; step < 2; ++step) {  // the probe, then the rule
        pipe->zero_grad();
        auto got = pipe->step(x, t, torch::nn::MSELoss());
        require_close(got, ref, 1e-12);
        auto a = plain->parameters();
        auto b = pipe->parameters();
        for (size_t i = 0; i < a.size(); ++i) {
          require_close(b[i].grad(), a[i].grad(), 1e-12);
        }
      }
    }
  }
}

namespace {

struct DropRowImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) { return x.slice(0, 0, -1); }
};
TORCH_MODULE(DropRow);

struct DoubleRowsImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) { return torch::cat({x, x}); }
};
TORCH_MODULE(DoubleRows);

struct ToScalarImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) { return x.sum(); }
};
TORCH_MODULE(ToScalar);

} // namespace

TEST_CASE("user models: a stage that changes the batch size is an error",
          "[user]") {
  auto x = torch::randn({6, 4});
  {
    torch::nn::Sequential m(torch::nn::Linear(4, 4), DropRow());
    auto pipe = GPipe(m, cpu_options({1, 1}, 2));
    CHECK_THROWS_WITH(pipe->forward(x),
                      Catch::Contains("stage 1") &&
                          Catch::Contains("batch size 2") &&
                          Catch::Contains("micro-batch 0 of 3 rows"));
  }
  {
    torch::nn::Sequential m(torch::nn::Linear(4, 4), DoubleRows());
    auto pipe = GPipe(m, cpu_options({1, 1}, 2));
    CHECK_THROWS_AS(pipe->forward(x), c10::ValueError);
  }
  {
    torch::nn::Sequential m(torch::nn::Linear(4, 4), ToScalar());
    auto pipe = GPipe(m, cpu_options({1, 1}, 2));
    CHECK_THROWS_WITH(pipe->forward(x), Catch::Contains("0-dimensional"));
  }
}

namespace {

// A 1-tuple between layers: (x * 2,), then unpacked by the next layer.
struct WrapImpl : torch::nn::Module {
  std::vector<torch::Tensor> forward(torch::Tensor x) { return {x * 2}; }
};
TORCH_MODULE(Wrap);

struct UnwrapImpl : torch::nn::Module {
  torch::Tensor forward(std::vector<torch::Tensor> x) {
    TORCH_CHECK(x.size() == 1, "expected a 1-tuple");
    return x.front() + 1;
  }
};
TORCH_MODULE(Unwrap);

} // namespace

TEST_CASE("user models: a 1-tuple stays a tuple across stages", "[user]") {
  auto x = torch::randn({4, 3});
  for (const auto& balance :
       std::vector<std::vector<int64_t>>{{2}, {1, 1}}) {
    torch::nn::Sequential m(Wrap{}, Unwrap{});
    auto pipe = GPipe(m, cpu_options(balance, 2));
    require_close(pipe->forward(x), x * 2 + 1);
  }
  // A tuple output of the last stage stays a tuple too.
  torch::nn::Sequential m(torch::nn::Linear(3, 3), Wrap());
  auto pipe = GPipe(m, cpu_options({1, 1}, 2));
  auto out = pipe->forward_batch({x});
  CHECK(out.is_tuple());
  CHECK(out.size() == 1);
}

TEST_CASE("user models: eval() never checkpoints", "[user]") {
  auto model = classifier(3);
  auto pipe = GPipe(model, cpu_options({2, 1}, 4, CheckpointMode::kAlways));
  pipe->eval();
  auto y = pipe->forward(torch::randn({8, 6}, torch::kFloat64));
  y.sum().backward();
  // last_trace() returns a copy: keep it alive while iterating its events
  // (a range-for over a temporary's member reads freed memory before C++23).
  const auto eval_trace = pipe->last_trace();
  for (const auto& e : eval_trace.events()) {
    CHECK_FALSE(e.recompute);
  }
  pipe->train();
  pipe->forward(torch::randn({8, 6}, torch::kFloat64)).sum().backward();
  bool recomputed = false;
  const auto train_trace = pipe->last_trace();
  for (const auto& e : train_trace.events()) {
    recomputed = recomputed || e.recompute;
  }
  CHECK(recomputed);
}

namespace {

struct ThrowsImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) {
    if (x.size(0) > 0) {
      throw std::invalid_argument("bad row");
    }
    return x;
  }
};
TORCH_MODULE(Throws);

} // namespace

TEST_CASE("user models: a std exception names its stage and micro-batch",
          "[user]") {
  torch::nn::Sequential m(torch::nn::Linear(3, 3), Throws());
  auto pipe = GPipe(m, cpu_options({1, 1}, 2));
  try {
    pipe->forward(torch::randn({4, 3}));
    FAIL("no exception");
  } catch (const pipegear::StageError& e) {
    const std::string what = e.what();
    CHECK_THAT(what, Catch::Contains("pipegear: in stage 1, micro-batch 0, "
                                     "forward") &&
                         Catch::Contains("std::invalid_argument: bad row"));
    bool nested = false;
    try {
      std::rethrow_if_nested(e);
    } catch (const std::invalid_argument&) {
      nested = true;
    }
    CHECK(nested);
  }
}

TEST_CASE("a pipeline leaves the caller's thread counts as it found them",
          "[user]") {
  auto in_new_thread = [] {
    int n = 0;
    std::thread([&] { n = at::get_num_threads(); }).join();
    return n;
  };
  const int caller = at::get_num_threads();
  const int fresh = in_new_thread();
  {
    auto model = classifier(3);
    auto pipe = GPipe(model, cpu_options({1, 1, 1}, 4).worker_threads(1));
    pipe->step(torch::randn({8, 6}, torch::kFloat64), torch::randint(0, 3, {8}),
               torch::nn::CrossEntropyLoss());
    CHECK(at::get_num_threads() == caller);
    CHECK(in_new_thread() == fresh);
  }
  CHECK(at::get_num_threads() == caller);
  CHECK(in_new_thread() == fresh);
}

TEST_CASE("user models: a pipeline refuses to move, casts its dtype",
          "[user]") {
  auto model = classifier(3);
  auto pipe = GPipe(model, cpu_options({2, 1}, 2));
  CHECK_THROWS_AS(pipe->to(torch::Device("meta")), c10::TypeError);
  CHECK_THROWS_WITH(pipe->to(torch::Device("meta"), torch::kFloat32),
                    Catch::Contains("would move the layers"));
  pipe->to(torch::kCPU);  // where it is: nothing to do
  pipe->to(torch::kFloat32);
  for (const auto& p : pipe->parameters()) {
    CHECK(p.dtype() == torch::kFloat32);
    CHECK(p.device().is_cpu());
  }
  CHECK_THROWS_WITH(
      GPipe(classifier(3), GPipeOptions({2, 1}).devices(
                               {torch::kCPU, torch::Device("meta")})),
      Catch::Contains("devices[1] is meta"));
}

namespace {

// A language model's ends as C++ users tie them: the head registers the
// embedding's weight as its own parameter (one tensor, two modules).
struct TokenEmbedImpl : torch::nn::Module {
  explicit TokenEmbedImpl(torch::Tensor w) {
    weight = register_parameter("weight", std::move(w));
  }
  torch::Tensor forward(torch::Tensor ids) {
    return torch::embedding(weight, ids);
  }
  torch::Tensor weight;
};
TORCH_MODULE(TokenEmbed);

struct TiedHeadImpl : torch::nn::Module {
  explicit TiedHeadImpl(torch::Tensor w) {
    weight = register_parameter("weight", std::move(w));
  }
  torch::Tensor forward(torch::Tensor x) { return x.matmul(weight.t()); }
  torch::Tensor weight;
};
TORCH_MODULE(TiedHead);

constexpr int64_t kLmVocab = 11, kLmWidth = 6;

// embed, (Linear, Tanh) x 2, head tied to embed: 6 layers.
torch::nn::Sequential tied_lm() {
  torch::manual_seed(5);
  auto w = torch::randn({kLmVocab, kLmWidth}, torch::kFloat64);
  torch::nn::Sequential m;
  m->push_back("embed", TokenEmbed(w));
  for (int i = 0; i < 2; ++i) {
    m->push_back("fc" + std::to_string(i), torch::nn::Linear(kLmWidth, kLmWidth));
    m->push_back("act" + std::to_string(i), torch::nn::Tanh());
  }
  m->push_back("head", TiedHead(w));
  m->to(torch::kFloat64);
  return m;
}

// The gradients by name (the tie under both of its names, as in the plain
// model's parameters()).
std::map<std::string, torch::Tensor> grads_of(const torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : m.named_parameters()) {
    out[p.key()] = p.value().grad().clone();
  }
  return out;
}

} // namespace

TEST_CASE("user models: a parameter tied across stages sums every use",
          "[user][tied]") {
  auto ids = torch::randint(0, kLmVocab, {10, 4});
  auto t = torch::randint(0, kLmVocab, {10, 4});
  t.index_put_({9, torch::indexing::Slice(2)}, -100);  // padding
  auto loss_of = [](const torch::Tensor& logits, const torch::Tensor& target) {
    return torch::nn::functional::cross_entropy(logits.flatten(0, 1),
                                                target.flatten());
  };
  auto plain = tied_lm();
  auto ref = loss_of(plain->forward(ids), t);
  ref.backward();
  const auto expected = grads_of(*plain);
  REQUIRE(expected.count("head.weight") == 1);
  auto ce = torch::nn::CrossEntropyLoss();
  auto flat_ce = [&](const torch::Tensor& o, const torch::Tensor& tt) {
    return ce->forward(o.flatten(0, 1), tt.flatten());
  };
  for (std::vector<int64_t> balance :
       {std::vector<int64_t>{6}, {1, 5}, {3, 3}, {2, 2, 2}, {1, 2, 2, 1}}) {
    for (auto mode : {CheckpointMode::kNever, CheckpointMode::kExceptLast,
                      CheckpointMode::kAlways}) {
      for (auto schedule : {ScheduleKind::kGPipe, ScheduleKind::k1F1B,
                            ScheduleKind::kZBH1, ScheduleKind::kZBH2}) {
        for (int64_t chunks : {1, 3, 4}) {
          INFO("balance " << c10::IntArrayRef(balance) << ", chunks "
                          << chunks << ", " << pipegear::to_string(mode));
          auto pipe = GPipe(tied_lm(),
                            cpu_options(balance, chunks, mode, schedule));
          // The loss counts the targets that are not ignored, as the plain
          // model's mean does.
          auto got = pipe->step(
              ids, t, flat_ce,
              pipegear::StepOptions().count(
                  pipegear::count_class_targets(-100)));
          require_close(got, ref, 1e-12);
          auto grads = grads_of(*pipe);
          REQUIRE(grads.size() == expected.size());
          for (const auto& [name, g] : expected) {
            INFO(name);
            require_close(grads.at(name), g, 1e-12);
          }
          // The same again, bit for bit: each stage sums its uses in its
          // schedule's order, the stages in stage order.
          pipe->zero_grad();
          pipe->step(ids, t, flat_ce,
                     pipegear::StepOptions().count(
                         pipegear::count_class_targets(-100)));
          REQUIRE(torch::equal(grads_of(*pipe).at("embed.weight"),
                               grads.at("embed.weight")));
        }
      }
    }
  }
  // Module style: the sum is in .grad once loss.backward() returns.
  auto pipe = GPipe(tied_lm(), cpu_options({2, 2, 2}, 3));
  loss_of(pipe->forward(ids), t).backward();
  for (const auto& [name, g] : expected) {
    INFO(name);
    require_close(grads_of(*pipe).at(name), g, 1e-12);
  }
  // Two steps without zero_grad: each step's sum is added once.
  pipe->step(ids, t, flat_ce,
             pipegear::StepOptions().count(pipegear::count_class_targets(-100)));
  require_close(grads_of(*pipe).at("head.weight"),
                2 * expected.at("head.weight"), 1e-12);
}
