// Trains a classifier on R replicas of a K-stage pipeline, without Python,
// and checks it against the plain model trained on the global batch.
// Launch K*R processes with torchrun's environment, e.g. ./run.sh (K=2,
// R=2), or
//   torchrun --nproc_per_node=4 --no-python ./train_replicas [K]
// Global rank g is replica g / K, stage g % K. Each rank builds only its
// stage; replica 0's parameters are broadcast to the others. Each replica
// has a batch of its own size, a third of the targets padding
// (ignore_index): every step's loss and gradients are those of the global
// batch. Exits 1 if a parameter differs from the plain model's by more
// than 1e-10 (float64).
#include <cstdlib>
#include <iostream>

#include <torch/torch.h>

#include <pipegear/distributed/pipeline.h>

namespace F = torch::nn::functional;

namespace {

constexpr int64_t kIn = 6, kWidth = 8, kClasses = 4, kSteps = 4;

// Layer factories; `seed` moves every initial value.
std::vector<pipegear::LayerFactory> layers(int64_t seed) {
  std::vector<pipegear::LayerFactory> out;
  auto linear = [seed](int64_t i, int64_t in, int64_t o) {
    return [=] {
      torch::manual_seed(seed * 100 + i);
      return torch::nn::AnyModule(torch::nn::Linear(in, o));
    };
  };
  out.push_back(linear(0, kIn, kWidth));
  out.push_back([] { return torch::nn::AnyModule(torch::nn::Tanh()); });
  out.push_back(linear(2, kWidth, kWidth));
  out.push_back([] { return torch::nn::AnyModule(torch::nn::Tanh()); });
  out.push_back(linear(4, kWidth, kClasses));
  return out;
}

// Replica d's batch at `step`: 4 + 3d + step rows.
std::pair<torch::Tensor, torch::Tensor> batch(int64_t step, int64_t d) {
  auto g = torch::make_generator<at::CPUGeneratorImpl>(1000 * step + d);
  const int64_t n = 4 + 3 * d + step;
  auto x = torch::randn({n, kIn}, g);
  auto t = torch::randint(kClasses, {n}, g, torch::kLong);
  t.masked_fill_(torch::rand({n}, g) < 0.33, -1);
  return {x, t};
}

torch::Tensor loss_of(const torch::Tensor& y, const torch::Tensor& t) {
  return F::cross_entropy(y, t, F::CrossEntropyFuncOptions().ignore_index(-1));
}

} // namespace

int main(int argc, char** argv) {
  const int64_t stages = argc > 1 ? std::atoll(argv[1]) : 2;
  auto mesh = pipegear::init_mesh_from_env(stages, "gloo");
  at::set_num_threads(1);
  torch::set_default_dtype(caffe2::TypeMeta::Make<double>());

  const auto factories = layers(1 + mesh.replica);  // replicas start apart
  std::vector<int64_t> balance(stages, 5 / stages);
  balance.back() += 5 % stages;
  pipegear::DistributedPipeline pipe(
      mesh.pp, mesh.dp, factories,
      pipegear::DistributedOptions().balance(balance).chunks(2).timeout(
          std::chrono::seconds(30)));
  torch::optim::SGD optimizer(pipe.module()->parameters(), /*lr=*/0.1);

  // The plain model (replica 0's initial values) on the global batch.
  torch::nn::Sequential plain;
  for (const auto& f : layers(1)) {
    plain->push_back(f());
  }
  torch::optim::SGD reference(plain->parameters(), /*lr=*/0.1);

  // What a mean cross-entropy averages over: the targets not ignored.
  auto options = pipegear::StepOptions().count(
      [](const pipegear::Batch& t) { return (t.front() != -1).sum().item<double>(); });
  auto loss_fn = [](const pipegear::Batch& y, const pipegear::Batch& t) {
    return loss_of(y.front(), t.front());
  };
  double worst = 0;
  for (int64_t step = 0; step < kSteps; ++step) {
    auto [x, t] = batch(step, mesh.replica);
    optimizer.zero_grad();
    auto loss = pipe.step(pipe.is_first() ? pipegear::Batch{x} : pipegear::Batch{},
                          pipe.is_last() ? pipegear::Batch{t} : pipegear::Batch{},
                          loss_fn, options);
    optimizer.step();

    std::vector<torch::Tensor> xs, ts;
    for (int64_t d = 0; d < mesh.replicas; ++d) {
      auto [xd, td] = batch(step, d);
      xs.push_back(xd);
      ts.push_back(td);
    }
    reference.zero_grad();
    auto expected = loss_of(plain->forward(torch::cat(xs)), torch::cat(ts));
    expected.backward();
    reference.step();
    worst = std::max(worst, std::abs(loss.item<double>() - expected.item<double>()));
    if (mesh.replica == 0 && mesh.stage == 0) {
      std::cout << "step " << step << "  loss of the global batch "
                << loss.item<double>() << " (plain model " << expected.item<double>()
                << ")\n";
    }
  }
  // This rank's parameters against the plain model's (the slice names its
  // layers by their index in the model, as the Sequential does).
  auto expected = plain->named_parameters();
  for (const auto& p : pipe.module()->named_parameters()) {
    worst = std::max(worst, (p.value() - expected[p.key()]).abs().max().item<double>());
  }
  std::cout << "replica " << pipe.replica() << "/" << pipe.replicas() << ", stage "
            << pipe.rank() << ": largest difference from the plain model " << worst
            << "\n";
  return worst <= 1e-10 ? 0 : 1;
}
