"""Why a 1F1B cell costs more than a GPipe cell on tiny layers (issue 21):
where the time of the distributed pipeline's cells goes, per schedule, and
the same cells without pipegear or c10d, in one run.

    .venv/bin/python benchmarks/bench_1f1b_cell_cost.py [--steps 100] [--widths 16 256]

1. Distributed: 2 processes, Gloo on loopback, 1 intra-op thread each,
   8 x Linear(w, w) split 4 + 4, batch 64, 8 micro-batches, no
   checkpointing, MSE loss; pipegear gpipe and 1f1b, torch.distributed.
   pipelining's ScheduleGPipe and Schedule1F1B on the same model and data,
   steps alternating: the median step, and the 10th percentile (steps
   little delayed by other processes of the machine). Per pipegear schedule and
   rank: the median trace time of a cell (from the end of its wait for a
   message to its end, as `last_events` gives it), the thread CPU time of
   the stage's layers in a forward (hooks on the first and last layer: no
   wait, no send inside), how often the layers' forward is preempted, the
   median idle time of a receiver per message (from the later of the
   message's producer cell end and its own previous cell end to its
   consuming cell's start, both ranks on one clock), the share of messages
   sent before their receive was posted, and the round trip of a 1 KiB
   Gloo message.
2. One process, no pipegear, no c10d: the same 4 layers' forward (F) and
   backward (B) of 8 micro-batches in rank 0's order under GPipe (all F,
   then all B) and under 1F1B (F0 F1 B0 F2 B1 ...), with nothing, a 300 µs
   sleep or a 300 µs spin before each B (where rank 0 waits for its
   gradient); per cell the thread CPU time.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
from torch import nn

BATCH, CHUNKS, LAYERS = 64, 8, 8
PAUSE_S = 300e-6  # between cells in part 2


def layers(width):
    out = []
    for i in range(LAYERS):
        torch.manual_seed(i)
        out.append(nn.Linear(width, width))
    return out


def median(v):
    return statistics.median(v) if v else float("nan")


class ForwardClock:
    """Thread CPU time, wall time and involuntary context switches of a
    rank's layers in each forward, by hooks on its first and last layer."""

    def __init__(self, first, last):
        self.cpu, self.wall, self.preempted = [], [], []
        self.on = False
        first.register_forward_pre_hook(self.start)
        last.register_forward_hook(self.stop)

    def start(self, *_):
        self.t = (time.thread_time_ns(), time.perf_counter_ns(),
                  resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw)

    def stop(self, *_):
        if self.on:
            cpu, wall, ivcsw = self.t
            self.cpu.append((time.thread_time_ns() - cpu) * 1e-3)
            self.wall.append((time.perf_counter_ns() - wall) * 1e-3)
            self.preempted.append(
                resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw - ivcsw)


