"""Largest trainable model under a fixed per-process memory budget, on CPU:
the layout of Table 1 of the GPipe paper (arXiv 1811.06965), measured.

    .venv/bin/python benchmarks/bench_memory.py           # 1 GiB per process
    .venv/bin/python benchmarks/bench_memory.py --quick   # 256 MiB per process

On this 2-vCPU machine, with other work running (load 2 to 3): 406 s for
the default run (15 attempts), 200 s with --quick; most of it is the
pipeline rows, whose processes hold K GiB of parameters and gradients in
all and share one core.
    .venv/bin/python benchmarks/bench_memory.py --budget-mib 512 --rows plain pipe-2

Model family, indexed by the depth L: ``nn.Sequential`` of L blocks
``Linear(W, W), GELU()`` (float32, W = 256), one mini-batch of N = 256 rows,
MSE loss, one SGD update (``p -= lr * p.grad``, what ``torch.optim.SGD``
without momentum does, in place, no optimizer state). A block has
W*W + W parameters (256 KiB, as much again in gradients) and saves two
N x W tensors for backward (the inputs of Linear and of GELU; 512 KiB), so
activations are twice the parameters: the plain model runs out of memory
on activations, a recomputing one on parameters and gradients. (Linear +
ReLU would save only one: ReLU saves its output, which is also the next
Linear's saved input; that needs twice the batch, and the time, for the
same ratio.) Rows (``--rows``):

- ``plain`` (the paper's Naive-1): the model as is;
- ``recompute``: the same model under
  ``torch.utils.checkpoint.checkpoint_sequential``, round(sqrt(L))
  segments, ``use_reentrant=False``;
- ``pipe-1`` (not in the default rows): ``pipegear.GPipe`` in one process,
  one partition, M micro-batches;
- ``pipe-K`` (the paper's Pipeline-K): ``pipegear.DistributedGPipe`` over
  K processes, Gloo on loopback, M = 8 micro-batches,
  ``checkpoint='always'``, L/K blocks per rank (L a multiple of K); every
  rank builds only its own layers (the model is a list of layer
  factories, each layer seeded by its index).

What is counted, per process: the growth of the resident set size (RSS)
above the RSS measured after ``import torch, pipegear``,
``torch.set_num_threads(1)``, the mallopt below and a warm-up on a 3-layer
model (autograd; for ``recompute`` one ``checkpoint_sequential`` call, whose
first use imports ``torch._dynamo``: ~80 MiB and seconds of imports, not
model memory; for the pipegear rows one ``pipegear.GPipe`` step), and
before anything else. So the growth includes the parameters, their
gradients, activations and recomputation, the input and target the process
holds, the autograd graph, the Python objects of the modules, and for
``pipe-K`` the Gloo process group (created after the baseline) and
pipegear's transport. The peak is ``getrusage(RUSAGE_SELF).ru_maxrss``
after one training step (building the model, forward, backward, update);
each attempt runs in fresh processes. (Linux starts a child's ru_maxrss at
its parent's peak RSS, across fork and exec; the launcher therefore never
imports torch, and each worker also reports VmHWM, its own memory's peak,
as a cross-check.) An attempt fits when every process's peak growth is
within the budget. glibc's mmap threshold is fixed at 128 KiB
(``mallopt(M_MMAP_THRESHOLD)``) so that freed large buffers go back to the
OS instead of being cached in the heap: the RSS then follows the live
memory. The launcher samples every worker's RSS every 20 ms and kills an
attempt as soon as one process's growth passes the budget (it cannot fit:
ru_maxrss >= any sampled RSS).

Search, per row, over x = L/K (blocks per process): doubling from a
quarter of a rough estimate until one x fits and a larger one does not
(halving while nothing fits), then a binary search inside that bracket,
each probe placed where the straight line through the fitting attempts'
peaks meets the budget (the peak grows about linearly in x), the midpoint
when that stops halving the bracket; it stops when the bracket is at most
--tol (2%) of x wide. A pipe-K row after another pipe row starts from that
row's line (same per-process structure) instead of doubling. One step of a
large model is seconds to a minute on one core, hence the coarse --tol.

Output: a markdown table on stdout; progress (every attempt) on stderr.
"""
import argparse
import ctypes
import datetime
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

