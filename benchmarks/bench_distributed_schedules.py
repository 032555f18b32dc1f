"""Every schedule across 2 processes: DistributedGPipe against
torch.distributed.pipelining on the same model and data, in one run
(issue 21).

    .venv/bin/python benchmarks/bench_distributed_schedules.py [--steps 10]

Two models, each split in 2 ranks (Gloo on loopback, 1 intra-op thread per
rank), batch 64, 8 micro-batches, no checkpointing, MSE loss:

- real: 8 x Linear(16, 16), the configuration where 1F1B cost more per cell
  than GPipe (issue 21: 98 vs 117 steps/s);
- sleep: 4 simulated layers (bench_schedules.py's: forward F, input-gradient
  B, weight-gradient W, each 2 ms, waiting without CPU).

pipegear runs gpipe, 1f1b, zb-h1, zb-h2 (one stage per rank), interleaved
and interleaved-zb (two stages per rank, the model cut in 4: rank r holds
stages r and r + 2); torch runs ScheduleGPipe, Schedule1F1B (one stage per rank),
and with two stages per rank ScheduleInterleaved1F1B,
ScheduleInterleavedZeroBubble (rank r holds stages r and r + 2) and
ScheduleZBVZeroBubble (the V: rank 0 holds stages 0 and 3). Steps of all
runners alternate, so that all see the same load; the table gives the
median steps/s and each pipegear schedule's ratio to the torch schedule of
the same family.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

BATCH, CHUNKS = 64, 8
SLEEP_S = 0.002
# pipegear's schedules and their stages per rank.
KINDS = {"gpipe": 1, "1f1b": 1, "zb-h1": 1, "zb-h2": 1, "interleaved": 2,
         "interleaved-zb": 2}


def simulated_layer():
    """bench_schedules' layer: F = B = W = SLEEP_S."""
    from bench_schedules import SimulatedLayer

    return SimulatedLayer(SLEEP_S, SLEEP_S, SLEEP_S)


def factories(model):
    def make(i):
        def f():
            torch.manual_seed(i)
            return nn.Linear(16, 16) if model == "real" else simulated_layer()
        return f
    return [make(i) for i in range(8 if model == "real" else 4)]


