"""DistributedGPipe across processes (Gloo on loopback).

This file is also the worker script: the tests launch it with
``python test_distributed.py KIND RANK WORLD PORT OUT`` once per rank. One
launch runs several configurations in a row on the same process group, to
keep the number of process start-ups (importing torch) small. Every launch
is bounded in time; the whole file takes about a minute and a half on 2 cores.
"""
import json
import os
import re
import sys
import time

import pytest
import torch
from torch import nn

from ranks import init_gloo, launch_kind

D, H, O = 6, 8, 3


class _Fork(nn.Module):
    """Passes a tuple on: the activation, a float tensor nobody uses (its
    gradient is None), an int64 tensor (no gradient at all) and the
    activation's row sums."""

    def forward(self, x):
        return (x, x * 2, torch.arange(x.size(0)), x.sum(-1))


class _Join(nn.Module):
    def forward(self, inputs):
        x, _unused, index, sums = inputs
        assert index.dtype == torch.int64
        return x + sums.unsqueeze(-1)


def layer_factories(bn: bool, fork: bool = False):
    """Deterministic layers: factory i seeds its own initialisation. `fork`:
    a tuple with a None gradient and an int tensor crosses stages 0 -> 1."""
    def make(i, ctor):
        def factory():
            torch.manual_seed(1000 + i)
            return ctor()
        return factory
    ctors = [lambda: nn.Linear(D, H), nn.Tanh, lambda: nn.Linear(H, H),
             (lambda: nn.BatchNorm1d(H)) if bn else (_Fork if fork else nn.ReLU),
             (lambda: nn.Sequential(_Join(), nn.Linear(H, H))) if fork
             else (lambda: nn.Linear(H, H)), nn.Tanh, lambda: nn.Linear(H, O)]
    return [make(i, c) for i, c in enumerate(ctors)]


def batch(cfg, step):
    """Step `step`'s input and target: batch size and sequence length change
    from step to step (bn configs have no sequence dimension)."""
    n, length = cfg["shapes"][step]
    g = torch.Generator().manual_seed(10 * step + 1)
    shape = (n, D) if cfg["bn"] else (n, length, D)
    x = torch.randn(shape, generator=g)
    t = torch.randn(shape[:-1] + (O,), generator=g)
    return x, t


def mse(y, t):
    return nn.functional.mse_loss(y, t)


def cfg(name, balance, chunks, checkpoint, shapes, bn=False, schedule="gpipe",
        face="step", fork=False):
    return dict(name=name, balance=balance, chunks=chunks,
                checkpoint=checkpoint, shapes=shapes, bn=bn,
                schedule=schedule, face=face, fork=fork)


CONFIGS = {
    2: [
        cfg("k2-c1-never", [4, 3], 1, "never", [(8, 5), (5, 3)]),
        cfg("k2-c4-always", [4, 3], 4, "always", [(8, 5), (6, 2)]),
        cfg("k2-c4-except_last-1f1b", [2, 5], 4, "except_last",
            [(9, 4), (7, 6)], schedule="1f1b"),
        cfg("k2-c4-module-except_last", [4, 3], 4, "except_last",
            [(8, 5), (3, 2)], face="module"),
        cfg("k2-c1-module-always-bn", [3, 4], 1, "always", [(6, 0), (9, 0)],
            bn=True, face="module"),
        cfg("k2-c4-tuple-none-grad", [4, 3], 4, "except_last",
            [(8, 5), (5, 2)], fork=True),
        cfg("k2-c2-module-tuple-none-grad", [4, 3], 2, "never",
            [(6, 3), (4, 4)], face="module", fork=True),
        cfg("k2-c4-always-zb-h1", [4, 3], 4, "always", [(8, 5), (7, 3)],
            schedule="zb-h1"),
        cfg("k2-c8-never-zb-h2-bn", [3, 4], 8, "never", [(16, 0), (18, 0)],
            bn=True, schedule="zb-h2"),
        cfg("k2-c3-except_last-zb-h1-tuple", [4, 3], 3, "except_last",
            [(8, 5), (6, 2)], schedule="zb-h1", fork=True),
    ],
    3: [
        cfg("k3-c4-except_last", [3, 2, 2], 4, "except_last",
            [(8, 5), (10, 7)]),
        cfg("k3-c4-never-bn", [3, 2, 2], 4, "never", [(12, 0), (8, 0)],
            bn=True),
        cfg("k3-c1-always-bn", [2, 3, 2], 1, "always", [(6, 0), (9, 0)],
            bn=True),
        cfg("k3-c4-module-always", [3, 2, 2], 4, "always", [(8, 5), (7, 3)],
            face="module"),
        cfg("k3-c4-module-never-bn", [3, 2, 2], 4, "never",
            [(12, 0), (10, 0)], bn=True, face="module"),
        cfg("k3-c4-except_last-zb-h1", [3, 2, 2], 4, "except_last",
            [(8, 5), (10, 7)], schedule="zb-h1"),
        cfg("k3-c1-always-zb-h2-bn", [2, 3, 2], 1, "always",
            [(6, 0), (9, 0)], bn=True, schedule="zb-h2"),
        cfg("k3-c8-never-zb-h2", [3, 2, 2], 8, "never", [(9, 5), (8, 2)],
            schedule="zb-h2"),
    ],
}


