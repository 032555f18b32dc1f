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
   K M / (M + K - 1). A second baseline, the plain model on the same M
   micro-batches one after another, separates what the engine costs from
   what smaller GEMMs and M-fold gradient accumulation cost: "engine
   efficiency" = (chunked / pipe) / ideal.

Run: .venv/bin/python benchmarks/bench_engine.py  (about 1 minute on 2 cores)
Run it on an otherwise idle machine: other processes steal the cores the
stage workers need.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from typing import Callable, List

import torch
from torch import nn
from torch.nn import functional as F

import pipegear


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"pipegear {pipegear.__version__}, Python {sys.version.split()[0]}, "
            f"load average {load:.2f} at start")


def blocks_timing(fn: Callable[[], None], target_s: float, blocks: int) -> float:
    """Median over `blocks` blocks of the mean time of one call, in seconds."""
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-7)
    n = max(1, int(target_s / one))
    means = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        means.append((time.perf_counter() - start) / n)
    return statistics.median(means)


def median_time(fn: Callable[[], None], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
          "layers one after another on the caller; overhead per cell = "
          "(pipe - plain, chunked) / (2 K M). Median of 7 blocks.\n")
    print("| K | M | cells | pipe step (µs) | plain, chunked (µs) | "
          "plain, whole batch (µs) | pipe per cell (µs) | "
          "overhead per cell (µs) |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for k in (1, 2, 4):
        for m in (1, 8, 32):
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(k)])
            plain = copy.deepcopy(model)
            pipe = pipegear.GPipe(model, balance=[1] * k, chunks=m,
                                  checkpoint="never", worker_threads=1)
            x, t = torch.randn(m, 1), torch.randn(m, 1)
            cells = 2 * k * m
            t_pipe = blocks_timing(
                lambda: pipe.step(x, t, F.mse_loss), 0.08, 7)
            t_chunk = blocks_timing(
                lambda: chunked_step(plain, x, t, m), 0.08, 7)
            t_whole = blocks_timing(lambda: plain_step(plain, x, t), 0.05, 7)
            print(f"| {k} | {m} | {cells} | {t_pipe * 1e6:.0f} | "
                  f"{t_chunk * 1e6:.0f} | {t_whole * 1e6:.0f} | "
                  f"{t_pipe / cells * 1e6:.1f} | "
                  f"{(t_pipe - t_chunk) / cells * 1e6:.1f} |")
            del pipe
    print()


# -- 2. speedup -----------------------------------------------------------
def heavy_model(blocks: int = 8, width: int = 1024) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def speedup() -> None:
    k, batch, width, repeats = 2, 256, 1024, 5
    print("## CPU pipelining speedup (compute-heavy, balanced)\n")
    print(f"8 x (Linear({width}, {width}) + ReLU), batch {batch}, float32, "
          f"K={k} stages of 4 blocks, worker_threads=1 per stage; plain "
          f"model on the caller with torch.set_num_threads(1). Forward + "
          f"backward step time, median of {repeats} steps. speedup = plain / "
          f"pipe; ideal = K M / (M + K - 1). 'chunked' = plain model on the "
          f"same M micro-batches one after another (1 thread); engine "
          f"efficiency = (chunked / pipe) / ideal. Bubble: measured from the "
          f"last step's trace, and GPipe's (K-1)/(M+K-1).\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = heavy_model(width=width)
        plain = copy.deepcopy(model)
        x, t = torch.randn(batch, width), torch.randn(batch, width)
        t_plain = median_time(lambda: plain_step(plain, x, t), repeats)
        print(f"plain model, 1 thread: {t_plain * 1e3:.1f} ms per step\n")
        print("| M | pipe (ms) | speedup | ideal | % of ideal | "
              "chunked (ms) | engine efficiency | bubble (measured) | "
              "bubble (theory) |")
        print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for m in (1, 2, 4, 8, 16, 32):
            pipe = pipegear.GPipe(copy.deepcopy(model), balance=[8, 8],
                                  chunks=m, checkpoint="never",
                                  worker_threads=1)
            t_pipe = median_time(lambda: pipe.step(x, t, F.mse_loss), repeats)
            trace = pipe.last_trace
            t_chunk = median_time(lambda: chunked_step(plain, x, t, m),
                                  repeats, warmup=1)
            ideal = k * m / (m + k - 1)
            sp = t_plain / t_pipe
            eff = (t_chunk / t_pipe) / ideal
            print(f"| {m} | {t_pipe * 1e3:.1f} | {sp:.2f} | {ideal:.2f} | "
                  f"{sp / ideal:.0%} | {t_chunk * 1e3:.1f} | {eff:.0%} | "
                  f"{trace.bubble_fraction:.1%} | "
                  f"{trace.theoretical_bubble_fraction:.1%} |")
            del pipe
    finally:
        torch.set_num_threads(threads)
    print()


def main() -> None:
    print(f"# bench_engine\n\n{machine_line()}\n")
    overhead()
    speedup()


if __name__ == "__main__":
    main()
