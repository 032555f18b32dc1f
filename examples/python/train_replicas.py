"""Trains a classifier on R replicas of a K-stage pipeline (Gloo on CPU):
a pp x dp DeviceMesh, K*R processes.

    torchrun --nproc_per_node=4 examples/python/train_replicas.py --stages 2
    torchrun --nproc_per_node=6 examples/python/train_replicas.py --stages 3

Global rank g is replica g // K, stage g % K. Each rank builds only its
stage; replica 0's parameters are broadcast to the others at construction.
Each replica's first stage reads its own share of the data (the replicas'
batches may differ in size), its last stage holds the targets, a quarter of
them padding (ignore_index). Every step's loss and gradients are those of
the global batch; the gradients of each stage are summed over its replicas
while the other stages still drain, so every replica's optimizer makes the
same update and the replicas stay equal (checked at the end).
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import pipegear
from pipegear.distributed import init_from_env

FEATURES, CLASSES, PAD = 16, 5, -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", type=int, default=2, help="K")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=48,
                        help="the global batch, split unevenly")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_from_env()  # Gloo, from RANK / WORLD_SIZE / MASTER_*
    world, K = dist.get_world_size(), args.stages
    if world % K:
        raise SystemExit(f"{world} processes do not make replicas of "
                         f"{K} stages")
    R = world // K
    mesh = init_device_mesh("cpu", (R, K), mesh_dim_names=("dp", "pp"))

    width = 64
    layers = [lambda: nn.Linear(FEATURES, width)]
    for _ in range(2 * K - 1):
        layers += [nn.ReLU, lambda: nn.Linear(width, width)]
    layers += [nn.ReLU, lambda: nn.Linear(width, CLASSES)]
    base, extra = divmod(len(layers), K)
    balance = [base + (1 if i < extra else 0) for i in range(K)]

    pipe = pipegear.DistributedGPipe(layers, balance, chunks=args.chunks,
                                     mesh=mesh, timeout=30.0)
    dp, pp = pipe.coordinates
    optimizer = torch.optim.Adam(pipe.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD)

    # Replica d takes rows [cuts[d], cuts[d+1]) of each global batch:
    # uneven shares, 1 : 2 : 3 ...
    weights = list(range(1, R + 1))
    cuts = [args.batch * sum(weights[:d]) // sum(weights) for d in range(R + 1)]
    data = torch.Generator().manual_seed(1)
    w_true = torch.randn(FEATURES, CLASSES, generator=data)
    for step in range(args.steps):
        x = torch.randn(args.batch, FEATURES, generator=data)
        t = (x @ w_true).argmax(-1)
        t[torch.rand(args.batch, generator=data) < 0.25] = PAD
        x, t = x[cuts[dp]:cuts[dp + 1]], t[cuts[dp]:cuts[dp + 1]]
        optimizer.zero_grad()
        loss = pipe.step(x if pipe.is_first else None,
                         t if pipe.is_last else None, loss_fn)
        optimizer.step()
        if (dp, pp) == (0, 0) and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss of the global batch {loss.item():.4f}",
                  flush=True)

    # The replicas of each stage hold the same parameters.
    for p in pipe.parameters():
        copies = [torch.empty_like(p) for _ in range(R)]
        dist.all_gather(copies, p.detach(), group=pipe.dp_group)
        assert all(torch.equal(c, copies[0]) for c in copies), "replicas differ"
    print(f"rank {dist.get_rank()} (dp={dp}, pp={pp}): layers "
          f"{list(pipe._modules)}, equal to its {R - 1} other replica(s)",
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
