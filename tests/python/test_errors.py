"""Every user mistake gets a clear ValueError / TypeError / IndexError.

Each row of docs/errors.md names the case id below that covers it. A
rejected call changes nothing: the module, parameters, gradients and
running statistics are as before, and no stage ran.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import pipegear


CPU2 = ["cpu", "cpu"]


def seq(n: int = 2, width: int = 2) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def pipe2(**kwargs) -> pipegear.GPipe:
    return pipegear.GPipe(seq(), [1, 1], chunks=2, devices=CPU2, **kwargs)


class Counter(nn.Module):
    """Counts its calls: a rejected call must not reach any stage."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class ReturnsDict(nn.Module):
    def forward(self, x):
        return {"y": x}


class ReturnsNone(nn.Module):
    def forward(self, x):
        return None


def _module_in_two_partitions() -> nn.Sequential:
    a = nn.Linear(2, 2)
    return nn.Sequential(a, nn.Sequential(nn.ReLU(), a))


def _used_twice() -> nn.Sequential:
    relu = nn.ReLU()
    return nn.Sequential(relu, relu)


mse = nn.functional.mse_loss
ones = torch.ones

# (case id, the mistake, expected type, regex the message matches)
CASES = [
    # -- constructing a pipeline -------------------------------------------
    ("balance-sum", lambda: pipegear.GPipe(seq(), [1]), ValueError,
     r"balance must sum to the 2 layers of the module, got 1"),
    ("balance-zero", lambda: pipegear.GPipe(seq(), [2, 0]), ValueError,
     r"balance\[1\] must be at least 1, got 0"),
    ("balance-negative", lambda: pipegear.GPipe(seq(), [3, -1]), ValueError,
     r"balance\[1\] must be at least 1, got -1"),
    ("balance-empty", lambda: pipegear.GPipe(seq(), []), ValueError,
     "balance must have at least 1 partition"),
    ("balance-not-ints", lambda: pipegear.GPipe(seq(), [1.0, 1.0]), TypeError,
     r"balance\[0\] must be an int, got float"),
    ("balance-string", lambda: pipegear.GPipe(seq(), "11"), TypeError,
     "balance must be a sequence of ints, got str"),
    ("too-few-devices", lambda: pipegear.GPipe(seq(), [1, 1], devices=["cpu"]),
     IndexError, "too few devices: 2 stages need 2 devices, got 1"),
    ("device-bad-name",
     lambda: pipegear.GPipe(seq(), [1, 1], devices=["cpu", "gpu7"]),
     ValueError, r"devices\[1\] is not a device: 'gpu7'"),
    ("device-bad-type",
     lambda: pipegear.GPipe(seq(), [1, 1], devices=["cpu", 1.5]),
     TypeError, "devices must hold torch.device, str or int, got float"),
    ("chunks-zero", lambda: pipegear.GPipe(seq(), [1, 1], chunks=0), ValueError,
     "chunks must be at least 1, got 0"),
    ("chunks-negative", lambda: pipegear.GPipe(seq(), [1, 1], chunks=-3),
     ValueError, "chunks must be at least 1, got -3"),
    ("chunks-not-int", lambda: pipegear.GPipe(seq(), [1, 1], chunks=2.0),
     TypeError, "chunks must be an int, got float"),
    ("checkpoint-unknown",
     lambda: pipegear.GPipe(seq(), [1, 1], checkpoint="sometimes"),
     ValueError, "checkpoint must be one of .*got 'sometimes'"),
    ("schedule-unknown",
     lambda: pipegear.GPipe(seq(), [1, 1], schedule="zigzag"),
     ValueError, "schedule must be one of .*got 'zigzag'"),
    ("worker-threads-negative",
     lambda: pipegear.GPipe(seq(), [1, 1], worker_threads=-1),
     ValueError, "worker_threads must be at least 0, got -1"),
    ("module-not-sequential", lambda: pipegear.GPipe(nn.Linear(2, 2), [1]),
     TypeError, "module must be an nn.Sequential, got Linear"),
    ("module-empty", lambda: pipegear.GPipe(nn.Sequential(), [1]), ValueError,
     "module must have at least 1 layer"),
    ("layer-used-twice", lambda: pipegear.GPipe(_used_twice(), [1, 1]),
     ValueError, "layer '1' is the same module as layer '0'"),
    ("module-in-two-partitions",
     lambda: pipegear.GPipe(_module_in_two_partitions(), [1, 1]), ValueError,
     r"module '1\.1' \(partition 1\) is module '0' \(partition 0\): a "
     "module with parameters cannot be in two partitions"),
    # -- calling it ----------------------------------------------------------
    ("input-not-tensor", lambda: pipe2()(3), TypeError,
     "input must be a tensor or a non-empty tuple of tensors, got int"),
    ("input-list", lambda: pipe2()([ones(2, 2)]), TypeError,
     "input must be a tensor or a non-empty tuple of tensors, got list"),
    ("input-empty-tuple", lambda: pipe2()(()), TypeError,
     "input must be a tensor or a non-empty tuple of tensors, got tuple"),
    ("input-tuple-not-tensors", lambda: pipe2()((ones(2, 2), 3)), TypeError,
     "input must be a tensor or a non-empty tuple of tensors"),
    ("input-batch-mismatch", lambda: pipe2()((ones(2, 2), ones(3, 2))),
     ValueError, "tensor 0 has 2, tensor 1 has 3"),
    ("input-batch-empty", lambda: pipe2()(ones(0, 2)), ValueError,
     "a batch needs at least 1 sample, got 0"),
    ("input-0-dim", lambda: pipe2()(torch.tensor(1.0)), ValueError,
     "input tensor 0 is 0-dimensional"),
    ("stage-output-dict",
     lambda: pipegear.GPipe(nn.Sequential(nn.Linear(2, 2), ReturnsDict()),
                            [1, 1], devices=CPU2)(ones(2, 2)),
     TypeError, "the output of stage 1 must be a tensor or a tuple of tensors"),
    ("stage-output-none",
     lambda: pipegear.GPipe(nn.Sequential(nn.Linear(2, 2), ReturnsNone()),
                            [1, 1], devices=CPU2)(ones(2, 2)),
     TypeError, "the output of stage 1 must be a tensor.*NoneType"),
    ("step-no-loss", lambda: pipe2().step(ones(2, 2), ones(2, 2), None),
     TypeError, "step needs a loss function, got None"),
    ("step-loss-not-callable", lambda: pipe2().step(ones(2, 2), ones(2, 2), 3),
     TypeError, "loss_fn must be callable, got int"),
    ("loss-not-scalar",
     lambda: pipe2().step(ones(4, 2), ones(4, 2), lambda y, t: (y - t) ** 2),
     ValueError, r"loss_fn must return a scalar tensor, got \[2, 2\]"),
    ("loss-not-tensor",
     lambda: pipe2().step(ones(4, 2), ones(4, 2), lambda y, t: 1.0),
     TypeError, "loss_fn must return a tensor, got <class 'float'>"),
    ("target-batch-mismatch",
     lambda: pipe2().step(ones(2, 2), ones(3, 2), mse), ValueError,
     "the target's batch size must equal the input's: input has 2, "
     "target has 3"),
    ("target-tuple-mismatch",
     lambda: pipe2().step(ones(2, 2), (ones(2, 2), ones(3, 2)), mse),
     ValueError, "every target tensor must have the same batch size"),
    ("target-0-dim",
     lambda: pipe2().step(ones(2, 2), torch.tensor(1.0), mse), ValueError,
     "target tensor 0 is 0-dimensional"),
    ("target-not-tensor", lambda: pipe2().step(ones(2, 2), [1, 2], mse),
     TypeError, "target must be a tensor or a non-empty tuple of tensors"),
    ("reduction-unknown",
     lambda: pipe2().step(ones(2, 2), ones(2, 2), mse, reduction="max"),
     ValueError, "reduction must be 'mean' or 'sum', got 'max'"),
    ("1f1b-module-style", lambda: pipe2(schedule="1f1b")(ones(2, 2)),
     ValueError, "module-style forward needs a fill/drain schedule"),
    ("schedule-table-zero", lambda: pipe2().schedule_table(0), ValueError,
     "micro_batches must be at least 1, got 0"),
    ("layer-index", lambda: pipe2()[5], IndexError,
     "layer index 5 out of range for 2 layers"),
    # -- schedules -------------------------------------------------------------
    ("render-unknown-schedule",
     lambda: pipegear.render_schedule("zigzag", 2, 2), ValueError,
     "schedule must be 'gpipe', '1f1b', 'zb-h1', 'zb-h2', 'interleaved' or "
     "'interleaved-zb', got 'zigzag'"),
    ("render-zero-stages", lambda: pipegear.render_schedule("gpipe", 0, 2),
     ValueError, "a schedule needs at least 1 stage, got 0"),
    ("render-zero-micro-batches",
     lambda: pipegear.render_schedule("1f1b", 2, 0), ValueError,
     "a schedule needs at least 1 micro-batch, got 0"),
    # -- balance ---------------------------------------------------------------
    ("cost-nan", lambda: pipegear.balance_by_cost(2, [1, math.nan]),
     ValueError, r"costs\[1\] must be a finite number >= 0, got nan"),
    ("cost-negative", lambda: pipegear.balance_by_cost(2, [1, -1]),
     ValueError, r"costs\[1\] must be a finite number >= 0, got -1"),
    ("cost-infinite", lambda: pipegear.balance_by_cost(2, [1, math.inf]),
     ValueError, r"costs\[1\] must be a finite number >= 0, got inf"),
    ("cost-not-numbers", lambda: pipegear.balance_by_cost(1, "ab"), TypeError,
     "costs must be a sequence of numbers, got str"),
    ("costs-empty", lambda: pipegear.balance_by_cost(1, []), ValueError,
     "needs the cost of at least one layer"),
    ("partitions-more-than-layers",
     lambda: pipegear.balance_by_cost(3, [1, 1]), ValueError,
     "cannot split 2 layers into 3 partitions"),
    ("partitions-zero", lambda: pipegear.balance_by_cost(0, [1, 1]),
     ValueError, "partitions must be at least 1, got 0"),
    ("memory-length",
     lambda: pipegear.balance_by_cost(1, [1, 2], memory=[1]), ValueError,
     "memory must give one value per layer: 2 costs but 1 memory values"),
    ("capacity-without-memory",
     lambda: pipegear.balance_by_cost(1, [1, 2], capacity=3), ValueError,
     "a capacity needs the memory of every layer"),
    ("capacity-too-small",
     lambda: pipegear.balance_by_cost(2, [1, 2], memory=[3, 3], capacity=2),
     ValueError, "a memory capacity of 2 per stage is too small"),
    ("profile-sample-rejected",
     lambda: pipegear.balance_by_time(2, seq(), ones(2, 3)), ValueError,
     r"layer 0 \('0', Linear\) failed while profiling: RuntimeError"),
    ("profile-size-sample-rejected",
     lambda: pipegear.balance_by_size(2, seq(), ones(2, 3)), ValueError,
     r"layer 0 \('0', Linear\) failed while profiling"),
    ("profile-partitions-more-than-layers",
     lambda: pipegear.balance_by_time(3, seq(), ones(2, 2)), ValueError,
     "cannot split 2 layers into 3 partitions"),
    ("profile-sample-not-tensor",
     lambda: pipegear.balance_by_time(2, seq(), [1]), TypeError,
     "sample must be a tensor or a tuple of tensors, got list"),
    ("profile-layer-output-not-tensor",
     lambda: pipegear.profile_layers(nn.Sequential(nn.Linear(2, 2),
                                                   ReturnsDict()), ones(2, 2)),
     TypeError, r"the output of layer 1 \('1', ReturnsDict\) must be a "
     "tensor or a tuple of tensors"),
    ("profile-repeats-zero",
     lambda: pipegear.profile_layers(seq(), ones(2, 2), repeats=0),
     ValueError, "repeats must be at least 1, got 0"),
    ("profile-timeout-zero",
     lambda: pipegear.profile_layers(seq(), ones(2, 2), timeout=0),
     ValueError, "timeout must be a positive number of seconds"),
    ("profile-bad-device",
     lambda: pipegear.profile_layers(seq(), ones(2, 2), device="gpu7"),
     ValueError, "device is not a device: 'gpu7'"),
    ("size-chunks-zero",
     lambda: pipegear.balance_by_size(2, seq(), ones(2, 2), chunks=0),
     ValueError, "chunks must be at least 1, got 0"),
    ("size-param-scale-negative",
     lambda: pipegear.balance_by_size(2, seq(), ones(2, 2), param_scale=-1),
     ValueError, "param_scale must be a finite number >= 0, got -1"),
    ("size-sample-0-dim",
     lambda: pipegear.balance_by_size(2, seq(), torch.tensor(1.0)),
     ValueError, "sample tensor 0 is 0-dimensional"),
    # -- DeferredBatchNorm -------------------------------------------------------
    ("dbn-wrong-channels",
     lambda: pipegear.DeferredBatchNorm(3)(ones(4, 2)), ValueError,
     r"DeferredBatchNorm of 3 features got an input of 2 channels"),
    ("dbn-wrong-channels-in-pipeline",
     lambda: pipegear.GPipe(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(3)),
                            [1, 1], chunks=2, devices=CPU2,
                            deferred_batch_norm=True)(ones(4, 2)),
     ValueError, "DeferredBatchNorm of 3 features got an input of 2 channels"),
    ("dbn-1d-input", lambda: pipegear.DeferredBatchNorm(3)(ones(4)),
     ValueError, "DeferredBatchNorm expects a 2D to 5D input"),
    ("dbn-one-value-per-channel",
     lambda: pipegear.DeferredBatchNorm(3)(ones(1, 3)), ValueError,
     "Expected more than 1 value per channel when training"),
    ("dbn-zero-features", lambda: pipegear.DeferredBatchNorm(0), ValueError,
     "num_features must be at least 1, got 0"),
    ("dbn-chunks-zero", lambda: pipegear.DeferredBatchNorm(3, chunks=0),
     ValueError, "chunks must be at least 1, got 0"),
    ("convert-chunks-zero",
     lambda: pipegear.convert_deferred_batch_norm(seq(), chunks=0),
     ValueError, "chunks must be at least 1, got 0"),
    ("convert-not-module", lambda: pipegear.convert_deferred_batch_norm(3),
     TypeError, "module must be an nn.Module, got int"),
]

