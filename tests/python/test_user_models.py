"""Models and losses as users write them (issue #15): every case equals the
plain model, or is a clear error.

- the loss's own reduction ('sum' modules, functools.partial, 'batchmean')
  and a mean over what the loss counts (ignore_index, class weights, a
  user ``count=``), asserted against the plain model to 1e-12;
- eval mode never checkpoints; moving a pipeline, bad devices; layers named
  like GPipe's attributes; slices; deepcopy / pickle / torch.save;
- stage outputs: 1-tuples, batch size changes, a loss without grad,
  in-place layers on checkpointed inputs, Ctrl-C;
- DistributedGPipe on an in-process group of one rank, and two ranks for a
  mistake of the last rank that must reach rank 0.

This file is also the worker script of the two-rank test:
``python test_user_models.py RANK WORLD PORT OUT``.
"""
import copy
import functools
import io
import json
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import pipegear
from pipegear.loss import plan_loss
from ranks import run_ranks

D, C, N = 6, 5, 10  # features, classes, rows (micro-batches of 3,3,2,2 / 4,3,3)
PAD = -100
TOL = dict(rtol=1e-12, atol=1e-12)


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(),
                         nn.Linear(8, C)).double()


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), g


def classes(g, padded=(0, 1, 7), pad=PAD):
    """Class targets; the first micro-batch is mostly padding."""
    t = torch.randint(0, C, (N,), generator=g)
    t[list(padded)] = pad
    return t


def assert_matches_plain(pipe, plain, x, target, loss_fn, **kwargs):
    """step() equals loss_fn(plain(x), target): loss and every gradient."""
    ref = loss_fn(plain(x), target)
    ref.backward()
    loss = pipe.step(x, target, loss_fn, **kwargs)
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    for (name, p), (ref_name, q) in zip(pipe.named_parameters(),
                                        plain.named_parameters()):
        assert name == ref_name
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


WEIGHT = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)


def _probabilities(g):
    return torch.softmax(torch.randn(N, C, generator=g,
                                     dtype=torch.float64), -1)


# (id, loss_fn, target(g), step kwargs)
LOSSES = [
    ("CrossEntropyLoss-sum", nn.CrossEntropyLoss(reduction="sum"),
     lambda g: classes(g, ()), {}),
    ("MSELoss-sum", nn.MSELoss(reduction="sum"),
     lambda g: torch.randn(N, C, generator=g, dtype=torch.float64), {}),
    ("F.cross_entropy-padding", F.cross_entropy, classes, {}),
    ("partial-ignore_index", functools.partial(F.cross_entropy,
                                               ignore_index=3),
     lambda g: classes(g, pad=3), {}),
    ("CrossEntropyLoss-weight-ignore_index",
     nn.CrossEntropyLoss(weight=WEIGHT, ignore_index=2),
     lambda g: classes(g, pad=2), {}),
    ("NLLLoss-weight-padding", nn.NLLLoss(weight=WEIGHT), classes, {}),
    ("partial-weight-label_smoothing",
     functools.partial(F.cross_entropy, weight=WEIGHT, label_smoothing=0.1),
     classes, {}),
    ("CrossEntropyLoss-probabilities", nn.CrossEntropyLoss(weight=WEIGHT),
     _probabilities, {}),
    ("KLDivLoss-batchmean", nn.KLDivLoss(reduction="batchmean"),
     _probabilities, {}),
    ("user-count", lambda o, t: F.cross_entropy(o, t, ignore_index=-1),
     lambda g: classes(g, pad=-1), {"count": lambda t: (t != -1).sum()}),
]


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("chunks", [4, 3])
@pytest.mark.parametrize("loss_fn, make_target, kwargs",
                         [c[1:] for c in LOSSES], ids=[c[0] for c in LOSSES])
def test_step_equals_the_plain_model(loss_fn, make_target, kwargs, chunks,
                                     schedule, checkpoint):
    plain = model()
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 1], devices=["cpu"] * 2,
                          chunks=chunks, schedule=schedule,
                          checkpoint=checkpoint)
    x, g = data()
    assert_matches_plain(pipe, plain, x, make_target(g), loss_fn, **kwargs)


