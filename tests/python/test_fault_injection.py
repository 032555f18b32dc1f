"""Fault injection: a layer raises at a random (stage, micro-batch, phase,
checkpoint mode, schedule, face), hundreds of times, on pipelines that are
created once. Every fault must reach the caller within seconds, leave no
thread behind, keep the memory flat, and the next correct step must give
exactly the result of a clean run.

Also the concurrency hygiene of pipelines: destruction joins the workers
(idle, right after a failure, with a module-style graph still alive), two
pipelines side by side, one pipeline called from two threads at once.

Run with -s to see the counts.
"""
from __future__ import annotations

import copy
import faulthandler
import gc
import os
import random
import threading
import time

import pytest
import torch
from torch import nn

import pipegear

W = 4          # features (plus one tag column holding the sample index)
K = 3          # stages
N = 7          # samples per batch
M = 3          # chunks: micro-batches of 3, 2, 2 samples
BALANCE = [2, 2, 3]
DEADLINE = 5.0  # seconds a failing call may take before it counts as a hang
FAULTS = 420
CPU = ["cpu"] * K  # the CPU even where CUDA is: threads are counted


def bounds(n: int = N, m: int = M) -> list[int]:
    """First sample of each micro-batch, as pipegear splits (larger first)."""
    parts = min(n, m)
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def micro_batch_of(sample: int, n: int = N, m: int = M) -> int:
    b = bounds(n, m)
    return next(j for j in range(len(b) - 1) if b[j] <= sample < b[j + 1])


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def wait_threads(target: int, timeout: float = 5.0) -> int:
    """Thread count, waiting a little for exiting threads to be reaped."""
    end = time.monotonic() + timeout
    n = threads()
    while n > target and time.monotonic() < end:
        time.sleep(0.01)
        gc.collect()
        n = threads()
    return n


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Injected(Exception):
    """The injected fault; must reach the caller with this type."""


class Plan:
    """Where the next fault fires: stage, micro-batch, phase."""
    stage = -1
    micro_batch = -1
    phase = ""
    fired = 0

    @classmethod
    def arm(cls, stage: int, micro_batch: int, phase: str) -> None:
        cls.stage, cls.micro_batch, cls.phase = stage, micro_batch, phase

    @classmethod
    def disarm(cls) -> None:
        cls.stage = -1


class RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, where):
        ctx.where = where
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        Plan.fired += 1
        raise Injected(f"backward fault at {ctx.where}")


