"""Trains a small MLP with a 2-stage pipeline on CPU: the main demo.

Profiles each layer, picks the balance, prints the schedule, trains on a
synthetic regression task and saves the timeline of the last step.

    .venv/bin/python examples/python/train_mlp.py [--steps 30] [--out out/]
"""
import argparse
import os

import torch
from torch import nn

import pipegear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--schedule", default="gpipe",
                        choices=pipegear.gpipe.SCHEDULES)
    parser.add_argument("--virtual-stages", type=int, default=1,
                        help="partitions per worker ('interleaved', "
                        "'interleaved-zb')")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 1),
    )
    # A fixed random teacher gives a learnable regression target.
    teacher = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    for p in teacher.parameters():
        p.requires_grad_(False)

    sample = torch.randn(64, 16)
    balance = pipegear.balance_by_time(args.stages * args.virtual_stages,
                                       model, sample, repeats=3)
    print(f"balance (layers per stage, profiled): {balance}")

    pipe = pipegear.GPipe(model, balance, chunks=args.chunks,
                          checkpoint="except_last", schedule=args.schedule,
                          virtual_stages=args.virtual_stages)
    print(pipe)
    print("schedule:")
    print(pipe.schedule_table())

    optimizer = torch.optim.Adam(pipe.parameters(), lr=3e-3)
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 16)
        y = teacher(x)
        optimizer.zero_grad()
        loss = pipe.step(x, y, nn.functional.mse_loss)
        optimizer.step()
        if step == 1 or step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.5f}")

    trace = pipe.last_trace
    print(f"last step: {len(trace.events)} cells, bubble fraction "
          f"{trace.bubble_fraction:.2f} measured, "
          f"{trace.theoretical_bubble_fraction:.2f} in theory")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "timeline.png")
    trace.plot(path, title="pipegear: one training step")
    print(f"timeline saved to {path}")


if __name__ == "__main__":
    main()