if not torch.cuda.is_available():
    CASES.append(
        ("device-cuda-unavailable",
         lambda: pipegear.GPipe(seq(), [1, 1], devices=["cpu", "cuda:0"]),
         ValueError, r"devices\[1\] is cuda:0 but CUDA is not available"))
else:
    CASES.append(
        ("device-cuda-index",
         lambda: pipegear.GPipe(seq(), [1, 1], devices=["cpu", 64]),
         IndexError, r"devices\[1\] is cuda:64 but there are only"))


@pytest.mark.parametrize("mistake, error, match", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_user_mistake(mistake, error, match):
    with pytest.raises(error, match=match) as info:
        mistake()
    # A user mistake is never a bare RuntimeError (nor an assertion).
    assert type(info.value) in (ValueError, TypeError, IndexError)


def test_case_ids_are_unique_and_many():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids)
    assert len(ids) >= 60
    print(f"\nbad inputs tried: {len(ids)} table cases")


def test_layer_errors_keep_their_type_and_name_the_stage():
    """A layer's own error is not a pipegear mistake: it keeps its type."""
    pipe = pipe2()
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes") as info:
        pipe(ones(2, 3))
    assert ("pipegear: in stage 0, micro-batch 0, forward"
            in info.value.__notes__)


@pytest.mark.parametrize("face", ["module", "step"])
def test_a_layer_error_in_backward_names_the_cell(face):
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, g):
            raise KeyError("backward boom")

    class Layer(nn.Module):
        def forward(self, x):
            return Bad.apply(x)

    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(2, 2), Layer(),
                                        nn.Linear(2, 2)), [1, 1, 1], chunks=2)
    with pytest.raises(KeyError, match="backward boom") as info:
        if face == "module":
            pipe(ones(4, 2)).sum().backward()
        else:
            pipe.step(ones(4, 2), ones(4, 2), nn.functional.mse_loss)
    notes = getattr(info.value, "__notes__", [])
    assert any(n.startswith("pipegear: in stage 1, micro-batch ")
               and n.endswith(", backward") for n in notes), notes


