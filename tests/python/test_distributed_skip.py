"""Skip connections across the ranks of a DistributedGPipe (issue #19).

The models of test_skip.py (a U-Net of nested skips, namespace-isolated
residuals, skips over 0/1/3 boundaries) on 2 and 3 ranks over Gloo: a
skip goes straight from the stashing rank to the popping rank. Losses,
outputs, the input gradient and every rank's parameter gradients equal the
plain model's, in both faces, both schedules and every checkpoint mode;
a skip going backwards across ranks is the same TypeError on every rank.

This file is also the worker script: ``python test_distributed_skip.py
KIND RANK WORLD PORT OUT``.
"""
import os
import sys

import pytest
import torch
from torch import nn

from ranks import init_gloo, launch_kind

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_skip import (WIDTH, add_into_pop, add_into_pop_of_input,  # noqa: E402
                       down, identity_then_inplace_elsewhere, jumps,
                       relu_after_stash, resnet, unet, up)

MODELS = {"unet": unet, "resnet": resnet, "jumps": jumps}
# (model, chunks, checkpoint, face, schedule)
CONFIGS = [
    ("unet", 1, "never", "module", "gpipe"),
    ("unet", 3, "always", "step", "1f1b"),
    ("unet", 4, "except_last", "step", "gpipe"),
    ("resnet", 3, "except_last", "module", "gpipe"),
    ("resnet", 4, "always", "step", "1f1b"),
    ("jumps", 3, "never", "step", "gpipe"),
    ("jumps", 4, "always", "module", "gpipe"),
    ("jumps", 1, "except_last", "step", "1f1b"),
]
BATCH = 7


def data():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(BATCH, WIDTH, generator=g),
            torch.randn(BATCH, WIDTH, generator=g))


def make(name):
    torch.manual_seed(0)
    return MODELS[name]()


def even_balance(n, k):
    base, extra = divmod(n, k)
    return [base + (i < extra) for i in range(k)]


def worker_compare(rank, world, port, out):
    import pipegear
    dist = init_gloo(rank, world, port)
    first, last = rank == 0, rank == world - 1
    results = []
    for name, chunks, checkpoint, face, schedule in CONFIGS:
        model = make(name)
        pipe = pipegear.DistributedGPipe(
            model, even_balance(len(model), world), chunks=chunks,
            checkpoint=checkpoint, schedule=schedule, timeout=60)
        x, t = data()
        x.requires_grad_(True)
        record = {}
        if face == "step":
            loss = pipe.step(x if first else None, t if last else None,
                             nn.MSELoss())
            record["loss"] = loss.detach()
        else:
            y = pipe(x if first else None)
            if last:
                record["output"] = y.detach()
                nn.functional.mse_loss(y, t).backward()
            else:
                y.backward()
        if first:
            record["input_grad"] = x.grad
        record["grads"] = {n: p.grad.clone()
                           for n, p in pipe.named_parameters()}
        results.append(record)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def worker_backwards(rank, world, port, out):
    """A skip popped on rank 0 and stashed on rank 1: refused everywhere."""
    import pipegear
    dist = init_gloo(rank, world, port)
    model = nn.Sequential(up("x"), nn.Linear(WIDTH, WIDTH), down("x"),
                          nn.Linear(WIDTH, WIDTH))
    try:
        pipegear.DistributedGPipe(model, [2, 2], timeout=60)
        text = "no error"
    except TypeError as e:
        text = f"TypeError: {e}"
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(text)
    dist.destroy_process_group()


class Boom(nn.Module):
    def forward(self, x):
        raise ValueError("boom")


def worker_fail(rank, world, port, out):
    """A layer fails in a step whose skips cross ranks: every rank raises
    the layer's error, and the next step refuses on every rank."""
    import pipegear
    dist = init_gloo(rank, world, port)
    model = make("unet")
    model.insert(5, Boom())  # rank 1's first layer after [4, 5]: d2, d1 pending
    pipe = pipegear.DistributedGPipe(model, [4, 5], chunks=2, timeout=20)
    x, t = data()
    texts = []
    for _ in range(2):
        try:
            pipe.step(x if rank == 0 else None, t if rank == 1 else None,
                      nn.MSELoss())
            texts.append("no error")
        except Exception as e:  # noqa: BLE001
            texts.append(f"{type(e).__name__}: {e}")
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write("\n---\n".join(texts))
    del pipe
    dist.destroy_process_group()


class _Dup(nn.Module):
    def forward(self, x):
        return x, x


class _AddInPlace(nn.Module):
    def forward(self, pair):
        a, b = pair
        a.add_(1.0)
        return a * b


def tuple_alias():
    """No skip: a stage returns one memory twice, the next modifies one in
    place (the mark travels in the message's header too)."""
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), _Dup(), _AddInPlace(),
                         nn.Linear(WIDTH, WIDTH))


SKIP_S = "skip 's' (stashed by rank 0, popped by rank 1)"
# In-place operations on memory a skip (or another tensor of a message)
# shares (test_skip.py): (model, balance over 2 ranks, whether rank 1
# raises: True for skip 's', or the text of its error).
INPLACE = {
    "relu_after_stash": (relu_after_stash, [2, 4], True),
    "add_into_pop": (add_into_pop, [2, 3], True),
    "relu_after_stash_same_rank": (relu_after_stash, [3, 3], False),
    "add_into_pop_of_input": (add_into_pop_of_input, [2, 3], False),
    "identity": (identity_then_inplace_elsewhere, [2, 5], False),
    "tuple_alias": (tuple_alias, [2, 2], "memory that tensors of its input "
                    "share with each other (stage 0 returned tensors sharing "
                    "memory"),
}
INPLACE_RUNS = [(name, checkpoint, face, schedule)
                for name in INPLACE
                for checkpoint in ["never", "always", "except_last"]
                for face, schedule in [("module", "gpipe"), ("step", "gpipe"),
                                       ("step", "1f1b")]]


