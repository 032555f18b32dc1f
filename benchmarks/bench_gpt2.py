"""Hugging Face GPT-2 on CPU: tokens/s of the plain model and of pipegear
K=2, the peak memory of each stage, and torch.distributed.pipelining on
the same model (issue #20).

    .venv/bin/python benchmarks/bench_gpt2.py [--steps 6] [--quick] \
        [--only throughput|memory|versus]

The model: ``transformers.GPT2LMHeadModel``, 4 blocks, width 256, 8 heads,
sequences of 128 byte tokens (vocabulary 257, the head tied to the
embedding), float32, dropout 0.1, batches of 16 sequences of the standard
library's sources (``pipegear.models.data``). A training step is forward,
backward (``CausalLMLoss``) and AdamW.

1. Tokens per second (batch x 128 / median step time): the plain model at
   1 and at 2 intra-op threads, and ``pipegear.GPipe`` over
   ``gpt2_sequential`` with K=2 stages (``balance_by_time``), one intra-op
   thread per stage (``worker_threads=1``), checkpoint ``'except_last'``,
   chunks 1, 4, 8, in step style. The variants take turns step by step in
   one process, so a drift in the machine's load hits them alike.
2. Peak memory of each stage: ``DistributedGPipe`` with the same layers,
   one stage per process (Gloo on loopback, 1 thread each), the
   embedding/head tie across the two ranks; each rank's peak resident
   memory during 3 steady-state steps above its resident memory at a
   step's start (``VmHWM``, reset through ``/proc/self/clear_refs``),
   beside the plain model's and the in-process GPipe's (one process, both
   stages). Each configuration runs in fresh processes.
3. Against torch.distributed.pipelining on 2 ranks: its ``PipelineStage``
   and ``ScheduleGPipe`` / ``Schedule1F1B`` over the same slices, the tied
   weight's gradient summed by hand, taking turns with DistributedGPipe
   step by step: tokens/s, and the first step's gradient of the tied
   weight against the plain model's on a batch with padding.

Requires transformers (requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import torch

import pipegear
from pipegear.models import CausalLMLoss, data, gpt2_sequential

LAYERS, WIDTH, HEADS, T, BATCH = 4, 256, 8, 128, 16
MIB = 1 << 20


def config(quick: bool):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GPT2Config(
        vocab_size=data.VOCAB_SIZE, n_positions=T,
        n_embd=128 if quick else WIDTH, n_layer=2 if quick else LAYERS,
        n_head=4 if quick else HEADS, bos_token_id=data.PAD,
        eos_token_id=data.PAD)


def model(quick: bool):
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config(quick))


def batches(n: int):
    x, y = data.pack(data.stdlib_text(n * BATCH * T + 1), T)
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
            for i in range(n)]


def parallel_capacity() -> float:
    """Work two threads each running a 1-thread GEMM loop get done, over
    one thread's (2.0 on two free cores, 1.0 when they share one)."""
    a = torch.randn(512, 512)

    def work() -> None:
        for _ in range(40):
            a @ a

    torch.set_num_threads(1)
    work()
    t0 = time.perf_counter()
    work()
    one = time.perf_counter() - t0
    thread = threading.Thread(target=work)
    t0 = time.perf_counter()
    thread.start()
    work()
    thread.join()
    return 2 * one / (time.perf_counter() - t0)