# ---- a rejected construction changes nothing ---------------------------


def _snapshot_module(module: nn.Module):
    return ([(name, type(m), m.training) for name, m in module.named_modules()],
            {k: v.clone() for k, v in module.state_dict().items()},
            [p.device for p in module.parameters()],
            [None if p.grad is None else p.grad.clone()
             for p in module.parameters()])


def _assert_same(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        assert torch.equal(before[1][k], after[1][k]), k
    assert before[2] == after[2]
    for a, b in zip(before[3], after[3]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [
    {"balance": [1, 1, 1]},
    {"balance": [2, 1, 1], "chunks": 0},
    {"balance": [2, 1, 1], "checkpoint": "sometimes"},
    {"balance": [2, 1, 1], "devices": ["cpu", "cpu"]},
    {"balance": [2, 1, 1], "devices": ["cpu", "cpu", "gpu7"]},
    {"balance": [1, 2, 1]},  # `a` in partitions 0 and 2
], ids=["balance", "chunks", "checkpoint", "devices", "device-name",
        "module-in-two-partitions"])
def test_rejected_construction_leaves_the_module_intact(kwargs):
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    if kwargs["balance"] == [1, 2, 1]:
        b = nn.Sequential(a)  # the module `a` in partitions 0 and 2
    module = nn.Sequential(a, nn.BatchNorm1d(3), nn.Linear(3, 3), b)
    module[0].weight.grad = torch.ones(3, 3)
    module.eval()
    before = _snapshot_module(module)
    with pytest.raises((ValueError, TypeError, IndexError)):
        pipegear.GPipe(module, deferred_batch_norm=True, **kwargs)
    _assert_same(before, _snapshot_module(module))
    assert type(module[1]) is nn.BatchNorm1d  # not converted


# ---- a rejected call changes nothing, and no stage runs -----------------


def _pipeline_with_state(deferred: bool, schedule: str = "gpipe"):
    torch.manual_seed(1)
    counter = Counter()
    model = nn.Sequential(counter, nn.Linear(3, 3), nn.BatchNorm1d(3),
                          nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain BatchNorm with chunks > 1
        pipe = pipegear.GPipe(model, [2, 2, 2], chunks=2, schedule=schedule,
                              devices=["cpu"] * 3,
                              deferred_batch_norm=deferred,
                              checkpoint="always")
    # Gradients and running statistics that a bad call must not touch.
    pipe.step(torch.randn(4, 3), torch.randn(4, 2), mse)
    return pipe, counter


def _snapshot_pipe(pipe):
    return ({k: v.clone() for k, v in pipe.state_dict().items()},
            [p.grad.clone() for p in pipe.parameters()],
            len(pipe.last_trace.events))


def _assert_same_pipe(before, after, what=""):
    """Parameters, buffers (running statistics), gradients, last trace."""
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), f"{what}: {k}"
    for a, b in zip(before[1], after[1]):
        assert torch.equal(a, b), f"{what}: a gradient changed"
    assert before[2] == after[2], f"{what}: the trace changed"


BAD_CALLS = [
    ("forward-int", lambda p: p(3)),
    ("forward-list", lambda p: p([torch.ones(2, 3)])),
    ("forward-tuple-mismatch", lambda p: p((torch.ones(2, 3),
                                            torch.ones(3, 3)))),
    ("forward-empty-batch", lambda p: p(torch.ones(0, 3))),
    ("forward-0-dim", lambda p: p(torch.tensor(1.0))),
    ("step-no-loss", lambda p: p.step(torch.ones(4, 3), torch.ones(4, 2),
                                      None)),
    ("step-loss-not-callable", lambda p: p.step(torch.ones(4, 3),
                                                torch.ones(4, 2), "mse")),
    ("step-target-mismatch", lambda p: p.step(torch.ones(4, 3),
                                              torch.ones(5, 2), mse)),
    ("step-target-0-dim", lambda p: p.step(torch.ones(4, 3),
                                           torch.tensor(0.0), mse)),
    ("step-target-list", lambda p: p.step(torch.ones(4, 3), [1.0], mse)),
    ("step-input-0-dim", lambda p: p.step(torch.tensor(1.0),
                                          torch.ones(4, 2), mse)),
    ("step-input-empty", lambda p: p.step(torch.ones(0, 3),
                                          torch.ones(0, 2), mse)),
    ("step-reduction", lambda p: p.step(torch.ones(4, 3), torch.ones(4, 2),
                                        mse, reduction="none")),
    ("schedule-table", lambda p: p.schedule_table(-1)),
]


@pytest.mark.parametrize("deferred", [False, True], ids=["bn", "deferred-bn"])
def test_rejected_call_changes_nothing_and_runs_no_stage(deferred):
    pipe, counter = _pipeline_with_state(deferred)
    calls = counter.calls
    before = _snapshot_pipe(pipe)
    for name, bad in BAD_CALLS:
        with pytest.raises((ValueError, TypeError)):
            bad(pipe)
        assert counter.calls == calls, f"{name} ran a stage"
        _assert_same_pipe(before, _snapshot_pipe(pipe), name)


def test_rejected_module_style_call_on_1f1b_changes_nothing():
    pipe, counter = _pipeline_with_state(False, schedule="1f1b")
    calls = counter.calls
    before = _snapshot_pipe(pipe)
    with pytest.raises(ValueError, match="fill/drain"):
        pipe(torch.randn(4, 3))
    assert counter.calls == calls
    _assert_same_pipe(before, _snapshot_pipe(pipe))


def test_loss_that_is_not_a_scalar_leaves_parameters_and_grads():
    """The loss is checked on the last stage, after the forwards ran: no
    backward runs, so parameters and gradients are unchanged (running
    statistics of plain BatchNorm layers saw the forwards, as in a plain
    model whose loss raises)."""
    pipe, _ = _pipeline_with_state(False)
    params = [p.detach().clone() for p in pipe.parameters()]
    grads = [p.grad.clone() for p in pipe.parameters()]
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        pipe.step(torch.randn(4, 3), torch.randn(4, 2),
                  lambda y, t: (y - t) ** 2)
    for p, q, g in zip(pipe.parameters(), params, grads):
        assert torch.equal(p, q) and torch.equal(p.grad, g)


def test_pipeline_still_works_after_every_mistake():
    plain = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 1], chunks=3,
                          devices=CPU2)
    x, t = torch.randn(5, 3), torch.randn(5, 2)
    for _, bad in BAD_CALLS:
        with pytest.raises((ValueError, TypeError)):
            bad(pipe)
    loss = pipe.step(x, t, mse)
    ref = mse(plain(x), t)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    for p, q in zip(pipe.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