def worker_inplace(rank, world, port, out):
    """Each run on a group of its own: a failed step with skips between
    ranks leaves its pipeline (and messages on its group) behind."""
    import pipegear
    dist = init_gloo(rank, world, port)
    results = []
    for name, checkpoint, face, schedule in INPLACE_RUNS:
        make_model, balance, _ = INPLACE[name]
        group = dist.new_group(list(range(world)))
        torch.manual_seed(0)
        pipe = pipegear.DistributedGPipe(
            make_model(), balance, process_group=group, chunks=4,
            checkpoint=checkpoint, schedule=schedule, timeout=60)
        x, t = data()
        x.requires_grad_(True)
        record = {}
        try:
            if face == "step":
                record["loss"] = pipe.step(x if rank == 0 else None,
                                           t if rank == 1 else None,
                                           nn.MSELoss()).detach()
            else:
                y = pipe(x if rank == 0 else None)
                if rank == 1:
                    record["output"] = y.detach()
                    nn.functional.mse_loss(y, t).backward()
                else:
                    y.backward()
            if rank == 0:
                record["input_grad"] = x.grad
            record["grads"] = {n: p.grad.clone()
                               for n, p in pipe.named_parameters()}
        except Exception as e:  # noqa: BLE001
            record["error"] = f"{type(e).__name__}: {e}"
        results.append(record)
        del pipe
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _launch(kind, world, out, **options):
    options.setdefault("timeout", 240)
    return launch_kind(__file__, kind, world, out, **options)


def reference(name, face):
    model = make(name)
    x, t = data()
    x.requires_grad_(True)
    y = model(x)
    loss = nn.functional.mse_loss(y, t)
    loss.backward()
    return {"loss": loss.detach(), "output": y.detach(), "input_grad": x.grad,
            "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("world", [2, 3])
def test_skips_across_ranks_match_the_plain_model(tmp_path, world):
    codes, logs = _launch("compare", world, str(tmp_path))
    assert codes == [0] * world, "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, (name, _, _, face, _) in enumerate(CONFIGS):
        ref = reference(name, face)
        first, last = ranks[0][i], ranks[-1][i]
        if face == "step":
            torch.testing.assert_close(last["loss"], ref["loss"])
        else:
            torch.testing.assert_close(last["output"], ref["output"])
        torch.testing.assert_close(first["input_grad"], ref["input_grad"])
        grads = {}
        for r in range(world):
            grads.update(ranks[r][i]["grads"])
        assert sorted(grads) == sorted(ref["grads"]), CONFIGS[i]
        for n, g in ref["grads"].items():
            torch.testing.assert_close(grads[n], g, msg=f"{CONFIGS[i]} {n}")


def test_a_skip_backwards_across_ranks_fails_every_rank(tmp_path):
    codes, logs = _launch("backwards", 2, str(tmp_path), timeout=120)
    assert codes == [0, 0], "\n".join(logs)
    texts = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert texts[0] == texts[1]
    assert texts[0].startswith("TypeError: skip connections do not match")
    assert "rank 0 declared 'x' as poppable but it was not stashed" in texts[0]


def test_a_failed_step_with_skips_across_ranks_breaks_the_pipeline(tmp_path):
    """What was sent and not received cannot be drained: after the failed
    step the pipeline refuses, on every rank, with a clear error."""
    codes, logs = _launch("fail", 2, str(tmp_path), timeout=180)
    assert codes == [0, 0], "\n".join(logs)
    for r in range(2):
        first, second = (tmp_path / f"rank{r}.txt").read_text().split(
            "\n---\n")
        assert "boom" in first, first
        assert "skip connections between ranks" in second, second
        assert "destroy the group and start again" in second, second


def test_inplace_on_memory_a_skip_shares_across_ranks(tmp_path):
    """A rank that modifies in place memory a skip shares with the stash
    layer's output raises ValueError naming the skip (the skip arrives as a
    tensor of its own: the change would not reach it); the other ranks
    raise too. In-place operations away from that memory match the plain
    model."""
    codes, logs = _launch("inplace", 2, str(tmp_path), timeout=400)
    assert codes == [0, 0], "\n".join(logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, (name, checkpoint, face, schedule) in enumerate(INPLACE_RUNS):
        make_model, _, raises = INPLACE[name]
        run = (name, checkpoint, face, schedule)
        first, last = ranks[0][i], ranks[1][i]
        if raises:
            assert "error" in first, run
            text = last.get("error", "")
            assert text.startswith("ValueError: "), (run, text)
            assert "modified in place" in text, (run, text)
            expected = SKIP_S if raises is True else raises
            assert expected in text, (run, text)
            continue
        assert "error" not in first and "error" not in last, (run, first,
                                                              last)
        torch.manual_seed(0)
        model = make_model()
        x, t = data()
        x.requires_grad_(True)
        y = model(x)
        loss = nn.functional.mse_loss(y, t)
        loss.backward()
        if face == "step":
            torch.testing.assert_close(last["loss"], loss.detach())
        else:
            torch.testing.assert_close(last["output"], y.detach())
        torch.testing.assert_close(first["input_grad"], x.grad)
        grads = {**first["grads"], **last["grads"]}
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, msg=f"{run} {n}")


if __name__ == "__main__":
    kind, rank, world, port, out = sys.argv[1:6]
    fn = {"compare": worker_compare, "backwards": worker_backwards,
          "fail": worker_fail, "inplace": worker_inplace}[kind]
    fn(int(rank), int(world), int(port), out)
