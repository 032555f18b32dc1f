"""Bubble and step time of every schedule on simulated devices (issue 21).

The simulated devices of bench_paper.py, with the backward split in two:
each layer waits F per micro-batch forward, B in the part of its backward
that computes the input gradient, W in the part that computes its weight's
gradient (a layer is two autograd nodes, one on the input's path, one on
the weight's, so a split backward runs them in different cells and a whole
backward runs both). Waiting uses no CPU, so K simulated devices run in
parallel on 2 cores. time.sleep overshoots (0.1 ms and more per call on a
loaded machine), which a device's kernel does not: a wait that directly
follows another on the same thread (the next layer of a cell) takes the
overshoot so far off its own, so that a cell lasts what its layers' times
add up to; what remains over the theory is the engine's own cost
(hand-offs between workers, Python, autograd, a late wake-up).

For K in {2, 4, 8}, M in {4, 8, 32} and F:B:W = 1:1:1 then 1:2:2: gpipe,
1f1b, zb-h1, zb-h2, interleaved and interleaved-zb (v = 2; the same 2K
layers cut into 2K
partitions, two per worker) on the same model. Per schedule: the measured
step time and bubble (the trace's idle share of worker-time) against the
schedule's theory: its cells replayed with those times, each starting when
its worker is free and its inputs are ready (what render_schedule does with
unit times). The activations each worker holds at its peak, in
micro-batches (a micro-batch between its B and its W is counted whole,
though B freed part of it).

Then the timeline of one step per schedule, K=4, M=8, F:B:W = 1:1:1, into
docs/img/schedule_<name>_k4_m8.png.

Prints markdown. Run: .venv/bin/python benchmarks/bench_schedules.py
(about 12 minutes).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

import pipegear
from pipegear import _C

ROOT = Path(__file__).resolve().parent.parent
# A stage's forward of one micro-batch (two layers of 10 ms): long enough
# that the engine's cost per cell (a few tenths of a millisecond on this
# machine) stays within a few percent of a cell of one layer.
UNIT_S = 0.020
SCHEDULES = ["gpipe", "1f1b", "zb-h1", "zb-h2", "interleaved",
             "interleaved-zb"]
V = 2  # virtual stages per worker of the interleaved schedules


def virtual_stages(kind: str) -> int:
    return V if kind in pipegear.gpipe.VIRTUAL_STAGE_SCHEDULES else 1


_device = threading.local()
GAP_S = 0.001  # a longer pause before a wait: the thread waited for work


def device_wait(seconds: float) -> None:
    """Waits `seconds` as a simulated device: see the module's docstring."""
    start = time.perf_counter()
    last_end, late = getattr(_device, "state", (-1.0, 0.0))
    if start - last_end > GAP_S:
        late = 0.0
    if seconds - late > 0:
        time.sleep(seconds - late)
    end = time.perf_counter()
    # How late this thread's waits end against their sum, never negative.
    _device.state = (end, max(0.0, late + (end - start) - seconds))


class InputPath(torch.autograd.Function):
    """The input's path through a layer: F forward, B backward."""

    @staticmethod
    def forward(ctx, x, f, b):
        ctx.b = b
        device_wait(f)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        device_wait(ctx.b)
        return g, None, None


class WeightPath(torch.autograd.Function):
    """The weight's path: nothing forward, W in the backward."""

    @staticmethod
    def forward(ctx, w, seconds):
        ctx.seconds = seconds
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        device_wait(ctx.seconds)
        return g, None


class SimulatedLayer(nn.Module):
    def __init__(self, f: float, b: float, w: float) -> None:
        super().__init__()
        self.f, self.b, self.w = f, b, w
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return InputPath.apply(x, self.f, self.b) + \
            WeightPath.apply(self.weight, self.w)


def theory(kind: str, k: int, m: int, costs: Dict[str, float]) -> Tuple[float, float]:
    """(makespan, bubble) of the schedule's cells replayed with `costs`
    (per stage of a K-stage cut; an interleaved chunk does 1/v of it)."""
    v = virtual_stages(kind)
    rows = _C.schedule_cells(kind, k, m, v)
    stages = k * v
    cost = {"forward": costs["F"], "backward": costs["B"] + costs["W"],
            "backward_input": costs["B"], "backward_weight": costs["W"]}
    end: Dict[Tuple[str, int, int], float] = {}
    free = [0.0] * k
    nxt = [0] * k
    remaining = sum(len(r) for r in rows)
    busy = 0.0
    while remaining:
        progressed = False
        for d in range(k):
            while nxt[d] < len(rows[d]):
                j, phase, chunk = rows[d][nxt[d]]
                s = chunk * k + d
                if phase == "forward":
                    dep = 0.0 if s == 0 else end.get(("F", s - 1, j))
                elif phase == "backward_weight":
                    dep = end.get(("B", s, j))
                else:
                    dep = (end.get(("F", s, j)) if s == stages - 1
                           else end.get(("B", s + 1, j)))
                if dep is None:
                    break
                start = max(free[d], dep)
                c = cost[phase] / v
                key = "F" if phase == "forward" else (
                    "W" if phase == "backward_weight" else "B")
                end[(key, s, j)] = start + c
                free[d] = start + c
                busy += c
                nxt[d] += 1
                remaining -= 1
                progressed = True
        assert progressed, "schedule deadlocks"
    span = max(free)
    return span, 1.0 - busy / (k * span)


