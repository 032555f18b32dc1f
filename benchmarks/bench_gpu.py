"""pipegear on one GPU: per-step overhead, memory of recomputation, and the
largest model that trains under a memory budget.

A bf16 stack of nn.TransformerEncoderLayer(d_model=1024, nhead=16,
batch_first=True), sequence 512, batch sized for a ~100 ms plain step.

1. step time (median after warm-up, cuda.synchronize around every step):
   the plain model vs pipegear K=1 (the engine's overhead; goal < 3 %) and
   K=2 with both stages on the same GPU, M in {1, 4, 8}; checkpoint='never'.
2. peak memory (torch.cuda.max_memory_allocated) of one step, K=2 M=8, for
   checkpoint never / except_last / always.
3. the largest number of layers that trains one step under
   torch.cuda.set_per_process_memory_fraction(budget), with and without
   recomputation (binary search; OOM caught, empty_cache between tries).

Prints markdown tables with the GPU and the torch version. Exits 0 with a
message without CUDA (benchmarks/run_all.py runs every bench_*.py). Sections
are skipped when PIPEGEAR_BENCH_BUDGET_S (default 220 s) runs out.

Run: PYTHONPATH=python python3 benchmarks/bench_gpu.py [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
from torch import nn

D_MODEL, NHEAD, SEQ, LAYERS = 1024, 16, 512, 24
DTYPE = torch.bfloat16
START = time.perf_counter()
BUDGET_S = float(os.environ.get("PIPEGEAR_BENCH_BUDGET_S", "220"))
LINES: list[str] = []


def out(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def elapsed() -> float:
    return time.perf_counter() - START


def time_left() -> float:
    return BUDGET_S - elapsed()


def stack(layers: int) -> nn.Sequential:
    return nn.Sequential(*[
        nn.TransformerEncoderLayer(D_MODEL, NHEAD, dim_feedforward=4 * D_MODEL,
                                   dropout=0.0, batch_first=True,
                                   device="cuda", dtype=DTYPE)
        for _ in range(layers)])


def batch(n: int) -> torch.Tensor:
    return torch.randn(n, SEQ, D_MODEL, device="cuda", dtype=DTYPE)


def train_step(fn, model, x):
    for p in model.parameters():
        p.grad = None
    fn(x).float().pow(2).mean().backward()


def median_step_ms(fn, model, x, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        train_step(fn, model, x)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(fn, model, x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e))


def cleanup() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def section_time(pipegear, model, n: int) -> None:
    out("## Step time (bf16, checkpoint='never', median of 10)")
    out()
    out(f"{LAYERS} layers, batch {n} x {SEQ} tokens")
    out()
    out("| configuration | step (ms) | vs plain |")
    out("|---|---:|---:|")
    x = batch(n)
    plain_ms = median_step_ms(model, model, x)
    out(f"| plain nn.Sequential | {plain_ms:.2f} | - |")
    configs = [(1, 1), (2, 1), (2, 4), (2, 8)]
    for k, m in configs:
        if time_left() < 30:
            out(f"| K={k} M={m} | skipped (time) | |")
            continue
        balance = [LAYERS] if k == 1 else [LAYERS // 2, LAYERS - LAYERS // 2]
        pipe = pipegear.GPipe(model, balance, devices=["cuda:0"] * k,
                              chunks=m, checkpoint="never")
        ms = median_step_ms(pipe, model, x)
        note = " (overhead; goal < 3 %)" if k == 1 else ""
        out(f"| pipegear K={k} M={m} (same GPU) | {ms:.2f} | "
            f"{(ms / plain_ms - 1) * 100:+.1f} %{note} |")
        del pipe
        cleanup()
    out()


def section_memory(pipegear, model, n: int) -> None:
    out("## Peak memory of one step (K=2 on one GPU, M=8)")
    out()
    out("| checkpoint | peak allocated (MiB) | step (ms) |")
    out("|---|---:|---:|")
    x = batch(n)
    train_step(model, model, x)  # the plain model, for reference
    cleanup()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_step(model, model, x)
    torch.cuda.synchronize()
    out(f"| plain nn.Sequential | "
        f"{torch.cuda.max_memory_allocated() / 2**20:.0f} | "
        f"{(time.perf_counter() - t0) * 1e3:.1f} |")
    cleanup()
    for mode in ("never", "except_last", "always"):
        if time_left() < 20:
            out(f"| {mode} | skipped (time) | |")
            continue
        pipe = pipegear.GPipe(model, [LAYERS // 2, LAYERS - LAYERS // 2],
                              devices=["cuda:0"] * 2, chunks=8,
                              checkpoint=mode)
        train_step(pipe, model, x)  # warm-up
        cleanup()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(pipe, model, x)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated() / 2**20
        out(f"| {mode} | {peak:.0f} | {ms:.1f} |")
        del pipe
        cleanup()
    out()


def fits(pipegear, layers: int, n: int, checkpoint: str) -> bool:
    model = pipe = x = None
    ok = False
    try:
        model = stack(layers)
        pipe = pipegear.GPipe(model, [layers], devices=["cuda:0"], chunks=8,
                              checkpoint=checkpoint)
        x = batch(n)
        train_step(pipe, model, x)
        torch.cuda.synchronize()
        ok = True
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
    del model, pipe, x
    cleanup()
    return ok


def section_capacity(pipegear, n: int, budget_gib: float) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, budget_gib * 2**30 / total)
    out(f"## Largest model that trains under {budget_gib:g} GiB "
        f"(set_per_process_memory_fraction({fraction:.3f}); K=1, M=8, "
        f"batch {n})")
    out()
    out("| checkpoint | max layers | tries | time (s) |")
    out("|---|---:|---:|---:|")
    cleanup()
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    try:
        for mode in ("never", "always"):
            if time_left() < 25:
                out(f"| {mode} | skipped (time) | | |")
                continue
            t0 = time.perf_counter()
            lo, hi, tries = 0, 1, 0
            # Grow until it fails, then bisect in (lo, hi).
            while hi <= 256 and time_left() > 10:
                tries += 1
                if not fits(pipegear, hi, n, mode):
                    break
                lo, hi = hi, hi * 2
            while hi - lo > 1 and time_left() > 10:
                mid = (lo + hi) // 2
                tries += 1
                if fits(pipegear, mid, n, mode):
                    lo = mid
                else:
                    hi = mid
            exact = "" if hi - lo <= 1 else f" (>= ; search cut at {hi})"
            out(f"| {mode} | {lo}{exact} | {tries} | "
                f"{time.perf_counter() - t0:.1f} |")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        cleanup()
    out()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", help="also write the tables here")
    parser.add_argument("--budget-gib", type=float, default=8.0,
                        help="memory budget of the capacity search")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device, nothing to measure (skipped)")
        return 0
    import pipegear

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    out("# pipegear GPU benchmark")
    out()
    out(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB")
    out(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"pipegear {getattr(pipegear, '__version__', '?')}")
    out(f"- model: {LAYERS} x TransformerEncoderLayer(d_model={D_MODEL}, "
        f"nhead={NHEAD}, ff={4 * D_MODEL}), seq {SEQ}, {DTYPE}")
    out()

    model = stack(LAYERS)
    # Size the batch for a ~100 ms plain step (a multiple of 8 for M=8).
    probe = median_step_ms(model, model, batch(8), warmup=2, iters=3)
    # At most 64: about 1 GiB of activations per layer and 16 sequences.
    n = int(max(8, min(64, round(8 * 100.0 / probe / 8) * 8)))
    out(f"- batch: {n} (plain step at batch 8: {probe:.1f} ms)")
    out()
    cleanup()

    def guarded(section, *section_args) -> None:
        # One section running out of memory must not cost the others.
        try:
            section(*section_args)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            out(f"_{section.__name__}: out of memory ({str(e)[:120]})_")
            out()
        cleanup()

    try:
        guarded(section_time, pipegear, model, n)
        guarded(section_memory, pipegear, model, n)
        del model
        cleanup()
        guarded(section_capacity, pipegear, n, args.budget_gib)
    finally:
        out(f"_total {elapsed():.0f} s_")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