def throughput(steps: int, quick: bool) -> None:
    import transformers

    print(f"Load: {os.cpu_count()} vCPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start, parallel capacity "
          f"{parallel_capacity():.2f}x (two 1-thread GEMM loops against one; "
          "2.00x on two free cores); torch "
          f"{torch.__version__}, transformers {transformers.__version__}.\n")
    print("## 1. Tokens per second\n")
    base = model(quick)
    params = sum(p.numel() for p in base.parameters())
    loss_fn = CausalLMLoss()
    work = batches(steps + 2)
    sample = gpt2_sequential(copy.deepcopy(base))
    torch.set_num_threads(1)
    balance = pipegear.balance_by_time(2, sample, work[0][0], repeats=2)
    print(f"GPT-2: {LAYERS if not quick else 2} blocks, {params / 1e6:.2f} M "
          f"parameters, batches of {BATCH} x {T} tokens; pipegear balance "
          f"{balance} (profiled at 1 thread), checkpoint 'except_last', "
          "worker_threads=1. Median of "
          f"{steps} steps after 2 of warm-up, variants taking turns.\n")

    variants = {}

    def plain(threads):
        m = copy.deepcopy(base)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step(x, y):
            torch.set_num_threads(threads)
            loss = loss_fn(m(x, use_cache=False).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return step

    def piped(chunks):
        pipe = pipegear.GPipe(gpt2_sequential(copy.deepcopy(base)), balance,
                              devices=["cpu"] * 2, chunks=chunks,
                              checkpoint="except_last", worker_threads=1)
        opt = torch.optim.AdamW(pipe.parameters(), lr=1e-3)

        def step(x, y):
            torch.set_num_threads(1)
            pipe.step(x, y, loss_fn)
            opt.step()
            opt.zero_grad()
        step.pipe = pipe
        return step

    variants["plain, 1 thread"] = plain(1)
    variants["plain, 2 threads"] = plain(2)
    for chunks in (1, 4, 8):
        variants[f"pipegear K=2, chunks {chunks}"] = piped(chunks)
    times = {name: [] for name in variants}
    for i, (x, y) in enumerate(work):
        for name, step in variants.items():
            t0 = time.perf_counter()
            step(x, y)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    tokens = BATCH * T
    ref = statistics.median(times["plain, 1 thread"])
    print("| variant | threads | step (s) | tokens/s | vs plain, 1 thread "
          "| bubble (measured) |")
    print("|---|---|---|---|---|---|")
    for name, step in variants.items():
        med = statistics.median(times[name])
        threads = "2" if "2 threads" in name else (
            "1 + 1" if "pipegear" in name else "1")
        pipe = getattr(step, "pipe", None)
        bubble = f"{pipe.last_trace.bubble_fraction:.2f}" if pipe else "-"
        print(f"| {name} | {threads} | {med:.3f} | {tokens / med:.0f} | "
              f"{ref / med:.2f}x | {bubble} |")
    print()


# ---- 2. memory per stage (one stage per process) ------------------------


def _hwm() -> int:
    """This process's peak resident memory since the last _reset_peak()."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _state_bytes(params) -> int:
    """Parameters and AdamW's two moments (float32)."""
    return sum(3 * p.numel() * p.element_size() for p in params)


def _measure(step, steps: int = 3) -> int:
    """Peak RSS growth over `steps` steps in steady state: a first step
    runs before (lazy imports, first-call buffers, the optimizer's state);
    the memory it freed goes back to the system (malloc_trim: glibc keeps
    freed blocks resident, which the next steps would reuse unseen), then
    the peak is reset to the resident memory at a step's start."""
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    _reset_peak()
    base = _rss()
    for _ in range(steps):
        step()
    return _hwm() - base


def memory_worker(rank: int, world: int, port: int, chunks: int,
                  quick: bool) -> None:
    torch.set_num_threads(1)
    loss_fn = CausalLMLoss()
    work = batches(1)[0]
    seq = gpt2_sequential(model(quick))
    balance = json.loads(os.environ["BENCH_BALANCE"])
    if world <= 1:  # one process: the plain model, or GPipe with 2 stages
        if world == 0:
            net = seq
        else:
            net = pipegear.GPipe(seq, balance, devices=["cpu"] * 2,
                                 chunks=chunks, checkpoint="except_last",
                                 worker_threads=1)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

        def step():
            x, y = work
            if world == 0:
                loss_fn(net(x), y).backward()
            else:
                net.step(x, y, loss_fn)
            opt.step()
            opt.zero_grad()
        peak = _measure(step)
        print(json.dumps({"rank": 0, "peak": peak,
                          "state": _state_bytes(net.parameters())}))
        return
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    pipe = pipegear.DistributedGPipe(seq, balance, chunks=chunks,
                                     checkpoint="except_last", timeout=300)
    del seq
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-3)

    def step():
        x, y = work
        pipe.step(x if pipe.is_first else None, y if pipe.is_last else None,
                  loss_fn)
        opt.step()
        opt.zero_grad()
    peak = _measure(step)
    print(json.dumps({"rank": rank, "peak": peak,
                      "state": _state_bytes(pipe.parameters())}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, chunks: int, quick: bool, balance) -> list:
    """world 0: the plain model; 1: GPipe K=2 in one process; 2: two
    DistributedGPipe ranks."""
    env = dict(os.environ, BENCH_BALANCE=json.dumps(balance),
               OMP_NUM_THREADS="1")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--worker", str(r), str(world),
         str(port), str(chunks)] + (["--quick"] if quick else []),
        env=env, stdout=subprocess.PIPE, text=True)
        for r in range(max(world, 1))]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=900)
        if p.returncode:
            raise SystemExit(f"memory worker failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(out, key=lambda r: r["rank"])


def memory(quick: bool) -> None:
    print("## 2. Peak memory per stage\n")
    sample = gpt2_sequential(model(quick))
    torch.set_num_threads(1)
    balance = pipegear.balance_by_time(2, sample, batches(1)[0][0],
                                       repeats=2)
    print("Per stage: `DistributedGPipe`, one stage per process (Gloo on "
          "loopback, 1 thread each). *step peak*: the peak resident memory "
          "during 3 training steps (forward, backward, AdamW) above the "
          "resident memory at a step's start, after a first step (Linux "
          "`VmHWM`, reset through `/proc/self/clear_refs`, after "
          "`malloc_trim`): activations, "
          "gradients, the loss, temporaries. *state*: parameters and AdamW's "
          "two moments, computed (resident all along). The plain model and "
          "the in-process `GPipe` are one process each (both stages in one "
          f"number). Balance {balance}, checkpoint 'except_last', batches "
          f"of {BATCH} x {T} tokens, float32.\n")
    print("| variant | chunks | step peak, stage 0 (MiB) | step peak, stage "
          "1 (MiB) | state, stage 0 / 1 (MiB) |")
    print("|---|---|---|---|---|")
    plain = _launch(0, 1, quick, balance)[0]
    print(f"| plain model (one process) | - | {plain['peak'] / MIB:.1f} "
          f"(whole model) | | {plain['state'] / MIB:.1f} (whole model) |")
    for chunks in (1, 4, 8):
        ranks = _launch(2, chunks, quick, balance)
        print(f"| DistributedGPipe K=2 | {chunks} | "
              f"{ranks[0]['peak'] / MIB:.1f} | {ranks[1]['peak'] / MIB:.1f} "
              f"| {ranks[0]['state'] / MIB:.1f} / "
              f"{ranks[1]['state'] / MIB:.1f} |")
    for chunks in (1, 4, 8):
        one = _launch(1, chunks, quick, balance)[0]
        print(f"| GPipe K=2 (one process) | {chunks} | {one['peak'] / MIB:.1f}"
              f" (both stages) | | {one['state'] / MIB:.1f} (both) |")
    print()


# ---- 3. against torch.distributed.pipelining (2 ranks) -------------------


def _padded(batch):
    """`batch` with its last sequence ending half way (padding: its last
    T/2 targets ignored), as the last batch of a text usually does."""
    x, y = batch[0].clone(), batch[1].clone()
    x[-1, T // 2:] = data.PAD
    y[-1, T // 2:] = data.IGNORE
    return x, y


def versus_worker(rank: int, world: int, port: int, steps: int,
                  quick: bool) -> None:
    """One rank of section 3: pipegear's DistributedGPipe and
    torch.distributed.pipelining's PipelineStage + ScheduleGPipe /
    Schedule1F1B on the same slice of the same GPT-2, taking turns step by
    step; the first step's gradient of the tied weight against the plain
    model's on a padded batch."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B,
                                              ScheduleGPipe)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    balance = json.loads(os.environ["BENCH_BALANCE"])
    loss_fn = CausalLMLoss()
    work = batches(steps + 2)
    check = _padded(work[0])
    base = model(quick)
    plain = copy.deepcopy(base).eval()  # no dropout in the check
    loss_fn(plain(check[0]).logits, check[1]).backward()
    ref = plain.transformer.wte.weight.grad
    first, last = rank == 0, rank == world - 1
    offset = sum(balance[:rank])
    # The tied weight: the embedding's on rank 0, the head's on rank 1.
    tied_name = "embed.wte.weight" if first else "lm_head.weight"
    # Every rank of both pipelines is the same group: one all-reduce of the
    # tied weight's gradient (the sum of both uses) on both ranks after the
    # backward is what pipegear does after its drain, by hand.
    tie_group = dist.new_group([0, world - 1])

    def stepper(module, opt, tied, run):
        """A training step: `run(x, y)` (forward and backward), then AdamW
        unless told not to; returns the tied weight's gradient (the sum of
        both uses)."""
        def step(x, y, update=True):
            run(x, y)
            grad = tied.grad.clone()
            if update:
                opt.step()
            opt.zero_grad()
            return grad
        step.module = module
        return step

    def ours(chunks, schedule):
        pipe = pipegear.DistributedGPipe(
            gpt2_sequential(copy.deepcopy(base)), balance, chunks=chunks,
            checkpoint="never", schedule=schedule, timeout=600)
        return stepper(
            pipe, torch.optim.AdamW(pipe.parameters(), lr=1e-3),
            dict(pipe.named_parameters())[tied_name],
            lambda x, y: pipe.step(x if first else None,
                                   y if last else None, loss_fn))

    def theirs(chunks, schedule):
        # Manual stages over the same slice of gpt2_sequential as
        # pipegear's; each end holds its own copy of the tied weight, and
        # its gradient is summed by hand.
        seq = gpt2_sequential(copy.deepcopy(base))
        part = torch.nn.Sequential(*list(seq)[offset:offset + balance[rank]])
        stage = PipelineStage(part, rank, world, torch.device("cpu"))
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        sched = kind(stage, chunks, loss_fn=loss_fn)
        tied = part[0].wte.weight if first else part[-1].weight

        def run(x, y):
            if first:
                sched.step(x)
            elif last:
                sched.step(target=y)
            else:
                sched.step()
            dist.all_reduce(tied.grad, group=tie_group)
        return stepper(part, torch.optim.AdamW(part.parameters(), lr=1e-3),
                       tied, run)

    rows = []
    for chunks, schedule in ((1, "gpipe"), (4, "gpipe"), (8, "gpipe"),
                             (8, "1f1b")):
        variants = {"pipegear": ours(chunks, schedule),
                    "torch.pipelining": theirs(chunks, schedule)}
        row = {"chunks": chunks, "schedule": schedule}
        for name, step in variants.items():
            step.module.eval()  # dropout off, as in the plain model's check
            grad = step(*check, update=False)
            step.module.train()
            row[name + " error"] = ((grad - ref).abs().max()
                                    / ref.abs().max()).item()
        times = {name: [] for name in variants}
        for i, (x, y) in enumerate(work):
            for name, step in variants.items():
                dist.barrier()
                t0 = time.perf_counter()
                step(x, y)
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        for name in variants:
            row[name] = statistics.median(times[name])
        rows.append(row)
    if last:
        print(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def versus(steps: int, quick: bool) -> None:
    import torch.distributed.pipelining  # noqa: F401 (fail early)

    print("## 3. Against torch.distributed.pipelining, 2 ranks\n")
    sample = gpt2_sequential(model(quick))
    torch.set_num_threads(1)
    balance = pipegear.balance_by_time(2, sample, batches(1)[0][0],
                                       repeats=2)
    env = dict(os.environ, BENCH_BALANCE=json.dumps(balance),
               OMP_NUM_THREADS="1")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--versus-worker", str(r), "2", str(port),
         str(steps)] + (["--quick"] if quick else []),
        env=env, stdout=subprocess.PIPE, text=True) for r in range(2)]
    out = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("versus worker failed")
    rows = json.loads(out[-1].strip().splitlines()[-1])
    tokens = BATCH * T
    print(f"Balance {balance}, one process per stage (Gloo on loopback, 1 "
          "thread each), no recomputation (pipegear's checkpoint='never': "
          "torch.pipelining recomputes nothing), AdamW; median of "
          f"{steps} steps after 2 of warm-up, the two taking turns step by "
          "step. torch.distributed.pipelining: manual `PipelineStage`s over "
          "the same slices of `gpt2_sequential`, so that both run the same "
          "layers (its tracer, `pipeline()`, also splits `GPT2LMHeadModel` "
          "once the config says `use_cache=False`: a `DynamicCache` in the "
          "output is not a pytree), each end holding its own copy of the "
          "tied weight whose gradient the benchmark sums with an all-reduce "
          "after `step` (pipegear does it after its drain). *grad error*: the first step's "
          "gradient of the tied weight, on a batch whose last sequence is "
          "half padding, against the plain model's (max abs difference "
          "over max abs value).\n")
    print("| schedule | chunks | pipegear tokens/s | torch.pipelining "
          "tokens/s | ratio | pipegear grad error | torch.pipelining grad "
          "error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ours_ = tokens / r["pipegear"]
        theirs_ = tokens / r["torch.pipelining"]
        print(f"| {r['schedule']} | {r['chunks']} | {ours_:.0f} | "
              f"{theirs_:.0f} | {ours_ / theirs_:.2f}x | "
              f"{r['pipegear error']:.1e} | "
              f"{r['torch.pipelining error']:.1e} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true",
                        help="a smaller model (a smoke test of the script)")
    parser.add_argument("--worker", nargs=4, type=int,
                        metavar=("RANK", "WORLD", "PORT", "CHUNKS"))
    parser.add_argument("--versus-worker", nargs=4, type=int,
                        metavar=("RANK", "WORLD", "PORT", "STEPS"))
    parser.add_argument("--only", choices=["throughput", "memory", "versus"])
    args = parser.parse_args()
    if args.worker:
        memory_worker(*args.worker, quick=args.quick)
        return
    if args.versus_worker:
        versus_worker(*args.versus_worker, quick=args.quick)
        return
    if args.only in (None, "throughput"):
        throughput(args.steps, args.quick)
    if args.only in (None, "memory"):
        memory(args.quick)
    if args.only in (None, "versus"):
        versus(args.steps, args.quick)


if __name__ == "__main__":
    main()
