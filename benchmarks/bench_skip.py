"""Skip connections through the engine vs threaded through every stage by
hand (issue 19): a U-Net on K=2 and K=4 CPU stages.

The same layers (three encoder levels, a bottom, three decoder levels, a
head; each encoder's output is popped by the decoder of its depth) run in
two ways:

- engine: ``@skippable`` layers; a skip goes straight from the stage that
  stashes it to the stage that pops it;
- by hand: every layer takes and returns a tuple (x, pending skips...), so
  a skip travels through every stage between its producer and consumer
  (what a pipegear user had to write before).

Memory held per stage is counted, not guessed, in module style between
the forward (fill) and the backward (drain), when everything a step keeps
is alive: the storages of the tensors autograd saved while the stage's
worker ran its layers (a saved_tensors_hooks pack hook; pipegear carries
it to the workers) plus the storages of the stage's inputs, popped skips
included (the cells keep them as leaves until their backward), each
storage counted once per stage. checkpoint='never', so every micro-batch's
activations are held. Time: median of 9 measured steps (step style,
forward + backward) after a warm-up step, the two variants' steps
interleaved in one process.

Run: .venv/bin/python benchmarks/bench_skip.py  (about a minute on 2 cores)
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import pipegear  # noqa: E402
from pipegear.skip import pop, skippable, stash  # noqa: E402

BATCH, SIZE, CHUNKS = 32, 64, 4
CH = (16, 32, 64, 128)


def conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


class EncoderBody(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = conv(cin, cout)

    def forward(self, x):
        y = self.conv(x)
        return y, F.max_pool2d(y, 2)


class DecoderBody(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.conv = conv(2 * cout, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([self.up(x), skip], dim=1))


def skip_encoder(level, body):
    @skippable(stash=[f"e{level}"])
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            y, down = self.body(x)
            yield stash(f"e{level}", y)
            return down

    return Encoder()


def skip_decoder(level, body):
    @skippable(pop=[f"e{level}"])
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            s = yield pop(f"e{level}")
            return self.body(x, s)

    return Decoder()


class HandEncoder(nn.Module):
    """(x, skips...) -> (down, skips..., y)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, xs):
        x, *skips = xs if isinstance(xs, tuple) else (xs,)
        y, down = self.body(x)
        return (down, *skips, y)


class HandDecoder(nn.Module):
    """(x, skips..., s) -> (out, skips...)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, xs):
        x, *skips = xs
        out = self.body(x, skips[-1])
        rest = skips[:-1]
        return (out, *rest) if rest else out


class Plain(nn.Module):
    """A layer on the tuple's first element (the others pass through)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, xs):
        if isinstance(xs, tuple):
            return (self.layer(xs[0]), *xs[1:])
        return self.layer(xs)


def bodies():
    torch.manual_seed(0)
    c0, c1, c2, c3 = CH
    enc = [EncoderBody(3, c0), EncoderBody(c0, c1), EncoderBody(c1, c2)]
    bottom = conv(c2, c3)
    dec = [DecoderBody(c3, c2), DecoderBody(c2, c1), DecoderBody(c1, c0)]
    head = nn.Conv2d(c0, 1, 1)
    return enc, bottom, dec, head


def engine_unet():
    enc, bottom, dec, head = bodies()
    return nn.Sequential(
        *[skip_encoder(i, b) for i, b in enumerate(enc)], bottom,
        *[skip_decoder(2 - i, b) for i, b in enumerate(dec)], head)


def hand_unet():
    enc, bottom, dec, head = bodies()
    return nn.Sequential(*[HandEncoder(b) for b in enc], Plain(bottom),
                         *[HandDecoder(b) for b in dec], Plain(head))


