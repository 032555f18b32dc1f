// What a C++ pipeline looks like as a module: its parameters and buffers
// named as the plain Sequential's (so torch::save / torch::load work across
// the plain model and any balance), and pretty_print.
#include "testing.h"

#include <sstream>
#include <string>
#include <vector>

#include <pipegear/gpipe.h>

using pipegear::CheckpointMode;
using pipegear::GPipe;
using pipegear::GPipeOptions;

namespace {

torch::nn::Sequential bn_model() {
  return torch::nn::Sequential(
      torch::nn::Linear(4, 6), torch::nn::BatchNorm1d(6), torch::nn::ReLU(),
      torch::nn::Linear(6, 6), torch::nn::BatchNorm1d(6), torch::nn::Tanh(),
      torch::nn::Linear(6, 3));
}

std::vector<std::string> state_keys(const torch::nn::Module& m) {
  std::vector<std::string> out;
  for (const auto& p : m.named_parameters()) {
    out.push_back(p.key());
  }
  for (const auto& b : m.named_buffers()) {
    out.push_back(b.key());
  }
  return out;
}

// Every parameter and buffer of `a` equals the one of the same name in `b`.
void require_same_state(const torch::nn::Module& a, const torch::nn::Module& b) {
  REQUIRE(state_keys(a) == state_keys(b));
  auto pa = a.named_parameters();
  auto pb = b.named_parameters();
  for (const auto& p : pa) {
    INFO(p.key());
    REQUIRE(torch::equal(p.value(), pb[p.key()]));
  }
  auto ba = a.named_buffers();
  auto bb = b.named_buffers();
  for (const auto& t : ba) {
    INFO(t.key());
    REQUIRE(torch::equal(t.value(), bb[t.key()]));
  }
}

// A few training steps so that parameters and running statistics differ from
// a fresh model's.
void train_steps(GPipe& pipe, int steps) {
  torch::optim::SGD sgd(pipe->parameters(), 0.1);
  for (int i = 0; i < steps; ++i) {
    sgd.zero_grad();
    pipe->step(torch::randn({8, 4}), torch::randn({8, 3}),
               torch::nn::MSELoss());
    sgd.step();
  }
}

template <typename Saved, typename Loaded>
void save_and_load(const Saved& from, Loaded& into) {
  std::stringstream buffer;
  torch::save(from, buffer);
  torch::load(into, buffer);
}


} // namespace

TEST_CASE("a pipeline's parameters and buffers have the plain model's names",
          "[gpipe][state]") {
  CollectWarnings warnings;  // plain BatchNorm with chunks > 1
  auto model = bn_model();
  const auto plain_keys = state_keys(*model);
  auto pipe = GPipe(model, GPipeOptions({2, 3, 2}).chunks(2));
  REQUIRE(state_keys(*pipe) == plain_keys);
  CHECK(plain_keys.front() == "0.weight");
  // Names given to push_back are kept too, and the partitions hold the
  // same modules under the same names without being registered.
  torch::nn::Sequential named;
  named->push_back("fc1", torch::nn::Linear(4, 5));
  named->push_back("act", torch::nn::ReLU());
  named->push_back("fc2", torch::nn::Linear(5, 2));
  auto pipe2 = GPipe(named, GPipeOptions({1, 2}));
  REQUIRE(state_keys(*pipe2) == state_keys(*named));
  REQUIRE(pipe2->named_children().keys() ==
          std::vector<std::string>({"fc1", "act", "fc2"}));
  REQUIRE(pipe2->partitions()->size() == 2);
  auto second = pipe2->partitions()->ptr(1)->named_children();
  REQUIRE(second.keys() == std::vector<std::string>({"act", "fc2"}));
  REQUIRE(second["fc2"].get() == named[2].get());
}

TEST_CASE("torch::save of a pipeline loads into the plain Sequential, another "
          "balance, and back", "[gpipe][state]") {
  CollectWarnings warnings;  // plain BatchNorm with chunks > 1
  torch::manual_seed(0);
  auto pipe = GPipe(bn_model(), GPipeOptions({2, 3, 2}).chunks(4));
  train_steps(pipe, 3);

  // pipeline -> plain Sequential: same state, same eval outputs.
  auto plain = bn_model();
  save_and_load(pipe, plain);
  require_same_state(*plain, *pipe);
  pipe->eval();
  plain->eval();
  const auto x = torch::randn({5, 4});
  require_close(plain->forward(x), pipe->forward(x), 1e-6);

  // pipeline -> pipeline of another balance.
  auto other = GPipe(bn_model(), GPipeOptions({4, 3}).chunks(2));
  save_and_load(pipe, other);
  require_same_state(*other, *pipe);
  other->eval();
  require_close(other->forward(x), pipe->forward(x), 1e-6);

  // plain Sequential -> pipeline ("and back").
  plain->train();
  torch::optim::SGD sgd(plain->parameters(), 0.1);
  sgd.zero_grad();
  torch::mse_loss(plain->forward(torch::randn({8, 4})), torch::randn({8, 3}))
      .backward();
  sgd.step();
  save_and_load(plain, pipe);
  require_same_state(*pipe, *plain);
  REQUIRE_FALSE(torch::equal(pipe->forward(x), other->forward(x)));

  // The pipeline still trains after a load: the stages hold the loaded
  // tensors (the same parameters as pipe->parameters()).
  pipe->train();
  auto before = pipe->parameters()[0].clone();
  train_steps(pipe, 1);
  REQUIRE_FALSE(torch::equal(before, pipe->parameters()[0]));
  auto stage0 = pipe->partitions()->ptr(0)->parameters();
  REQUIRE(stage0[0].unsafeGetTensorImpl() ==
          pipe->parameters()[0].unsafeGetTensorImpl());
}

TEST_CASE("a deferred-BatchNorm pipeline's state loads into the plain model",
          "[gpipe][state]") {
  torch::manual_seed(1);
  auto pipe = GPipe(bn_model(),
                    GPipeOptions({3, 4}).chunks(4).deferred_batch_norm(true));
  train_steps(pipe, 2);
  auto plain = bn_model();
  save_and_load(pipe, plain);
  require_same_state(*plain, *pipe);
  CHECK(plain->named_buffers()["1.num_batches_tracked"].item<int64_t>() == 2);
}

TEST_CASE("pretty_print shows the configuration, as the Python repr",
          "[gpipe][state]") {
  auto pipe = GPipe(bn_model(), GPipeOptions({2, 5}).chunks(4).checkpoint(
                                    CheckpointMode::kAlways));
  std::ostringstream line;
  pipe->pretty_print(line);
  CHECK(line.str() == "pipegear::GPipe(balance=[2, 5], devices=[cpu, cpu], "
                      "chunks=4, checkpoint=always)");
  std::ostringstream tree;
  tree << *pipe;  // the layers under their names, as a Sequential prints
  CHECK(tree.str().rfind(line.str() + "(\n  (0): torch::nn::Linear(", 0) == 0);
}