# ---------------------------------------------------------------- workers
def _run_step(pipe, c, x, t, rank, world):
    """One training step of either face; returns the loss (None on a
    non-last rank in module style)."""
    first, last = rank == 0, rank == world - 1
    if c["face"] == "step":
        return pipe.step(x if first else None, t if last else None, mse)
    y = pipe(x if first else None)
    if last:
        loss = mse(y, t)
        loss.backward()
        return loss.detach()
    assert y.dim() == 0 and y.requires_grad
    y.backward()
    return None


def worker_compare(rank, world, port, out):
    import pipegear
    dist = init_gloo(rank, world, port)
    results = {}
    for c in CONFIGS[world]:
        pipe = pipegear.DistributedGPipe(
            layer_factories(c["bn"], c["fork"]), c["balance"], chunks=c["chunks"],
            checkpoint=c["checkpoint"], deferred_batch_norm=c["bn"],
            schedule=c["schedule"], timeout=20.0)
        pipe.train()
        steps = []
        for step in range(len(c["shapes"])):
            x, t = batch(c, step)
            x.requires_grad_(True)
            loss = _run_step(pipe, c, x, t, rank, world)
            grads = {n: p.grad.clone() for n, p in pipe.named_parameters()}
            for p in pipe.parameters():
                p.grad = None
            steps.append({"loss": loss, "grads": grads,
                          "input_grad": x.grad if rank == 0 else None})
        result = {"steps": steps,
                  "buffers": {n: b.clone() for n, b in pipe.named_buffers()}}
        if c["face"] == "module":
            # evaluation: no graph, no backward, running statistics
            pipe.eval()
            x, _ = batch(c, 0)
            with torch.no_grad():
                y = pipe(x if rank == 0 else None)
            result["eval"] = y if rank == world - 1 else None
        results[c["name"]] = result
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


class _Exit(nn.Module):
    def forward(self, x):
        if os.environ.get("PIPEGEAR_TEST_MODE") == "hang":
            time.sleep(60)  # the test kills it once the peer has given up
        os._exit(3)


def worker_crash(rank, world, port, out):
    import pipegear
    init_gloo(rank, world, port)
    dying = int(os.environ["PIPEGEAR_TEST_DYING"])
    layers = [lambda: nn.Linear(D, H)] + [lambda: nn.Linear(H, H)] * (world - 2) \
        + [lambda: nn.Linear(H, O)]
    if rank == dying:
        layers[rank] = _Exit
    pipe = pipegear.DistributedGPipe(layers, [1] * world, chunks=4,
                                     timeout=float(os.environ["PIPEGEAR_TEST_TIMEOUT"]))
    x, t = torch.randn(8, D), torch.randn(8, O)
    start = time.monotonic()
    try:
        pipe.step(x if rank == 0 else None, t if rank == world - 1 else None, mse)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001
        result = {"error": f"{type(e).__name__}: {e}"}
    result["elapsed"] = time.monotonic() - start
    result["broken"] = pipe.broken
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # no teardown against a dead peer


class _Slow(nn.Module):
    """A Linear whose forward sleeps `delay` seconds once while armed."""
    delay = 0.0

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(H, O)

    def forward(self, x):
        if _Slow.delay:
            time.sleep(_Slow.delay)
            _Slow.delay = 0.0
        return self.linear(x)


def _attempt(fn):
    """(error or None, seconds) of a call."""
    start = time.monotonic()
    try:
        fn()
        error = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    return error, time.monotonic() - start


def worker_late(rank, world, port, out):
    """Rank 1 is late for step 1 by 2.5 s, inside it (PIPEGEAR_TEST_MODE
    'in-step': its layer sleeps) or before it ('between-steps'), so rank 0
    gives up on it after 1 s (`timeout`, `idle_timeout`); then every rank
    tries step 2."""
    import pipegear
    init_gloo(rank, world, port)
    pipe = pipegear.DistributedGPipe([lambda: nn.Linear(D, H), _Slow], [1, 1],
                                     chunks=2, timeout=1.0, idle_timeout=1.0)
    x, t = torch.randn(4, D), torch.randn(4, O)

    def step():
        pipe.step(x if rank == 0 else None, t if rank == 1 else None, mse)
    report = {"step0": _attempt(step)}
    if rank == 1:
        if os.environ["PIPEGEAR_TEST_MODE"] == "in-step":
            _Slow.delay = 2.5
        else:
            time.sleep(2.5)
    report["step1"] = _attempt(step)
    report["broken"] = pipe.broken
    report["step2"] = _attempt(step)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    os._exit(0)  # no teardown on a broken group


def worker_pause(rank, world, port, out):
    """Between steps, rank 0 is busy for 3 s, then the last rank for 2 s
    (module style), with timeout=1 s: the steps after the pauses work."""
    import datetime

    import pipegear
    dist = init_gloo(rank, world, port)
    # The group's own timeout does not bound pipegear's waits either: each
    # wait passes its own bound to the backend.
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=1))
    pipe = pipegear.DistributedGPipe(layer_factories(False), [4, 3], chunks=2,
                                     timeout=1.0)
    c = CONFIGS[2][0]
    first, last = rank == 0, rank == world - 1
    report = {"idle_timeout": pipe.idle_timeout}
    for step, (pause_rank, pause, face) in enumerate(
            [(None, 0, "step"), (0, 3.0, "step"), (world - 1, 2.0, "module")]):
        if rank == pause_rank:
            time.sleep(pause)
        x, t = batch(c, 0)
        error, elapsed = _attempt(
            lambda: report.__setitem__(f"loss{step}", _run_step(
                pipe, dict(c, face=face), x, t, rank, world)))
        report[f"step{step}"] = [error, elapsed]
        pipe.zero_grad()
    report["loss1"] = float(report["loss1"])
    report["loss2"] = None if report["loss2"] is None else float(report["loss2"])
    report["loss0"] = float(report["loss0"])
    report["broken"] = pipe.broken
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    os._exit(0)