MIB = 2 ** 20
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------
# worker: one attempt (one process; one rank of a pipeline)
# --------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _blocks_of(rank: int, world: int, blocks: int) -> int:
    return blocks // world + (1 if rank < blocks % world else 0)


def worker(cfg: dict) -> None:
    import gc

    import torch
    from torch import nn

    import pipegear  # noqa: F401  (imported before the baseline, all rows)

    torch.set_num_threads(1)
    if not cfg["no_mallopt"]:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        except OSError:  # pragma: no cover - not glibc
            pass
    # Warm-up on a 3-layer model, before the baseline: the lazy imports and
    # one-time set-ups of the code path this configuration uses (autograd;
    # torch.utils.checkpoint imports torch._dynamo, ~80 MiB and seconds).
    tiny = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    xt = torch.randn(4, 4)
    tiny(xt).sum().backward()
    if cfg["kind"] == "recompute":
        from torch.utils.checkpoint import checkpoint_sequential

        checkpoint_sequential(tiny, 2, xt, use_reentrant=False).sum().backward()
    elif cfg["kind"] in ("gpipe", "pipe"):
        import torch.distributed  # noqa: F401

        pipegear.GPipe(tiny, [3], chunks=2,
                       checkpoint=cfg["checkpoint"])(xt).sum().backward()
    del tiny, xt
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover
        pass
    base = _rss_bytes()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with open(os.path.join(cfg["dir"], f"base.{rank}.tmp"), "w") as f:
        f.write(str(base))
    os.replace(os.path.join(cfg["dir"], f"base.{rank}.tmp"),
               os.path.join(cfg["dir"], f"base.{rank}"))

    kind, L, W, N, M = cfg["kind"], cfg["L"], cfg["W"], cfg["N"], cfg["M"]

    def factory(i):
        def f():
            if i % 2:
                return nn.GELU()
            torch.manual_seed(i)
            return nn.Linear(W, W)
        return f

    factories = [factory(i) for i in range(2 * L)]
    loss_fn = nn.functional.mse_loss
    t0 = time.perf_counter()
    comm = 0
    if kind == "pipe":
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method="env://", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=cfg["timeout"]))
        comm = _rss_bytes() - base
        balance = [2 * _blocks_of(r, world, L) for r in range(world)]
        model = pipegear.DistributedGPipe(
            factories, balance, chunks=M, checkpoint=cfg["checkpoint"],
            timeout=cfg["timeout"])
    else:
        model = nn.Sequential(*[f() for f in factories])
        if kind == "gpipe":
            model = pipegear.GPipe(model, [2 * L], chunks=M,
                                   checkpoint=cfg["checkpoint"])
    params = sum(p.numel() for p in model.parameters())
    first = rank == 0
    last = rank == world - 1
    x = torch.randn(N, W, generator=torch.Generator().manual_seed(0)) if first else None
    t = torch.randn(N, W, generator=torch.Generator().manual_seed(1)) if last else None
    built = _rss_bytes() - base

    if kind == "plain":
        loss = loss_fn(model(x), t)
        loss.backward()
    elif kind == "recompute":
        from torch.utils.checkpoint import checkpoint_sequential

        segments = max(1, round(math.sqrt(L)))
        out = checkpoint_sequential(model, segments, x, use_reentrant=False)
        loss = loss_fn(out, t)
        loss.backward()
    elif kind == "gpipe":
        loss = loss_fn(model(x), t)
        loss.backward()
    else:
        loss = model.step(x, t, loss_fn)
    with torch.no_grad():  # SGD, no momentum: what torch.optim.SGD does
        for p in model.parameters():
            p.add_(p.grad, alpha=-1e-3)
    loss = float(loss.detach())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    with open("/proc/self/status") as f:  # cross-check: this mm's own peak
        hwm = int(f.read().split("VmHWM:")[1].split()[0]) * 1024 - base
    result = {"rank": rank, "peak": peak, "built": built, "comm": comm,
              "params": params, "loss": loss, "base": base,
              "seconds": time.perf_counter() - t0, "torch": torch.__version__,
              "hwm": hwm}
    with open(os.path.join(cfg["dir"], f"result.{rank}"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    # No teardown: a clean Gloo shutdown can wait for peers; the result is
    # written, and the parent waits for every rank.
    os._exit(0)


# --------------------------------------------------------------------------
# parent: attempts, search, table
# --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vmrss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def attempt(args, kind: str, K: int, L: int) -> dict:
    """Runs one training step of depth L in K fresh processes. Returns
    {'fits', 'peak' (max over ranks, or None if killed), 'ranks': [...]}."""
    budget = args.budget_mib * MIB
    with tempfile.TemporaryDirectory(prefix="bench_memory.") as d:
        cfg = {"kind": kind, "L": L, "W": args.width, "N": args.batch,
               "M": args.chunks, "checkpoint": args.checkpoint,
               "timeout": args.attempt_timeout, "dir": d,
               "no_mallopt": args.no_mallopt}
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   WORLD_SIZE=str(K))
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(HERE, "..", "python"), env.get("PYTHONPATH", "")])
        procs = []
        logs = []
        for r in range(K):
            log = open(os.path.join(d, f"log.{r}"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker",
                 json.dumps(cfg)], env=dict(env, RANK=str(r)),
                stdout=log, stderr=subprocess.STDOUT))
        bases = [None] * K
        over = None
        start = time.monotonic()
        try:
            while any(p.poll() is None for p in procs):
                for r, p in enumerate(procs):
                    if bases[r] is None:
                        try:
                            with open(os.path.join(d, f"base.{r}")) as f:
                                bases[r] = int(f.read())
                        except (OSError, ValueError):
                            continue
                    if p.poll() is None:
                        grow = _vmrss(p.pid) - bases[r]
                        if grow > budget:
                            over = (r, grow)
                if over is not None:
                    break
                if time.monotonic() - start > args.attempt_timeout + 60:
                    raise RuntimeError(f"{kind} K={K} L={L}: attempt timed out")
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait()
        if over is not None:
            return {"fits": False, "peak": None, "killed": over, "ranks": []}
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(d, f"result.{r}")
            if p.returncode != 0 or not os.path.exists(path):
                logs[r].seek(0)
                raise RuntimeError(f"{kind} K={K} L={L}: rank {r} failed "
                                   f"(exit {p.returncode}):\n{logs[r].read()}")
            with open(path) as f:
                results.append(json.load(f))
        for log in logs:
            log.close()
    peak = max(r["peak"] for r in results)
    return {"fits": peak <= budget, "peak": peak, "ranks": results}


