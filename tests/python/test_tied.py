"""Parameters tied across partitions (issue #20; python/pipegear/tied.py).

A small language model whose output head reuses its embedding's weight, as
GPT-2 does, pipelined with the tie in the first and the last partition:

- partitions on the owner's device compute with an alias of the parameter
  (its storage, a gradient of their own); on another device with a copy:
  run here with the CPU standing in for the other device
  (``tied.needs_copy`` replaced), so the refresh, the gradient sum and the
  bookkeeping run for real;
- both faces, every checkpoint mode, both schedules: the losses, gradients
  and parameters after AdamW steps equal the plain model's (float64,
  1e-12); ``parameters()`` and ``state_dict()`` are the plain model's;
- the tied gradient is exact (integer-valued gradients, compared bit for
  bit, 32 micro-batches) and reproducible run to run in float32 (no two
  workers add into one ``.grad``).
"""
import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import pipegear
from pipegear import tied

V, D, T = 11, 6, 5  # vocabulary, width, sequence length
TOL = dict(rtol=1e-12, atol=1e-12)


class Embed(nn.Module):
    def __init__(self, vocab=V, width=D):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, width))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


def lm(seed=0, layers=2, vocab=V, width=D):
    """embed, `layers` x (Linear, Tanh), head tied to embed."""
    torch.manual_seed(seed)
    body = []
    for i in range(layers):
        body += [(f"fc{i}", nn.Linear(width, width)), (f"act{i}", nn.Tanh())]
    head = nn.Linear(width, vocab, bias=False)
    embed = Embed(vocab, width)
    head.weight = embed.weight
    return nn.Sequential(OrderedDict(
        [("embed", embed)] + body + [("head", head)])).double()


def batch(seed=1, rows=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, T), generator=g)
    target = torch.randint(0, V, (rows, T), generator=g)
    target[0, :3] = -100  # some ignored targets
    return ids, target


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(),
                           reduction="sum")


@pytest.fixture(params=["alias", "copy"])
def replicate(request, monkeypatch):
    """The replicas' two kinds: aliases (partitions on the owner's device,
    here), copies (the CPU standing in for another device)."""
    if request.param == "copy":
        monkeypatch.setattr(tied, "needs_copy", lambda owner, device: True)
    return request.param


def _pipe(model, balance, **kwargs):
    return pipegear.GPipe(model, balance, devices=["cpu"] * len(balance),
                          **kwargs)


