"""pipegear against torchgpipe 0.0.7 and the plain model, on CPU, 2 stages.

torchgpipe is an optional dependency of this benchmark only; install it
without letting pip resolve torch:

    .venv/bin/pip install --no-deps torchgpipe==0.0.7

torchgpipe 0.0.7 runs unmodified on torch 2.x CPU builds (checked on
2.13.0+cpu), so no shim is applied: it imports no private torch API that
was removed, and its stream helpers (torchgpipe/stream.py) fall back to a
CPU "stream" for non-CUDA devices. The one CUDA assumption is the default
``devices``: ``range(torch.cuda.device_count())``, empty on a CPU build,
which raises ``IndexError: too few devices to hold given partitions``; pass
``devices=['cpu', 'cpu']`` explicitly. Note that its worker threads are
keyed by the normalised device (torchgpipe/worker.py, spawn_workers), so
all CPU partitions share ONE worker thread, and its backward runs in
autograd's CPU thread: on CPU it never overlaps stages.

Everything runs at torch.set_num_threads(1) (plain model, torchgpipe's
threads, and pipegear's stage workers with worker_threads=1).

1. Overhead per cell: K=2 stages of one nn.Linear(1, 1) each, a batch of M
   rows, chunks=M (one-row micro-batches), checkpoint='never', forward +
   backward (module style ``pipe(x).sum().backward()`` for both; pipegear
   step style too). per cell = step / (2 K M). Goal: pipegear's at most a
   tenth of torchgpipe's.
2. Time per step, balanced MLP 8 x (Linear(1024, 1024) + ReLU), balance
   [8, 8], batch 256, and 8 x Linear(512, 512), batch 1024 (same FLOPs,
   cheap micro-batches), chunks in {1, 4, 8, 32}: plain (1 thread), pipegear
   (worker_threads=1), torchgpipe, forward + backward, module style.

The variants of one row take turns (block by block, or step by step), so a
drift in the machine's load hits them alike; medians are reported.

Run: .venv/bin/python benchmarks/bench_torchgpipe.py  (about 1-2 minutes)
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.nn import functional as F

import pipegear

try:
    import torchgpipe
except ImportError:  # pragma: no cover - optional
    torchgpipe = None

Fn = Callable[[], None]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def parallel_capacity() -> float:
    """Throughput of two threads each running a 1-thread GEMM loop, over
    one thread's (2.0 on two free cores, ~1.0 on effectively one)."""
    a = torch.randn(512, 512)

    def work() -> None:
        for _ in range(40):
            a @ a

    work()
    t0 = time.perf_counter()
    work()
    one = time.perf_counter() - t0
    th = threading.Thread(target=work)
    t0 = time.perf_counter()
    th.start()
    work()
    th.join()
    two = time.perf_counter() - t0
    return 2 * one / two


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    tg = torchgpipe.__version__ if torchgpipe is not None else "not installed"
    return (f"Machine: {os.cpu_count()} vCPUs ({platform.machine()}, "
            f"{cpu_model()}), load average {load:.2f} at start; "
            f"measured parallel capacity {parallel_capacity():.2f}x "
            f"(two concurrent 1-thread GEMM loops vs one; 2.00x = two free "
            f"cores). torch {torch.__version__} at 1 intra-op thread, "
            f"pipegear {pipegear.__version__}, torchgpipe {tg}, Python "
            f"{sys.version.split()[0]}.")


def make_tg(model: nn.Sequential, balance: List[int], chunks: int):
    return torchgpipe.GPipe(model, balance=balance,
                            devices=["cpu"] * len(balance), chunks=chunks,
                            checkpoint="never")


def make_pg(model: nn.Sequential, balance: List[int], chunks: int):
    return pipegear.GPipe(model, balance=balance, chunks=chunks,
                          checkpoint="never", worker_threads=1)


def module_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x), t).backward()


def chunked_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                 m: int) -> None:
    """The pipeline's M micro-batches one after another, no engine."""
    model.zero_grad(set_to_none=True)
    n = x.shape[0]
    for xc, tc in zip(x.chunk(m), t.chunk(m)):
        (F.mse_loss(model(xc), tc) * (xc.shape[0] / n)).backward()


def check_same_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4)
                            for m in (nn.Linear(16, 16), nn.ReLU())])
    x, t = torch.randn(32, 16), torch.randn(32, 16)
    ref = copy.deepcopy(model)
    module_step(ref, x, t)
    pipes = {"pipegear": make_pg(copy.deepcopy(model), [4, 4], 4)}
    if torchgpipe is not None:
        pipes["torchgpipe"] = make_tg(copy.deepcopy(model), [4, 4], 4)
    for name, pipe in pipes.items():
        module_step(pipe, x, t)
        for (n, a), b in zip(ref.named_parameters(), pipe.parameters()):
            if not torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6):
                raise SystemExit(f"{name}: gradient of {n} differs")
    print(f"Gradient check: {', '.join(pipes)} match the plain model.\n")


