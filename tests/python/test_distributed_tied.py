"""Parameters tied across the ranks of a DistributedGPipe (issue #20).

The first and the last rank hold a tie (an embedding and the head reusing
its weight, as GPT-2's); 2 and 3 ranks over Gloo, each rank a process:

- found by identity in an ``nn.Sequential``, or named by
  ``tied_parameters`` for layer factories (whose copies start different:
  the first rank's value is broadcast);
- step and module style, 4 AdamW steps: the losses and every rank's
  parameters equal the plain model's (float64, 1e-12), and the copies of
  the tied weight on the two ranks are equal bit for bit;
- gradients accumulated over two steps without zero_grad are summed once;
- a tie whose copies have different shapes, a name that is no layer's or
  no parameter's: the same ValueError on every rank.

GPT-2 itself across ranks: test_distributed_gpt2.py.

This file is also the worker script: ``python test_distributed_tied.py
RANK WORLD PORT OUT``.
"""
import copy
import json
import os
import sys
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import pipegear
from ranks import run_ranks

V, D, T, ROWS = 11, 6, 5, 6
TOL = dict(rtol=1e-12, atol=1e-12)
STEPS = 4


class Embed(nn.Module):
    def __init__(self, weight=None):
        super().__init__()
        self.weight = weight if weight is not None else nn.Parameter(
            torch.randn(V, D, dtype=torch.float64))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


def lm(seed=0):
    """embed, 2 x (Linear, Tanh), head tied to embed: 6 layers."""
    torch.manual_seed(seed)
    embed = Embed()
    head = nn.Linear(D, V, bias=False).double()
    head.weight = embed.weight
    layers = [("embed", embed)]
    for i in range(2):
        layers += [(f"fc{i}", nn.Linear(D, D).double()),
                   (f"act{i}", nn.Tanh())]
    return nn.Sequential(OrderedDict(layers + [("head", head)]))


def factories(seed=0):
    """The same model as layer factories: every rank builds only its own
    layers, so the head's weight starts as a different tensor; the tie is
    named by tied_parameters (list layers are named by their index)."""
    plain = lm(seed)

    def make(i):
        def build():
            layer = copy.deepcopy(plain[i])
            if i == 5:  # the head: its own (random) weight, not the tie
                layer.weight = nn.Parameter(torch.randn(V, D,
                                                        dtype=torch.float64))
            return layer
        return build

    return [make(i) for i in range(6)], plain


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V, (ROWS, T), generator=g)
    target = torch.randint(0, V, (ROWS, T), generator=g)
    target[-1, 2:] = -100
    return ids, target


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def count(target):
    return (target != -100).sum()


BALANCES = {2: [3, 3], 3: [2, 2, 2]}


