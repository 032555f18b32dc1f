"""Activation memory and step time under recomputation (issue 5).

A deep model, 32 x (Linear(2048, 2048) + ReLU), float32, CPU: the plain model
against pipegear with K=4 stages, M=8 micro-batches under
checkpoint='never' / 'except_last' / 'always'.

Activation memory held for backward is counted, not guessed:

- every tensor autograd saves for backward goes through a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook installed around the
  call (pipegear carries the caller's thread-local state, hooks included, to
  its stage workers); the packed object holds the tensor until autograd
  releases it;
- a checkpointed forward keeps its stage input outside autograd until its
  backward: a forward pre-hook on each partition's first layer sees that
  input while ``pipegear.is_checkpointing()`` is true, and a weakref
  finalizer tells when the engine lets it go.

Bytes are counted per storage (a tensor saved twice, or saved and kept as a
checkpoint input, counts once); parameters, and the input and target that
the caller holds anyway, are excluded. The table shows the
peak of the live total during one step. Peak RSS growth over the step is
shown beside it (mallopt fixes glibc's mmap threshold at 128 KiB so freed
activations leave the RSS).

Estimate, in activation units (1 unit = one layer's output for the whole
mini-batch, N x 2048 floats): the plain model holds L (every ReLU output;
L = 32 blocks), as does 'never'. 'always' holds GPipe's O(N + L/K x N/M)
per stage: the stage input for all micro-batches (1 unit; stage 0's is the
caller's input) plus one recomputed micro-batch (L/K / M units),
K - 1 + L/M in all; 'except_last' holds at most L/M more, the last
micro-batch's activations.

Run: .venv/bin/python benchmarks/bench_checkpoint.py  (about 2 minutes on
2 cores: one warm-up and one measured step per run)
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

import pipegear

BLOCKS, WIDTH, BATCH, K, M = 32, 2048, 512, 4, 8


def _fix_mmap_threshold() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, and no dynamic one
    except OSError:  # pragma: no cover - not glibc
        pass


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


class RssPeak:
    """Peak RSS growth over a block: VmHWM after resetting it, or sampling."""

    def __enter__(self) -> "RssPeak":
        _trim()
        self.base = _status_kib("VmRSS")
        self.sampled = self.base
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.hwm = True
        except OSError:
            self.hwm = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, _status_kib("VmRSS"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        peak = _status_kib("VmHWM") if self.hwm else self.sampled
        self.peak_bytes = (max(peak, self.sampled) - self.base) * 1024


class OtherLoad:
    """Share of the machine's CPU time that other processes used in a block."""

    @staticmethod
    def _sample() -> Tuple[int, int, int]:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], sum(v), int(own[11]) + int(own[12])

    def __enter__(self) -> "OtherLoad":
        self.start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        busy, total, own = (b - a for a, b in zip(self.start, self._sample()))
        self.share = max(0.0, (busy - own) / total) if total else 0.0