class Tagged(nn.Module):
    """Linear + tanh on the features; the tag column passes unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(W, W, dtype=torch.float64)

    def forward(self, x):
        return torch.cat([torch.tanh(self.lin(x[:, :-1])), x[:, -1:]], 1)


class Untag(nn.Module):
    def forward(self, x):
        return x[:, :-1]


class Fault(nn.Module):
    """Raises when the plan names this stage and the micro-batch it runs."""

    def __init__(self, stage: int) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x):
        if Plan.stage != self.stage:
            return x
        j = micro_batch_of(int(x[0, -1].item()))
        if j != Plan.micro_batch:
            return x
        where = f"stage {self.stage}, micro-batch {j}"
        recomputing = pipegear.is_recomputing()
        if Plan.phase == "forward" and not recomputing:
            Plan.fired += 1
            raise Injected(f"forward fault at {where}")
        if Plan.phase == "recompute" and recomputing:
            Plan.fired += 1
            raise Injected(f"recompute fault at {where}")
        if Plan.phase == "backward":
            return RaiseInBackward.apply(x, where)
        return x


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for s in range(K):
        layers += [Tagged(), Fault(s)]
    layers.append(Untag())
    return nn.Sequential(*layers)


def batch(n: int = N, offset: int = 0):
    g = torch.Generator().manual_seed(n + offset)
    x = torch.randn(n, W, generator=g, dtype=torch.float64)
    tag = torch.arange(offset, offset + n, dtype=torch.float64)[:, None]
    t = torch.randn(n, W, generator=g, dtype=torch.float64)
    return torch.cat([x, tag], 1), t


def mse(y, t):
    return ((y - t) ** 2).mean()


def run(pipe: pipegear.GPipe, face: str, x, t):
    """One call of `face`; returns (value, parameter grads, input grad)."""
    for p in pipe.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    if face == "module":
        y = pipe(x)
        mse(y, t).backward()
        value = y.detach()
    else:
        value = pipe.step(x, t, mse)
    return (value, [p.grad.clone() for p in pipe.parameters()],
            x.grad.clone())


def same(a, b) -> bool:
    return (torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
            and all(torch.equal(p, q) for p, q in zip(a[1], b[1])))


MODES = ("always", "except_last", "never")
SCHEDULES = ("gpipe", "1f1b")


@pytest.fixture(autouse=True)
def watchdog():
    """A hang kills the process with every thread's stack, not the CI job."""
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_fault_injection_loop():
    Plan.disarm()
    x, t = batch()
    plain = model()
    ref_loss = mse(plain(x), t)
    pipes = {(mode, sched): pipegear.GPipe(model(), BALANCE, chunks=M, devices=CPU,
                                           checkpoint=mode, schedule=sched)
             for mode in MODES for sched in SCHEDULES}
    faces = {key: (("module", "step") if key[1] == "gpipe" else ("step",))
             for key in pipes}
    # Clean results, and their agreement with the plain model.
    refs = {}
    for key, pipe in pipes.items():
        for face in faces[key]:
            refs[key, face] = run(pipe, face, x, t)
            if face == "step":
                torch.testing.assert_close(refs[key, face][0], ref_loss)

    rng = random.Random(1234)
    counts: dict[str, int] = {}
    raised = hangs = mismatches = 0
    slowest = 0.0
    baseline_threads = rss_start = None
    for i in range(FAULTS):
        if i == 20:  # warmed up: allocator pools and lazy inits are done
            gc.collect()
            baseline_threads, rss_start = threads(), rss_mb()
        key = rng.choice(list(pipes))
        mode, sched = key
        face = rng.choice(faces[key])
        stage = rng.randrange(K)
        j = rng.randrange(M)
        phases = ["forward", "backward"]
        if mode == "always" or (mode == "except_last" and j < M - 1):
            phases.append("recompute")
        phase = rng.choice(phases)
        Plan.arm(stage, j, phase)
        fired = Plan.fired
        start = time.monotonic()
        try:
            run(pipes[key], face, x, t)
        except Injected as e:
            raised += 1
            assert f"stage {stage}, micro-batch {j}" in str(e)
            if phase == "forward":
                assert any(f"stage {stage}" in n
                           for n in getattr(e, "__notes__", []))
        else:
            pytest.fail(f"no error for {key} {face} {stage} {j} {phase}")
        finally:
            Plan.disarm()
        elapsed = time.monotonic() - start
        slowest = max(slowest, elapsed)
        hangs += elapsed > DEADLINE
        assert Plan.fired == fired + 1, "the fault fired once"
        label = f"{phase}/{face}/{mode}/{sched}"
        counts[label] = counts.get(label, 0) + 1
        # The next correct call gives exactly the clean result.
        if not same(run(pipes[key], face, x, t), refs[key, face]):
            mismatches += 1

    gc.collect()
    leaked = wait_threads(baseline_threads) - baseline_threads
    rss_growth = rss_mb() - rss_start
    by_phase = {p: sum(v for k, v in counts.items() if k.startswith(p))
                for p in ("forward", "backward", "recompute")}
    by_face = {f: sum(v for k, v in counts.items() if f"/{f}/" in k)
               for f in ("module", "step")}
    print(f"\nfault injection: faults injected={raised} ({by_phase}, "
          f"{by_face}, {len(counts)} combinations), hangs={hangs}, "
          f"leaked threads={leaked}, mismatches after a fault={mismatches}, "
          f"slowest failing call={slowest:.3f}s, RSS growth="
          f"{rss_growth:+.1f} MB")
    assert raised == FAULTS >= 300
    assert hangs == 0
    assert leaked == 0
    assert mismatches == 0
    assert rss_growth < 64
    # every (phase, face) pair was exercised
    assert all(v > 0 for v in by_phase.values())
    assert all(v > 0 for v in by_face.values())


# ---- destruction joins the workers --------------------------------------


def _settled_baseline() -> int:
    gc.collect()
    # One pipeline created and destroyed first: lazy one-time threads
    # (intra-op pools of the caller) exist from here on.
    p = pipegear.GPipe(model(), BALANCE, chunks=M, devices=CPU)
    x, t = batch()
    run(p, "step", x, t)
    del p
    gc.collect()
    time.sleep(0.05)  # exiting threads leave /proc/self/task
    return threads()


def _fail_once(pipe, face: str) -> None:
    x, t = batch()
    Plan.arm(1, 1, "backward")
    try:
        run(pipe, face, x, t)
    except Injected:
        pass
    finally:
        Plan.disarm()


def test_create_and_destroy_pipelines_repeatedly_leaks_no_thread():
    base = _settled_baseline()
    peak = 0
    x, t = batch()
    for i in range(40):
        pipe = pipegear.GPipe(model(), BALANCE, chunks=M, devices=CPU,
                              checkpoint=MODES[i % 3],
                              schedule=SCHEDULES[i % 2])
        peak = max(peak, threads() - base)
        if i % 4 == 0:
            _fail_once(pipe, "step")
        else:
            run(pipe, "step", x, t)
        del pipe
    gc.collect()
    assert peak == K  # one worker per stage, no more
    assert wait_threads(base) == base


