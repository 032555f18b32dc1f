"""Engine overhead per cell, and real pipelining speedup on CPU (issue 4).

1. Overhead: tiny layers (one Linear(1, 1) per stage, a batch of M rows, so
   M one-row micro-batches), K in {1, 2, 4}, M in {1, 8, 32}, step style,
   checkpoint='never'. The same layers run without the engine, as the same M
   micro-batches one after another (forward, loss, backward each: gradient
   accumulation), do the same work; the engine's overhead per cell is
   (pipe - plain) / (2 K M). The plain model on the whole batch at once is
   shown for reference.
2. Speedup: K=2 stages of 4 x (Linear(1024, 1024) + ReLU) each (8 blocks in
   all), batch 256, float32, forward + backward (step style). Each stage
   worker has worker_threads=1; the plain model runs on the caller with
   torch.set_num_threads(1). Speedup = plain / pipe, against GPipe's ideal
   K M / (M + K - 1). Two more baselines split the gap: the plain model on
   the same M micro-batches one after another (what micro-batching itself
   costs), and the two stages' cells run on two threads at once with no
   dependencies (what two cores give); see the table's notes. The same
   again with Linear(512, 512) and batch 1024 (same FLOPs), where smaller
   micro-batches cost far less on CPU.

Run: .venv/bin/python benchmarks/bench_engine.py  (about 2 minutes on 2 cores)
Run it on an otherwise idle machine: other processes steal the cores the
stage workers need.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
import threading
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

import pipegear


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"pipegear {pipegear.__version__}, Python {sys.version.split()[0]}, "
            f"load average {load:.2f} at start")


class OtherLoad:
    """Share of the machine's CPU time used by other processes in a block.

    /proc/stat's busy time minus this process's: a benchmark whose cores
    are taken by someone else's compile is not measuring pipegear.
    """

    @staticmethod
    def _busy_and_own() -> Tuple[int, int, int]:
        try:
            with open("/proc/stat") as f:
                v = [int(a) for a in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
            return sum(v) - v[3] - v[4], sum(v), int(own[11]) + int(own[12])
        except (OSError, IndexError, ValueError):
            return 0, 0, 0

    def __enter__(self) -> "OtherLoad":
        self.start = self._busy_and_own()
        return self

    def __exit__(self, *exc) -> None:
        busy, total, own = (b - a for a, b in zip(self.start,
                                                  self._busy_and_own()))
        self.share = max(0.0, (busy - own) / total) if total else float("nan")


def rounds(fns: Dict[str, Callable[[], None]], calls: Dict[str, int],
           count: int) -> Dict[str, float]:
    """Median seconds per call of each fn, the fns interleaved in rounds.

    Interleaving makes a slow spell of the (shared, virtual) machine hit
    every variant alike instead of whichever ran then.
    """
    for fn in fns.values():
        fn()  # warm-up
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(count):
        for name, fn in fns.items():
            n = calls.get(name, 1)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def quiet_rounds(fns: Dict[str, Callable[[], None]], calls: Dict[str, int],
                 count: int, retries: int = 2,
                 limit: float = 0.10) -> Tuple[Dict[str, float], float]:
    """rounds(), measured again (up to `retries` times, after a pause) while
    other processes took more than `limit` of the machine's CPU time."""
    for attempt in range(retries + 1):
        with OtherLoad() as load:
            r = rounds(fns, calls, count)
        if load.share <= limit or attempt == retries:
            return r, load.share
        time.sleep(10)
    raise AssertionError("unreachable")


def calls_for(fn: Callable[[], None], target_s: float) -> int:
    fn()
    start = time.perf_counter()
    fn()
    return max(1, int(target_s / max(time.perf_counter() - start, 1e-7)))


def plain_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    F.mse_loss(model(x), t).backward()


def chunked_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                 m: int) -> None:
    """The same micro-batches as the pipeline, one after another."""
    n = x.shape[0]
    for xc, tc in zip(x.chunk(m), t.chunk(m)):
        (F.mse_loss(model(xc), tc) * (xc.shape[0] / n)).backward()