def worker_absent(rank, world, port, out):
    """Rank PIPEGEAR_TEST_DYING never comes to step 1 (the test kills it);
    idle_timeout=2 s, timeout=1 s."""
    import pipegear
    init_gloo(rank, world, port)
    pipe = pipegear.DistributedGPipe(layer_factories(False), [3, 2, 2], chunks=2,
                                     timeout=1.0, idle_timeout=2.0)
    x, t = batch(CONFIGS[2][0], 0)

    def step():
        pipe.step(x if rank == 0 else None, t if rank == world - 1 else None, mse)
    report = {"step0": _attempt(step)}
    if rank == int(os.environ["PIPEGEAR_TEST_DYING"]):
        time.sleep(60)
    report["step1"] = _attempt(step)
    report["broken"] = pipe.broken
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    os._exit(0)


def _step_with(input=None, target=None, loss_fn=mse, reduction=None):
    """A step where rank 0 passes `input` or the batch's, the last rank
    `target` and `loss_fn` (each "batch": the batch's own)."""
    def call(pipe, rank, world, x, t):
        first, last = rank == 0, rank == world - 1
        pipe.step((x if input == "batch" else input) if first else None,
                  (t if target == "batch" else target) if last else None,
                  loss_fn, reduction)
    return call


def _forward_with(input):
    """Module style: rank 0 passes `input`, the others None."""
    def call(pipe, rank, world, x, t):
        pipe(input if rank == 0 else None)
    return call


# name: (the call of every rank, the failing rank, what it raises). Each is
# a one-rank mistake found before the step: every rank must raise at once,
# the others naming the failing rank and quoting its error, and the next
# step must work.
MISTAKES = {
    # found by DistributedGPipe.step (python/pipegear/loss.py)
    "target-none": (_step_with("batch", None, nn.MSELoss()), 1,
                    "ValueError: step got target=None but the loss MSELoss "
                    "needs a target: pass the batch's target"),
    "reduction-disagrees": (
        _step_with("batch", "batch", nn.MSELoss(reduction="sum"), "mean"), 1,
        "ValueError: reduction='mean' disagrees with the loss: MSELoss "
        "reduces with 'sum'; leave reduction=None to use the loss's"),
    "loss-not-callable": (_step_with("batch", "batch", 3), 1,
                          "TypeError: loss_fn must be callable, got int"),
    # found by the binding, converting the arguments
    "target-not-tensor": (_step_with("batch", "abc"), 1,
                          "TypeError: the target must be a tensor or a tuple "
                          "of tensors, got <class 'str'>"),
    "input-not-tensor": (_step_with("abc", "batch"), 0,
                         "TypeError: the input must be a tensor or a tuple of "
                         "tensors, got <class 'str'>"),
    "forward-input-not-tensor": (
        _forward_with(["abc"]), 0,
        "TypeError: the input must be a tensor or a tuple of tensors, got a "
        "tuple holding <class 'str'>"),
    # found by the pipeline
    "no-loss": (_step_with("batch", "batch", None), 1,
                "ValueError: step needs a loss function on the last rank, "
                "got none"),
    "no-input": (_step_with(None, "batch"), 0,
                 "ValueError: rank 0 must pass the input, got none"),
}