def test_the_issue_padding_in_the_first_micro_batch():
    """The report: F.cross_entropy over padded sequences, the first
    micro-batch mostly padding; the pipeline averaged by rows."""
    plain = model(3)
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 1], devices=["cpu"] * 2,
                          chunks=2)
    x, g = data(4)
    t = classes(g, padded=(0, 1, 2, 3))  # micro-batch 0: 4 of 5 padding
    assert_matches_plain(pipe, plain, x, t, F.cross_entropy)


def test_a_micro_batch_of_padding_only_counts_nothing():
    """Its own mean is 0/0 (NaN); the whole batch's is finite."""
    plain = model(5)
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 1], devices=["cpu"] * 2,
                          chunks=4)
    x, g = data(6)
    t = classes(g, padded=(0, 1, 2))  # micro-batch 0 is rows 0-2
    assert_matches_plain(pipe, plain, x, t, F.cross_entropy)


def test_class_index_losses_count_what_they_average_over():
    t = torch.tensor([0, -100, 2, 2, -100])
    for loss in (F.cross_entropy, F.nll_loss, nn.CrossEntropyLoss(),
                 nn.NLLLoss(), functools.partial(F.cross_entropy,
                                                 label_smoothing=0.1)):
        reduction, count = plan_loss(loss, t, None, None)
        assert reduction == "mean" and int(count(t)) == 3, loss
    w = torch.tensor([1.0, 10.0, 100.0])
    for loss in (nn.CrossEntropyLoss(weight=w, ignore_index=0),
                 functools.partial(F.nll_loss, weight=w, ignore_index=0)):
        _, count = plan_loss(loss, t.clamp(min=0), None, None)
        assert float(count(torch.tensor([0, 1, 2, 2]))) == 210.0
    # A float (probability) target, a sum, a loss with no ignore_index:
    # micro-batches weigh by rows.
    assert plan_loss(F.cross_entropy, torch.rand(4, 3), None, None)[1] is None
    assert plan_loss(nn.CrossEntropyLoss(reduction="sum"), t, None,
                     None) == ("sum", None)
    assert plan_loss(F.mse_loss, torch.rand(4), None, None) == ("mean", None)