def worker(rank, world, port, steps):
    import datetime
    import torch.distributed as dist
    import pipegear
    from torch.distributed.pipelining import (
        PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    x = torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(0))
    t = torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(1))
    loss_fn = nn.functional.mse_loss
    first, last = rank == 0, rank == world - 1
    results = {}
    for model in ("real", "sleep"):
        layers = len(factories(model))
        runners = {}
        busy = {k: [] for k in KINDS}
        cells = {}
        for kind, v in KINDS.items():
            pipe = pipegear.DistributedGPipe(
                factories(model), [layers // (2 * v)] * (2 * v), chunks=CHUNKS,
                checkpoint="never", schedule=kind, virtual_stages=v)

            def ours(pipe=pipe, kind=kind):
                pipe.step(x if first else None, t if last else None, loss_fn)
                pipe.zero_grad(set_to_none=True)
                # This rank's cells: their time (waiting excluded) and count.
                events = pipe._pipeline.last_events
                busy[kind].append(sum(e[4] - e[3] for e in events) * 1e-9)
                cells[kind] = len(events)
            runners["pipegear " + kind] = ours

        def stage_of(index, count):
            per = layers // count
            part = nn.Sequential(*[f() for f in factories(model)[
                index * per:(index + 1) * per]])
            return PipelineStage(part, index, count, torch.device("cpu")), part

        def torch_runner(cls, indices, count):
            built = [stage_of(i, count) for i in indices]
            stages = [s for s, _ in built]
            parts = [p for _, p in built]
            sched = cls(stages if len(stages) > 1 else stages[0], CHUNKS,
                        loss_fn=loss_fn)
            holds_first = 0 in indices
            holds_last = count - 1 in indices

            def run():
                kwargs = {}
                if holds_last:
                    kwargs = dict(target=t, losses=[])
                if holds_first:
                    sched.step(x, **kwargs)
                else:
                    sched.step(**kwargs)
                for p in parts:
                    p.zero_grad(set_to_none=True)
            return run

        runners["torch ScheduleGPipe"] = torch_runner(ScheduleGPipe, [rank], 2)
        runners["torch Schedule1F1B"] = torch_runner(Schedule1F1B, [rank], 2)
        runners["torch ScheduleInterleaved1F1B"] = torch_runner(
            ScheduleInterleaved1F1B, [rank, rank + 2], 4)
        runners["torch ScheduleInterleavedZeroBubble"] = torch_runner(
            ScheduleInterleavedZeroBubble, [rank, rank + 2], 4)
        runners["torch ScheduleZBVZeroBubble"] = torch_runner(
            ScheduleZBVZeroBubble, [rank, 3 - rank], 4)
        times = {name: [] for name in runners}
        for i in range(steps + 2):
            for name, fn in runners.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        results[model] = {n: statistics.median(v) for n, v in times.items()}
        results[model + " cells"] = {
            k: [statistics.median(v[2:]), cells[k]] for k, v in busy.items()}
    print(f"RESULT{rank} " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


PAIRS = {"gpipe": "torch ScheduleGPipe", "1f1b": "torch Schedule1F1B",
         "zb-h1": "torch ScheduleZBVZeroBubble",
         "zb-h2": "torch ScheduleZBVZeroBubble",
         "interleaved": "torch ScheduleInterleaved1F1B",
         "interleaved-zb": "torch ScheduleInterleavedZeroBubble"}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from launch import run_ranks

    load = os.getloadavg()[0]
    outs = run_ranks(__file__, 2, [args.steps])
    per_rank = [json.loads(next(line for line in out.splitlines()
                                if line.startswith(f"RESULT{r} "))[8:])
                 for r, out in enumerate(outs)]
    results = per_rank[-1]
    print(f"2 processes, Gloo, 1 thread each, batch {BATCH}, {CHUNKS} "
          f"micro-batches, median of {args.steps} alternating steps; "
          f"{os.cpu_count()} logical CPUs shared with other work (load "
          f"average {load:.2f} at start): compare ratios, not absolute "
          "times.\n")
    for model, label in (("real", "8 x Linear(16, 16)"),
                         ("sleep", f"4 simulated layers, F = B = W = "
                                   f"{SLEEP_S * 1e3:.0f} ms")):
        r = results[model]
        print(f"#### {label}\n")
        print("| runner | steps/s | vs pipegear gpipe | pipegear / torch "
              "(same family) |")
        print("|---|--:|--:|--:|")
        for name, seconds in r.items():
            kind = name.split(" ", 1)[1]
            ratio = ""
            if name.startswith("pipegear") and kind in PAIRS:
                ratio = f"{r[PAIRS[kind]] / seconds:.2f}x vs {PAIRS[kind][6:]}"
            print(f"| {name} | {1 / seconds:.1f} | "
                  f"{r['pipegear gpipe'] / seconds:.2f} | {ratio} |")
        print()
        print("Where a pipegear step goes, per rank: its cells' own time "
              "(waiting for messages excluded) per cell, and the rest of the "
              "step (waiting, the step's header and agreement).\n")
        print("| schedule | " + " | ".join(
            f"rank {i}: µs per cell | rank {i}: rest of step (ms)"
            for i in range(2)) + " |")
        print("|---|" + "--:|--:|" * 2)
        for kind in KINDS:
            row = []
            for res in per_rank:
                cell_s, n = res[model + " cells"][kind]
                step_s = res[model]["pipegear " + kind]
                row += [f"{cell_s / n * 1e6:.0f}",
                        f"{(step_s - cell_s) * 1e3:.2f}"]
            print(f"| {kind} | " + " | ".join(row) + " |")
        print()
    print("Families: gpipe ~ ScheduleGPipe, 1f1b ~ Schedule1F1B, "
          "interleaved ~ ScheduleInterleaved1F1B, interleaved-zb ~ "
          "ScheduleInterleavedZeroBubble (both two stages per rank, rank r "
          "holding r and r + 2); pipegear's ZB-H1 and ZB-H2 keep one stage "
          "per rank, so they are put next to torch's ScheduleZBVZeroBubble, "
          "which needs two (the V). ratio > 1: pipegear is faster.")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, port, steps = map(int, sys.argv[2:6])
        worker(rank, world, port, steps)
    else:
        main()