def worker_mistakes(rank, world, port, out):
    """Every MISTAKES scenario, then a good step, on one pipeline."""
    import pipegear
    dist = init_gloo(rank, world, port)
    pipe = pipegear.DistributedGPipe(layer_factories(False), [4, 3], chunks=2,
                                     timeout=20.0)
    x, t = batch(CONFIGS[2][0], 0)
    report = {}
    for name, (call, *_) in MISTAKES.items():
        report[name] = _attempt(lambda: call(pipe, rank, world, x, t))
        report[name + "-broken"] = pipe.broken
        pipe.zero_grad(set_to_none=True)
        # the next step works
        report[name + "-next"] = _attempt(
            lambda: _step_with("batch", "batch")(pipe, rank, world, x, t))
    report["grads"] = {n: p.grad.tolist() for n, p in pipe.named_parameters()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def worker_pending(rank, world, port, out):
    """Module style, forward() while the backward of the previous forward
    has not run: on the last rank only ("last"), rank 0 only ("first"), or
    every rank ("every"); the others run their backward. Each is followed
    by a good step."""
    import pipegear
    dist = init_gloo(rank, world, port)
    pipe = pipegear.DistributedGPipe(layer_factories(False), [4, 3], chunks=2,
                                     timeout=20.0)
    x, t = batch(CONFIGS[2][0], 0)
    first, last = rank == 0, rank == world - 1
    report = {}
    for who in ("last", "first", "every"):
        forgets = who == "every" or (who == "last") == last
        y = pipe(x if first else None)
        if forgets:  # `y` is still alive: its backward is pending
            report[who] = _attempt(lambda: pipe(x if first else None))
            if last:  # the old output's backward comes too late now
                report[who + "-late-backward"] = _attempt(
                    lambda: mse(y, t).backward())
        else:
            report[who] = _attempt(
                lambda: (mse(y, t) if last else y).backward())
        del y
        report[who + "-broken"] = pipe.broken
        pipe.zero_grad(set_to_none=True)
        report[who + "-next"] = _attempt(
            lambda: _step_with("batch", "batch")(pipe, rank, world, x, t))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def worker_chunks(rank, world, port, out):
    """Pipelines with different chunks, one after another on one group, one
    step each; the losses go to rank{rank}.json."""
    import pipegear
    dist = init_gloo(rank, world, port)
    losses = []
    for chunks in CHUNKS_IN_TURN:
        pipe = pipegear.DistributedGPipe(layer_factories(False), [4, 3],
                                         chunks=chunks, timeout=10.0)
        x, t = batch(CONFIGS[2][0], 0)
        loss = pipe.step(x if rank == 0 else None, t if rank == 1 else None, mse)
        losses.append(float(loss))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(losses, f)
    dist.barrier()
    dist.destroy_process_group()


# The header receive posted early by the first pipeline (chunks 5) had the
# tag of the third pipeline's first activations when a pipeline's tags were
# its number times a stride of its own chunks.
CHUNKS_IN_TURN = [5, 1, 1, 3]


class _Boom(nn.Module):
    """Raises ValueError in its forward or backward while armed."""
    armed = None  # None, "forward" or "backward"

    def __init__(self):
        super().__init__()
        torch.manual_seed(1002)
        self.linear = nn.Linear(H, H)

    def forward(self, x):
        import pipegear
        if _Boom.armed == "forward" and not pipegear.is_recomputing():
            raise ValueError("boom in a forward")
        y = self.linear(x)
        if _Boom.armed == "backward":
            y = _Fail.apply(y)
        return y


class _Fail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise ValueError("boom in a backward")


RAISE_SCENARIOS = [("step", "gpipe", "forward"), ("step", "gpipe", "backward"),
                   ("step", "1f1b", "forward"), ("step", "1f1b", "backward"),
                   ("module", "gpipe", "forward"),
                   ("module", "gpipe", "backward")]


def worker_raise(rank, world, port, out):
    """Rank 1 raises in step 1; every rank must raise; step 2 must be right."""
    import pipegear
    dist = init_gloo(rank, world, port)
    report = []
    for face, schedule, where in RAISE_SCENARIOS:
        factories = layer_factories(False)
        factories[2] = _Boom  # rank 1's first layer with balance [2, 3, 2]
        c = cfg("raise", [2, 3, 2], 4, "except_last", [(8, 3)] * 3,
                schedule=schedule, face=face)
        pipe = pipegear.DistributedGPipe(factories, c["balance"], chunks=4,
                                         schedule=schedule, timeout=20.0)
        entry = {"scenario": [face, schedule, where]}
        for step in range(3):
            x, t = batch(c, step)
            _Boom.armed = where if (step == 1 and rank == 1) else None
            start = time.monotonic()
            try:
                loss = _run_step(pipe, c, x, t, rank, world)
                entry[f"step{step}"] = None
            except Exception as e:  # noqa: BLE001
                entry[f"step{step}"] = f"{type(e).__name__}: {e}"
                loss = None
            entry[f"elapsed{step}"] = time.monotonic() - start
            if step == 2:
                entry["loss"] = None if loss is None else float(loss)
                entry["grads"] = {n: None if p.grad is None else p.grad.tolist()
                                  for n, p in pipe.named_parameters()}
            pipe.zero_grad(set_to_none=True)
        _Boom.armed = None
        entry["broken"] = pipe.broken
        report.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "grads"}),
              flush=True)
    errors = _mismatches(rank, world)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"raise": report, "mismatch": errors}, f)
    dist.barrier()
    dist.destroy_process_group()


def _mismatches(rank, world):
    """Ranks that disagree fail, on every rank, with the reason; the
    pipeline works afterwards."""
    import pipegear
    errors = {}
    try:
        pipegear.DistributedGPipe(layer_factories(False), [3, 2, 2],
                                  chunks=4 if rank == 0 else 2, timeout=10.0)
        errors["chunks"] = None
    except Exception as e:  # noqa: BLE001
        errors["chunks"] = f"{type(e).__name__}: {e}"
    pipe = pipegear.DistributedGPipe(layer_factories(False), [3, 2, 2],
                                     chunks=2, timeout=10.0)
    x, t = batch(CONFIGS[2][0], 0)
    last = rank == world - 1
    try:
        if rank == 1:
            pipe(None)  # the others call step()
        else:
            pipe.step(x if rank == 0 else None, t if last else None, mse)
        errors["face"] = None
    except Exception as e:  # noqa: BLE001
        errors["face"] = f"{type(e).__name__}: {e}"
    # Rank 0 forgets its input: every rank raises (rank 0 a ValueError
    # saying so), within seconds, and the pipeline is not broken.
    start = time.monotonic()
    try:
        pipe.step(None, t if last else None, mse)
        errors["no_input"] = None
    except Exception as e:  # noqa: BLE001
        errors["no_input"] = f"{type(e).__name__}: {e}"
    errors["no_input_s"] = time.monotonic() - start
    errors["no_input_broken"] = pipe.broken
    loss = pipe.step(x if rank == 0 else None, t if last else None, mse)
    errors["after"] = float(loss)
    return errors


