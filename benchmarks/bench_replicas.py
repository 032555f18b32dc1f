"""Replicas of a pipeline (K=2 stages x R=2 replicas, 4 processes, Gloo on
loopback, 1 intra-op thread each): the gradient sums over the replicas
started after each stage's last backward cell (overlapped with the rest of
the drain) against started after the step, and against no sums at all.

    .venv/bin/python benchmarks/bench_replicas.py [--steps 20] [--png out.png]

Two models, both with the same parameters per stage:
- *sleep*: each stage's layers sleep in forward and backward (a fixed cost
  per cell, independent of the machine's load) and hold a large parameter
  whose gradient the replicas sum;
- *real*: Linear layers.
For each, the three modes alternate step by step (same load for all). The
table gives the median step time (the slowest rank's, from a barrier to
the return of ``step``), the time of the sums alone (no overlap, the
difference to "none"), and the fraction of it the overlap hides:
(after - overlap) / (after - none). ``--png`` draws one overlapped step of
the sleep model: every rank's cells and its buckets' sums.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

K, R = 2, 2


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, fwd, bwd, grad):
        ctx.bwd, ctx.grad = bwd, grad
        time.sleep(fwd)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd)
        # A gradient made once: the cell costs its sleep, little CPU.
        return g, ctx.grad, None, None, None


class SleepLayer(nn.Module):
    """Sleeps `fwd` / `bwd` seconds per micro-batch; holds `size` floats
    whose gradient is a constant."""

    def __init__(self, size, fwd, bwd):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(size))
        self.fwd, self.bwd = fwd, bwd
        self.grad = torch.full((size,), 1e-3)

    def forward(self, x):
        return _Sleep.apply(x, self.w, self.fwd, self.bwd, self.grad)


def model(kind, args):
    if kind == "sleep":
        # 2 layers per stage, 2 x 1M floats (8 MB) of gradient per stage.
        return [lambda: SleepLayer(args.sleep_floats, 0.010, 0.020)
                for _ in range(2 * K)]
    width = args.width
    layers = []
    for i in range(2 * K):
        def make(i=i):
            torch.manual_seed(i)
            return nn.Sequential(nn.Linear(width, width), nn.Tanh())
        layers.append(make)
    return layers


def worker(rank, world, port, args):
    import datetime
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    import pipegear
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (R, K), mesh_dim_names=("dp", "pp"))
    pp, dp = mesh.get_group("pp"), mesh.get_group("dp")
    results = {}
    timeline = {}
    for kind in ("sleep", "real"):
        layers = model(kind, args)
        pipes = {
            "overlap": pipegear.DistributedGPipe(
                layers, [2] * K, chunks=args.chunks, mesh=mesh, timeout=60.0,
                bucket_cap_mb=args.bucket_mb),
            "after": pipegear.DistributedGPipe(
                layers, [2] * K, chunks=args.chunks, mesh=mesh, timeout=60.0,
                bucket_cap_mb=args.bucket_mb, overlap=False),
            "none": pipegear.DistributedGPipe(
                layers, [2] * K, chunks=args.chunks, process_group=pp,
                timeout=60.0),  # independent pipelines: no sums at all
        }
        width = 8 if kind == "sleep" else args.width
        x = torch.randn(args.batch, width)
        t = torch.randn(args.batch, width)
        times = {m: [] for m in pipes}
        reductions = {m: [] for m in pipes}
        for step in range(args.steps + 2):  # 2 warm-up steps
            for mode, pipe in pipes.items():
                pipe.zero_grad()
                dist.barrier()
                start = time.monotonic_ns()
                pipe.step(x if pipe.is_first else None,
                          t if pipe.is_last else None,
                          nn.functional.mse_loss)
                took = torch.tensor([time.monotonic_ns() - start],
                                    dtype=torch.float64)
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                if step >= 2:
                    times[mode].append(took.item() * 1e-6)
                    sums = pipe.last_reductions()
                    if sums:
                        reductions[mode].append(
                            (max(e for _, _, e in sums)
                             - min(s for _, s, _ in sums)) * 1e-6)
                if mode == "overlap" and step == args.steps + 1:
                    timeline[kind] = dict(cells=pipe.last_events(),
                                          sums=pipe.last_reductions(),
                                          coords=pipe.coordinates)
        results[kind] = dict(
            times={m: statistics.median(v) for m, v in times.items()},
            sums={m: statistics.median(v) if v else 0.0
                  for m, v in reductions.items()})
    everything = [None] * world
    dist.all_gather_object(everything, timeline)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(dict(results=results, timelines=everything), f)
    dist.barrier()
    dist.destroy_process_group()


def plot(timelines, path):
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    rows = sorted(timelines, key=lambda t: (t["coords"][1], t["coords"][0]))
    origin = min(c[3] for t in rows for c in t["cells"])
    fig = Figure(figsize=(12, 0.7 * len(rows) + 1.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for y, t in enumerate(rows):
        for j, phase, recompute, s, e in t["cells"]:
            color = "#4c72b0" if phase == "F" else "#dd8452"
            ax.barh(y, (e - s) * 1e-6, left=(s - origin) * 1e-6, height=0.5,
                    color=color, edgecolor="black", linewidth=0.5,
                    hatch="//" if recompute else None)
            ax.text((s + e) / 2 * 1e-6 - origin * 1e-6, y, str(j),
                    ha="center", va="center", fontsize=7, color="white")
        for b, s, e in t["sums"]:
            ax.barh(y + 0.35, (e - s) * 1e-6, left=(s - origin) * 1e-6,
                    height=0.2, color="#55a868", edgecolor="black",
                    linewidth=0.5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank dp={t['coords'][0]} pp={t['coords'][1]}"
                        for t in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms from the first cell")
    ax.set_title("one step, K=2 x R=2, sleep layers: cells and the "
                 "replicas' gradient sums (green, one bar per bucket)")
    ax.legend(handles=[Patch(color="#4c72b0", label="forward"),
                       Patch(color="#dd8452", label="backward"),
                       Patch(color="#55a868", label="gradient sum")],
              loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--sleep-floats", type=int, default=1 << 20)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--png", default=os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
        "img", "replicas_timeline.png"))
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args)
        return
    import tempfile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "replicas.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [a for a in sys.argv[1:]]
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker",
                               str(r), str(K * R), str(port), "--out", out],
                              env=env) for r in range(K * R)]
    codes = [p.wait(timeout=1200) for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: {codes}")
    with open(out) as f:
        data = json.load(f)
    print(f"K={K} stages x R={R} replicas, chunks={args.chunks}, "
          f"batch {args.batch} per replica, buckets of {args.bucket_mb} MB, "
          f"{args.steps} steps per mode, median of the slowest rank\n")
    print("| model | none (ms) | sums after the step (ms) | overlapped (ms) "
          "| sums alone (ms) | hidden |")
    print("|---|---|---|---|---|---|")
    for kind, r in data["results"].items():
        t = r["times"]
        cost = t["after"] - t["none"]
        hidden = (t["after"] - t["overlap"]) / cost if cost > 0 else float("nan")
        print(f"| {kind} | {t['none']:.1f} | {t['after']:.1f} | "
              f"{t['overlap']:.1f} | {cost:.1f} | {hidden:.0%} |")
    # From the last overlapped step: how much of each rank's sums ran while
    # some stage still ran backward cells (the drain).
    print("\nlast overlapped step: the share of each rank's sums (first "
          "start to last end) before the drain's last cell ended\n")
    print("| model | rank (dp, pp) | sums (ms) | during the drain |")
    print("|---|---|---|---|")
    for kind in data["results"]:
        rows = [t[kind] for t in data["timelines"]]
        drain_end = max(e for t in rows for *_, e in t["cells"])
        for t in sorted(rows, key=lambda t: (t["coords"][1], t["coords"][0])):
            start = min(s for _, s, _ in t["sums"])
            end = max(e for _, _, e in t["sums"])
            during = max(0, min(end, drain_end) - start) / max(end - start, 1)
            print(f"| {kind} | {tuple(t['coords'])} | "
                  f"{(end - start) * 1e-6:.1f} | {during:.0%} |")
    if args.png:
        plot([t["sleep"] for t in data["timelines"]], args.png)
        print(f"\ntimeline of the last overlapped sleep step: "
              f"{os.path.relpath(args.png)}")
    print("""
How to read it: "hidden" is the share of the sums' cost (after - none)
that the overlap takes off the step. Stage 0 finishes the drain last, so
its last bucket (its first layers) can never be hidden; a bucket of a later
stage, or of stage 0's later layers, runs while the drain goes on. The
ranks are 4 processes with 1 thread each: where the machine has fewer free
cores than that, an overlapped sum (Gloo's copies and additions are CPU
work) competes with the cells it overlaps, which the sleep model, whose
cells only sleep, is immune to; the real model's figure then says more
about the load than about the overlap.""")


if __name__ == "__main__":
    main()
