"""Skip connections across the ranks of a pipeline with replicas: a U-Net
split over K=2 stages, R=2 replicas with uneven batches (5 and 6 rows), 4
processes over Gloo. After 2 SGD steps every rank's slice equals the plain
model trained on the global batch (float64), without and with
recomputation: the skips go between the stages of each replica, the
gradient sums between the replicas of each stage.

This file is also the worker script: ``python
test_distributed_skip_replicas.py RANK WORLD PORT OUT``.
"""
import json
import os
import sys

import pytest
import torch
from torch import nn

from ranks import init_mesh, run_ranks
from test_skip import WIDTH, unet

K, R, STEPS = 2, 2, 2
CHECKPOINTS = ("never", "always")


def model():
    torch.manual_seed(0)
    return unet().double()


def batch(step, dp):
    g = torch.Generator().manual_seed(100 * step + dp)
    rows = 5 + dp  # uneven replicas
    return (torch.randn(rows, WIDTH, generator=g, dtype=torch.float64),
            torch.randn(rows, WIDTH, generator=g, dtype=torch.float64))


def _worker(rank, world, port, out):
    import torch.distributed as dist

    import pipegear

    mesh = init_mesh(rank, world, port, K)
    dp = mesh["dp"]
    layers = len(model())
    balance = [layers // 2, layers - layers // 2]
    report = {}
    for checkpoint in CHECKPOINTS:
        pipe = pipegear.DistributedGPipe(
            model(), balance, chunks=3, checkpoint=checkpoint, timeout=30.0,
            **mesh["groups"])
        opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
        for step in range(STEPS):
            x, t = batch(step, dp)
            opt.zero_grad()
            pipe.step(x if pipe.is_first else None,
                      t if pipe.is_last else None, nn.functional.mse_loss)
            opt.step()
        report[checkpoint] = {k: v.tolist()
                              for k, v in pipe.state_dict().items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_skips_across_ranks_with_replicas_train_like_the_plain_model(
        tmp_path):
    reports = run_ranks(__file__, K * R, tmp_path, timeout=300)
    plain = model()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for step in range(STEPS):
        xs, ts = zip(*[batch(step, dp) for dp in range(R)])
        opt.zero_grad()
        nn.functional.mse_loss(plain(torch.cat(xs)), torch.cat(ts)).backward()
        opt.step()
    reference = plain.state_dict()
    for checkpoint in CHECKPOINTS:
        seen = set()
        for rank, report in enumerate(reports):
            for key, value in report[checkpoint].items():
                seen.add(key)
                torch.testing.assert_close(
                    torch.tensor(value, dtype=torch.float64), reference[key],
                    rtol=1e-10, atol=1e-10,
                    msg=f"{checkpoint}: {key} on rank {rank}")
        assert seen == set(reference), checkpoint


if __name__ == "__main__":
    _worker(*map(int, sys.argv[1:4]), sys.argv[4])