class SavedCounter:
    """Live bytes of activations held for backward, per storage."""

    def __init__(self, exclude: set) -> None:
        self.exclude = exclude
        self.lock = threading.Lock()
        self.refs: Dict[int, List[int]] = {}
        self.live = 0
        self.peak = 0
        self.packs = 0
        self.checkpoint_inputs = 0

    def acquire(self, t: torch.Tensor) -> Optional[int]:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0:
            return None
        with self.lock:
            entry = self.refs.get(key)
            if entry is None:
                self.refs[key] = [1, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            else:
                entry[0] += 1
        return key

    def release(self, key: Optional[int]) -> None:
        if key is None:
            return
        with self.lock:
            entry = self.refs[key]
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.refs[key]


class _Packed:
    __slots__ = ("tensor", "key", "counter")

    def __init__(self, counter: SavedCounter, t: torch.Tensor) -> None:
        self.counter = counter
        self.tensor = t.detach()  # detached: no cycle through saved outputs
        self.key = counter.acquire(t)

    def __del__(self) -> None:
        self.counter.release(self.key)


def count_activations(counter: SavedCounter, first_layers: List[nn.Module],
                      fn: Callable[[], None]) -> None:
    def pack(t: torch.Tensor) -> _Packed:
        counter.packs += 1
        return _Packed(counter, t)

    def unpack(p: _Packed) -> torch.Tensor:
        return p.tensor

    def keep_input(module: nn.Module, args: Tuple) -> None:
        if not pipegear.is_checkpointing():
            return
        for t in args:
            if isinstance(t, torch.Tensor):
                counter.checkpoint_inputs += 1
                weakref.finalize(t, counter.release, counter.acquire(t))

    handles = [m.register_forward_pre_hook(keep_input) for m in first_layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            fn()
    finally:
        for h in handles:
            h.remove()
    gc.collect()


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: List[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers)


def estimate_units(mode: str) -> float:
    if mode in ("plain", "never"):
        return BLOCKS
    always = K - 1 + BLOCKS / M
    return always if mode == "always" else always + BLOCKS / M


def measure(mode: str, model: nn.Sequential, x: torch.Tensor,
            t: torch.Tensor) -> Tuple[float, SavedCounter, int, float]:
    if mode == "plain":
        runner: nn.Module = model
        first_layers: List[nn.Module] = []

        def step() -> None:
            F.mse_loss(model(x), t).backward()
    else:
        runner = pipegear.GPipe(model, balance=[2 * BLOCKS // K] * K,
                                chunks=M, checkpoint=mode)
        first_layers = [part[0] for part in runner.partitions]

        def step() -> None:
            runner.step(x, t, F.mse_loss)

    step()  # warm-up; allocates the gradients, which then stay
    runner.zero_grad(set_to_none=False)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {x.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    exclude |= {p.grad.untyped_storage().data_ptr()
                for p in model.parameters() if p.grad is not None}
    # One measured step (the hooks cost microseconds next to seconds),
    # measured again once if other processes took over 10% of the CPU.
    for attempt in range(2):
        counter = SavedCounter(exclude)
        with OtherLoad() as load, RssPeak() as rss:
            start = time.perf_counter()
            count_activations(counter, first_layers, step)
            seconds = time.perf_counter() - start
        runner.zero_grad(set_to_none=False)
        if load.share <= 0.10:
            break
    return seconds, counter, rss.peak_bytes, load.share


def main() -> None:
    _fix_mmap_threshold()
    load = os.getloadavg()[0]
    print("# bench_checkpoint\n")
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, pipegear "
          f"{pipegear.__version__}, Python {sys.version.split()[0]}, load "
          f"average {load:.2f} at start\n")
    unit = BATCH * WIDTH * 4
    print(f"{BLOCKS} x (Linear({WIDTH}, {WIDTH}) + ReLU), batch {BATCH}, "
          f"float32, CPU. pipegear: K={K} stages of {BLOCKS // K} blocks, "
          f"M={M}, worker_threads default ({max(1, torch.get_num_threads() // K)}"
          f" per stage); plain: {torch.get_num_threads()} intra-op threads. "
          f"1 activation unit = {BATCH} x {WIDTH} floats = "
          f"{unit / 2**20:.0f} MiB. Time: the measured step (forward + "
          f"backward, after a warm-up step); 'other load' is other processes' "
          f"share of the CPU during it (a step is measured again once if "
          f"that is above 10%).\n")
    model = build_model()
    x, t = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    rows = []
    for mode in ("plain", "never", "except_last", "always"):
        seconds, counter, rss, share = measure(mode, model, x, t)
        rows.append((mode, seconds, counter, rss, share))
        _trim()
    plain_bytes = rows[0][2].peak
    print("| run | activations held (MiB) | units | % of plain | "
          "estimate (units) | peak RSS growth (MiB) | time / step (s) | "
          "saved tensors packed | checkpoint inputs | other load |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for mode, seconds, counter, rss, share in rows:
        name = "plain" if mode == "plain" else f"K={K}, M={M}, {mode}"
        print(f"| {name} | {counter.peak / 2**20:.0f} | "
              f"{counter.peak / unit:.1f} | {counter.peak / plain_bytes:.0%} | "
              f"{'<= ' if mode == 'except_last' else ''}"
              f"{estimate_units(mode):.0f} | {rss / 2**20:.0f} | "
              f"{seconds:.2f} | {counter.packs} | {counter.checkpoint_inputs} | "
              f"{share:.0%} |")
    if any(row[2].packs == 0 for row in rows):
        print("\nWARNING: a run packed no saved tensors: the hooks did not "
              "reach the workers, so its count is not valid.")
    always = rows[-1][2].peak / plain_bytes
    print(f"\nGoal: 'always' <= 35% of plain's activation memory: "
          f"{always:.0%}, {'met' if always <= 0.35 else 'MISSED'}.")
    print()


if __name__ == "__main__":
    main()