def worker(rank, world, port, steps, widths, out_dir):
    import datetime
    import torch.distributed as dist
    import pipegear
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B,
                                              ScheduleGPipe)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    first, last = rank == 0, rank == world - 1
    per = LAYERS // world
    loss_fn = nn.functional.mse_loss
    result = {}
    for width in widths:
        x = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(0))
        t = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(1))
        runners, traces, clocks = {}, {}, {}
        for kind in ("gpipe", "1f1b"):
            model = layers(width)
            mine = model[rank * per:(rank + 1) * per]
            clocks[kind] = ForwardClock(mine[0], mine[-1])
            pipe = pipegear.DistributedGPipe(model, [per] * world, chunks=CHUNKS,
                                             checkpoint="never", schedule=kind)
            traces[kind] = []

            def ours(pipe=pipe, kind=kind, clock=clocks[kind]):
                clock.on = True
                pipe.step(x if first else None, t if last else None, loss_fn)
                clock.on = False
                pipe.zero_grad(set_to_none=True)
                traces[kind].append(pipe._pipeline.last_events)
            runners["pipegear " + kind] = ours

        def torch_runner(cls):
            part = nn.Sequential(*layers(width)[rank * per:(rank + 1) * per])
            stage = PipelineStage(part, rank, world, torch.device("cpu"))
            sched = cls(stage, CHUNKS, loss_fn=loss_fn)

            def run():
                kwargs = dict(target=t, losses=[]) if last else {}
                if first:
                    sched.step(x, **kwargs)
                else:
                    sched.step(**kwargs)
                part.zero_grad(set_to_none=True)
            return run

        runners["torch ScheduleGPipe"] = torch_runner(ScheduleGPipe)
        runners["torch Schedule1F1B"] = torch_runner(Schedule1F1B)
        times = {name: [] for name in runners}
        warm = 3
        for i in range(steps + warm):
            if i == warm:
                for kind in traces:
                    traces[kind].clear()
                    clocks[kind].cpu.clear()
                    clocks[kind].wall.clear()
                    clocks[kind].preempted.clear()
            for name, fn in runners.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if i >= warm:
                    times[name].append(time.perf_counter() - t0)
        result[str(width)] = {
            "times": {n: median(v) for n, v in times.items()},
            "fast": {n: sorted(v)[len(v) // 10] for n, v in times.items()},
            "events": {k: [[list(e) for e in ev] for ev in v]
                       for k, v in traces.items()},
            "forward": {k: {"cpu": median(c.cpu), "wall": median(c.wall),
                            "preempted": sum(c.preempted) / max(1, len(c.preempted))}
                        for k, c in clocks.items()}}
    # Round trips of a 1 KiB message, the receive posted before the send.
    buf, msg, rtt = torch.zeros(256), torch.ones(256), []
    for i in range(300):
        if i % 50 == 0:
            dist.barrier()
        if first:
            r = dist.irecv(buf, 1, tag=7)
            t0 = time.perf_counter()
            dist.isend(msg, 1, tag=7).wait()
            r.wait()
            rtt.append(time.perf_counter() - t0)
        else:
            dist.irecv(buf, 0, tag=7).wait()
            dist.isend(msg, 0, tag=7).wait()
    result["rtt"] = sorted(rtt[20:])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def message_idle(events0, events1):
    """Per message, how long its receiver sat idle: from the later of the
    producer cell's end and the receiver's own previous cell's end to the
    start of the cell consuming it (µs; both ranks' trace clocks are the
    machine's monotonic clock)."""
    out = {"activations": [], "gradients": []}
    for ev0, ev1 in zip(events0, events1):
        index = [{(e[0], e[1]): e for e in ev} for ev in (ev0, ev1)]
        previous = []
        for ev in (ev0, ev1):
            order = sorted(ev, key=lambda e: e[3])
            previous.append({(c[0], c[1]): p[4] for p, c in zip(order, order[1:])})
        for j in range(CHUNKS):
            for what, phase, src, dst in (("activations", "F", 0, 1),
                                          ("gradients", "B", 1, 0)):
                made = index[src][(j, phase)][4]
                taken = index[dst][(j, phase)][3]
                ready = max(made, previous[dst].get((j, phase), 0))
                out[what].append((taken - ready) * 1e-3)
    return out


def sent_unposted(events0, events1):
    """The share of messages sent before the receiver had posted their
    receive (C10dTransport posts 2 per direction ahead, then receive k when
    the wait for receive k - 2 ends, at about the start of the cell that
    consumes message k - 2): such a send waits in Gloo for the receiver's
    notice, one more hop between the processes' threads."""
    late = total = 0
    for ev0, ev1 in zip(events0, events1):
        for src, dst, phase in ((ev0, ev1, "F"), (ev1, ev0, "B")):
            taken = sorted((e for e in dst if e[1] == phase), key=lambda e: e[3])
            made = {e[0]: e[4] for e in src if e[1] == phase}
            for k, cell in enumerate(taken):
                total += 1
                late += k >= 2 and made[cell[0]] < taken[k - 2][3]
    return late / max(1, total)


def single_process(rounds):
    """Part 2: per cell thread CPU time (µs) of F and B by order and pause."""
    def pause(mode):
        if mode == "sleep":
            time.sleep(PAUSE_S)
        elif mode == "spin":
            end = time.perf_counter() + PAUSE_S
            while time.perf_counter() < end:
                pass

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(LAYERS // 2)])
    xs = [torch.randn(BATCH // CHUNKS, 16, requires_grad=True)
          for _ in range(CHUNKS)]
    gs = [torch.randn(BATCH // CHUNKS, 16) for _ in range(CHUNKS)]
    clock = time.thread_time_ns

    def forward(j, acc, mode):
        t0 = clock()
        y = model(xs[j].view_as(xs[j]))
        acc["F"].append(clock() - t0)
        return y

    def backward(y, j, acc, mode):
        pause(mode)
        t0 = clock()
        y.backward(gs[j])
        acc["B"].append(clock() - t0)

    def gpipe(acc, mode):
        ys = [forward(j, acc, mode) for j in range(CHUNKS)]
        for j in reversed(range(CHUNKS)):
            backward(ys[j], j, acc, mode)

    def one_f_one_b(acc, mode):
        ys = {0: forward(0, acc, mode)}
        for j in range(1, CHUNKS):
            ys[j] = forward(j, acc, mode)
            backward(ys.pop(j - 1), j - 1, acc, mode)
        backward(ys.pop(CHUNKS - 1), CHUNKS - 1, acc, mode)

    modes = ("nothing", "sleep", "spin")
    orders = (("gpipe", gpipe), ("1f1b", one_f_one_b))
    res = {(m, o): {"F": [], "B": []} for m in modes for o, _ in orders}
    for i in range(rounds + 5):
        for mode in modes:
            for name, fn in orders:
                acc = {"F": [], "B": []}
                fn(acc, mode)
                model.zero_grad(set_to_none=True)
                for x in xs:
                    x.grad = None
                if i >= 5:
                    for k in acc:
                        res[mode, name][k] += acc[k]
    return {key: {k: median(v) * 1e-3 for k, v in r.items()}
            for key, r in res.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--rounds", type=int, default=150)
    args = parser.parse_args()
    import tempfile

    from launch import run_ranks
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out_dir:
        run_ranks(__file__, 2, [args.steps, ",".join(map(str, args.widths)),
                                out_dir])
        per_rank = []
        for r in range(2):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    load_mid = os.getloadavg()[0]
    single = single_process(args.rounds)
    print(f"Load average {load:.2f} at the start, {load_mid:.2f} after part 1, "
          f"{os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} logical "
          "CPUs shared with other work): compare ratios within this run.\n")
    print(f"### 1. Two processes, 8 x Linear(w, w), batch {BATCH}, {CHUNKS} "
          f"micro-batches, median of {args.steps} alternating steps\n")
    for width in args.widths:
        res = [r[str(width)] for r in per_rank]
        times, best = res[-1]["times"], res[-1]["fast"]
        print(f"#### w = {width}\n")
        print("| runner | steps/s | vs pipegear gpipe | vs torch Schedule1F1B "
              "| fast steps (10th percentile): steps/s | vs pipegear gpipe |")
        print("|---|--:|--:|--:|--:|--:|")
        for name, sec in times.items():
            print(f"| {name} | {1 / sec:.1f} | "
                  f"{times['pipegear gpipe'] / sec:.2f} | "
                  f"{times['torch Schedule1F1B'] / sec:.2f} | "
                  f"{1 / best[name]:.0f} | "
                  f"{best['pipegear gpipe'] / best[name]:.2f} |")
        print()
        print("| pipegear schedule | rank | F cell (µs) | B cell (µs) | "
              "layers' forward: CPU (µs) | wall (µs) | preempted | "
              "receiver idle per message (µs) | sent before the receive was "
              "posted |")
        print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for kind in ("gpipe", "1f1b"):
            idle = message_idle(res[0]["events"][kind], res[1]["events"][kind])
            unposted = sent_unposted(res[0]["events"][kind],
                                     res[1]["events"][kind])
            for rank in range(2):
                cells = [e for ev in res[rank]["events"][kind] for e in ev]
                us = {p: median([(e[4] - e[3]) * 1e-3 for e in cells
                                 if (e[1] == "F") == (p == "F")])
                      for p in ("F", "B")}
                fwd = res[rank]["forward"][kind]
                waits = idle["activations" if rank == 1 else "gradients"]
                print(f"| {kind} | {rank} | {us['F']:.0f} | {us['B']:.0f} | "
                      f"{fwd['cpu']:.0f} | {fwd['wall']:.0f} | "
                      f"{fwd['preempted']:.2f} | {median(waits):.0f} | "
                      f"{100 * unposted:.0f}% |")
        print()
    rtt = per_rank[0]["rtt"]
    print(f"Round trip of a 1 KiB Gloo message (receive posted first): median "
          f"{median(rtt) * 1e6:.0f} µs, 90th percentile "
          f"{rtt[9 * len(rtt) // 10] * 1e6:.0f} µs, 99th "
          f"{rtt[99 * len(rtt) // 100] * 1e6:.0f} µs.\n")
    print(f"### 2. One process, the same 4 x Linear(16, 16), micro-batches of "
          f"{BATCH // CHUNKS} rows, no pipegear, no c10d, rank 0's order of "
          f"cells: thread CPU time per cell (median of {args.rounds} rounds)\n")
    print(f"| before each B | F, GPipe order (µs) | F, 1F1B order (µs) | "
          "B, GPipe order (µs) | B, 1F1B order (µs) |")
    print("|---|--:|--:|--:|--:|")
    for mode, label in (("nothing", "nothing"),
                        ("sleep", f"a {PAUSE_S * 1e6:.0f} µs sleep"),
                        ("spin", f"a {PAUSE_S * 1e6:.0f} µs spin")):
        g, o = single[mode, "gpipe"], single[mode, "1f1b"]
        print(f"| {label} | {g['F']:.1f} | {o['F']:.1f} | {g['B']:.1f} | "
              f"{o['B']:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, port, steps = map(int, sys.argv[2:6])
        worker(rank, world, port, steps,
               [int(w) for w in sys.argv[6].split(",")], sys.argv[7])
    else:
        main()