# ------------------------------------------------------------------ tests
def _launch(kind, world, out, env_extra=None, timeout=120, wait_for=None):
    """Starts `world` ranks of this file; waits for all of them, or only for
    the ranks in `wait_for` (the others are killed afterwards)."""
    return launch_kind(__file__, kind, world, out, timeout=timeout,
                       env_extra=env_extra, wait_for=wait_for)


def _reference(c):
    """The plain model on the whole batch. With BatchNorm and chunks > 1 each
    micro-batch is normalised with its own statistics (by design), so the
    loss and gradients come from the in-process pipegear.GPipe instead; the
    running statistics still equal the plain model's."""
    import pipegear
    model = nn.Sequential(*[f() for f in layer_factories(c["bn"], c["fork"])])
    model.train()
    pipe = None
    if c["bn"] and c["chunks"] > 1:
        pipe = pipegear.GPipe(
            nn.Sequential(*[f() for f in layer_factories(True)]),
            balance=c["balance"], chunks=c["chunks"],
            checkpoint=c["checkpoint"], deferred_batch_norm=True)
        pipe.train()
    steps = []
    for step in range(len(c["shapes"])):
        x, t = batch(c, step)
        x.requires_grad_(True)
        loss = mse(model(x), t)
        if pipe is not None:
            model.zero_grad(set_to_none=True)
            x.grad = None
            loss = pipe.step(x, t, mse)
            steps.append({"loss": loss.detach(), "input_grad": x.grad,
                          "grads": {n: p.grad.clone()
                                    for n, p in pipe.named_parameters()}})
            pipe.zero_grad(set_to_none=True)
            continue
        loss.backward()
        steps.append({"loss": loss.detach(), "input_grad": x.grad,
                      "grads": {n: p.grad.clone()
                                for n, p in model.named_parameters()}})
        model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        evaluation = model(batch(c, 0)[0])
    return steps, dict(model.named_buffers()), evaluation


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def launched(request, tmp_path_factory):
    world = request.param
    out = str(tmp_path_factory.mktemp(f"dist{world}"))
    codes, logs = _launch("compare", world, out)
    assert codes == [0] * world, "\n".join(logs)
    return world, [torch.load(os.path.join(out, f"rank{r}.pt"))
                   for r in range(world)]


def test_matches_whole_model(launched):
    """Losses, every rank's gradients, the input gradient, running
    statistics and eval outputs equal the plain model's, for both faces,
    chunks 1, 3, 4 and 8, every checkpoint mode, gpipe, 1f1b, zb-h1 and
    zb-h2, DeferredBatchNorm,
    and a second step with another batch size and sequence length."""
    world, ranks = launched
    for c in CONFIGS[world]:
        ref_steps, ref_buffers, ref_eval = _reference(c)
        for step, ref in enumerate(ref_steps):
            seen = set()
            for r, res in enumerate(ranks):
                got = res[c["name"]]["steps"][step]
                if got["loss"] is not None:
                    torch.testing.assert_close(
                        got["loss"], ref["loss"], rtol=1e-5, atol=1e-6,
                        msg=lambda m: f"{c['name']} step {step} rank {r}: {m}")
                else:
                    assert c["face"] == "module" and r < world - 1
                for name, g in got["grads"].items():
                    torch.testing.assert_close(
                        g, ref["grads"][name], rtol=1e-4, atol=1e-6,
                        msg=lambda m: f"{c['name']} step {step} {name}: {m}")
                    seen.add(name)
            # every parameter lives on exactly one rank
            assert seen == set(ref["grads"]), c["name"]
            torch.testing.assert_close(
                ranks[0][c["name"]]["steps"][step]["input_grad"],
                ref["input_grad"], rtol=1e-4, atol=1e-6,
                msg=lambda m: f"{c['name']} step {step} input grad: {m}")
        if c["bn"]:
            buffers = {}
            for res in ranks:
                buffers.update(res[c["name"]]["buffers"])
            for name, b in ref_buffers.items():
                torch.testing.assert_close(buffers[name], b, rtol=1e-5,
                                           atol=1e-6, msg=name)
        if c["face"] == "module":
            torch.testing.assert_close(ranks[-1][c["name"]]["eval"], ref_eval,
                                       rtol=1e-5, atol=1e-6)


def test_each_rank_keeps_only_its_slice(launched):
    world, ranks = launched
    c = CONFIGS[world][0]
    names = [set(res[c["name"]]["steps"][0]["grads"]) for res in ranks]
    for a in range(world):
        for b in range(a + 1, world):
            assert not names[a] & names[b]


@pytest.mark.parametrize("world,dying,mode", [(2, 1, "exit"), (3, 1, "exit"),
                                              (2, 1, "hang")],
                         ids=["last-dies", "middle-dies", "last-hangs"])