def interleaved_blocks(fns: Dict[str, Fn], block_s: float,
                       rounds: int) -> Dict[str, float]:
    """Median over rounds of the mean call time in a block of ~block_s,
    the fns taking turns block by block."""
    sizes = {}
    for name, fn in fns.items():
        for _ in range(5):
            fn()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        sizes[name] = max(1, int(block_s / max((time.perf_counter() - t0)
                                               / 5, 1e-7)))
    means: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = sizes[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            means[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(v) for name, v in means.items()}


def interleaved_steps(fns: Dict[str, Fn], rounds: int,
                      warmup: int = 2) -> Dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def overhead() -> None:
    k = 2
    print("## 1. Overhead per cell (K=2 stages of nn.Linear(1, 1))\n")
    print("Batch of M rows, chunks=M (one-row micro-batches), "
          "checkpoint='never', forward + backward. Module style "
          "`pipe(x).sum().backward()` for both; pipegear step style "
          "`pipe.step(x, t, F.mse_loss)` beside it. per cell = step / "
          "(2 K M). 'no engine': the plain model run on the same M one-row "
          "micro-batches one after another on the caller (the compute "
          "floor; its / cell is what the cells cost without any engine). "
          "Variants take turns block by block; median of 9 blocks of "
          "~0.1 s.\n")
    print("| K | M | cells | no engine step | pipegear step | pipegear step "
          "style | torchgpipe step | no engine / cell | pipegear / cell | "
          "pipegear step style / cell | torchgpipe / cell | pipegear / "
          "torchgpipe | pipegear / torchgpipe, engine only |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for m in (8, 32):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1))
        x, t = torch.randn(m, 1), torch.randn(m, 1)
        cells = 2 * k * m
        pg = make_pg(copy.deepcopy(model), [1, 1], m)
        plain = copy.deepcopy(model)
        fns: Dict[str, Fn] = {
            "plain": lambda: [plain(xc).sum().backward()
                              for xc in x.chunk(m)],
            "pg": lambda: pg(x).sum().backward(),
            "pgs": lambda: pg.step(x, t, F.mse_loss),
        }
        tg = None
        if torchgpipe is not None:
            tg = make_tg(copy.deepcopy(model), [1, 1], m)
            fns["tg"] = lambda: tg(x).sum().backward()
        r = interleaved_blocks(fns, 0.1, 9)
        del pg, tg

        def us(name: str, per: int = 1) -> str:
            return f"{r[name] / per * 1e6:.1f} µs" if name in r else "n/a"

        rat = (f"{r['pg'] / r['tg']:.3f} (1/{r['tg'] / r['pg']:.1f})"
               if "tg" in r else "n/a")
        eng = (f"{(r['pg'] - r['plain']) / (r['tg'] - r['plain']):.3f}"
               if "tg" in r else "n/a")
        print(f"| {k} | {m} | {cells} | {us('plain')} | {us('pg')} | "
              f"{us('pgs')} | {us('tg')} | {us('plain', cells)} | "
              f"{us('pg', cells)} | {us('pgs', cells)} | "
              f"{us('tg', cells)} | {rat} | {eng} |")
    print()


def heavy(width: int, batch: int, rounds: int = 5) -> None:
    print(f"## 2. Time per step, balanced MLP of width {width}, batch "
          f"{batch}, 2 stages\n")
    if width < 1024:
        print("The same FLOPs as the 1024-wide model with 4x more rows: "
              "micro-batches stay large enough for efficient GEMMs, so "
              "micro-batching itself is cheap here.\n")
    print(f"8 x (Linear({width}, {width}) + ReLU), batch {batch}, float32, "
          "balance [8, 8], checkpoint='never', forward + backward, module "
          "style `F.mse_loss(pipe(x), t).backward()`. plain: the model on "
          "the caller, 1 thread; pipegear: worker_threads=1; torchgpipe: "
          "devices=['cpu', 'cpu']; chunked: the plain model on the same M "
          "micro-batches one after another, no engine (the cost of the "
          "smaller GEMMs alone). Variants take turns step by step; median "
          f"of {rounds} steps after 2 warm-up steps. GPipe's ideal over "
          "plain on 2 free cores: 2M / (M + 1).\n")
    print("| chunks | plain | chunked | pipegear | torchgpipe | "
          "plain / pipegear | plain / torchgpipe | torchgpipe / pipegear | "
          "chunked / pipegear | chunked / torchgpipe | ideal (2 cores) |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    torch.manual_seed(0)
    layers: List[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers)
    x, t = torch.randn(batch, width), torch.randn(batch, width)
    plain = copy.deepcopy(model)
    for m in (1, 4, 8, 32):
        pg = make_pg(copy.deepcopy(model), [8, 8], m)
        fns: Dict[str, Fn] = {
            "plain": lambda: module_step(plain, x, t),
            "chunked": lambda: chunked_step(plain, x, t, m),
            "pg": lambda: module_step(pg, x, t),
        }
        tg = None
        if torchgpipe is not None:
            tg = make_tg(copy.deepcopy(model), [8, 8], m)
            fns["tg"] = lambda: module_step(tg, x, t)
        r = interleaved_steps(fns, rounds)
        del pg, tg

        def ms(name: str) -> str:
            return f"{r[name] * 1e3:.1f} ms" if name in r else "n/a"

        def ratio(a: str, b: str) -> str:
            return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "n/a"

        print(f"| {m} | {ms('plain')} | {ms('chunked')} | {ms('pg')} | "
              f"{ms('tg')} | {ratio('plain', 'pg')} | {ratio('plain', 'tg')} "
              f"| {ratio('tg', 'pg')} | {ratio('chunked', 'pg')} | "
              f"{ratio('chunked', 'tg')} | {2 * m / (m + 1):.2f}x |")
    print()


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"# bench_torchgpipe\n\n{machine_line()}\n")
    if torchgpipe is None:
        print("torchgpipe is not installed (.venv/bin/pip install --no-deps "
              "torchgpipe==0.0.7); its columns read n/a.\n")
    check_same_gradients()
    overhead()
    heavy(width=1024, batch=256)
    heavy(width=512, batch=1024)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Total {time.perf_counter() - start:.0f} s; load average "
          f"{load:.2f} at the end.")


if __name__ == "__main__":
    main()
