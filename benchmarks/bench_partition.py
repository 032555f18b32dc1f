"""Partitioner speed and the balance it finds on a heterogeneous model.

1. balance_by_cost time for L layers of random costs into K stages.
2. A model whose layers differ widely in cost (an embedding, MLP blocks of
   different widths, a large output head): the bottleneck, max stage time /
   mean stage time (1.00 is perfect), of balance_by_time's split against a
   uniform layer-count split. Stage times are measured afresh, each stage as
   one layer of profile_layers, not taken from the profile that chose the
   balance.

Run: .venv/bin/python benchmarks/bench_partition.py [--threads N]
(under a minute on 2 cores). One intra-op thread by default: on a shared
machine, more threads make layer timings swing by 2x between runs.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import List, Sequence

import torch
from torch import nn

from pipegear.balance import balance_by_cost, balance_by_time, profile_layers


def time_partitioner() -> None:
    print("## Partitioner speed\n")
    print("balance_by_cost on L random (log-normal) costs, median of 5 calls, "
          "ms:\n")
    print("| L | K=2 | K=8 | K=64 |")
    print("|--:|--:|--:|--:|")
    rng = random.Random(0)
    for layers in (100, 1000, 10000):
        costs = [rng.lognormvariate(0, 1) for _ in range(layers)]
        row = []
        for k in (2, 8, 64):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                balance_by_cost(k, costs)
                times.append(time.perf_counter() - start)
            row.append(f"{statistics.median(times) * 1e3:.2f}")
        print(f"| {layers} | " + " | ".join(row) + " |")
    print()


class Block(nn.Module):
    """A residual MLP block of hidden width `width` on tokens of `dim`."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, width)
        self.down = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def heterogeneous_model(dim: int = 256, vocab: int = 8192) -> nn.Sequential:
    widths = [128, 256, 512, 2048, 4096, 2048, 512, 256, 128, 1024, 64, 64]
    return nn.Sequential(
        nn.Embedding(vocab, dim),
        *[Block(dim, w) for w in widths],
        nn.LayerNorm(dim),
        nn.Linear(dim, vocab),
    )


def uniform(layers: int, k: int) -> List[int]:
    return [layers // k + (1 if i < layers % k else 0) for i in range(k)]


def stage_ratio(model: nn.Sequential, balance: Sequence[int], sample) -> float:
    stages, at = [], 0
    for n in balance:
        stages.append(nn.Sequential(*list(model)[at : at + n]))
        at += n
    profiles = profile_layers(nn.Sequential(*stages), sample, repeats=5)
    times = [p.forward_seconds + p.backward_seconds for p in profiles]
    return max(times) / statistics.mean(times)


def lower_bound(costs: Sequence[float], k: int) -> float:
    """No split beats its largest layer or an even share of the total."""
    mean = sum(costs) / k
    return max(max(costs), mean) / mean


def compare_on_model() -> None:
    torch.manual_seed(0)
    model = heterogeneous_model()
    sample = torch.randint(0, 8192, (8, 64))
    model(sample).sum().backward()  # the process's first run is slow
    model.zero_grad(set_to_none=True)
    print("## Balance found on a heterogeneous model\n")
    print(
        f"{len(model)} layers (an embedding, 12 residual MLP blocks of "
        "widths 64..4096, a layernorm, an 8192-way head), 8x64 tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s). "
        "Bottleneck = max stage time / mean stage time, each stage timed "
        "afresh (1.00 is perfect); bound = max(largest layer, total / K) / "
        "(total / K), the best any contiguous split can do on the profiled "
        "costs.\n")
    costs = [
        p.forward_seconds + p.backward_seconds
        for p in profile_layers(model, sample, repeats=5)
    ]
    print("| K | balance_by_time | uniform split | bound | balance |")
    print("|--:|--:|--:|--:|---|")
    for k in (2, 4, 8):
        balance = balance_by_time(k, model, sample, repeats=5)
        ours = stage_ratio(model, balance, sample)
        even = stage_ratio(model, uniform(len(model), k), sample)
        bound = lower_bound(costs, k)
        print(f"| {k} | {ours:.2f} | {even:.2f} | {bound:.2f} | {balance} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    start = time.perf_counter()
    time_partitioner()
    compare_on_model()
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)