class HeldPerStage:
    """Storages held per stage: saved by its worker, or its inputs."""

    def __init__(self, pipe) -> None:
        self.lock = threading.Lock()
        self.stage_of: Dict[int, int] = {}
        self.held: List[Dict[int, int]] = [dict() for _ in pipe.partitions]
        for s, part in enumerate(pipe.partitions):
            part.register_forward_pre_hook(self._pre_hook(s))
            if part._skip_pops:
                original = part._forward_skips

                def wrapped(input, popped, s=s, original=original):  # noqa: A002
                    self._add(s, popped)
                    return original(input, popped)

                part._forward_skips = wrapped

    def _add(self, s, tensors) -> None:
        with self.lock:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    self.held[s][st.data_ptr()] = st.nbytes()

    def _pre_hook(self, s):
        def hook(module, args):
            self.stage_of[threading.get_ident()] = s
            value = args[0]
            self._add(s, value if isinstance(value, tuple) else (value,))
        return hook

    def pack(self, t):
        s = self.stage_of.get(threading.get_ident())
        if s is not None:
            self._add(s, (t,))
        return t

    def mib(self) -> List[float]:
        return [sum(h.values()) / 2**20 for h in self.held]


def measure_memory(make, balance, x):
    pipe = pipegear.GPipe(make(), balance, chunks=CHUNKS, checkpoint="never")
    counter = HeldPerStage(pipe)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        y = pipe(x)
        held = counter.mib()
        y.mean().backward()
    return held


def step_times(pipes, x, target, repeats=9):
    """Median step time of each pipe, their steps interleaved (so that a
    burst of other load hits them alike)."""
    times = {name: [] for name in pipes}
    for pipe in pipes.values():
        pipe.step(x, target, nn.MSELoss())  # warm-up
    for _ in range(repeats):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe.step(x, target, nn.MSELoss())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    target = torch.randn(BATCH, 1, SIZE, SIZE)
    load = os.getloadavg()[0]
    print("# bench_skip\n")
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, pipegear "
          f"{pipegear.__version__}, load average {load:.2f} at start "
          "(the machine is shared: compare rows of this run only)\n")
    print(f"U-Net, 3 levels (channels {CH}), input {BATCH} x 3 x {SIZE} x "
          f"{SIZE}, float32, CPU, chunks {CHUNKS}, checkpoint 'never' for "
          "memory (held between forward and backward, per stage); "
          "step time: step style, median of 9 after a warm-up, the two variants' steps interleaved.\n")
    # Same parameters, same result: the by-hand model is the control.
    a, b = engine_unet(), hand_unet()
    torch.testing.assert_close(a(x[:2]), b(x[:2]))
    notes = []
    print("| K | balance | skips | held per stage (MiB) | total (MiB) | "
          "time / step (s) | time vs engine |")
    print("|--:|---|---|---|--:|--:|--:|")
    for balance in ([4, 4], [2, 2, 2, 2]):
        makers = {"engine": engine_unet, "by hand": hand_unet}
        held = {name: measure_memory(make, balance, x)
                for name, make in makers.items()}
        pipes = {name: pipegear.GPipe(make(), balance, chunks=CHUNKS,
                                      checkpoint="except_last")
                 for name, make in makers.items()}
        times = step_times(pipes, x, target)
        rows = {name: (held[name], times[name]) for name in makers}
        for name, (held_mib, t) in rows.items():
            print(f"| {len(balance)} | {balance} | {name} | "
                  f"{' / '.join(f'{m:.1f}' for m in held_mib)} | "
                  f"{sum(held_mib):.1f} | {t:.3f} | "
                  f"{t / rows['engine'][1]:.2f} |")
        saved = sum(rows["by hand"][0]) - sum(rows["engine"][0])
        differ = [str(i) for i, (a, b) in enumerate(
            zip(rows["engine"][0], rows["by hand"][0])) if abs(a - b) > 0.05]
        notes.append(f"K={len(balance)}: by hand holds {saved:.1f} MiB more "
                     f"({saved / sum(rows['engine'][0]):.0%} of the engine's "
                     "total); stages that differ: "
                     f"{', '.join(differ) or 'none'}; step time by hand / engine "
                     f"{rows['by hand'][1] / rows['engine'][1]:.2f}.")
    print()
    for note in notes:
        print(f"- {note}")
    print("\nOn two stages every skip goes from stage 0 to stage 1, so both "
          "hold the same; the difference grows with the stages a skip "
          "crosses. On the CPU nothing is copied either way; on devices the "
          "by-hand model also copies each skip once per stage crossed.")
    print()


if __name__ == "__main__":
    main()
