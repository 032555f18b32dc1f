#include "testing.h"

#include <pipegear/gpipe.h>
#include <pipegear/profile.h>
#include <pipegear/skip.h>

using pipegear::CheckpointMode;
using pipegear::GPipe;
using pipegear::GPipeOptions;
using pipegear::Namespace;
using pipegear::ScheduleKind;
using pipegear::Skippable;

namespace {

constexpr int64_t kWidth = 5;

// A layer that stashes or pops its names (a tanh(Linear) between them):
// a popped tensor is added to the input, a stashed one is the input
// scaled by 3 (so that its gradient differs from the output's).
struct SkipLayerImpl : torch::nn::Cloneable<SkipLayerImpl>, Skippable {
  SkipLayerImpl(std::vector<std::string> stash, std::vector<std::string> pop)
      : Skippable(std::move(stash), std::move(pop)) {
    reset();
  }
  void reset() override {
    fc = register_module("fc", torch::nn::Linear(kWidth, kWidth));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (const auto& name : pop_names()) {
      x = x + pop(name) * 0.5;
    }
    auto y = torch::tanh(fc(x));
    for (const auto& name : stash_names()) {
      stash(name, x * 3 + y);
    }
    return y;
  }
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(SkipLayer);

torch::nn::Sequential dense() {
  return torch::nn::Sequential(torch::nn::Linear(kWidth, kWidth),
                               torch::nn::Tanh());
}

// Three nested skips: d1 spans the whole model.
torch::nn::Sequential unet() {
  torch::nn::Sequential s;
  s->push_back(SkipLayer(std::vector<std::string>{"d1"}, std::vector<std::string>{}));
  s->push_back(SkipLayer(std::vector<std::string>{"d2"}, std::vector<std::string>{}));
  s->push_back(SkipLayer(std::vector<std::string>{"d3"}, std::vector<std::string>{}));
  s->push_back(torch::nn::Linear(kWidth, kWidth));
  s->push_back(SkipLayer(std::vector<std::string>{}, std::vector<std::string>{"d3"}));
  s->push_back(SkipLayer(std::vector<std::string>{}, std::vector<std::string>{"d2"}));
  s->push_back(SkipLayer(std::vector<std::string>{}, std::vector<std::string>{"d1"}));
  s->push_back(torch::nn::Linear(kWidth, kWidth));
  return s;
}

// Residuals of one name, isolated per block.
torch::nn::Sequential resnet() {
  torch::nn::Sequential s;
  for (int b = 0; b < 3; ++b) {
    Namespace ns;
    SkipLayer in(std::vector<std::string>{"res"}, std::vector<std::string>{});
    SkipLayer out(std::vector<std::string>{}, std::vector<std::string>{"res"});
    in->isolate(ns);
    out->isolate(ns);
    s->push_back(in);
    s->push_back(torch::nn::Linear(kWidth, kWidth));
    s->push_back(torch::nn::Tanh());
    s->push_back(out);
  }
  return s;
}

// At balance {2, 2, 2, 2}: 'a' stays in stage 0, 'b' crosses one boundary,
// 'c' three; layer 3 pops 'b' and stashes 'e'.
torch::nn::Sequential jumps() {
  using V = std::vector<std::string>;
  torch::nn::Sequential s;
  s->push_back(SkipLayer(V{"a", "c"}, V{}));
  s->push_back(SkipLayer(V{"b"}, V{"a"}));
  s->push_back(torch::nn::Linear(kWidth, kWidth));
  s->push_back(SkipLayer(V{"e"}, V{"b"}));
  s->push_back(torch::nn::Linear(kWidth, kWidth));
  s->push_back(torch::nn::Tanh());
  s->push_back(torch::nn::Linear(kWidth, kWidth));
  s->push_back(SkipLayer(V{}, V{"c", "e"}));
  return s;
}

void check_transparency(torch::nn::Sequential plain, std::vector<int64_t> balance,
                        int64_t chunks, CheckpointMode mode, bool step_style,
                        ScheduleKind schedule) {
  plain->to(torch::kFloat64);
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(plain->clone());
  auto pipe = GPipe(torch::nn::Sequential(copy), GPipeOptions(balance)
                                                     .chunks(chunks)
                                                     .checkpoint(mode)
                                                     .schedule(schedule));
  auto x = torch::randn({7, kWidth}, torch::kFloat64);
  auto target = torch::randn({7, kWidth}, torch::kFloat64);
  auto x1 = x.clone().requires_grad_(true);
  auto x2 = x.clone().requires_grad_(true);
  auto ref = plain->forward(x1);
  auto ref_loss = torch::mse_loss(ref, target);
  ref_loss.backward();
  if (step_style) {
    auto loss = pipe->step(x2, target, [](auto y, auto t) {
      return torch::mse_loss(y, t);
    });
    require_close(loss, ref_loss, 1e-10);
  } else {
    auto y = pipe->forward(x2);
    require_close(y, ref, 1e-10);
    torch::mse_loss(y, target).backward();
  }
  require_close(x2.grad(), x1.grad(), 1e-10);
  auto p1 = plain->parameters();
  auto p2 = pipe->parameters();
  REQUIRE(p1.size() == p2.size());
  for (size_t i = 0; i < p1.size(); ++i) {
    require_close(p2[i].grad(), p1[i].grad(), 1e-10);
  }
}

} // namespace

TEST_CASE("skips: transparency of a U-Net, residuals and long jumps", "[skip]") {
  torch::manual_seed(0);
  const auto model = GENERATE(0, 1, 2);
  const auto k = GENERATE(1, 2, 3, 4);
  const auto chunks = GENERATE(1, 3, 4);
  const auto mode = GENERATE(CheckpointMode::kNever, CheckpointMode::kExceptLast,
                             CheckpointMode::kAlways);
  // module; step: gpipe, 1f1b, zb-h1, zb-h2
  const auto face = GENERATE(0, 1, 2, 3, 4);
  auto plain = model == 0 ? unet() : model == 1 ? resnet() : jumps();
  INFO("model " << model << " K " << k << " chunks " << chunks << " face "
                << face);
  check_transparency(plain, even_balance(plain->size(), k), chunks, mode,
                     face > 0,
                     face == 2   ? ScheduleKind::k1F1B
                     : face == 3 ? ScheduleKind::kZBH1
                     : face == 4 ? ScheduleKind::kZBH2
                                 : ScheduleKind::kGPipe);
}

TEST_CASE("skips: the layout crosses 0, 1 and 3 boundaries", "[skip]") {
  auto layout = pipegear::skip_layout(jumps(), {2, 2, 2, 2});
  REQUIRE(layout.size() == 4);
  auto names = [](const std::vector<pipegear::SkipKey>& keys) {
    std::vector<std::string> out;
    for (const auto& k : keys) {
      out.push_back(k.second);
    }
    return out;
  };
  CHECK(names(layout[0].stash) == std::vector<std::string>{"c", "b"});
  CHECK(names(layout[1].pop) == std::vector<std::string>{"b"});
  CHECK(names(layout[1].stash) == std::vector<std::string>{"e"});
  CHECK(layout[2].pop.empty());
  CHECK(layout[2].stash.empty());
  CHECK(names(layout[3].pop) == std::vector<std::string>{"c", "e"});
  CHECK(pipegear::skip_layout(unet(), {8})[0].pop.empty());
}

TEST_CASE("skips: mismatches are TypeErrors at construction", "[skip]") {
  using V = std::vector<std::string>;
  auto build = [](torch::nn::Sequential s) {
    GPipe(s, GPipeOptions(std::vector<int64_t>(s->size(), 1)));
  };
  CHECK_THROWS_AS(build(torch::nn::Sequential(SkipLayer(V{}, V{"x"}),
                                              SkipLayer(V{"x"}, V{}))),
                  c10::TypeError);
  CHECK_THROWS_WITH(build(torch::nn::Sequential(SkipLayer(V{"x"}, V{}),
                                                torch::nn::Tanh())),
                    Catch::Contains("no module declared 'x' as poppable"));
  CHECK_THROWS_WITH(build(torch::nn::Sequential(SkipLayer(V{}, V{"x"}))),
                    Catch::Contains("'0' declared 'x' as poppable but it was "
                                    "not stashed"));
  CHECK_THROWS_WITH(
      build(torch::nn::Sequential(SkipLayer(V{"x"}, V{}), SkipLayer(V{"x"}, V{}),
                                  SkipLayer(V{}, V{"x"}))),
      Catch::Contains("'1' redeclared 'x' as stashable"));
  CHECK_THROWS_WITH(build(torch::nn::Sequential(SkipLayer(V{"x"}, V{"x"}))),
                    Catch::Contains("'0' declared 'x' both as stashable and "
                                    "as poppable"));
}

TEST_CASE("skips: an undeclared stash or pop is a ValueError", "[skip]") {
  struct Bad : Skippable {
    Bad() : Skippable({"a"}, {}) {}
    void run() { stash("b", torch::ones(1)); }
    torch::Tensor take() { return pop("a"); }
  } bad;
  CHECK_THROWS_AS(bad.run(), c10::ValueError);
  CHECK_THROWS_AS(bad.take(), c10::ValueError);
}

TEST_CASE("skips: the profiler runs skippable layers and counts their skips",
          "[skip]") {
  torch::manual_seed(0);
  auto model = unet();
  auto x = torch::randn({4, kWidth});
  auto profiles = pipegear::profile_layers(model, x,
                                           pipegear::ProfileOptions().repeats(1));
  const int64_t row = 4 * kWidth * 4;  // one skip: 4 rows of float32
  std::vector<int64_t> skip_bytes;
  for (const auto& p : profiles) {
    skip_bytes.push_back(p.skip_bytes);
  }
  CHECK(skip_bytes == std::vector<int64_t>{row, row, row, 0, row, row, row, 0});
  CHECK(pipegear::balance_by_time(2, model, x,
                                  pipegear::BalanceByTimeOptions().repeats(1))
            .size() == 2);
  CHECK(pipegear::balance_by_size(3, model, x).size() == 3);
  for (const auto& p : model->parameters()) {
    CHECK(!p.grad().defined());
  }
  CHECK(pipegear::current_skip_tracker().size() == 0);
}

namespace {

// torchgpipe's Identity: the skip is the layer's output.
struct StashItselfImpl : torch::nn::Cloneable<StashItselfImpl>, Skippable {
  StashItselfImpl() : Skippable(std::vector<std::string>{"s"}, {}) {}
  void reset() override {}
  torch::Tensor forward(torch::Tensor x) {
    stash("s", x);
    return x;
  }
};
TORCH_MODULE(StashItself);

struct PopPlusImpl : torch::nn::Cloneable<PopPlusImpl>, Skippable {
  PopPlusImpl() : Skippable({}, std::vector<std::string>{"s"}) {}
  void reset() override {}
  torch::Tensor forward(torch::Tensor x) { return x + pop("s"); }
};
TORCH_MODULE(PopPlus);

// ReLU(inplace) right after the stash: it changes the skip too.
torch::nn::Sequential relu_on_the_skip() {
  return torch::nn::Sequential(
      torch::nn::Linear(kWidth, kWidth), StashItself(),
      torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true)),
      torch::nn::Linear(kWidth, kWidth), PopPlus(),
      torch::nn::Linear(kWidth, kWidth));
}

} // namespace