def _train(pipe, style, steps=STEPS, zero=True):
    opt = torch.optim.AdamW(pipe.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        ids, target = batch(step)
        first, last = pipe.is_first, pipe.is_last
        if style == "step":
            loss = pipe.step(ids if first else None, target if last else None,
                             loss_fn, count=count)
        else:
            out = pipe(ids if first else None)
            if last:
                loss = loss_fn(out, target)
                loss.backward()
            else:
                out.backward()
                loss = out
        losses.append(float(loss))
        if zero:
            opt.step()
            opt.zero_grad()
    return losses


def _state(pipe):
    return {k: v.tolist() for k, v in pipe.state_dict().items()}


def _grads(pipe):
    return {n: p.grad.tolist() for n, p in pipe.named_parameters()}


def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    balance = BALANCES[world]
    report = {}
    for style in ("step", "module"):
        pipe = pipegear.DistributedGPipe(lm(), balance, chunks=3,
                                         checkpoint="always", timeout=30.0)
        report[f"sequential-{style}"] = {"losses": _train(pipe, style),
                                         "state": _state(pipe)}
    layers, _ = factories()
    pipe = pipegear.DistributedGPipe(layers, balance, chunks=2, timeout=30.0,
                                     tied_parameters=[["0.weight",
                                                       "5.weight"]])
    report["factories"] = {"losses": _train(pipe, "step"),
                           "state": _state(pipe)}
    pipe = pipegear.DistributedGPipe(lm(), balance, chunks=3, timeout=30.0)
    _train(pipe, "step", steps=2, zero=False)
    report["accumulate"] = {"grads": _grads(pipe)}

    def wrong(i):
        def build():
            layer = lm()[i]
            if i == 5:
                layer.weight = nn.Parameter(torch.zeros(D, V))
            return layer
        return build

    report["mistakes"] = {}
    for name, layers, tied in [
            ("shapes", [wrong(i) for i in range(6)], [["0.weight",
                                                       "5.weight"]]),
            ("no-layer", factories()[0], [["0.weight", "9.weight"]]),
            ("no-parameter", factories()[0], [["0.weight", "5.bias"]]),
            ("one-name", factories()[0], [["0.weight"]]),
            ("not-a-list", factories()[0], "0.weight"),
            ("two-on-one-rank", factories()[0], [["0.weight", "1.weight",
                                                  "5.weight"]])]:
        try:
            pipegear.DistributedGPipe(layers, balance, timeout=30.0,
                                      tied_parameters=tied)
            report["mistakes"][name] = None
        except (TypeError, ValueError) as e:
            report["mistakes"][name] = f"{type(e).__name__}: {e}"

    # Last (it leaves a forward undrained): a module-style forward with
    # grad whose output is dropped (a logged validation loss) leaves the
    # tied gradient as the plain model's: it is set aside only when a drain
    # starts.
    pipe = pipegear.DistributedGPipe(lm(), balance, chunks=3, timeout=30.0)
    _train(pipe, "module", steps=1, zero=False)
    before = _grads(pipe)
    pipe(batch(0)[0] if pipe.is_first else None)
    report["dropped-forward"] = _grads(pipe) == before
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def _plain_run(model, style="step", steps=STEPS, zero=True):
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        ids, target = batch(step)
        loss = loss_fn(model(ids), target)
        loss.backward()
        losses.append(loss.item())
        if zero:
            opt.step()
            opt.zero_grad()
    return losses


def _assert_states(reports, key, plain_state, tol=TOL):
    """Every rank's slice equals the plain model's, and the tied weight's
    copies on the first and the last rank are equal bit for bit."""
    seen = {}
    for rank, report in enumerate(reports):
        for name, value in report[key]["state"].items():
            assert name not in seen, (name, rank)
            seen[name] = torch.tensor(value, dtype=torch.float64)
            torch.testing.assert_close(seen[name], plain_state[name], **tol,
                                       msg=f"{key}: {name} on rank {rank}")
    assert list(seen) == list(plain_state)
    return seen


@pytest.mark.parametrize("world", [2, 3])
def test_a_tie_across_ranks_trains_like_the_plain_model(world, tmp_path):
    reports = run_ranks(__file__, world, tmp_path)
    for style in ("step", "module"):
        key = f"sequential-{style}"
        plain = lm()
        ref = _plain_run(plain, style)
        if style == "step":  # every rank gets the loss
            for report in reports:
                assert report[key]["losses"] == reports[-1][key]["losses"]
        losses = reports[-1][key]["losses"]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref),
                                   **TOL)
        seen = _assert_states(reports, key, plain.state_dict())
        assert torch.equal(seen["embed.weight"], seen["head.weight"])

    # Factories: the head's copy started elsewhere; rank 0's value won.
    _, plain = factories()
    ref = _plain_run(plain)
    torch.testing.assert_close(
        torch.tensor(reports[-1]["factories"]["losses"]), torch.tensor(ref),
        **TOL)
    seen = _assert_states(reports, "factories", {
        k.replace("embed", "0").replace("head", "5").replace("fc0", "1")
         .replace("fc1", "3"): v for k, v in plain.state_dict().items()})
    assert torch.equal(seen["0.weight"], seen["5.weight"])

    # Two steps without zero_grad: each step's sum is added once.
    plain = lm()
    _plain_run(plain, steps=2, zero=False)
    grads = {}
    for report in reports:
        for name, g in report["accumulate"]["grads"].items():
            grads[name] = torch.tensor(g, dtype=torch.float64)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **TOL, msg=name)
    tied = plain.embed.weight.grad
    torch.testing.assert_close(grads["head.weight"], tied, **TOL)
    assert all(report["dropped-forward"] for report in reports)

    # Mistakes: the same error on every rank (a mistake only one rank can
    # see is gathered first), before any step.
    last = world - 1
    expected = {
        "shapes": "ValueError: tied_parameters[0]: a tie across ranks needs "
                  f"one shape, but '0.weight' on rank 0 has shape ({V}, {D}) "
                  f"and '5.weight' on rank {last} has shape ({D}, {V})",
        "no-layer": "ValueError: tied_parameters[0] names '9.weight', but "
                    "the model has no layer '9' (layers: 0, 1, 2, 3, 4, 5)",
        "no-parameter": f"ValueError: tied_parameters[0]: rank {last} holds "
                        "layer '5' but it has no parameter '5.bias'",
        "one-name": "ValueError: tied_parameters[0] must name at least 2 "
                    "parameters, got ['0.weight']",
        "not-a-list": "TypeError: tied_parameters must be a list of lists "
                      "of parameter names, got str",
        "two-on-one-rank": "ValueError: tied_parameters[0]: 0.weight, "
                           "1.weight are 2 different parameters on rank 0; "
                           "within a rank, tie them as modules do (b.weight "
                           "= a.weight)",
    }
    for report in reports:
        assert report["mistakes"] == expected


if __name__ == "__main__":
    _worker(*map(int, sys.argv[1:4]), sys.argv[4])