def test_dead_peer_fails_within_timeout(tmp_path, world, dying, mode):
    """A rank killed mid-step (os._exit) or hanging makes every other rank
    raise within the timeout (plus a margin), never hang."""
    timeout = 4.0
    survivors = [r for r in range(world) if r != dying]
    t0 = time.monotonic()
    codes, logs = _launch("crash", world, str(tmp_path),
                          {"PIPEGEAR_TEST_DYING": str(dying),
                           "PIPEGEAR_TEST_MODE": mode,
                           "PIPEGEAR_TEST_TIMEOUT": str(timeout)},
                          timeout=60, wait_for=survivors)
    if mode == "exit":
        assert codes[dying] == 3, logs
    for r in survivors:
        with open(tmp_path / f"rank{r}.json") as f:
            result = json.load(f)
        assert result["error"] is not None, logs
        assert "pipegear: rank" in result["error"], result
        assert result["elapsed"] < timeout + 4.0, result
        assert result["broken"], result
        if mode == "hang":
            assert "timed out" in result["error"].lower(), result
            assert result["elapsed"] > timeout - 1.0, result
    assert time.monotonic() - t0 < 45


@pytest.mark.parametrize("mode", ["in-step", "between-steps"])
def test_a_rank_late_after_its_peer_gave_up_gets_pipegear_context(tmp_path,
                                                                   mode):
    """Rank 1 comes 2.5 s late for step 1, after rank 0 gave up on it (after
    1 s: `timeout` inside the step, `idle_timeout` before it) and Gloo
    closed their link, so rank 1's next c10d call fails. It raises
    that with pipegear's context (this rank, the step, what it was doing),
    not Gloo's bare "Connection closed by peer", and both ranks are broken:
    the next step raises at once."""
    codes, logs = _launch("late", 2, str(tmp_path), {"PIPEGEAR_TEST_MODE": mode},
                          timeout=30)
    assert codes == [0, 0], "\n".join(logs)
    rank0, rank1 = [json.loads((tmp_path / f"rank{r}.json").read_text())
                    for r in range(2)]
    assert rank0["step0"][0] is None and rank1["step0"][0] is None
    error, elapsed = rank0["step1"]
    assert error.startswith("RuntimeError: pipegear: rank 0: "), error
    assert "step 1 timed out after 1 s" in error, error
    assert elapsed < 1.0 + 2.0, rank0
    error, elapsed = rank1["step1"]
    assert error.startswith("RuntimeError: pipegear: rank 1: "), error
    assert re.search(r"step [12]\b", error), error
    assert "(did rank 0 die, or time out waiting for a rank?)" in error, error
    # at once once back (a sleep inside the step counts, one before not)
    assert elapsed < (2.5 if mode == "in-step" else 0) + 1.5, rank1
    for r, report in enumerate((rank0, rank1)):
        assert report["broken"], report
        error, elapsed = report["step2"]
        assert error.startswith(f"RuntimeError: pipegear: rank {r}: an earlier "
                                "step failed"), error
        assert elapsed < 0.5, report


def test_exception_in_a_layer_fails_every_rank_and_the_next_step_works(tmp_path):
    """A Python exception in rank 1's layer (forward or backward, both faces,
    gpipe and 1f1b): rank 1 raises it, every other rank raises an error
    naming rank 1 at once (no timeout), and the next step is exact. Ranks
    that disagree on the options or the call get the reason."""
    codes, logs = _launch("raise", 3, str(tmp_path), timeout=90)
    assert codes == [0] * 3, "\n".join(logs)
    reports, mismatches = [], []
    for r in range(3):
        with open(tmp_path / f"rank{r}.json") as f:
            got = json.load(f)
        reports.append(got["raise"])
        mismatches.append(got["mismatch"])
    for i, (face, schedule, where) in enumerate(RAISE_SCENARIOS):
        c = cfg("raise", [2, 3, 2], 4, "except_last", [(8, 3)] * 3)
        factories = layer_factories(False)
        model = nn.Sequential(*[f() for f in factories[:2]], _Boom(),
                              *[f() for f in factories[3:]])
        reference = {}
        for r, rep in enumerate(reports):
            e = rep[i]
            label = f"{e['scenario']} rank {r}"
            assert e["step0"] is None and e["step2"] is None, label
            assert e["step1"] is not None, label
            if r == 1:
                assert e["step1"].startswith("ValueError: boom in a " + where), label
            else:
                assert "rank 1 failed" in e["step1"], label
                if face == "step":
                    assert "boom" in e["step1"] or "see its error" in e["step1"], label
            assert e["elapsed1"] < 10.0, label  # well under the 20 s timeout
            assert not e["broken"], label
            reference.update(e["grads"])
        # step 2 equals the plain model (the Boom layer is a Linear then)
        x, t = batch(c, 2)
        loss = mse(model(x), t)
        loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(torch.tensor(reference[name]), p.grad,
                                       rtol=1e-4, atol=1e-6, msg=name)
        last = reports[2][i]["loss"]
        assert last == pytest.approx(loss.item(), rel=1e-5)
    # Ranks that disagree (same launch, to save a start-up): on chunks at
    # construction, every rank raises the reason; on the call (rank 1 calls
    # forward() while the others call step()), rank 1 raises the reason and
    # the others that rank 1 failed; the next step works.
    for r, errors in enumerate(mismatches):
        assert errors["chunks"].startswith("ValueError"), errors
        assert "chunks is" in errors["chunks"], errors
        if r == 1:
            assert "rank 0 called step() while this rank called forward()" \
                in errors["face"], errors
        else:
            assert "rank 1 failed" in errors["face"], errors
        assert errors["no_input"] is not None, errors
        if r == 0:
            assert errors["no_input"].startswith(
                "ValueError: rank 0 must pass the input"), errors
        else:
            assert "rank 0 failed" in errors["no_input"], errors
        assert errors["no_input_s"] < 5 and not errors["no_input_broken"], errors
    assert len({e["after"] for e in mismatches}) == 1
    assert mismatches[0]["after"] > 0