TEST_CASE("skips: an in-place change of memory a skip shares is a ValueError",
          "[skip]") {
  torch::manual_seed(0);
  const auto mode = GENERATE(CheckpointMode::kNever, CheckpointMode::kExceptLast,
                             CheckpointMode::kAlways);
  const auto face = GENERATE(0, 1, 2);  // module, step gpipe, step 1f1b
  const auto schedule = face == 2 ? ScheduleKind::k1F1B : ScheduleKind::kGPipe;
  const auto balance = GENERATE(std::vector<int64_t>{2, 4},
                                std::vector<int64_t>{2, 2, 2});
  INFO("face " << face << " stages " << balance.size());
  auto model = relu_on_the_skip();
  model->to(torch::kFloat64);
  auto pipe = GPipe(model, GPipeOptions(balance).chunks(4).checkpoint(mode).schedule(
                               schedule));
  auto x = torch::randn({7, kWidth}, torch::kFloat64);
  auto run = [&] {
    if (face == 0) {
      pipe->forward(x).sum().backward();
    } else {
      pipe->step(x, torch::zeros_like(x),
                 [](auto y, auto t) { return torch::mse_loss(y, t); });
    }
  };
  CHECK_THROWS_AS(run(), c10::ValueError);
  CHECK_THROWS_WITH(run(), Catch::Contains("stage 1 modified in place its input "
                                           "(tensor 0)") &&
                               Catch::Contains("skip 's' (stashed by stage 0, "
                                               "popped by stage " +
                                               std::to_string(balance.size() - 1)) &&
                               Catch::Contains("x.clone()"));
  // The in-place change inside the stashing stage reaches every later
  // stage, as without a pipeline.
  check_transparency(relu_on_the_skip(), {3, 3}, 4, mode, face > 0, schedule);
}
