"""Activations each worker holds at its peak, per schedule (issue 21).

Every tensor autograd saves for a backward is counted while it is alive
(saved-tensor hooks, which the engine carries to its workers), per worker
thread; a worker's peak, divided by what one micro-batch's forward of one
stage saves, is the peak in micro-batches, next to what the schedule states
(`peak_activations`: forwards run whose backward, or W when split, has not
run yet). K=4 workers, M=8, 8 x (Linear(256, 256) + Tanh), batch 64,
checkpoint='never'; interleaved and interleaved-zb with v=2 (8 partitions,
two per worker).

With a split backward, B frees the part of a micro-batch's graph that only
the input gradient needed (here: nothing, a Linear's weight gradient needs
its input, which is the input gradient's too) and W frees the rest, so a
micro-batch between its B and W still counts; layers whose weight
gradient needs less than their input gradient would hold less.

Prints markdown. Run: .venv/bin/python benchmarks/bench_schedule_memory.py
"""
from __future__ import annotations

import threading
from collections import defaultdict

import torch
from torch import nn

import pipegear
from bench_schedules import SCHEDULES, virtual_stages
from bench_schedules import peaks as stated_peaks

K, M, BATCH, WIDTH, LAYERS = 4, 8, 64, 256, 8

_lock = threading.Lock()
_alive: dict[int, int] = defaultdict(int)
_peak: dict[int, int] = defaultdict(int)


_parameters: set[int] = set()  # storages of the weights: not activations


class Held:
    """A saved tensor, counted against the thread that saved it while it
    lives (weights, saved by every Linear, are not activations)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.tid = threading.get_ident()
        weight = t.untyped_storage().data_ptr() in _parameters
        self.size = 0 if weight else t.numel() * t.element_size()
        with _lock:
            _alive[self.tid] += self.size
            _peak[self.tid] = max(_peak[self.tid], _alive[self.tid])

    def __del__(self) -> None:
        with _lock:
            _alive[self.tid] -= self.size


def model() -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers)


def peaks(kind: str, m: int) -> list[int]:
    v = virtual_stages(kind)
    n = K * v
    pipe = pipegear.GPipe(model(), [2 * LAYERS // n] * n, chunks=m,
                          checkpoint="never", schedule=kind,
                          virtual_stages=v, worker_threads=1)
    _parameters.clear()
    _parameters.update(p.untyped_storage().data_ptr()
                       for p in pipe.parameters())
    x = torch.randn(BATCH, WIDTH)
    t = torch.randn(BATCH, WIDTH)
    pipe.step(x, t, nn.functional.mse_loss)  # warm-up: threads exist
    _alive.clear()
    _peak.clear()
    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        pipe.step(x, t, nn.functional.mse_loss)
    # Which thread is which worker is not recorded: the peaks, largest
    # first (the loss's own saved tensors count on the last worker).
    return sorted(_peak.values(), reverse=True)


def stated(kind: str) -> list[float]:
    return sorted(stated_peaks(kind, K, M), reverse=True)


def main() -> None:
    # One stage's activations for the whole batch: GPipe with M=1 holds it
    # (the smallest peak: the last worker holds the loss's too).
    unit = min(peaks("gpipe", 1))
    print(f"K={K} workers, M={M}, {LAYERS} x (Linear({WIDTH}, {WIDTH}) + "
          f"Tanh), batch {BATCH} (micro-batches of {BATCH // M} rows), "
          "checkpoint='never'. Peak saved-tensor bytes per worker, in "
          f"micro-batches of one stage ({unit / 2**10:.0f} KiB at M=1, weights "
          "excluded, "
          f"scaled by 1/{M} for micro-batches of {BATCH // M} rows), "
          "workers sorted by their peak. The last worker also holds what the "
          "loss saves (input and target, half a stage's worth here), so "
          "the largest measured peak is up to 1.5 times its stage's.\n")
    print("| schedule | measured peak per worker (micro-batches) | stated "
          "(peak_activations) |")
    print("|---|---|---|")
    per_micro_batch = unit / M
    for kind in SCHEDULES:
        measured = peaks(kind, M)
        print(f"| {kind} | "
              + ", ".join(f"{p / per_micro_batch:.1f}" for p in measured)
              + " | " + ", ".join(f"{s:g}" for s in stated(kind)) + " |")
    print()


if __name__ == "__main__":
    main()