def test_a_rank_busy_between_steps_longer_than_timeout_is_waited_for(tmp_path):
    """Saving a checkpoint or evaluating on one rank between steps takes
    longer than `timeout` (1 s): rank 0 pauses 3 s, then the last rank 2 s
    (before a module-style forward). The others wait for them up to
    `idle_timeout` (default 1800 s) and the steps work on every rank."""
    codes, logs = _launch("pause", 2, str(tmp_path), timeout=30)
    assert codes == [0, 0], "\n".join(logs)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text())
               for r in range(2)]
    for r, report in enumerate(reports):
        assert report["idle_timeout"] == 1800.0
        for step in range(3):
            assert report[f"step{step}"][0] is None, (r, report)
        assert not report["broken"], report
    assert reports[0]["loss1"] == reports[1]["loss1"] == reports[0]["loss0"]
    # the waiting rank waited out the pause (more than `timeout`)
    assert reports[1]["step1"][1] > 2.5, reports
    assert reports[0]["step2"][1] > 1.5, reports


@pytest.mark.parametrize("absent", [0, 1], ids=["rank0", "rank1"])
def test_a_rank_that_never_comes_fails_the_others_after_idle_timeout(tmp_path,
                                                                     absent):
    """3 ranks, idle_timeout 2 s, timeout 1 s: a rank that does not come to
    step 1 makes the others raise after idle_timeout (not timeout), broken.
    Rank 0 waits idle_timeout for every rank to come; the others wait for
    rank 0 idle_timeout + timeout, so that when rank 1 is absent rank 0 is
    the one that times out and names it (its timeout closes its links, so
    rank 2 raises at the same time)."""
    survivors = [r for r in range(3) if r != absent]
    codes, logs = _launch("absent", 3, str(tmp_path),
                          {"PIPEGEAR_TEST_DYING": str(absent)}, timeout=30,
                          wait_for=survivors)
    for r in survivors:
        report = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert report["step0"][0] is None, report
        error, elapsed = report["step1"]
        assert error is not None and report["broken"], report
        if absent == 0:
            assert error == (
                f"RuntimeError: pipegear: rank {r}: waiting for rank 0 to "
                "start step 1 timed out after 3 s (idle_timeout + timeout; "
                "did rank 0 die, hang or skip the call?)"), error
            assert 2.9 < elapsed < 3.0 + 2.0, report
            continue
        if r == 0:
            assert error == (
                "RuntimeError: pipegear: rank 0: waiting for rank 1 to start "
                "step 1 timed out after 2 s (idle_timeout; did rank 1 die, hang "
                "or skip the call?)"), error
        else:  # the timeout closed rank 0's links (Gloo): at once, too
            assert error.startswith(
                "RuntimeError: pipegear: rank 2: waiting for rank 0 to start "
                "step 1 failed (did rank 0 die, or time out waiting for a "
                "rank?): "), error
        assert 1.9 < elapsed < 2.0 + 2.0, report


