"""Reads in Python what the C++ program saved (examples/cpp/cxx17_consumer):
the state of a C++ pipeline loads into the plain nn.Sequential and into a
pipegear.GPipe, and both compute what the C++ pipeline computed.

    python check_state.py <the program's output folder>

What works (torch 2.13):
- state_dict.pt, torch::pickle_save of a c10::Dict<std::string, Tensor>:
  torch.load gives a dict under the plain model's keys. torch::pickle_save
  tags a typed dict with torch.jit._pickle.restore_type_tag, which
  torch.load's default weights_only=True refuses unless allowed (it only
  records the type): torch.serialization.safe_globals below.
- pipe.pt, torch::save of the pipeline (a TorchScript archive):
  torch.jit.load(path).state_dict() gives the same keys. torch.load refuses
  it with weights_only=True (and hands it to torch.jit.load otherwise).
- tensors.pt, torch::save of a std::vector<Tensor>: torch.jit.load too, the
  tensors under "0", "1", ... (their names are lost).
"""
import sys
from pathlib import Path

import torch
import torch.jit._pickle
from torch import nn


def make_model() -> nn.Sequential:
    # main.cpp's make_model().
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    with torch.serialization.safe_globals(
            [torch.jit._pickle.restore_type_tag]):
        probe = torch.load(out / "probe.pt")
        from_dict = torch.load(out / "state_dict.pt")
    states = {
        "state_dict.pt (torch.load)": from_dict,
        "pipe.pt (torch.jit.load)":
            torch.jit.load(str(out / "pipe.pt")).state_dict(),
    }
    for what, state in states.items():
        plain = make_model()
        plain.load_state_dict(state)  # strict: the plain model's keys
        plain.eval()
        torch.testing.assert_close(plain(probe["input"]), probe["output"])
        try:
            import pipegear
        except ImportError:
            print(f"{what}: loads into nn.Sequential")
            continue
        pipe = pipegear.GPipe(make_model(), [2, 4], chunks=2,
                              deferred_batch_norm=True)
        pipe.load_state_dict(state)
        pipe.eval()
        torch.testing.assert_close(pipe(probe["input"]), probe["output"])
        print(f"{what}: loads into nn.Sequential and pipegear.GPipe")
    tensors = torch.jit.load(str(out / "tensors.pt")).state_dict()
    params = [v for k, v in from_dict.items()
              if not k.endswith(("running_mean", "running_var",
                                 "num_batches_tracked"))]
    assert list(tensors) == [str(i) for i in range(len(params))]
    for got, want in zip(tensors.values(), params):
        assert torch.equal(got, want)
    print("tensors.pt (torch.jit.load): the parameters under 0, 1, ...")


if __name__ == "__main__":
    main()
