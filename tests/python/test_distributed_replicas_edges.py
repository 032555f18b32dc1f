"""Replicas (K=2 stages x R=2 replicas, 4 processes over Gloo) on models
whose gradients are not one per parameter and replica:

- a layer never used, and one used on one replica only: after 2 SGD steps
  with momentum and weight decay every parameter equals the plain model's
  on the global batch; a parameter no replica used keeps ``grad`` None
  (zeros would let weight decay and momentum move it);
- a layer used twice in one backward through reentrant checkpoints (its
  gradient accumulates twice in the last backward cell): with
  ``overlap=True`` a bucket's sum may have started before the second
  accumulation, so every rank raises; with ``overlap=False`` it trains as
  the plain model.

This file is also the worker script: ``python
test_distributed_replicas_edges.py RANK WORLD PORT OUT``.
"""
import json
import os
import sys

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

from ranks import init_mesh, run_ranks

K, R, STEPS, D = 2, 2, 2, 4


class Branch(nn.Module):
    """`extra` only for rows whose first feature is above -0.5 (replica 1
    has none), `never` never."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(D, D)
        self.extra = nn.Linear(D, D)
        self.never = nn.Linear(D, D)

    def forward(self, x):
        out = self.l(x)
        rows = (x[:, 0] > -0.5).nonzero().flatten()
        return out.index_add(0, rows, self.extra(x[rows])) if len(rows) else out


class Twice(nn.Module):
    """One Linear applied twice, each through a reentrant checkpoint."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(D, D)

    def forward(self, x):
        h = cp.checkpoint(lambda a: torch.tanh(self.l(a)), x,
                          use_reentrant=True)
        return cp.checkpoint(lambda a: torch.tanh(self.l(a)), h,
                             use_reentrant=True)


def model(kind):
    torch.manual_seed(7)
    middle = Branch() if kind == "branch" else Twice()
    return nn.Sequential(nn.Linear(D, D), nn.Tanh(), middle,
                         nn.Linear(D, 2)).double()


def batch(step, dp):
    g = torch.Generator().manual_seed(100 * step + dp)
    x = torch.randn(5 + dp, D, generator=g, dtype=torch.float64)
    if dp == 1:
        x[:, 0] = x[:, 0].clamp(max=-0.6)  # `extra` unused on replica 1
    return x, torch.randn(5 + dp, 2, generator=g, dtype=torch.float64)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.05)


CASES = [("branch", True), ("twice", True), ("twice", False)]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    import pipegear

    mesh = init_mesh(rank, world, port, K)
    dp = mesh["dp"]
    report = {}
    for kind, overlap in CASES:
        pipe = pipegear.DistributedGPipe(
            model(kind), [2, 2], chunks=2, checkpoint="never", timeout=30.0,
            overlap=overlap, **mesh["groups"])
        opt = optimizer(pipe.parameters())
        result = {"error": None}
        try:
            for step in range(STEPS):
                x, t = batch(step, dp)
                opt.zero_grad()
                pipe.step(x if pipe.is_first else None,
                          t if pipe.is_last else None, nn.functional.mse_loss)
                if step == 0:
                    result["none"] = sorted(
                        n for n, p in pipe.named_parameters() if p.grad is None)
                opt.step()
            result["state"] = {k: v.tolist()
                               for k, v in pipe.state_dict().items()}
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"
        report[f"{kind}-{overlap}"] = result
        dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def plain_state(kind):
    plain = model(kind)
    opt = optimizer(plain.parameters())
    none = None
    for step in range(STEPS):
        xs, ts = zip(*[batch(step, dp) for dp in range(R)])
        opt.zero_grad()
        nn.functional.mse_loss(plain(torch.cat(xs)), torch.cat(ts)).backward()
        if step == 0:
            none = sorted(n for n, p in plain.named_parameters()
                          if p.grad is None)
        opt.step()
    return plain.state_dict(), none


@pytest.mark.slow
def test_replicas_on_unused_and_twice_accumulated_parameters(tmp_path):
    reports = run_ranks(__file__, K * R, tmp_path, timeout=300)
    for kind, overlap in CASES:
        case = f"{kind}-{overlap}"
        if kind == "twice" and overlap:
            for rank, report in enumerate(reports):
                error = report[case]["error"]
                assert error is not None, (case, rank)
            # The replicas' last stages refuse, naming the remedy; the
            # first stages raise because their pipeline's peer failed.
            for rank in (1, 3):
                assert "accumulated a gradient again" in \
                    reports[rank][case]["error"]
                assert "overlap=False" in reports[rank][case]["error"]
            continue
        reference, none = plain_state(kind)
        seen = set()
        for rank, report in enumerate(reports):
            result = report[case]
            assert result["error"] is None, (case, rank, result["error"])
            for key, value in result["state"].items():
                seen.add(key)
                torch.testing.assert_close(
                    torch.tensor(value, dtype=torch.float64), reference[key],
                    rtol=1e-10, atol=1e-10, msg=f"{case}: {key} rank {rank}")
        assert seen == set(reference), case
        if kind == "branch":
            # `never` has no gradient anywhere, as in the plain model.
            assert none == ["2.never.bias", "2.never.weight"]
            assert reports[1][case]["none"] == none


if __name__ == "__main__":
    _worker(*map(int, sys.argv[1:4]), sys.argv[4])