def test_a_mistake_one_rank_finds_before_the_step_fails_every_rank_at_once(
        tmp_path):
    """A one-rank mistake found before the step (the last rank's target,
    loss or reduction, rank 0's input; by DistributedGPipe, the binding or
    the pipeline): that rank raises it with its own type, the other raises
    at once naming that rank and the mistake, before any cell runs (no
    timeout, 20 s here), and the next step works."""
    codes, logs = _launch("mistakes", 2, str(tmp_path), timeout=60)
    assert codes == [0, 0], "\n".join(logs)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text())
               for r in range(2)]
    for step, (name, (_, failing, raised)) in enumerate(MISTAKES.items()):
        for r, report in enumerate(reports):
            error, elapsed = report[name]
            if r == failing:
                assert error == raised, (name, error)
            else:
                assert error == (
                    f"RuntimeError: pipegear: rank {r}: rank {failing} failed "
                    f"before step {2 * step} began: {raised}"), (name, error)
            assert elapsed < 2.0, (name, r, elapsed)  # measured: ~1 ms
            assert not report[name + "-broken"], (name, r)
            assert report[name + "-next"][0] is None, (name, r, report)
    # the last good step equals the plain model's
    model = nn.Sequential(*[f() for f in layer_factories(False)])
    x, t = batch(CONFIGS[2][0], 0)
    mse(model(x), t).backward()
    grads = {**reports[0]["grads"], **reports[1]["grads"]}
    for name, p in model.named_parameters():
        torch.testing.assert_close(torch.tensor(grads[name]), p.grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_a_forward_before_the_backward_of_the_last_fails_that_backward_on_every_rank(
        tmp_path):
    """Module style: a rank calls forward() while the backward of its
    previous forward has not run. Its peers wait for it in that backward
    (their drain), not in a next step, so it fails the drain on every rank
    the way a failing backward does: every rank raises at once (no timeout,
    20 s here), the group intact, and the next step works."""
    codes, logs = _launch("pending", 2, str(tmp_path), timeout=60)
    assert codes == [0, 0], "\n".join(logs)
    rank0, rank1 = [json.loads((tmp_path / f"rank{r}.json").read_text())
                    for r in range(2)]

    def pending(r, step):
        return (f"RuntimeError: pipegear: rank {r}: the backward of the "
                f"previous forward (step {step}) has not run; every rank must "
                "run it before the next forward (use no_grad for forwards "
                "without backward)")
    # the last rank forgets (step 0); rank 0 waits in its backward
    assert rank1["last"][0] == pending(1, 0), rank1
    assert rank0["last"][0].startswith(
        "RuntimeError: pipegear: rank 0: rank 1 failed in step 0, so this "
        "rank stops too (receiving the gradients of micro-batch 1 from rank "
        "1): " + pending(1, 0)[len("RuntimeError: "):]), rank0
    assert rank1["last-late-backward"][0] == (
        "RuntimeError: pipegear: rank 1: the backward of step 0 comes after "
        "the next forward, which failed it on every rank (see that forward's "
        "error)"), rank1
    # rank 0 forgets (step 2); the last rank waits in its backward
    assert rank0["first"][0] == pending(0, 2), rank0
    assert rank1["first"][0] == ("RuntimeError: pipegear: rank 1: rank 0 "
                                 "failed in the backward of step 2 (see its "
                                 "error)"), rank1
    # every rank forgets (step 4)
    assert rank0["every"][0] == pending(0, 4), rank0
    assert rank1["every"][0] == pending(1, 4), rank1
    for r, report in enumerate((rank0, rank1)):
        for who in ("last", "first", "every"):
            assert report[who][1] < 2.0, (who, r, report)  # measured: ~ms
            assert not report[who + "-broken"], (who, r)
            assert report[who + "-next"][0] is None, (who, r, report)


def test_pipelines_with_different_chunks_on_one_group_keep_their_tags_apart(
        tmp_path):
    codes, logs = _launch("chunks", 2, str(tmp_path), timeout=30)
    assert codes == [0, 0], "\n".join(logs)
    model = nn.Sequential(*[f() for f in layer_factories(False)])
    x, t = batch(CONFIGS[2][0], 0)
    expected = mse(model(x), t).item()
    for r in range(2):
        losses = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert losses == pytest.approx([expected] * len(CHUNKS_IN_TURN),
                                       rel=1e-5), r


def test_world_size_must_match_balance():
    import pipegear

    class FakeGroup:
        def size(self):
            return 2

        def rank(self):
            return 0

    with pytest.raises(ValueError, match="3 partitions .* 2 ranks"):
        pipegear.DistributedGPipe([nn.Linear(2, 2)] * 3, [1, 1, 1],
                                  process_group=FakeGroup())


class _TwoRanks:
    def size(self):
        return 2

    def rank(self):
        return 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(balance="11"), TypeError, "balance must be a sequence of ints, got str"),
    (dict(balance=[1, 1.0]), TypeError, r"balance\[1\] must be an int, got float"),
    (dict(balance=[0, 2]), ValueError, r"balance\[0\] must be at least 1, got 0"),
    (dict(chunks=0), ValueError, "chunks must be at least 1, got 0"),
    (dict(chunks=2.0), TypeError, "chunks must be an int, got float"),
    (dict(checkpoint="sometimes"), ValueError,
     "checkpoint must be one of .*got 'sometimes'"),
    (dict(schedule="zigzag"), ValueError, "schedule must be one of .*'zigzag'"),
    (dict(timeout=0.0), ValueError, "timeout must be .* got 0.0"),
    (dict(timeout=float("inf")), ValueError, "timeout must be .* got inf"),
    (dict(idle_timeout=0.0), ValueError,
     "idle_timeout must be a finite number of seconds, at least 0.001, got 0.0"),
    (dict(idle_timeout=float("nan")), ValueError, "idle_timeout must be .* got nan"),
    (dict(idle_timeout="1h"), ValueError, "idle_timeout must be .* got '1h'"),
    (dict(device="bogus"), ValueError, "is not a device: 'bogus'"),
    (dict(device=1.5), TypeError, "devices must hold torch.device, str or int"),
])
def test_bad_arguments_are_typed_errors_like_gpipes(kwargs, error, match):
    """Checked before any rank talks to another (the same errors as GPipe)."""
    import pipegear
    args = dict(balance=[1, 1])
    args.update(kwargs)
    balance = args.pop("balance")
    with pytest.raises(error, match=match):
        pipegear.DistributedGPipe([nn.Linear(2, 2), nn.Linear(2, 2)], balance,
                                  process_group=_TwoRanks(), **args)


def test_needs_a_process_group():
    import torch.distributed as dist

    import pipegear
    if dist.is_initialized():
        pytest.skip("a default group exists in this process")
    with pytest.raises(RuntimeError, match="needs a process group"):
        pipegear.DistributedGPipe([nn.Linear(2, 2)], [1])


if __name__ == "__main__":
    kind, rank, world, port, out = sys.argv[1:6]
    fn = {"compare": worker_compare, "crash": worker_crash,
          "raise": worker_raise, "late": worker_late,
          "chunks": worker_chunks, "pause": worker_pause,
          "absent": worker_absent, "mistakes": worker_mistakes,
          "pending": worker_pending}[kind]
    fn(int(rank), int(world), int(port), out)