def _guess(args, kind: str) -> int:
    """Depth per process from a coarse per-block model: only where the
    search starts (it starts at a quarter of this and measures)."""
    W, N = args.width, args.batch
    p = (W * W + W) * 4  # parameters of one block; as much again in grads
    a = 2 * N * W * 4    # a block saves 2 N x W tensors (Linear and GELU inputs)
    per_block = p + max(a, p) if kind == "plain" else 2 * p
    return max(1, int(args.budget_mib * MIB / per_block))


class Line:
    """Peak growth ~ intercept + slope * x, x = blocks of the largest rank."""

    def __init__(self, points):
        self.points = sorted(points)  # (x, peak) of fitting attempts

    def slope(self):
        pts = self.points
        if len(pts) >= 2 and pts[-1][0] - pts[0][0] >= max(2, pts[-1][0] // 20):
            (x1, p1), (x2, p2) = pts[0], pts[-1]
            return (p2 - p1) / (x2 - x1)
        return None

    def predict(self, target, slope=None):
        """x where the line through the points meets target; with one point
        only, through it with the given slope (or through the origin)."""
        if not self.points:
            return None
        x2, p2 = self.points[-1]
        s = self.slope() or slope or p2 / x2
        return None if s <= 0 else x2 + (target - p2) / s


def search(args, kind: str, K: int, label: str,
           seed: Optional[Line]) -> dict:
    """Largest x = L/K that fits, to within --tol (module docstring)."""
    budget = args.budget_mib * MIB
    target = budget * (1 - args.tol / 3)
    ok = {}        # x -> attempt, the fitting ones
    tried = []

    def probe(x):
        t0 = time.monotonic()
        res = attempt(args, kind, K, x * K)
        tried.append(x)
        if res["fits"]:
            ok[x] = res
            what = f"peak {res['peak'] / MIB:.1f} MiB, fits"
        elif res["peak"] is None:
            r, grow = res["killed"]
            what = f"killed when rank {r} passed {grow / MIB:.0f} MiB"
        else:
            what = f"peak {res['peak'] / MIB:.1f} MiB, over"
        print(f"  {label}: L={x * K}: {what} ({time.monotonic() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        return res["fits"]

    def predicted():
        line = Line((x, r["peak"]) for x, r in ok.items())
        if seed is not None and len(line.points) < 2:
            # another row's line: aim one step lower, then close upwards
            g = (seed.predict(budget * (1 - args.tol)) if not line.points
                 else line.predict(target, seed.slope()))
        else:
            g = line.predict(target)
        return None if g is None else int(g)

    lo = hi = None
    x = predicted() if seed is not None else None
    if x is None:
        seed = None
        x = _guess(args, kind) // 4
    x = max(1, x)
    width0, since = None, 0
    while True:
        if probe(x):
            lo = x
        else:
            hi = x
        step = max(1, int(args.tol * (lo or x)))
        if lo is None:                      # nothing fits yet
            if x == 1:
                raise RuntimeError(f"{label}: even L={K} does not fit")
            x = max(1, int(x * (1 - 3 * args.tol)) if seed else x // 2)
            continue
        g = predicted()
        if hi is None:                      # nothing failed yet: grow
            if len(ok) < 2 and seed is None:
                x = 2 * lo                  # doubling until the line is known
            else:
                x = max(lo + step, min(g if g is not None else 2 * lo, 4 * lo))
            continue
        if hi - lo <= step:
            break
        # bracketed: where the line meets the budget, inside the bracket;
        # the midpoint when two probes did not halve the bracket
        if width0 is None or hi - lo <= width0 / 2:
            width0, since = hi - lo, 0
        else:
            since += 1
        if g is None or since >= 2:
            g, since = (lo + hi) // 2, 0
        x = min(max(g, lo + step), hi - step)
        x = min(max(x, lo + 1), hi - 1)
    return {"kind": kind, "K": K, "L": lo * K, "next": hi * K,
            "attempts": len(tried), "result": ok[lo],
            "line": Line((x, r["peak"]) for x, r in ok.items())}


ROWS = {
    "plain": ("Naive-1: plain model", "plain", 1),
    "recompute": ("Naive-1 + recomputation (checkpoint_sequential)",
                  "recompute", 1),
    "pipe-1": ("Pipeline-1: pipegear.GPipe, 1 process", "gpipe", 1),
}


def row_spec(name: str):
    if name in ROWS:
        return ROWS[name]
    if name.startswith("pipe-"):
        K = int(name[5:])
        return (f"Pipeline-{K}: pipegear.DistributedGPipe", "pipe", K)
    raise SystemExit(f"unknown row {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mib", type=float, default=None,
                        help="per-process budget (default 1024; 256 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB budget, for a fast check")
    parser.add_argument("--width", type=int, default=256, help="W")
    parser.add_argument("--batch", type=int, default=256, help="N")
    parser.add_argument("--chunks", type=int, default=8, help="M")
    parser.add_argument("--checkpoint", default="always",
                        choices=["always", "except_last", "never"],
                        help="pipegear checkpoint mode")
    parser.add_argument("--rows", nargs="+",
                        default=["plain", "recompute", "pipe-2", "pipe-4"],
                        help="plain, recompute, pipe-1, pipe-K (K >= 2)")
    parser.add_argument("--tol", type=float, default=0.02,
                        help="search resolution, relative to L")
    parser.add_argument("--attempt-timeout", type=float, default=300.0)
    parser.add_argument("--no-mallopt", action="store_true")
    args = parser.parse_args()
    if args.budget_mib is None:
        args.budget_mib = 256.0 if args.quick else 1024.0

    # No torch in this process: a child's ru_maxrss starts at its parent's
    # peak RSS (Linux carries it over fork and exec), so the launcher stays
    # small.
    t0 = time.monotonic()
    rows = []
    seed = None
    for name in args.rows:
        label, kind, K = row_spec(name)
        print(f"{label} (K={K})", file=sys.stderr, flush=True)
        row = search(args, kind, K, name, seed if kind == "pipe" else None)
        rows.append(row)
        if kind == "pipe":
            seed = row["line"]
    elapsed = time.monotonic() - t0

    W, N = args.width, args.batch
    block_params = W * W + W
    plain_L = next((r["L"] for r in rows if r["kind"] == "plain"), None)
    comm = max((rk["comm"] for r in rows for rk in r["result"]["ranks"]),
               default=0)
    hwm_gap = max(rk["peak"] - rk["hwm"] for r in rows
                  for rk in r["result"]["ranks"])
    print(f"Budget {args.budget_mib:g} MiB of peak RSS growth per process; "
          f"L blocks of Linear({W}, {W}) + GELU, float32, batch N={N}, "
          f"MSE loss, one SGD step; pipegear: M={args.chunks} micro-batches, "
          f"checkpoint='{args.checkpoint}', Gloo on loopback; torch "
          f"{rows[0]['result']['ranks'][0]['torch']}, CPU, 1 thread per "
          f"process")
    print()
    print("| configuration | K | largest L | parameters | parameter memory "
          "(MiB, per process) | peak memory (MiB, per process, max over ranks) "
          "| vs plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        L, K = r["L"], r["K"]
        res = r["result"]
        per_proc = max(_blocks_of(k, K, L) for k in range(K)) * block_params
        assert sum(rk["params"] for rk in res["ranks"]) == L * block_params
        vs = f"{L / plain_L:.2f}x" if plain_L else "-"
        print(f"| {row_spec_label(r)} | {K} | {L} | "
              f"{L * block_params / 1e6:.1f}M | {per_proc * 4 / MIB:.1f} | "
              f"{res['peak'] / MIB:.1f} | {vs} |")
    print()
    print(f"largest L: the largest depth whose training step (build, forward, "
          f"backward, update) kept every process within the budget; the next "
          f"depth tried ({', '.join(str(r['next']) for r in rows)}) did not "
          f"(search resolution {args.tol:.0%}). Peak memory: ru_maxrss minus "
          f"the RSS after imports and warm-up (VmHWM agrees to "
          f"{hwm_gap / MIB:.1f} MiB); it counts parameters, gradients, "
          f"activations, inputs, Python objects and, for pipegear, the Gloo "
          f"group (at most {comm / MIB:.1f} MiB after init_process_group). "
          f"Parameter memory: the largest process's parameters (as much "
          f"again in gradients). {sum(r['attempts'] for r in rows)} attempts, "
          f"{elapsed:.0f} s.")


def row_spec_label(r: dict) -> str:
    if r["kind"] == "pipe":
        return f"Pipeline-{r['K']} (pipegear.DistributedGPipe, Gloo)"
    return {"plain": "Naive-1 (plain model)",
            "recompute": "Naive-1 + recomputation (checkpoint_sequential)",
            "gpipe": "Pipeline-1 (pipegear.GPipe, in-process)"}[r["kind"]]


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
