"""Randomness by construction: every cell draws from streams of its own.

A recomputed micro-batch draws exactly the masks its forward drew, whatever
the other stages do meanwhile (sleeps injected between draws force the
interleavings), and the same seed gives bit-identical outputs, losses and
gradients whatever the timing, the checkpoint mode or the balance. The
distributed pipeline seeded alike gives the single-process numbers.

This file is also the worker script of its distributed test:
``python test_randomness.py RANK WORLD PORT OUT``.
"""
import json
import os
import random
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipegear
from ranks import run_ranks


class Jittery(nn.Module):
    """Many small draws with F.dropout (not a module), sleeping at random
    between them: another stage's draws land between ours."""

    def __init__(self, draws=20, p=0.01):
        super().__init__()
        self.draws, self.p = draws, p

    def forward(self, x):
        rng = random.Random()
        for _ in range(self.draws):
            if rng.random() < 0.2:
                time.sleep(rng.random() * 2e-4)
            x = F.dropout(x, self.p, self.training)
        return x


class Noise(nn.Module):
    """torch.rand / randn_like inside a layer."""

    def forward(self, x):
        return x + 0.1 * torch.rand(x.shape, dtype=x.dtype) + 0.1 * torch.randn_like(x)


def model(blocks=4, width=8):
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.Dropout(0.3), Noise(),
                   Jittery(5, 0.1)]
    return nn.Sequential(*layers).double()


def outcome(balance, checkpoint="except_last", schedule="gpipe", face="step",
            seed=11, chunks=4):
    """Output or loss, input and parameter gradients, and the caller's next
    draw after one step from `seed` (one thread per stage: GEMMs sum in one
    order)."""
    m = model()
    pipe = pipegear.GPipe(m, balance, devices=["cpu"] * len(balance),
                          chunks=chunks, checkpoint=checkpoint,
                          schedule=schedule, worker_threads=1)
    torch.manual_seed(seed)
    x = torch.rand(12, 8, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(12, 8, dtype=torch.float64)
    if face == "step":
        value = pipe.step(x, t, F.mse_loss)
    else:
        y = pipe(x)
        F.mse_loss(y, t).backward()
        value = y.detach()
    grads = [p.grad.clone() for p in m.parameters()]
    return value, x.grad.clone(), grads, torch.rand(4)


def same(a, b):
    va, xa, ga, na = a
    vb, xb, gb, nb = b
    return (torch.equal(va, vb) and torch.equal(xa, xb) and torch.equal(na, nb)
            and all(torch.equal(p, q) for p, q in zip(ga, gb)))


@pytest.mark.parametrize("schedule,face", [("gpipe", "module"),
                                           ("gpipe", "step"), ("1f1b", "step")])
def test_recomputed_masks_equal_the_forwards(schedule, face):
    # The reproduction: two random stages on one device, every
    # micro-batch recomputed.
    for trial in range(10):
        pipe = pipegear.GPipe(nn.Sequential(Jittery(100, 0.001), Jittery(100, 0.001)),
                              [1, 1], devices=["cpu", "cpu"], chunks=10,
                              checkpoint="always", schedule=schedule)
        x = torch.rand(10, 10, requires_grad=True)
        if face == "module":
            y = pipe(x)
            y.norm().backward()
        else:
            # loss_fn sees each micro-batch's output after its forward and
            # after its recomputation: both must be equal.
            seen = {}

            def loss(o, t):
                seen.setdefault(int(t[0]), []).append(o.detach().clone())
                return o.sum()

            pipe.step(x, torch.arange(10.0), loss)
            assert all(len(v) == 2 and torch.equal(v[0], v[1])
                       for v in seen.values()), trial
            y = torch.cat([seen[j][0] for j in sorted(seen)])
        assert torch.equal(y != 0, x.grad != 0), trial


def test_the_same_seed_is_bit_identical_50_times():
    ref = outcome([8, 8])
    for _ in range(49):
        assert same(outcome([8, 8]), ref)
    assert not same(outcome([8, 8], seed=12), ref)


@pytest.mark.parametrize("face,schedule", [("step", "gpipe"), ("step", "1f1b"),
                                           ("module", "gpipe")])
def test_checkpoint_modes_and_balances_are_bit_identical(face, schedule):
    ref = outcome([16], "never", schedule, face)
    for checkpoint in ("never", "except_last", "always"):
        for balance in ([16], [8, 8], [3, 5, 8], [4, 4, 4, 4]):
            assert same(outcome(balance, checkpoint, schedule, face), ref), (
                checkpoint, balance)


def test_schedules_draw_the_same_masks():
    # Gradients accumulate in each schedule's order: equal up to rounding.
    a = outcome([8, 8], "always", "gpipe")
    b = outcome([8, 8], "always", "1f1b")
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    for p, q in zip(a[2], b[2]):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_eval_forwards_reproduce_from_a_seed():
    # eval(): Dropout and F.dropout(training=False) draw nothing; Noise
    # still draws, from the cells' streams.
    pipe = pipegear.GPipe(model(), [8, 8], devices=["cpu", "cpu"],
                          chunks=4).eval()
    x = torch.rand(12, 8, dtype=torch.float64)
    torch.manual_seed(3)
    with torch.no_grad():
        a = pipe(x)
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(pipe(x), a)


def test_eval_forwards_leave_the_callers_generator_alone():
    # A plain model without random layers draws nothing in eval mode; the
    # pipeline's eval forwards do not advance the caller's stream either, so
    # evaluating between training steps changes no training mask.
    pipe = pipegear.GPipe(model(), [8, 8], devices=["cpu", "cpu"],
                          chunks=4).eval()
    x = torch.rand(12, 8, dtype=torch.float64)
    torch.manual_seed(9)
    expected = torch.rand(3)
    torch.manual_seed(9)
    with torch.no_grad():
        pipe(x)
    pipe(x)
    assert torch.equal(torch.rand(3), expected)


# -- distributed: 2 ranks seeded alike give the single-process numbers -----

def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for checkpoint in ("never", "always"):
        m = model()
        pipe = pipegear.DistributedGPipe(m, balance=[8, 8], chunks=4,
                                         checkpoint=checkpoint)
        torch.manual_seed(11)
        x = torch.rand(12, 8, dtype=torch.float64)
        t = torch.zeros(12, 8, dtype=torch.float64)
        loss = pipe.step(x if pipe.is_first else None,
                         t if pipe.is_last else None, F.mse_loss)
        results[checkpoint] = [loss.item()] + [
            p.grad.sum().item() for p in pipe.parameters()]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_distributed_ranks_seeded_alike_match_one_process(tmp_path):
    ranks = run_ranks(__file__, 2, tmp_path, timeout=120)
    for checkpoint in ("never", "always"):
        pipe = pipegear.GPipe(model(), [8, 8], devices=["cpu", "cpu"],
                              chunks=4, checkpoint=checkpoint)
        torch.manual_seed(11)
        x = torch.rand(12, 8, dtype=torch.float64)
        loss = pipe.step(x, torch.zeros(12, 8, dtype=torch.float64), F.mse_loss)
        grads = [p.grad.sum().item() for p in pipe.parameters()]
        n0 = len(list(pipe.partitions[0].parameters()))
        assert ranks[1][checkpoint][0] == pytest.approx(loss.item(), rel=1e-12)
        assert ranks[0][checkpoint][1:] == pytest.approx(grads[:n0], rel=1e-9)
        assert ranks[1][checkpoint][1:] == pytest.approx(grads[n0:], rel=1e-9)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