def _assert_like_plain(pipe, plain):
    """parameters(), named_parameters() and state_dict() as the plain
    model's: the same names, the same values, the tie listed once / twice."""
    assert [n for n, _ in pipe.named_parameters()] == \
        [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in pipe.named_parameters(remove_duplicate=False)] == \
        [n for n, _ in plain.named_parameters(remove_duplicate=False)]
    assert len(list(pipe.parameters())) == len(list(plain.parameters()))
    ours, theirs = pipe.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], **TOL, msg=k)
    for (name, p), (_, q) in zip(pipe.named_parameters(),
                                 plain.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


def _train(pipe, plain, steps, style, chunks_batch_seed=1):
    """`steps` AdamW steps of both; the losses must match every step."""
    opt = torch.optim.AdamW(pipe.parameters(), lr=0.05)
    ref_opt = torch.optim.AdamW(plain.parameters(), lr=0.05)
    for step in range(steps):
        ids, target = batch(chunks_batch_seed + step)
        ref = loss_fn(plain(ids), target)
        ref.backward()
        if style == "step":
            loss = pipe.step(ids, target, loss_fn, reduction="sum")
        else:
            loss = loss_fn(pipe(ids), target)
            loss.backward()
        torch.testing.assert_close(loss.detach(), ref.detach(), **TOL)
        _assert_like_plain(pipe, plain)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    _assert_like_plain(pipe, plain)


CASES = [(style, schedule, checkpoint)
         for style in ("step", "module")
         for schedule in ("gpipe", "1f1b")
         for checkpoint in ("always", "except_last", "never")
         if not (style == "module" and schedule == "1f1b")]


@pytest.mark.parametrize("style, schedule, checkpoint", CASES)
def test_tied_across_partitions_trains_like_the_plain_model(
        replicate, style, schedule, checkpoint):
    plain = lm()
    pipe = _pipe(copy.deepcopy(plain), [2, 2, 2], chunks=3,
                 schedule=schedule, checkpoint=checkpoint)
    ties = pipe._ties.ties
    assert len(ties) == 1 and ties[0].partitions == [0, 2]
    # The head computes with an alias of the parameter, or with a copy.
    assert pipe.head.weight is not pipe.embed.weight
    assert (pipe.head.weight.data_ptr() == pipe.embed.weight.data_ptr()) == \
        (replicate == "alias")
    _train(pipe, plain, 4, style)


@pytest.mark.parametrize("balance", [[1, 5], [2, 1, 1, 2], [6]])
def test_any_balance(replicate, balance):
    plain = lm()
    pipe = _pipe(copy.deepcopy(plain), balance, chunks=4)
    _train(pipe, plain, 3, "step")


def test_three_partitions_each_have_a_replica(replicate):
    """Embedding in partition 0, a layer reading the weight in partition 1,
    the head in partition 2: a replica for each of partitions 1 and 2, each
    accumulated by its own worker and summed in partition order."""

    class Mix(nn.Module):  # uses the embedding weight as a D x D block
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x + x @ self.weight[:D, :].t() * 0.1

    plain = lm(layers=1)
    layers = list(plain._modules.items())
    layers.insert(3, ("mix", Mix(plain.embed.weight)))
    plain = nn.Sequential(OrderedDict(layers))
    pipe = _pipe(copy.deepcopy(plain), [2, 2, 1], chunks=2)
    (tie,) = pipe._ties.ties
    assert tie.partitions == [0, 1, 2]
    assert [r.partition for r in tie.replicas] == [1, 2]
    assert pipe.mix.weight is tie.replicas[0].param
    assert pipe.head.weight is tie.replicas[1].param
    _train(pipe, plain, 3, "step")
    _train(pipe, plain, 2, "module")


def test_replicas_follow_the_parameter(replicate):
    """Refreshed before every forward: after an optimizer step, a
    load_state_dict, an in-place change through .data, a dtype cast,
    freezing."""
    plain = lm()
    pipe = _pipe(copy.deepcopy(plain), [2, 4], chunks=2)
    replica = pipe.head.weight
    ids, target = batch()
    with torch.no_grad():
        pipe.embed.weight.data.mul_(2)  # no version bump
        plain.embed.weight.mul_(2)
    torch.testing.assert_close(pipe(ids), plain(ids), **TOL)
    assert torch.equal(replica, pipe.embed.weight)

    state = lm(seed=5).state_dict()
    pipe.load_state_dict(state)
    plain.load_state_dict(state)
    _assert_like_plain(pipe, plain)
    torch.testing.assert_close(pipe(ids), plain(ids), **TOL)

    pipe.float()
    plain.float()
    assert pipe.head.weight.dtype == torch.float32
    torch.testing.assert_close(pipe(ids), plain(ids))

    pipe.embed.weight.requires_grad_(False)  # frozen by the owner's name
    pipe.step(ids, target, loss_fn, reduction="sum")
    assert pipe.embed.weight.grad is None and replica.grad is None


def test_gradients_accumulate_across_steps_and_drains(replicate):
    """Two steps without zero_grad, and two module-style forwards whose
    backwards run afterwards: each drain adds its share once."""
    plain = lm()
    pipe = _pipe(copy.deepcopy(plain), [3, 3], chunks=2, checkpoint="always")
    (ids1, t1), (ids2, t2) = batch(1), batch(2)
    for ids, t in ((ids1, t1), (ids2, t2)):
        loss_fn(plain(ids), t).backward()
    pipe.step(ids1, t1, loss_fn, reduction="sum")
    pipe.step(ids2, t2, loss_fn, reduction="sum")
    _assert_like_plain(pipe, plain)

    pipe.zero_grad()
    out1, out2 = pipe(ids1), pipe(ids2)  # both graphs alive
    loss_fn(out2, t2).backward()
    loss_fn(out1, t1).backward()
    _assert_like_plain(pipe, plain)
    assert pipe.head.weight.grad is None  # moved into the parameter


def test_tuple_outputs_and_no_grad(replicate):
    class Split(nn.Module):
        def forward(self, x):
            return x, x * 2

    class Join(nn.Module):
        def forward(self, xs):
            return xs[0] + xs[1]

    class Heads(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def forward(self, x):
            return x @ self.weight.t(), x.sum(-1)

    plain = lm(layers=1)
    layers = list(plain._modules.items())[:-1]
    layers[2:2] = [("split", Split()), ("join", Join())]
    layers.append(("heads", Heads(plain.embed.weight)))
    plain = nn.Sequential(OrderedDict(layers))
    pipe = _pipe(copy.deepcopy(plain), [2, 2, 2], chunks=3)
    ids, target = batch()
    a, b = plain(ids)
    (loss_fn(a, target) + b.sum()).backward()
    a, b = pipe(ids)
    (loss_fn(a, target) + b.sum()).backward()
    _assert_like_plain(pipe, plain)
    with torch.no_grad():
        out = pipe(ids)
    torch.testing.assert_close(out, plain(ids), **TOL)


def test_copies_keep_the_tie(replicate):
    plain = lm()
    pipe = _pipe(copy.deepcopy(plain), [2, 4], chunks=2)
    buffer = io.BytesIO()
    torch.save(pipe, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(pipe), pickle.loads(pickle.dumps(pipe)),
                  torch.load(buffer, weights_only=False)):
        assert other.head.weight is not other.embed.weight  # a replica
        assert other._ties.ties[0].master is other.embed.weight
        assert other.embed.weight is not pipe.embed.weight
        _train(other, copy.deepcopy(plain), 2, "step")


def test_a_failed_drain_leaves_no_replica_gradient(replicate):
    """A backward that fails in partition 0 after the head's cells ran:
    the replica holds part of a gradient, which the next step drops (the
    user zeroes the parameters' gradients before retrying, as after any
    failed step)."""

    class Fail(torch.autograd.Function):
        armed = False

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            if Fail.armed:
                raise RuntimeError("boom")
            return grad

    class Boom(nn.Module):
        def forward(self, x):
            return Fail.apply(x)

    plain = lm()
    layers = list(plain._modules.items())
    layers.insert(1, ("boom", Boom()))
    model = nn.Sequential(OrderedDict(layers))
    pipe = _pipe(copy.deepcopy(model), [2, 5], chunks=2, checkpoint="never")
    ids, target = batch()
    Fail.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        pipe.step(ids, target, loss_fn, reduction="sum")
    assert pipe.head.weight.grad is not None  # the head's cells ran
    Fail.armed = False
    pipe.zero_grad()
    loss_fn(plain(ids), target).backward()
    pipe.step(ids, target, loss_fn, reduction="sum")
    for p, q in zip(pipe.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


# ---- exactness and reproducibility of the tied gradient ------------------


class IntEmbed(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class IntHead(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.t()


class Scale(nn.Module):
    def forward(self, x):
        return x * 2


def _integer_lm(vocab, width):
    """Integer weights, integer inputs, a sum loss with integer weights:
    every gradient is an integer far below 2**53, so float64 sums are exact
    in any order: a lost or doubled addition shows bit for bit."""
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randint(-3, 4, (vocab, width), generator=g,
                                        dtype=torch.float64))
    return nn.Sequential(OrderedDict([
        ("embed", IntEmbed(weight)), ("scale", Scale()),
        ("head", IntHead(weight))]))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_the_tied_gradient_is_exact(schedule, checkpoint):
    """Stage 0 (the embedding) accumulates into the parameter, stage 1 (the
    head) into its alias, both during the drain; the sum after it equals
    the plain model's bit for bit, 32 micro-batches, 10 steps."""
    vocab, width, rows = 512, 256, 64
    plain = _integer_lm(vocab, width)
    pipe = _pipe(copy.deepcopy(plain), [2, 1], chunks=32, schedule=schedule,
                 checkpoint=checkpoint)
    # An alias: the parameter's storage, a gradient of its own.
    assert pipe.head.weight.data_ptr() == pipe.embed.weight.data_ptr()
    g = torch.Generator().manual_seed(1)
    coef = torch.randint(-2, 3, (rows, 1, vocab), generator=g,
                         dtype=torch.float64)

    def loss(out, c):
        return (out * c).sum()

    for _ in range(10):
        ids = torch.randint(0, vocab, (rows, 1), generator=g)
        plain.zero_grad()
        loss(plain(ids), coef).backward()
        pipe.zero_grad()
        pipe.step(ids, coef, loss, reduction="sum")
        assert torch.equal(pipe.embed.weight.grad, plain.embed.weight.grad)


def test_the_tied_gradient_is_reproducible():
    """float32, 16 micro-batches, stages on one device: the same steps give
    the same tied gradient bit for bit, run after run (with the parameter
    itself in both stages, its two workers' additions interleave as the
    timing goes, and the last bits differ from run to run)."""
    plain = lm(layers=2, vocab=300, width=64).float()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (64, T), generator=g)
    target = torch.randint(0, 300, (64, T), generator=g)
    grads = []
    for _ in range(5):
        pipe = _pipe(copy.deepcopy(plain), [3, 3], chunks=16)
        pipe.step(ids, target, loss_fn, reduction="sum")
        grads.append(pipe.embed.weight.grad)
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0])


# ---- what stays refused ---------------------------------------------------


def test_a_module_in_two_partitions_is_refused():
    a = nn.Linear(3, 3)
    inner = nn.Sequential(nn.Tanh(), a)
    with pytest.raises(ValueError,
                       match=r"module '2\.1' \(partition 1\) is module '0' "
                             r"\(partition 0\)"):
        pipegear.GPipe(nn.Sequential(a, nn.ReLU(), inner), [2, 1])
    with pytest.raises(ValueError, match="same module"):
        pipegear.GPipe(nn.Sequential(a, a), [1, 1])