# -- 1. overhead ----------------------------------------------------------
def overhead() -> None:
    print("## Engine overhead per cell (tiny layers)\n")
    print("One Linear(1, 1) per stage, batch of M rows (M one-row "
          "micro-batches), step style, checkpoint='never', worker_threads=1. "
          "'plain, chunked' runs the same M micro-batches through the same "
          "layers one after another on the caller (forward, loss, backward "
          "each); overhead per cell = (pipe - plain, chunked) / (2 K M). "
          "That includes the per-step cost (waking the workers, collecting "
          "the trace); the marginal column leaves it out: the growth of "
          "(pipe - plain, chunked) from M=1, per added cell. Median of 9 "
          "interleaved rounds; 'other load' is other processes' share of the "
          "CPU during the row (measured again, up to twice, above 10%).\n")
    print("| K | M | cells | pipe step (µs) | plain, chunked (µs) | "
          "plain, whole batch (µs) | pipe per cell (µs) | "
          "overhead per cell (µs) | marginal overhead per cell (µs) | "
          "other load |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    with OtherLoad() as load:
        for k in (1, 2, 4):
            at_m1 = 0.0
            for m in (1, 8, 32):
                torch.manual_seed(0)
                model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(k)])
                plain = copy.deepcopy(model)
                pipe = pipegear.GPipe(model, balance=[1] * k, chunks=m,
                                      checkpoint="never", worker_threads=1)
                x, t = torch.randn(m, 1), torch.randn(m, 1)
                fns = {
                    "pipe": lambda: pipe.step(x, t, F.mse_loss),
                    "chunked": lambda: chunked_step(plain, x, t, m),
                    "whole": lambda: plain_step(plain, x, t),
                }
                calls = {name: calls_for(fn, 0.03) for name, fn in fns.items()}
                r, share = quiet_rounds(fns, calls, 9)
                cells = 2 * k * m
                delta = r["pipe"] - r["chunked"]
                if m == 1:
                    at_m1 = delta
                    marginal = "–"
                else:
                    marginal = (f"{(delta - at_m1) / (cells - 2 * k) * 1e6:.1f}")
                print(f"| {k} | {m} | {cells} | {r['pipe'] * 1e6:.0f} | "
                      f"{r['chunked'] * 1e6:.0f} | {r['whole'] * 1e6:.0f} | "
                      f"{r['pipe'] / cells * 1e6:.1f} | "
                      f"{delta / cells * 1e6:.1f} | {marginal} | "
                      f"{share:.0%} |")
                del pipe
    print(f"\nOther processes used {load.share:.0%} of the machine's CPU "
          f"time meanwhile.\n")


# -- 2. speedup -----------------------------------------------------------
def heavy_model(blocks: int = 8, width: int = 1024) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def stage_work(stage: nn.Module, x: torch.Tensor, m: int) -> None:
    """One stage's M micro-batches, forward and backward, no dependencies."""
    for xc in x.chunk(m):
        y = stage(xc)
        y.backward(torch.ones_like(y))


