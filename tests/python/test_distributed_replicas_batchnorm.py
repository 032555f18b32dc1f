"""DeferredBatchNorm with replicas: the running statistics are those of
the global batch. K=2 stages x R=2 replicas with uneven batches (5 and 8
rows), chunks 2, 4 processes over Gloo: after 3 steps the running mean,
variance and count of two BatchNorms of the data (the model's first
layer, so their input is the data) equal nn.BatchNorm1d's run on the concatenated batches,
on both replicas; every replica's statistics are the same.

This file is also the worker script: ``python
test_distributed_replicas_batchnorm.py RANK WORLD PORT OUT``.
"""
import json
import os
import sys

import pytest
import torch
from torch import nn

from ranks import init_mesh, run_ranks

K, R, STEPS, D = 2, 2, 3, 4


class TwoNorms(nn.Module):
    """Two BatchNorms of the data itself (statistics the plain model's
    must equal whatever the parameters), summed over the replicas in one
    collective."""

    def __init__(self):
        super().__init__()
        self.a = nn.BatchNorm1d(D)
        self.b = nn.BatchNorm1d(D)

    def forward(self, x):
        return self.a(x) + self.b(2 * x + 1)


def model():
    torch.manual_seed(0)
    return nn.Sequential(TwoNorms(), nn.Linear(D, D), nn.Tanh(),
                         nn.Linear(D, 1)).double()


def batch(step, dp):
    g = torch.Generator().manual_seed(10 * step + dp)
    rows = 5 + 3 * dp  # uneven replicas
    return (2 + 3 * torch.randn(rows, D, generator=g, dtype=torch.float64),
            torch.randn(rows, 1, generator=g, dtype=torch.float64))


def _worker(rank, world, port, out):
    import torch.distributed as dist

    import pipegear

    mesh = init_mesh(rank, world, port, K)
    dp = mesh["dp"]
    pipe = pipegear.DistributedGPipe(
        model(), [2, 2], chunks=2, deferred_batch_norm=True, timeout=30.0,
        **mesh["groups"])
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    for step in range(STEPS):
        x, t = batch(step, dp)
        opt.zero_grad()
        pipe.step(x if pipe.is_first else None, t if pipe.is_last else None,
                  nn.functional.mse_loss)
        opt.step()
    state = {k: v.tolist() for k, v in pipe.state_dict().items()
             if k.startswith("0.") and ("running" in k or "tracked" in k)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(state, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_running_statistics_are_those_of_the_global_batch(tmp_path):
    reports = run_ranks(__file__, K * R, tmp_path, timeout=300)
    norms = model()[0]
    for step in range(STEPS):
        norms(torch.cat([batch(step, dp)[0] for dp in range(R)]))
    for dp in range(R):
        state = reports[dp * K]  # the replica's first stage holds them
        for name, bn in (("a", norms.a), ("b", norms.b)):
            torch.testing.assert_close(
                torch.tensor(state[f"0.{name}.running_mean"],
                             dtype=torch.float64),
                bn.running_mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(
                torch.tensor(state[f"0.{name}.running_var"],
                             dtype=torch.float64),
                bn.running_var, rtol=1e-12, atol=1e-12)
            assert state[f"0.{name}.num_batches_tracked"] == STEPS


if __name__ == "__main__":
    _worker(*map(int, sys.argv[1:4]), sys.argv[4])
