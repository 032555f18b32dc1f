// A C++17 program using pipegear as a LibTorch user does: a pipeline built
// from a torch::nn::Sequential, trained in step style with a torch::nn loss
// module, printed, and saved so that the plain model (C++ and Python) loads
// its state.
//
//   cxx17_consumer [out_dir]   writes into out_dir (default "."):
//     pipe.pt        torch::save(pipe): loads into the plain Sequential and
//                    into a pipeline of any balance (torch::load); in Python,
//                    torch.jit.load(path).state_dict()
//     state_dict.pt  the named parameters and buffers as a c10::Dict saved by
//                    torch::pickle_save: in Python, torch.load(path)
//     probe.pt       an input and the model's eval output, to compare with
//                    (torch::pickle_save as well)
//     tensors.pt     torch::save of a std::vector<torch::Tensor> (the
//                    parameters): a TorchScript archive whose keys are
//                    "0", "1", ...; the names are lost
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <pipegear/pipegear.h>

namespace {

// The model in its plain form; examples/cpp/cxx17_consumer/check_state.py
// builds the same one in Python.
torch::nn::Sequential make_model() {
  return torch::nn::Sequential(
      torch::nn::Linear(8, 32), torch::nn::BatchNorm1d(32), torch::nn::ReLU(),
      torch::nn::Linear(32, 32), torch::nn::ReLU(), torch::nn::Linear(32, 1));
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    throw std::runtime_error("cannot write " + path);
  }
}

} // namespace

int main(int argc, char** argv) {
  const std::string out = argc > 1 ? argv[1] : ".";
  torch::manual_seed(0);

  // DeferredBatchNorm: running statistics of whole mini-batches.
  auto pipe = pipegear::GPipe(
      make_model(),
      pipegear::GPipeOptions({3, 3}).chunks(4).deferred_batch_norm(true));
  std::cout << *pipe << "\n";

  torch::optim::Adam optimizer(pipe->parameters(), /*lr=*/1e-2);
  const auto teacher = torch::randn({8, 1});
  float first = 0;
  float last = 0;
  for (int step = 0; step < 30; ++step) {
    const auto x = torch::randn({32, 8});
    optimizer.zero_grad();
    last = pipe->step(x, x.matmul(teacher), torch::nn::MSELoss()).item<float>();
    optimizer.step();
    if (step == 0) {
      first = last;
    }
  }
  std::cout << "loss " << first << " -> " << last << "\n";

  // The state under the plain model's names: torch::save(pipe) loads into
  // the plain Sequential as it is.
  torch::save(pipe, out + "/pipe.pt");
  auto plain = make_model();
  torch::load(plain, out + "/pipe.pt");
  pipe->eval();
  plain->eval();
  const auto probe = torch::randn({5, 8});
  const auto expected = pipe->forward(probe);
  // Close, not equal: the stage workers run with fewer intra-op threads
  // than the caller, which may sum in another order.
  const auto diff = (plain->forward(probe) - expected).abs().max().item<float>();
  if (!(diff < 1e-5F)) {
    std::cerr << "the plain model loaded from pipe.pt computes otherwise "
                 "(max abs difference " << diff << ")\n";
    return 1;
  }

  // For Python's torch.load: a dict of named tensors, pickled as torch.save
  // does it.
  c10::Dict<std::string, torch::Tensor> state;
  for (const auto& p : pipe->named_parameters()) {
    state.insert(p.key(), p.value().detach());
  }
  for (const auto& b : pipe->named_buffers()) {
    state.insert(b.key(), b.value());
  }
  write_file(out + "/state_dict.pt", torch::pickle_save(state));
  c10::Dict<std::string, torch::Tensor> check;
  check.insert("input", probe);
  check.insert("output", expected);
  write_file(out + "/probe.pt", torch::pickle_save(check));
  torch::save(pipe->parameters(), out + "/tensors.pt");

  std::cout << "saved pipe.pt, state_dict.pt, probe.pt, tensors.pt in " << out
            << "\n";
  return last < first ? 0 : 1;
}
