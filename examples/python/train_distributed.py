"""Trains an MLP with one pipeline stage per process (Gloo on CPU).

    torchrun --nproc_per_node=2 examples/python/train_distributed.py [--steps 40]

Each rank builds only its own layers (the model is a list of layer
factories), rank 0 feeds the data, the last rank holds the targets and the
loss; every rank steps its own optimizer on its own parameters.
"""
import argparse
import os

import torch
from torch import nn

import pipegear
from pipegear.distributed import init_from_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    group = init_from_env()  # Gloo, from RANK / WORLD_SIZE / MASTER_*
    world, rank = group.size(), group.rank()

    torch.manual_seed(0)
    width = 128
    layers = [lambda: nn.Linear(16, width)]
    for _ in range(2 * world - 1):
        layers += [nn.ReLU, lambda: nn.Linear(width, width)]
    layers += [nn.ReLU, lambda: nn.Linear(width, 1)]
    base, extra = divmod(len(layers), world)
    balance = [base + (1 if i < extra else 0) for i in range(world)]

    pipe = pipegear.DistributedGPipe(layers, balance, chunks=args.chunks,
                                     checkpoint="except_last", timeout=30.0)
    optimizer = torch.optim.Adam(pipe.parameters(), lr=1e-3)
    print(f"rank {rank}/{world}: layers {list(pipe._modules)}", flush=True)

    data = torch.Generator().manual_seed(1)
    w_true = torch.randn(16, 1, generator=data)
    for step in range(args.steps):
        x = torch.randn(args.batch, 16, generator=data)
        y = torch.tanh(x @ w_true)
        optimizer.zero_grad()
        loss = pipe.step(x if pipe.is_first else None,
                         y if pipe.is_last else None,
                         nn.functional.mse_loss)
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)

    # Module style: pipe(x) on every rank; the last rank gets the output.
    # (With grad enabled the last rank would call loss.backward() and the
    # others pipe.backward().)
    pipe.eval()
    with torch.no_grad():
        x = torch.randn(256, 16, generator=data)
        out = pipe(x if pipe.is_first else None)
    if pipe.is_last:
        error = nn.functional.mse_loss(out, torch.tanh(x @ w_true)).item()
        print(f"rank {rank}: held-out mse {error:.4f}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