def unsynchronised(stages: List[nn.Module], inputs: List[torch.Tensor],
                   m: int) -> None:
    """Each stage's work on its own thread at once, nobody waiting on anyone:
    what the cores can do with the two stages' cells in parallel."""

    def run(stage: nn.Module, x: torch.Tensor) -> None:
        torch.set_num_threads(1)
        stage_work(stage, x, m)

    threads = [threading.Thread(target=run, args=(s, x))
               for s, x in zip(stages, inputs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def speedup(width: int, batch: int, note: str = "") -> None:
    k, count = 2, 5
    print(f"## CPU pipelining speedup: Linear({width}, {width}), batch "
          f"{batch}\n")
    if note:
        print(note + "\n")
    print(f"8 x (Linear({width}, {width}) + ReLU), batch {batch}, float32, "
          f"K={k} stages of 4 blocks, worker_threads=1 per stage; plain "
          f"model on the caller with torch.set_num_threads(1). Forward + "
          f"backward step time, median of {count} interleaved rounds. "
          f"speedup = plain / pipe; ideal = K M / (M + K - 1).\n")
    print("Where the time goes (same in every table): 'chunked' = the plain model on the same M "
          "micro-batches one after another (1 thread), so plain / chunked is "
          "what smaller GEMMs and M-fold gradient accumulation cost; "
          "'unsync' = each stage's M micro-batches on its own thread at the "
          "same time with no dependencies between them, so chunked / unsync "
          "is what two cores give two independent streams of this work "
          "(at most 2), and unsync / pipe is what the pipeline's "
          "dependencies, bubble and engine cost on top (1.00: nothing; the "
          "fill and drain can even beat it, as one stage alone then has the "
          "memory bandwidth to itself). speedup = (plain / chunked) x "
          "(chunked / unsync) x (unsync / pipe). Bubble: measured in the "
          "last step's trace, and GPipe's (K-1)/(M+K-1).\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = heavy_model(width=width)
        plain = copy.deepcopy(model)
        stages = [plain[:8], plain[8:]]
        x, t = torch.randn(batch, width), torch.randn(batch, width)
        h = plain[:8](x).detach()  # stage 1's input
        print("| M | plain (ms) | pipe (ms) | speedup | ideal | % of ideal | "
              "chunked (ms) | unsync (ms) | plain / chunked | "
              "chunked / unsync | unsync / pipe | bubble (measured) | "
              "bubble (theory) | other load |")
        print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        with OtherLoad() as load:
            for m in (1, 2, 4, 8, 16, 32):
                pipe = pipegear.GPipe(copy.deepcopy(model), balance=[8, 8],
                                      chunks=m, checkpoint="never",
                                      worker_threads=1)
                r, share = quiet_rounds({
                    "plain": lambda: plain_step(plain, x, t),
                    "pipe": lambda: pipe.step(x, t, F.mse_loss),
                    "chunked": lambda: chunked_step(plain, x, t, m),
                    "unsync": lambda: unsynchronised(stages, [x, h], m),
                }, {}, count)
                trace = pipe.last_trace
                ideal = k * m / (m + k - 1)
                sp = r["plain"] / r["pipe"]
                print(f"| {m} | {r['plain'] * 1e3:.1f} | "
                      f"{r['pipe'] * 1e3:.1f} | {sp:.2f} | {ideal:.2f} | "
                      f"{sp / ideal:.0%} | {r['chunked'] * 1e3:.1f} | "
                      f"{r['unsync'] * 1e3:.1f} | "
                      f"{r['plain'] / r['chunked']:.2f} | "
                      f"{r['chunked'] / r['unsync']:.2f} | "
                      f"{r['unsync'] / r['pipe']:.2f} | "
                      f"{trace.bubble_fraction:.1%} | "
                      f"{trace.theoretical_bubble_fraction:.1%} | "
                      f"{share:.0%} |")
                del pipe
        print(f"\nOther processes used {load.share:.0%} of the machine's CPU "
              f"time meanwhile ('other load': during each row's last try; a row "
              f"is measured again, up to twice, while it is above 10%, and "
              f"one still above it is not trustworthy).")
    finally:
        torch.set_num_threads(threads)
    print()


def main() -> None:
    print(f"# bench_engine\n\n{machine_line()}\n")
    overhead()
    speedup(1024, 256)
    speedup(512, 1024, note=(
        "The same FLOPs with 4x narrower layers and 4x more rows: a "
        "micro-batch still has 1024 / M rows, and the 8 MiB of weights (16 "
        "with their gradients) stay in cache, so micro-batches stay "
        "compute-bound; this shows the engine where micro-batching itself is "
        "cheap."))


if __name__ == "__main__":
    main()
