"""Trains a small Hugging Face GPT-2 with a 2-stage pipeline on CPU.

A language model end to end (issue #20): ``transformers.GPT2LMHeadModel``
with a random init (no download), turned into an ``nn.Sequential`` by
``pipegear.models.gpt2_sequential``, its head tied to the embedding across
the first and the last stage; trained with AdamW in step style on byte
tokens of Python's standard library sources (real text nobody here wrote,
already on every machine). Prints the loss, evaluates on held-out text,
plots the loss curve, and hands the trained weights to the plain
``GPT2LMHeadModel``, which generates a sample.

    .venv/bin/python examples/python/train_gpt2.py [--steps 200] [--out out/]

or one stage per process, with ``DistributedGPipe`` over Gloo:

    .venv/bin/torchrun --nproc_per_node=2 examples/python/train_gpt2.py

Writes ``out/gpt2_loss.png`` (with matplotlib) and ``out/gpt2_loss.csv``
(rank 0 under torchrun).
"""
import argparse
import copy
import math
import os
import sys
import time

import torch

import pipegear
from pipegear.models import CausalLMLoss, data, gpt2_sequential

try:
    from tqdm import tqdm
except ImportError:  # the setup installs it; the example runs without
    tqdm = None


class _Progress:
    """A one-line progress bar for when tqdm is not installed."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.start, self.text = total, 0, time.time(), ""

    def update(self, n: int = 1) -> None:
        self.n += n
        width = 30
        done = int(width * self.n / self.total)
        rate = self.n / max(time.time() - self.start, 1e-9)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] "
                         f"{self.n}/{self.total} {rate:.2f} it/s {self.text}")
        sys.stderr.flush()

    def set_postfix_str(self, text: str) -> None:
        self.text = text

    def write(self, text: str) -> None:
        sys.stderr.write("\r" + " " * 79 + "\r")
        print(text, flush=True)

    def close(self) -> None:
        sys.stderr.write("\n")


def progress(total: int):
    if tqdm is not None:
        return tqdm(total=total, unit="step", dynamic_ncols=True)
    return _Progress(total)


def feed(pipe, x, y):
    """The step's input and target for this rank: a DistributedGPipe's
    first rank takes the input, its last the target; GPipe takes both."""
    return (x if getattr(pipe, "is_first", True) else None,
            y if getattr(pipe, "is_last", True) else None)


def evaluate(pipe, inputs, targets, batch):
    """Mean loss per target byte over the held-out sequences (padding
    ignored), in eval mode: no dropout, nothing checkpointed, no graph."""
    pipe.eval()
    total, count = 0.0, 0
    loss_fn = CausalLMLoss(reduction="sum")
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            x, y = inputs[i:i + batch], targets[i:i + batch]
            total += pipe.step(*feed(pipe, x, y), loss_fn).item()
            count += int((y != data.IGNORE).sum())
    pipe.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--sample", type=int, default=120,
                        help="bytes to generate at the end (0: none; at "
                        "most the sequence length less the prompt)")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()

    import transformers
    transformers.logging.set_verbosity_error()

    # Under torchrun: one stage per process (Gloo); rank 0 reports.
    group = None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from pipegear.distributed import init_from_env
        group = init_from_env()
        args.stages = group.size()
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    reporting = group is None or group.rank() == 0
    log = print if reporting else (lambda *a, **k: None)

    # -- data: the standard library's sources, byte tokens ---------------
    # The first sequences are held out; the text ends half-way through the
    # last training sequence, which is padded (ignored targets).
    held_out = 32
    rows = args.steps * args.batch + held_out
    text = data.stdlib_text(rows * args.seq_len + 1 - args.seq_len // 2)
    inputs, targets = data.pack(text, args.seq_len)
    eval_x, eval_y = inputs[:held_out], targets[:held_out]
    train_x, train_y = inputs[held_out:], targets[held_out:]
    log(f"data: {len(text) / 1e6:.2f} MB of the standard library's "
          f"sources ({len(data.stdlib_files())} files), byte tokens: "
          f"{held_out} held-out and {len(train_x)} training sequences of "
          f"{args.seq_len}, the last padded "
          f"({int((train_y == data.IGNORE).sum())} ignored targets)")

    # -- the model: GPT-2, random init, as a Sequential --------------------
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=data.VOCAB_SIZE, n_positions=args.seq_len,
        n_embd=args.width, n_layer=args.layers, n_head=args.heads,
        resid_pdrop=args.dropout, embd_pdrop=args.dropout,
        attn_pdrop=args.dropout, bos_token_id=data.PAD,
        eos_token_id=data.PAD)
    model = transformers.GPT2LMHeadModel(config)
    seq = gpt2_sequential(model)
    params = sum(p.numel() for p in seq.parameters())
    log(f"model: GPT-2, {args.layers} blocks, width {args.width}, "
          f"{params / 1e6:.2f} M parameters (lm_head tied to embed.wte)")

    balance = pipegear.balance_by_time(args.stages, seq,
                                       train_x[:args.batch], repeats=2)
    if group is None:
        pipe = pipegear.GPipe(seq, balance, devices=["cpu"] * args.stages,
                              chunks=args.chunks, checkpoint="except_last")
        print(f"balance {balance}: " + " | ".join(
            ", ".join(part._modules) for part in pipe.partitions))
        print(pipe.schedule_table())
    else:
        import torch.distributed as dist

        # Timings differ from rank to rank: every rank takes rank 0's
        # balance (the ranks must agree on it).
        shared = [balance]
        dist.broadcast_object_list(shared, src=0, group=group)
        balance = shared[0]
        # The tie (lm_head.weight is embed.wte.weight) spans the first and
        # the last rank: each holds a copy, their gradients are summed.
        pipe = pipegear.DistributedGPipe(seq, balance, process_group=group,
                                         chunks=args.chunks,
                                         checkpoint="except_last")
        log(f"balance {balance} over {args.stages} ranks")
        print(f"rank {group.rank()}: {', '.join(pipe._modules)}", flush=True)

    optimizer = torch.optim.AdamW(pipe.parameters(), lr=args.lr,
                                  weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    loss_fn = CausalLMLoss()
    order = torch.randperm(len(train_x),
                           generator=torch.Generator().manual_seed(1))

    # -- training ----------------------------------------------------------
    losses, evals = [], []
    bar = progress(args.steps) if reporting else None
    start = time.time()
    for step in range(1, args.steps + 1):
        rows = order[(step - 1) * args.batch % len(order):][:args.batch]
        # Every rank gets the loss of the step.
        loss = pipe.step(*feed(pipe, train_x[rows], train_y[rows]), loss_fn)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix_str(f"loss {losses[-1]:.3f}")
            bar.update(1)
        if step == 1 or step % args.eval_every == 0 or step == args.steps:
            evals.append((step, evaluate(pipe, eval_x, eval_y, args.batch)))
            recent = sum(losses[-10:]) / len(losses[-10:])
            if bar is not None:
                bar.write(f"step {step:4d}  train loss {recent:.3f}  "
                          f"held-out {evals[-1][1]:.3f} "
                          f"({evals[-1][1] / math.log(2):.2f} bits/byte)")
    if bar is not None:
        bar.close()
    elapsed = time.time() - start
    tokens = args.steps * args.batch * args.seq_len
    log(f"{args.steps} steps in {elapsed:.0f} s: {tokens / elapsed:.0f} "
        "tokens/s" + ("" if group is not None else
                      "; last step's bubble fraction "
                      f"{pipe.last_trace.bubble_fraction:.2f}"))

    # The whole state: one rank's slice each under torchrun (its keys are
    # the plain model's; the tied weight is on the first and the last).
    state = pipe.state_dict()
    if group is not None:
        slices = [None] * group.size() if reporting else None
        dist.gather_object(state, slices, dst=0, group=group)
        # Every rank is done with the group: take it down together, before
        # the interpreter exits (left to the exit, Gloo's threads may be
        # torn down while still running: "terminate called without an
        # active exception").
        del pipe, optimizer, scheduler
        dist.barrier(group=group)
        dist.destroy_process_group()
        if not reporting:
            return
        state = {k: v for part in slices for k, v in part.items()}

    # -- the loss curve ----------------------------------------------------
    os.makedirs(args.out, exist_ok=True)
    csv = os.path.join(args.out, "gpt2_loss.csv")
    with open(csv, "w") as f:
        f.write("step,train_loss,held_out_loss\n")
        held = dict(evals)
        for i, value in enumerate(losses, 1):
            f.write(f"{i},{value:.6f},{held.get(i, '')}\n")
    print(f"loss curve saved to {csv}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(1, len(losses) + 1), losses, lw=0.8,
                label="training batch")
        ax.plot(*zip(*evals), "o-", label="held-out")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy per byte (nats)")
        ax.set_title(f"GPT-2 ({params / 1e6:.1f} M) on stdlib bytes, "
                     f"pipegear K={args.stages}, chunks {args.chunks}")
        ax.legend()
        ax.grid(alpha=0.3)
        png = os.path.join(args.out, "gpt2_loss.png")
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        print(f"loss plot saved to {png}")

    # -- the plain model takes the trained weights and writes --------------
    if args.sample > 0:
        plain = transformers.GPT2LMHeadModel(copy.deepcopy(config))
        # The pipeline saves the plain model's keys: no renaming.
        plain.load_state_dict(state, strict=True)
        plain.eval()
        prompt = torch.tensor([list(b"def ")])
        torch.manual_seed(2)
        # GPT-2 has no position past n_positions = seq_len.
        new = min(args.sample, args.seq_len - prompt.shape[1])
        out = plain.generate(prompt, max_new_tokens=new,
                             do_sample=True, top_k=10,
                             pad_token_id=data.PAD,
                             attention_mask=torch.ones_like(prompt))
        sample = bytes(t for t in out[0].tolist() if t < 256)
        print("sample from the plain GPT2LMHeadModel with the pipeline's "
              "weights:\n" + sample.decode("utf-8", "replace"))


if __name__ == "__main__":
    main()
