"""DistributedGPipe vs torch.distributed.pipelining (PipelineStage +
ScheduleGPipe): 2 processes, Gloo on loopback, 1 intra-op thread each.

    .venv/bin/python benchmarks/bench_distributed.py [--steps 10] [--chunks 4 8 16]

Both run the same MLP split in two (same initial weights), the same batch
and the same MSE loss, without checkpointing; the steps of the two
alternate, so that both see the same load. The markdown table gives the
median time per training step (forward + backward, no optimizer) and the
speed-up torch time / pipegear time. The launcher starts both ranks as
subprocesses of this same file.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

WIDTH = int(os.environ.get("PIPEGEAR_BENCH_WIDTH", 512))
BATCH = int(os.environ.get("PIPEGEAR_BENCH_BATCH", 256))
LAYERS = 8


def factories():
    def make(i):
        def f():
            torch.manual_seed(i)
            return nn.Linear(WIDTH, WIDTH) if i % 2 == 0 else nn.ReLU()
        return f
    return [make(i) for i in range(LAYERS)]


def worker(rank, world, port, steps, chunks_list):
    import datetime
    import torch.distributed as dist
    import pipegear
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    balance = [LAYERS // world] * world
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(0))
    t = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))
    loss_fn = nn.functional.mse_loss
    rows = []
    for chunks in chunks_list:
        pipe = pipegear.DistributedGPipe(factories(), balance, chunks=chunks,
                                         checkpoint="never")
        offset = sum(balance[:rank])
        part = nn.Sequential(*[f() for f in factories()[offset:offset + balance[rank]]])
        stage = PipelineStage(part, rank, world, torch.device("cpu"))
        sched = ScheduleGPipe(stage, chunks, loss_fn=loss_fn)

        def ours():
            return pipe.step(x if rank == 0 else None,
                             t if rank == world - 1 else None, loss_fn)

        def theirs():
            losses = []
            if rank == 0:
                sched.step(x)
            elif rank == world - 1:
                sched.step(target=t, losses=losses)
            else:
                sched.step()
            return sum(losses) / len(losses) if losses else None

        # Alternate the two step by step, so that both see the same noise
        # (other processes on the machine).
        times = {"ours": [], "theirs": []}
        check = {}
        for i in range(steps + 2):
            for name, fn, module in (("ours", ours, pipe), ("theirs", theirs, part)):
                dist.barrier()
                t0 = time.perf_counter()
                loss = fn()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
                if i == 0 and loss is not None:
                    check[name] = float(loss)
                module.zero_grad(set_to_none=True)
        rows.append({"chunks": chunks,
                     "pipegear_ms": statistics.median(times["ours"]) * 1e3,
                     "torch_ms": statistics.median(times["theirs"]) * 1e3,
                     "loss_diff": abs(check["ours"] - check["theirs"])
                     if len(check) == 2 else None})
        if rank == world - 1:
            print("CHECK " + json.dumps(rows[-1]), flush=True)
    if rank == world - 1:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--batch", type=int, default=BATCH)
    args = parser.parse_args()
    from launch import run_ranks

    outs = run_ranks(__file__, 2, [args.steps, *args.chunks],
                     dict(PIPEGEAR_BENCH_WIDTH=str(args.width),
                          PIPEGEAR_BENCH_BATCH=str(args.batch)))
    rows = json.loads(next(line for line in outs[-1].splitlines()
                           if line.startswith("RESULT "))[7:])
    print(f"2 processes, Gloo, 1 thread each; MLP {LAYERS} layers x "
          f"{args.width}, batch {args.batch}; median of {args.steps} steps; "
          f"{os.cpu_count()} logical CPUs")
    print()
    print("| chunks | pipegear ms/step | torch.pipelining ms/step | speed-up |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['chunks']} | {r['pipegear_ms']:.1f} | {r['torch_ms']:.1f} "
              f"| {r['torch_ms'] / r['pipegear_ms']:.2f}x |")
    print()
    print("speed-up = torch.pipelining time / pipegear time (> 1: pipegear "
          "is faster); same initial weights, first-step losses differ by at "
          f"most {max(r['loss_diff'] or 0 for r in rows):.1e}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, port, steps = map(int, sys.argv[2:6])
        worker(rank, world, port, steps, [int(c) for c in sys.argv[6:]])
    else:
        main()