def peaks(kind: str, k: int, m: int) -> List[float]:
    """Activations each worker holds at its peak, in micro-batches of a
    whole stage (the schedule's statement: peak_activations)."""
    v = virtual_stages(kind)
    return [p / v for p in pipegear.peak_activations(kind, k, m, v)]


def build(kind: str, k: int, m: int, costs: Dict[str, float]) -> pipegear.GPipe:
    # 2K layers, each half a stage's work: K stages of 2 layers, or, for
    # the interleaved schedules, 2K partitions of 1 layer, two per worker.
    layers = [SimulatedLayer(costs["F"] * UNIT_S / 2, costs["B"] * UNIT_S / 2,
                             costs["W"] * UNIT_S / 2) for _ in range(2 * k)]
    if virtual_stages(kind) > 1:
        return pipegear.GPipe(nn.Sequential(*layers), [1] * (2 * k), chunks=m,
                              checkpoint="never", schedule=kind,
                              virtual_stages=V)
    return pipegear.GPipe(nn.Sequential(*layers), [2] * k, chunks=m,
                          checkpoint="never", schedule=kind)


def measure(pipe: pipegear.GPipe, m: int, repeats: int) -> Tuple[float, float]:
    # The input asks for a gradient: stage 0's first layer has a B too.
    x = torch.ones(m, 1, requires_grad=True)
    t = torch.zeros(m, 1)
    loss = nn.functional.mse_loss
    pipe.step(x, t, loss)  # warm-up
    times, bubbles = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.step(x, t, loss)
        times.append(time.perf_counter() - start)
        bubbles.append(pipe.last_trace.bubble_fraction)
    i = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
    return times[i], bubbles[i]  # the median step (the upper one of two)


def table(costs: Dict[str, float], repeats: int) -> float:
    ratio = f"{costs['F']:g}:{costs['B']:g}:{costs['W']:g}"
    print(f"### F:B:W = {ratio}\n")
    print(f"A stage's forward of one micro-batch takes F = "
          f"{costs['F'] * UNIT_S * 1e3:.0f} ms; an unsplit backward B + W. "
          "Step: median of "
          f"{repeats} steps; bubble: the trace of that step. 'vs theory': "
          "measured step time / the schedule's replayed makespan. 'peak': "
          "activations held by the busiest worker at its peak, in "
          "micro-batches of a whole stage.\n")
    print("| K | M | schedule | step (ms) | theory (ms) | vs theory | "
          "bubble | bubble theory | step vs gpipe | step vs 1f1b | peak |")
    print("|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    worst = 0.0
    for k in (2, 4, 8):
        for m in (4, 8, 32):
            steps: Dict[str, float] = {}
            for kind in SCHEDULES:
                pipe = build(kind, k, m, costs)
                step, bubble = measure(pipe, m, repeats)
                del pipe
                span, bubble_theory = theory(kind, k, m, costs)
                span *= UNIT_S
                steps[kind] = step
                worst = max(worst, step / span)
                held = max(peaks(kind, k, m))
                print(f"| {k} | {m} | {kind} | {step * 1e3:.0f} | "
                      f"{span * 1e3:.0f} | {step / span:.3f} | "
                      f"{bubble:.1%} | {bubble_theory:.1%} | "
                      f"{step / steps['gpipe']:.2f} | "
                      f"{step / steps.get('1f1b', step):.2f} | "
                      f"{held:g} |")
    print(f"\nWorst measured / theory: {worst:.3f}.\n")
    return worst


def timelines() -> None:
    print("### Timelines, K=4, M=8, F:B:W = 1:1:1\n")
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    costs = {"F": 1.0, "B": 1.0, "W": 1.0}
    for kind in SCHEDULES:
        pipe = build(kind, 4, 8, costs)
        measure(pipe, 8, 1)
        path = img / f"schedule_{kind}_k4_m8.png"
        trace = pipe.last_trace
        span, bubble_theory = theory(kind, 4, 8, costs)
        trace.plot(str(path), title=(
            f"{kind}{' (v=2)' if virtual_stages(kind) > 1 else ''}, K=4, M=8, "
            f"F:B:W = 1:1:1: bubble {trace.bubble_fraction:.1%} "
            f"(theory {bubble_theory:.1%})"))
        print(f"![{kind}](img/{path.name})\n")


def main() -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("## bench_schedules\n")
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, pipegear "
          f"{pipegear.__version__}, Python {sys.version.split()[0]}, load "
          f"average {load:.2f} at start (the machine is shared: other "
          "agents' builds run meanwhile; sleeping layers need little CPU, "
          "but a late wake-up shows as a longer step)\n")
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    table({"F": 1.0, "B": 1.0, "W": 1.0}, repeats)
    table({"F": 1.0, "B": 2.0, "W": 2.0}, repeats)
    timelines()


if __name__ == "__main__":
    main()
