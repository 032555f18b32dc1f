"""GPipe's Table 2 and Figure 2 on this machine (arXiv 1811.06965).

1. Schedule efficiency by simulation: every layer stands for device compute
   by sleeping (forward t, backward 2t) without using the CPU, so K
   simulated devices run in parallel on 2 cores. Speedup of K stages over
   one stage holding all layers, same M, next to the ideal K*M/(M+K-1).
2. Real compute: K=2 CPU stages (one intra-op thread each) against the plain
   model on one thread, M in {1, 4, 32}, normalised like the paper's Table 2.
3. The timeline of one step for K=4, M=8 from real timestamps (Figure 2),
   saved as docs/img/timeline_k4_m8.png.

Prints markdown. Run: .venv/bin/python benchmarks/bench_paper.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import pipegear

ROOT = Path(__file__).resolve().parent.parent
FORWARD_S = 0.010  # simulated forward time of one layer and micro-batch (ms-scale,
# like a device kernel; much shorter waits measure the VM's wake-up latency)


class SleepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class SimulatedLayer(nn.Module):
    """Stands for a layer on its own device: waits, uses no CPU."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return SleepFn.apply(x * self.weight, self.seconds)


def step_time(pipe: pipegear.GPipe, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        pipe(x).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def simulation() -> None:
    print("## Schedule efficiency (simulated devices)\n")
    print(f"Each of K layers waits {FORWARD_S * 1e3:.0f} ms per micro-batch "
          f"forward and {2 * FORWARD_S * 1e3:.0f} ms backward. Speedup = "
          "time of one stage holding all K layers / time of K stages, same "
          "M (checkpoint='never').\n")
    print("| K | M | 1 stage (s) | K stages (s) | speedup | ideal "
          "K·M/(M+K-1) | % of ideal |")
    print("|---|---|---|---|---|---|---|")
    worst = 1.0
    for k in (2, 4, 8):
        for m in (1, 4, 32):
            layers = [SimulatedLayer(FORWARD_S) for _ in range(k)]
            x = torch.ones(m, 1)
            one = pipegear.GPipe(nn.Sequential(*layers), [k], chunks=m,
                                 checkpoint="never")
            t1 = step_time(one, x, 2)
            del one
            many = pipegear.GPipe(nn.Sequential(*layers), [1] * k, chunks=m,
                                  checkpoint="never")
            tk = step_time(many, x, 2)
            del many
            ideal = k * m / (m + k - 1)
            speedup = t1 / tk
            worst = min(worst, speedup / ideal)
            print(f"| {k} | {m} | {t1:.3f} | {tk:.3f} | {speedup:.2f} | "
                  f"{ideal:.2f} | {100 * speedup / ideal:.0f}% |")
    print(f"\nWorst case: {100 * worst:.0f}% of the ideal.\n")


def real_compute() -> None:
    print("## Real compute: K=2 CPU stages vs the plain model "
          "(paper Table 2 layout)\n")
    width, depth, batch = 1024, 8, 256
    torch.manual_seed(0)

    def model() -> nn.Sequential:
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers)

    x = torch.randn(batch, width)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plain = model()
    times = []
    for _ in range(4):
        start = time.perf_counter()
        plain(x).sum().backward()
        times.append(time.perf_counter() - start)
    t_plain = statistics.median(times[1:])
    torch.set_num_threads(threads)
    print(f"{depth} x (Linear({width}, {width}) + ReLU), batch {batch}, "
          f"float32; plain model on 1 thread: {t_plain * 1e3:.0f} ms per "
          "step. Each stage's worker has 1 intra-op thread; "
          "checkpoint='never'.\n")
    print("| K | M=1 | M=4 | M=32 |")
    print("|---|---|---|---|")
    row = []
    for m in (1, 4, 32):
        pipe = pipegear.GPipe(model(), [depth, depth], chunks=m,
                              checkpoint="never", worker_threads=1)
        t = step_time(pipe, x, 3)
        row.append(f"{t_plain / t:.2f}")
    print(f"| 1 (plain) | 1 | 1 | 1 |")
    print(f"| 2 | {' | '.join(row)} |")
    print("\nNormalised throughput = plain step time / pipelined step time "
          "(the paper: 1 / 1.7 / 1.8 for Transformer-48 at K=2).\n")


def timeline() -> None:
    print("## Timeline of one step, K=4, M=8 (Figure 2)\n")
    layers = [SimulatedLayer(FORWARD_S) for _ in range(4)]
    pipe = pipegear.GPipe(nn.Sequential(*layers), [1, 1, 1, 1], chunks=8,
                          checkpoint="except_last")
    pipe(torch.ones(8, 1)).sum().backward()
    pipe(torch.ones(8, 1)).sum().backward()
    trace = pipe.last_trace
    out = ROOT / "docs" / "img"
    os.makedirs(out, exist_ok=True)
    trace.plot(out / "timeline_k4_m8.png",
               title="pipegear, K=4, M=8, checkpoint=except_last")
    print(f"Measured bubble fraction {trace.bubble_fraction:.2f}, GPipe's "
          f"(K-1)/(M+K-1) = {trace.theoretical_bubble_fraction:.2f}.\n")
    print("![timeline](img/timeline_k4_m8.png)\n")


def main() -> int:
    print(f"Machine: {os.cpu_count()} cores, torch {torch.__version__}.\n")
    simulation()
    real_compute()
    timeline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
