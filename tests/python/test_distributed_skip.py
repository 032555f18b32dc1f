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

from ranks import launch_kind

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_skip import WIDTH, down, jumps, resnet, unet, up  # noqa: E402

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


def _init(rank, world, port):
    import datetime
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    return dist


def worker_compare(rank, world, port, out):
    import pipegear
    dist = _init(rank, world, port)
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
    dist = _init(rank, world, port)
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
    dist = _init(rank, world, port)
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


if __name__ == "__main__":
    kind, rank, world, port, out = sys.argv[1:6]
    fn = {"compare": worker_compare, "backwards": worker_backwards,
          "fail": worker_fail}[kind]
    fn(int(rank), int(world), int(port), out)