def test_destroying_an_idle_pipeline_joins_its_workers():
    base = _settled_baseline()
    pipe = pipegear.GPipe(model(), BALANCE, chunks=M, devices=CPU)
    assert threads() == base + K
    del pipe
    gc.collect()
    assert wait_threads(base) == base


@pytest.mark.parametrize("face", ["module", "step"])
def test_destroying_a_pipeline_right_after_a_failure_joins_its_workers(face):
    base = _settled_baseline()
    pipe = pipegear.GPipe(model(), BALANCE, chunks=M, devices=CPU)
    _fail_once(pipe, face)
    del pipe
    gc.collect()
    assert wait_threads(base) == base


def test_a_live_module_style_graph_keeps_the_workers_until_it_is_freed():
    base = _settled_baseline()
    pipe = pipegear.GPipe(model(), BALANCE, chunks=M, devices=CPU)
    x, t = batch()
    y = pipe(x.requires_grad_(True))
    del pipe
    gc.collect()
    # The graph holds the engine: its backward still works...
    mse(y, t).backward()
    assert x.grad is not None
    # ...and freeing it joins the workers.
    del y
    gc.collect()
    assert wait_threads(base) == base


# ---- several callers ----------------------------------------------------


def _in_threads(n: int, work) -> list:
    errors: list = []

    def body(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for th in ts:
        th.start()
    for th in ts:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in ts), "a caller hangs"
    return errors


def test_two_pipelines_in_one_process_run_at_once():
    x, t = batch()
    pipes = [pipegear.GPipe(model(seed), BALANCE, chunks=M, devices=CPU)
             for seed in (1, 2)]
    refs = [run(p, "step", x, t) for p in pipes]
    results: list = [[], []]

    def work(i: int) -> None:
        for _ in range(25):
            results[i].append(run(pipes[i], "step", x, t))

    assert not _in_threads(2, work)
    for i in (0, 1):
        assert all(same(r, refs[i]) for r in results[i])
    assert not torch.equal(refs[0][0], refs[1][0])  # they are different


class Log(nn.Module):
    """Records (caller, micro-batch) of every first forward of its stage."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list = []
        self.lock = threading.Lock()

    def forward(self, x):
        if not pipegear.is_recomputing():
            sample = int(x[0, -1].item())
            with self.lock:
                self.entries.append((sample // 1000, sample % 1000))
        return x


@pytest.mark.parametrize("face", ["module", "step"])
def test_one_pipeline_from_two_threads_serialises_the_calls(face):
    """Both callers get the right result; the passes do not interleave (a
    stage sees all micro-batches of one call, then all of the other's) and
    the gradients of both calls accumulate."""
    base = model()
    log_first, log_last = Log(), Log()
    layers = [log_first, *base[:-1], log_last, base[-1]]
    pipe = pipegear.GPipe(nn.Sequential(*layers), [3, 2, 4], chunks=M,
                          devices=CPU)
    inputs = [batch(offset=1000 * i) for i in (0, 1)]
    refs = [run(pipe, face, *inputs[i]) for i in (0, 1)]
    log_first.entries.clear()
    log_last.entries.clear()
    calls = 15
    outputs: list = [[], []]

    def work(i: int) -> None:
        x, t = inputs[i]
        for _ in range(calls):
            xi = x.clone().requires_grad_(True)
            if face == "module":
                y = pipe(xi)
                mse(y, t).backward()
                outputs[i].append((y.detach(), xi.grad))
            else:
                outputs[i].append((pipe.step(xi, t, mse), xi.grad))

    for p in pipe.parameters():
        p.grad = None
    assert not _in_threads(2, work)
    for i in (0, 1):
        for value, xgrad in outputs[i]:
            assert torch.equal(value, refs[i][0])
            assert torch.equal(xgrad, refs[i][2])
    # Every pass is one block of M micro-batches of one caller, in order.
    for log in (log_first, log_last):
        entries = log.entries
        assert len(entries) == 2 * calls * M
        for b in range(0, len(entries), M):
            block = entries[b:b + M]
            assert len({caller for caller, _ in block}) == 1, block
            # the micro-batches of 3, 2, 2 samples start at 0, 3 and 5
            assert [first for _, first in block] == [0, 3, 5], block
    # Gradients of all calls accumulated.
    expected = [calls * (g0 + g1) for g0, g1 in zip(refs[0][1], refs[1][1])]
    for p, g in zip(pipe.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