def _legacy_sum_loss():
    """nn.MSELoss(size_average=False): 'sum' (torch warns the arguments
    are deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.MSELoss(size_average=False)


@pytest.mark.parametrize("loss_fn, reduction, expected", [
    (nn.MSELoss(reduction="sum"), None, "sum"),
    (nn.MSELoss(), None, "mean"),
    (functools.partial(nn.MSELoss(reduction="sum")), None, "sum"),
    (_legacy_sum_loss(), None, "sum"),
    (functools.partial(F.mse_loss, reduction="sum"), None, "sum"),
    (functools.partial(F.mse_loss, reduce=False, size_average=True), None,
     "none"),
    (F.l1_loss, None, "mean"),
    (F.l1_loss, "mean", "mean"),
    (lambda o, t: (o - t).pow(2).sum(), "sum", "sum"),
    (lambda o, t: (o - t).pow(2).mean(), None, "mean"),
    (nn.KLDivLoss(reduction="batchmean"), "mean", "mean"),
], ids=["module-sum", "module-mean", "partial-of-module", "module-legacy",
        "partial-sum",
        "partial-legacy-none", "function-default", "function-agrees",
        "lambda-sum", "lambda-default", "batchmean-is-mean"])
def test_the_reduction_is_read_from_the_loss(loss_fn, reduction, expected):
    if expected == "none":
        with pytest.raises(ValueError, match="reduces with 'none'"):
            plan_loss(loss_fn, torch.ones(2), reduction, None)
    else:
        assert plan_loss(loss_fn, torch.ones(2), reduction,
                         None)[0] == expected


def _pipe2(**kwargs):
    return pipegear.GPipe(model(), [2, 1], devices=["cpu"] * 2, chunks=2,
                          **kwargs)


ONES, CLS = torch.ones(4, D, dtype=torch.float64), torch.zeros(4).long()
F_SUM = functools.partial(F.mse_loss, reduction="sum")

# (id, call on a pipeline, type, message)
MISTAKES = [
    ("reduction-disagrees",
     lambda p: p.step(ONES, CLS, nn.CrossEntropyLoss(reduction="sum"),
                      reduction="mean"), ValueError,
     "reduction='mean' disagrees with the loss: CrossEntropyLoss reduces "
     "with 'sum'; leave reduction=None"),
    ("reduction-disagrees-partial",
     lambda p: p.step(ONES, ONES[:, :C], F_SUM, reduction="mean"), ValueError,
     r"reduction='mean' disagrees with the loss: functools.partial\(mse_loss"
     r"\) reduces with 'sum'"),
    ("reduction-disagrees-function",
     lambda p: p.step(ONES, ONES[:, :C], F.mse_loss, reduction="sum"),
     ValueError, "reduction='sum' disagrees with the loss: mse_loss reduces "
     "with 'mean'"),
    ("loss-reduction-none",
     lambda p: p.step(ONES, CLS, nn.CrossEntropyLoss(reduction="none")),
     ValueError, r"CrossEntropyLoss reduces with 'none' but step needs a "
     r"loss that reduces each micro-batch to a scalar.*\(reduction=None\)"),
    ("reduction-none-passed",
     lambda p: p.step(ONES, CLS, nn.CrossEntropyLoss(), reduction="none"),
     ValueError, r"reduction must be 'mean' or 'sum', got 'none' "
     r"\(CrossEntropyLoss reduces with 'mean'\)"),
    ("count-with-sum",
     lambda p: p.step(ONES, ONES[:, :C], F_SUM, count=lambda t: 1),
     ValueError, "count is the denominator of a mean, but the loss reduces "
     "with 'sum'"),
    ("count-not-callable",
     lambda p: p.step(ONES, ONES[:, :C], F.mse_loss, count=3), TypeError,
     "count must be callable .* got int"),
    ("count-without-target",
     lambda p: p.step(ONES, None, lambda o, t: o.sum(), count=len),
     ValueError, "count is called on each micro-batch's target, got "
     "target=None"),
    ("target-none-module",
     lambda p: p.step(ONES, None, nn.CrossEntropyLoss()), ValueError,
     "step got target=None but the loss CrossEntropyLoss needs a target"),
    ("target-none-functional",
     lambda p: p.step(ONES, None, F.mse_loss), ValueError,
     "step got target=None but the loss mse_loss needs a target"),
]


@pytest.mark.parametrize("mistake, error, match", [m[1:] for m in MISTAKES],
                         ids=[m[0] for m in MISTAKES])
def test_loss_mistakes_are_named_before_anything_runs(mistake, error, match):
    pipe = _pipe2()
    before = {k: v.clone() for k, v in pipe.state_dict().items()}
    with pytest.raises(error, match=match) as info:
        mistake(pipe)
    assert type(info.value) is error
    assert all(p.grad is None for p in pipe.parameters())  # no stage ran
    for k, v in pipe.state_dict().items():
        assert torch.equal(v, before[k])


# -- eval mode -------------------------------------------------------------
def test_eval_never_checkpoints():
    pipe = pipegear.GPipe(model(), [2, 1], devices=["cpu"] * 2, chunks=4,
                          checkpoint="always")
    x, g = data()
    pipe(x).sum().backward()
    assert any(e.recompute for e in pipe.last_trace.events)
    pipe.eval()
    pipe(x).sum().backward()  # grad mode on, eval mode
    assert not any(e.recompute for e in pipe.last_trace.events)
    pipe.step(x, classes(g), F.cross_entropy)
    assert not any(e.recompute for e in pipe.last_trace.events)
    pipe.train()
    pipe.step(x, classes(g), F.cross_entropy)
    assert any(e.recompute for e in pipe.last_trace.events)


def test_a_pipeline_starts_in_the_mode_of_its_module():
    pipe = pipegear.GPipe(model().eval(), [2, 1], devices=["cpu"] * 2)
    assert not pipe.training
    assert not any(m.training for m in pipe.partitions.modules())


# -- moving a pipeline -----------------------------------------------------
MOVES = [
    ("to-meta", lambda p: p.to("meta"), r"\.to\('meta'\)"),
    ("to-meta-device", lambda p: p.to(torch.device("meta"), torch.float32),
     r"\.to\('meta'\)"),
    ("to-tensor", lambda p: p.to(torch.empty(0, device="meta")),
     r"\.to\('meta'\)"),
    ("to-cuda", lambda p: p.to("cuda:0"), r"\.to\('cuda:0'\)"),
    ("cuda", lambda p: p.cuda(), r"\.cuda\(\)"),
    ("cuda-index", lambda p: p.cuda(1), r"\.cuda\(1\)"),
    ("xpu", lambda p: p.xpu(), r"\.xpu\(\)"),
    ("to-empty-meta", lambda p: p.to_empty(device="meta"),
     r"\.to_empty\(device='meta'\)"),
]


@pytest.mark.parametrize("move, call", [m[1:] for m in MOVES],
                         ids=[m[0] for m in MOVES])
def test_moving_a_pipeline_is_refused(move, call):
    pipe = _pipe2()
    params = [(p, p.detach().clone()) for p in pipe.parameters()]
    with pytest.raises(TypeError, match=call + r" would move the layers of "
                       r"this GPipe off the devices its partitions are placed"
                       r" on \(cpu, cpu\); build a new GPipe\(module, balance,"
                       r" devices=\[\.\.\.\]\)"):
        move(pipe)
    for p, (q, value) in zip(pipe.parameters(), params):
        assert p is q and p.device.type == "cpu" and torch.equal(p, value)


def test_a_move_to_where_the_pipeline_is_and_dtype_casts_work():
    plain = model()
    pipe = pipegear.GPipe(copy.deepcopy(plain).float(), [2, 1],
                          devices=["cpu"] * 2, chunks=3)
    params = list(pipe.parameters())
    for same in (lambda p: p.cpu(), lambda p: p.to("cpu"),
                 lambda p: p.to(torch.device("cpu")),
                 lambda p: p.to("cpu", non_blocking=True)):
        assert same(pipe) is pipe
    assert list(pipe.parameters()) == params
    assert pipe.half() is pipe and params[0].dtype == torch.float16
    assert pipe.to("cpu", torch.float32) is pipe
    assert params[0].dtype == torch.float32
    pipe.double()
    assert list(pipe.parameters()) == params  # the same Parameters
    plain.float().half().float().double()  # the same roundings
    x, g = data()
    assert_matches_plain(pipe, plain, x, classes(g), F.cross_entropy)
    pipe.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in pipe.parameters())
    assert pipe(x.float()).dtype == torch.float32


# -- devices -------------------------------------------------------------
@pytest.mark.parametrize("devices, error, match", [
    ("cpu", TypeError, "devices must be a sequence of devices, one per "
     r"partition \(e.g. \['cpu', 'cpu'\]\), got str"),
    (torch.device("cpu"), TypeError, "devices must be a sequence of devices.*"
     "got device"),
    (["cpu", "mps"], ValueError, r"devices\[1\] is mps but MPS is not "
     "available"),
    (["meta", "cpu"], ValueError, r"devices\[0\] is meta: a partition runs on "
     "a device that holds data"),
    (["cpu", "xpu:0"], ValueError, r"devices\[1\] is xpu:0 but XPU is not "
     "available"),
], ids=["str", "device", "mps", "meta", "xpu"])
def test_devices_are_checked_at_construction(devices, error, match):
    if "mps" in str(devices) and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    module = model()
    with pytest.raises(error, match=match):
        pipegear.GPipe(module, [2, 1], devices=devices)
    assert all(p.device.type == "cpu" for p in module.parameters())


# -- layers named like GPipe's attributes ---------------------------------
NAMES = ["checkpoint", "step", "chunks", "balance", "devices", "schedule",
         "partitions"]


def clashing_model():
    torch.manual_seed(7)
    layers = [nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
              nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, C)]
    return nn.Sequential(OrderedDict(zip(NAMES, layers))).double()


def test_layers_named_like_gpipe_attributes_just_work():
    plain = clashing_model()
    pipe = pipegear.GPipe(copy.deepcopy(plain), [4, 3], devices=["cpu"] * 2,
                          chunks=3, checkpoint="always")
    assert list(pipe._modules) == NAMES
    assert pipe.state_dict().keys() == plain.state_dict().keys()
    assert (pipe.checkpoint, pipe.chunks, pipe.balance, pipe.schedule) == (
        "always", 3, [4, 3], "gpipe")
    assert pipe.devices == [torch.device("cpu")] * 2
    assert isinstance(pipe.partitions, nn.ModuleList)
    assert callable(pipe.step) and pipe[1] is pipe._modules["step"]
    opt1 = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(pipe.parameters(), lr=0.1)
    x, g = data()
    for _ in range(3):
        t = classes(g)
        opt1.zero_grad()
        opt2.zero_grad()
        assert_matches_plain(pipe, plain, x, t, F.cross_entropy)
        opt1.step()
        opt2.step()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(pipe.state_dict()[k], v, **TOL)
    other = clashing_model()
    other.load_state_dict(pipe.state_dict())


# -- slices ---------------------------------------------------------------
def test_slices_are_sequentials_of_the_layers():
    layers = list(model())
    pipe = pipegear.GPipe(nn.Sequential(*layers), [2, 1],
                          devices=["cpu"] * 2)
    for index in (slice(0, 2), slice(-2, None), slice(None, None, 2),
                  slice(None, None, -1), slice(5, 9)):
        part = pipe[index]
        assert type(part) is nn.Sequential
        assert list(part) == layers[index]
        assert list(part._modules) == [str(i) for i in
                                       range(len(layers))][index]
    assert pipe[-1] is layers[-1] and pipe[torch.tensor(1).item()] is layers[1]
    with pytest.raises(TypeError, match="layer index must be an int or a "
                       "slice, got str"):
        pipe["0"]


def test_the_configuration_is_read_only():
    pipe = _pipe2()
    for name, value in (("balance", [1, 2]), ("chunks", 4),
                        ("checkpoint", "never"), ("schedule", "1f1b"),
                        ("devices", ["cpu"] * 2), ("partitions", None)):
        with pytest.raises(AttributeError, match="has no setter"):
            setattr(pipe, name, value)


# -- deepcopy, pickle, torch.save -------------------------------------------
def _bn_model():
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Tanh(),
                         nn.Linear(8, C)).double()


def _copies():
    def saved(pipe):
        buffer = io.BytesIO()
        torch.save(pipe, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    return [("deepcopy", copy.deepcopy),
            ("pickle", lambda p: pickle.loads(pickle.dumps(p))),
            ("torch.save", saved)]


@pytest.mark.parametrize("how, clone", _copies(),
                         ids=[c[0] for c in _copies()])
@pytest.mark.parametrize("deferred", [True, False], ids=["deferred-bn", "bn"])
def test_a_copy_is_an_independent_equal_pipeline(how, clone, deferred):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain BatchNorm, chunks > 1
        pipe = pipegear.GPipe(_bn_model(), [2, 2], devices=["cpu"] * 2,
                              chunks=3, checkpoint="always", schedule="1f1b",
                              deferred_batch_norm=deferred, worker_threads=1)
    x, g = data()
    t = classes(g)
    pipe.step(x, t, F.cross_entropy)  # running statistics, gradients
    pipe.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no new BatchNorm warning
        twin = clone(pipe)
    assert type(twin) is pipegear.GPipe
    assert (twin.balance, twin.devices, twin.chunks, twin.checkpoint,
            twin.schedule, twin._worker_threads, twin.training) == (
        pipe.balance, pipe.devices, pipe.chunks, pipe.checkpoint,
        pipe.schedule, pipe._worker_threads, pipe.training)
    assert [type(m) for m in twin] == [type(m) for m in pipe]
    assert twin.state_dict().keys() == pipe.state_dict().keys()
    for k, v in pipe.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k
        assert twin.state_dict()[k].data_ptr() != v.data_ptr(), k
    for a, b in ((pipe, twin), (twin, pipe)):  # identical, twice
        losses = [m.step(x, t, F.cross_entropy) for m in (a, b)]
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p.grad, q.grad)
    for k, v in pipe.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k
    with torch.no_grad():
        next(twin.parameters()).add_(1)  # independent
    assert not torch.equal(next(twin.parameters()), next(pipe.parameters()))
    twin.eval()
    assert pipe.training and clone(twin).training is False


# -- what the stages return --------------------------------------------------
class Tuple1(nn.Module):
    def forward(self, x):
        return (x * 2,)


class Untuple1(nn.Module):
    def forward(self, t):
        (x,) = t
        return x + 1


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("face", ["module", "step"])
def test_a_one_tuple_stays_a_one_tuple_between_stages(face):
    plain = nn.Sequential(Tuple1(), Untuple1())
    pipe = pipegear.GPipe(nn.Sequential(Tuple1(), Untuple1()), [1, 1],
                          devices=["cpu"] * 2, chunks=2)
    x = torch.randn(4, 3, dtype=torch.float64)
    if face == "module":
        torch.testing.assert_close(pipe(x), plain(x), **TOL)
    else:
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = pipe.step(x1, x, F.mse_loss)
        ref = F.mse_loss(plain(x2), x)
        ref.backward()
        torch.testing.assert_close(loss, ref.detach(), **TOL)
        torch.testing.assert_close(x1.grad, x2.grad, **TOL)


@pytest.mark.parametrize("change", [lambda x: x[:-1],
                                    lambda x: torch.cat([x, x]),
                                    lambda x: x.sum()],
                         ids=["drops-a-row", "doubles-the-rows", "0-dim"])
@pytest.mark.parametrize("face", ["module", "step"])
def test_the_last_stage_must_keep_the_batch_size(change, face):
    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(3, 3), Lambda(change)),
                          [1, 1], devices=["cpu"] * 2, chunks=2)
    x = torch.randn(6, 3)  # micro-batches of 3 rows
    with pytest.raises(ValueError) as info:
        if face == "module":
            pipe(x)
        else:
            pipe.step(x, torch.randn(6, 3), lambda o, t: o.sum())
    assert type(info.value) is ValueError
    text = " ".join([str(info.value), *getattr(info.value, "__notes__", [])])
    out = change(torch.ones(3, 3))
    size = f"batch size {len(out)}" if out.dim() else "0-dimensional"
    for part in ("stage 1", "micro-batch 0", size):
        assert part in text, text


def test_a_loss_that_does_not_require_grad_raises():
    pipe = _pipe2()
    x, g = data()
    with pytest.raises(ValueError, match="does not require grad"):
        pipe.step(x, classes(g), lambda o, t: F.cross_entropy(o.detach(), t))
    assert all(p.grad is None or not p.grad.any() for p in pipe.parameters())


class MulInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2)


class AddInPlace(nn.Module):
    def forward(self, x):
        return x.add_(1)


@pytest.mark.parametrize("layer", [MulInPlace, AddInPlace,
                                   lambda: nn.ReLU(inplace=True)],
                         ids=["mul_", "add_", "ReLU-inplace"])
@pytest.mark.parametrize("checkpoint", ["except_last", "always"])
@pytest.mark.parametrize("stage", [0, 1])
def test_in_place_on_a_checkpointed_stage_input_is_exact(layer, checkpoint,
                                                         stage):
    torch.manual_seed(11)
    first = [layer(), nn.Linear(D, 8)] if stage == 0 else [nn.Linear(D, 8)]
    rest = [layer(), nn.Tanh(), nn.Linear(8, C)] if stage == 1 else \
        [nn.Tanh(), nn.Linear(8, C)]
    plain = nn.Sequential(*first, *rest).double()
    pipe = pipegear.GPipe(copy.deepcopy(plain), [len(first), len(rest)],
                          devices=["cpu"] * 2, chunks=3, checkpoint=checkpoint)
    x, g = data()
    t = classes(g)
    ref = F.cross_entropy(plain(x.clone()), t)
    ref.backward()
    loss = pipe.step(x.clone(), t, F.cross_entropy)
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    for p, q in zip(pipe.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


def test_ctrl_c_interrupts_a_step_within_about_a_cell():
    cell = 0.2

    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(cell)
            return x

    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(3, 3), Slow()), [1, 1],
                          devices=["cpu"] * 2, chunks=16, checkpoint="never")
    sent = []

    def interrupt():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(2 * cell, interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pipe.step(torch.randn(16, 3), torch.randn(16, 3), F.mse_loss)
        interrupted = time.monotonic()
    finally:
        timer.join()
    assert interrupted - sent[0] < 3 * cell  # about a cell, not 14 more
    assert pipe(torch.randn(2, 3)).shape == (2, 3)  # still works


# -- DistributedGPipe on one rank ------------------------------------------
def _group_of_one():
    store = dist.HashStore()
    group = dist.ProcessGroup(store, 0, 1)
    backend = dist.ProcessGroupGloo(store, 0, 1)
    group._register_backend(torch.device("cpu"),
                            dist.ProcessGroup.BackendType.GLOO, backend)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    return group


@pytest.fixture(scope="module")
def group():
    return _group_of_one()


def _distributed(group, module, **kwargs):
    return pipegear.DistributedGPipe(module, [len(module)],
                                     process_group=group, device="cpu",
                                     timeout=10.0, **kwargs)


DISTRIBUTED_LOSSES = [c for c in LOSSES if c[0] in (
    "CrossEntropyLoss-sum", "F.cross_entropy-padding",
    "CrossEntropyLoss-weight-ignore_index", "user-count")]


@pytest.mark.parametrize("loss_fn, make_target, kwargs",
                         [c[1:] for c in DISTRIBUTED_LOSSES],
                         ids=[c[0] for c in DISTRIBUTED_LOSSES])
def test_distributed_step_equals_the_plain_model(group, loss_fn, make_target,
                                                 kwargs):
    plain = model()
    pipe = _distributed(group, copy.deepcopy(plain), chunks=4,
                        checkpoint="always")
    x, g = data()
    assert_matches_plain(pipe, plain, x, make_target(g), loss_fn, **kwargs)
    pipe.eval()
    pipe.step(x, make_target(g), loss_fn, **kwargs)
    assert not any(e[2] for e in pipe.last_events())  # no recomputation


def test_distributed_mistakes_moves_names_devices(group):
    pipe = _distributed(group, model(), chunks=2)
    x, g = data()
    with pytest.raises(ValueError, match="step got target=None but the loss "
                       "CrossEntropyLoss needs a target"):
        pipe.step(x, None, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="reduction='sum' disagrees with the "
                       "loss: CrossEntropyLoss reduces with 'mean'"):
        pipe.step(x, classes(g), nn.CrossEntropyLoss(), "sum")
    with pytest.raises(TypeError, match="loss_fn must be callable, got int"):
        pipe.step(x, classes(g), 3)
    assert not pipe.broken
    pipe.step(x, classes(g), F.cross_entropy)  # the next step works
    with pytest.raises(TypeError, match=r"\.to\('meta'\) would move the "
                       r"layers of this DistributedGPipe .*\(cpu\); build a "
                       r"new DistributedGPipe\(\.\.\., device=\.\.\.\)"):
        pipe.to("meta")
    assert pipe.cpu() is pipe and pipe.to(torch.float64) is pipe
    for device, match in (("meta", "device is meta"),
                          ("mps", "device is mps but MPS is not available")):
        with pytest.raises(ValueError, match=match):
            pipegear.DistributedGPipe([nn.Linear(2, 2)], [1],
                                      process_group=group, device=device)
    named = _distributed(group, nn.Sequential(OrderedDict(
        rank=nn.Linear(D, C), step=nn.Tanh(), device=nn.Identity(),
        partition=nn.Identity())).double())
    assert (named.rank, named.device, callable(named.step)) == (
        0, torch.device("cpu"), True)
    assert list(named.state_dict()) == ["rank.weight", "rank.bias"]
    named.step(x, classes(g), F.cross_entropy)


# -- two ranks: a mistake of the last rank reaches rank 0 --------------------
def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    plain = model()
    layers = list(copy.deepcopy(plain))
    pipe = pipegear.DistributedGPipe(layers, [2, 1], chunks=4, timeout=20.0,
                                     checkpoint="always")
    x, g = data()
    t = classes(g)
    last = rank == world - 1
    report = {}
    for name, target, loss_fn, reduction in (
            ("no-target", None, nn.CrossEntropyLoss(), None),
            ("disagrees", t, nn.CrossEntropyLoss(), "sum")):
        start = time.monotonic()
        try:
            pipe.step(x if rank == 0 else None, target if last else None,
                      loss_fn, reduction)
            report[name] = None
        except Exception as e:  # noqa: BLE001
            report[name] = f"{type(e).__name__}: {e}"
        report[name + "_s"] = time.monotonic() - start
    report["broken"] = pipe.broken
    loss = pipe.step(x if rank == 0 else None, t if last else None,
                     F.cross_entropy)
    report["loss"] = float(loss)
    report["grads"] = {n: p.grad.tolist() for n, p in pipe.named_parameters()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_a_mistake_of_the_last_rank_fails_every_rank_at_once(tmp_path):
    reports = run_ranks(__file__, 2, tmp_path, timeout=60)
    rank0, rank1 = reports
    assert rank1["no-target"].startswith(
        "ValueError: step got target=None but the loss CrossEntropyLoss "
        "needs a target"), rank1
    assert rank1["disagrees"].startswith(
        "ValueError: reduction='sum' disagrees with the loss"), rank1
    for step, name in enumerate(("no-target", "disagrees")):
        # rank 0 names the last rank and quotes its mistake
        assert rank0[name] == (f"RuntimeError: pipegear: rank 0: rank 1 failed "
                               f"before step {step} began: " + rank1[name]), rank0
        assert rank0[name + "_s"] < 5 and rank1[name + "_s"] < 5, reports
    assert not rank0["broken"] and not rank1["broken"]
    plain = model()
    x, g = data()
    ref = F.cross_entropy(plain(x), classes(g))
    ref.backward()
    assert rank0["loss"] == pytest.approx(ref.item(), rel=1e-12)
    grads = {**rank0["grads"], **rank1["grads"]}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(torch.tensor(grads[name],
                                                dtype=torch.float64),
                                   p.grad, **TOL)



# -- outputs that share memory, modified in place by the next stage ---------
class Dup(nn.Module):
    """Returns its input twice: one memory, two tensors."""

    def forward(self, x):
        return x, x


class AddInPlace(nn.Module):
    """Adds 1 into the first tensor in place: in the model the second, the
    same memory, sees it too."""

    def forward(self, pair):
        a, b = pair
        a.add_(1.0)
        return a * b


def dup_then_in_place():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(D, D), Dup(), AddInPlace(),
                         nn.Linear(D, C)).double()


ALIAS_FACES = [("module", "gpipe"), ("step", "gpipe"), ("step", "1f1b"),
               ("step", "zb-h1")]


@pytest.mark.parametrize("face,schedule", ALIAS_FACES)
@pytest.mark.parametrize("checkpoint", ["never", "except_last", "always"])
def test_outputs_sharing_memory_modified_in_place_by_the_next_stage_raise(
        checkpoint, face, schedule):
    """Between stages each output travels as a tensor of its own (a copy
    in a checkpointed forward, between devices or ranks), so the next
    stage's in-place change of one would not reach the other as in the
    model: a ValueError in every mode instead of a silently wrong output or
    gradient. Within one stage the model's aliasing holds."""
    x = torch.randn(7, D, dtype=torch.float64)
    t = torch.randn(7, C, dtype=torch.float64)
    for balance, raises in (([2, 2], True), ([3, 1], False)):
        plain = dup_then_in_place()
        pipe = pipegear.GPipe(dup_then_in_place(), balance, chunks=4,
                              checkpoint=checkpoint, schedule=schedule)
        if raises:
            with pytest.raises(ValueError, match="memory that tensors of its "
                               "input share with each other .stage 0 "
                               "returned tensors sharing memory"):
                if face == "module":
                    pipe(x)
                else:
                    pipe.step(x, t, F.mse_loss)
            continue
        ref = F.mse_loss(plain(x), t)
        ref.backward()
        if face == "module":
            loss = F.mse_loss(pipe(x), t)
            loss.backward()
        else:
            loss = pipe.step(x, t, F.mse_loss)
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
        for a, b in zip(pipe.parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_an_input_holding_one_tensor_twice_modified_in_place_raises():
    x = torch.randn(6, D, dtype=torch.float64)
    for checkpoint in ("never", "always"):
        pipe = pipegear.GPipe(nn.Sequential(AddInPlace(), nn.Linear(D, C)),
                              [1, 1], chunks=2, checkpoint=checkpoint)
        with pytest.raises(ValueError, match="the pipeline's input holds one "
                                             "tensor twice"):
            pipe((x, x))

if __name__ == "__main__":
    _worker(*map(int, sys.argv[1:4]), sys.argv[4])


def test_a_pipeline_leaves_the_thread_counts_as_it_found_them():
    import threading

    def in_new_thread():
        out = []
        t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
        t.start()
        t.join()
        return out[0]

    caller, fresh = torch.get_num_threads(), in_new_thread()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    pipe = pipegear.GPipe(model, [1, 1, 1], devices=["cpu"] * 3, chunks=2,
                          worker_threads=1)
    pipe.step(torch.randn(4, 4), torch.randn(4, 2), F.mse_loss)
    assert torch.get_num_threads() == caller
    assert in_new_thread() == fresh
