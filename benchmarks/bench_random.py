"""What random streams of their own cost the cells (docs/engine.md,
"Randomness").

Two tables, each measured side by side in one run (variants interleaved in
rounds, medians):

1. K=2 CPU stages, 8 blocks of Linear + ReLU + Dropout against the same
   model with nn.Identity for Dropout: the pipelining speedup over the plain
   model with randomness, as a share of the speedup without it (goal: at
   least 90%).
2. The mechanism per cell: one stage of tiny layers drawing once per layer
   (F.dropout of one element) against the same layers drawing nothing, in
   the pipeline and in the plain model; what the pipeline adds per drawing
   layer and cell beyond what the draw costs anyway.

    .venv/bin/python benchmarks/bench_random.py
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import calls_for, machine_line, plain_step, quiet_rounds  # noqa: E402

import pipegear  # noqa: E402


def blocks(width: int, dropout: bool, n: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(n):
        layers += [nn.Linear(width, width), nn.ReLU(),
                   nn.Dropout(0.1) if dropout else nn.Identity()]
    return nn.Sequential(*layers)


def speedups(width: int, batch: int) -> None:
    print(f"## Pipelining speedup with and without dropout, K=2 CPU stages\n")
    print(f"8 x (Linear({width}, {width}) + ReLU + Dropout(0.1) or "
          f"Identity), batch {batch}, float32, step style with MSE, "
          "checkpoint 'except_last'; plain = the whole model on the caller "
          f"({torch.get_num_threads()} intra-op threads), pipe = 2 stages of "
          "1 thread each. Speedup = plain / pipe; the last column is the "
          "speedup with dropout as a share of the one without.\n")
    print("| M | plain, no dropout (ms) | pipe, no dropout (ms) | speedup | "
          "plain, dropout (ms) | pipe, dropout (ms) | speedup | share |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    x = torch.randn(batch, width)
    t = torch.randn(batch, width)
    for m in (1, 4, 8):
        fns = {}
        for drop in (False, True):
            model = blocks(width, drop)
            pipe = pipegear.GPipe(blocks(width, drop), [12, 12],
                                  devices=["cpu", "cpu"], chunks=m,
                                  worker_threads=1)
            fns[f"plain{drop}"] = (lambda mm=model: plain_step(mm, x, t))
            fns[f"pipe{drop}"] = (lambda p=pipe: p.step(x, t, F.mse_loss))
        r, _ = quiet_rounds(fns, {}, 9)
        s0 = r["plainFalse"] / r["pipeFalse"]
        s1 = r["plainTrue"] / r["pipeTrue"]
        print(f"| {m} | {r['plainFalse'] * 1e3:.1f} | {r['pipeFalse'] * 1e3:.1f} "
              f"| {s0:.2f} | {r['plainTrue'] * 1e3:.1f} | "
              f"{r['pipeTrue'] * 1e3:.1f} | {s1:.2f} | {s1 / s0:.0%} |")
    print()


class Draw(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, self.training)


class Keep(nn.Module):
    def forward(self, x):
        return x * 1.0


def per_cell(layers: int = 8, m: int = 16) -> None:
    print("## The mechanism per drawing layer and cell\n")
    print(f"One stage of {layers} layers, each F.dropout of its input "
          f"(draws) or x * 1.0 (draws nothing), batch of {m} one-element "
          f"rows in {m} micro-batches, no gradient (forward cells only). "
          "Plain: the same layers on the same micro-batches, one after "
          "another, on the caller. Added per drawing layer and cell = "
          "((pipe draws - pipe keeps) - (plain draws - plain keeps)) / "
          f"({layers} x {m}): the interception of the random op and the "
          "cell's generator for that layer (created at its first draw).\n")
    x = torch.rand(m, 1)
    fns: Dict[str, object] = {}
    for name, cls in (("draws", Draw), ("keeps", Keep)):
        model = nn.Sequential(*[cls() for _ in range(layers)])
        pipe = pipegear.GPipe(nn.Sequential(*[cls() for _ in range(layers)]),
                              [layers], devices=["cpu"], chunks=m,
                              worker_threads=1)

        def plain(mm=model):
            with torch.no_grad():
                for xc in x.split(1):
                    mm(xc)

        def piped(p=pipe):
            with torch.no_grad():
                p(x)

        fns[f"plain {name}"] = plain
        fns[f"pipe {name}"] = piped
    calls = {k: calls_for(f, 0.05) for k, f in fns.items()}
    r, share = quiet_rounds(fns, calls, 15)
    print("| variant | µs per step | µs per cell |")
    print("|---|--:|--:|")
    for k, v in r.items():
        print(f"| {k} | {v * 1e6:.1f} | {v * 1e6 / m:.2f} |")
    added = ((r["pipe draws"] - r["pipe keeps"]) -
             (r["plain draws"] - r["plain keeps"])) / (layers * m)
    print(f"\nAdded per drawing layer and cell: **{added * 1e6:.2f} µs** "
          f"(other processes used {share:.0%} of the CPU meanwhile).\n")


def main() -> None:
    print(f"# bench_random\n\n{machine_line()}\n")
    speedups(512, 1024)
    per_cell()


if __name__ == "__main__":
    main()
