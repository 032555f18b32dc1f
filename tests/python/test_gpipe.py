"""Transparency of pipegear.GPipe against the plain nn.Sequential."""
import copy
import threading
import time
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

import pipegear


class Twice(torch.autograd.Function):
    """A custom autograd Function inside a layer."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class CustomFn(nn.Module):
    def forward(self, x):
        return Twice.apply(x)


class Split(nn.Module):
    """Returns a tuple: the next layer takes two tensors."""

    def forward(self, x):
        return x[:, :3], x[:, 3:]


class Join(nn.Module):
    def forward(self, xs):
        a, b = xs
        return torch.cat([a * 2, b], dim=1)


def make_model():
    return nn.Sequential(
        nn.Linear(6, 6), nn.ReLU(inplace=True), CustomFn(), Split(), Join(),
        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("face", ["module", "step"])
def test_transparency(k, chunks, checkpoint, face):
    torch.manual_seed(0)
    plain = make_model()
    model = copy.deepcopy(plain)
    balance = {1: [8], 2: [4, 4], 3: [2, 3, 3]}[k]
    pipe = pipegear.GPipe(model, balance, chunks=chunks, checkpoint=checkpoint)
    x = torch.randn(9, 6, dtype=torch.float64)
    t = torch.randn(9, 3, dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ref = plain(x1)
    ref_loss = nn.functional.mse_loss(ref, t)
    ref_loss.backward()
    if face == "module":
        y = pipe(x2)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        nn.functional.mse_loss(y, t).backward()
    else:
        loss = pipe.step(x2, t, nn.functional.mse_loss)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(),
                                  pipe.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_optimizer_steps_keep_parameters_equal(optimizer):
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.0),
                          nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 2, 2], chunks=4)
    o1 = optimizer(plain.parameters(), lr=0.01)
    o2 = optimizer(pipe.parameters(), lr=0.01)
    for _ in range(5):
        x, t = torch.randn(12, 5), torch.randn(12, 2)
        o1.zero_grad()
        o2.zero_grad()
        nn.functional.mse_loss(plain(x), t).backward()
        pipe.step(x, t, nn.functional.mse_loss)
        o1.step()
        o2.step()
    for p1, p2 in zip(plain.parameters(), pipe.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6)


def test_dropout_always_equals_never_bitwise():
    # Both dropouts sit in stage 1: stages sharing one device share its
    # generator, so only one of them may draw for the replay to be exact
    # (docs/engine.md, "Randomness").
    def run(mode):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Dropout(0.5),
                              nn.Linear(6, 6), nn.Dropout(0.3), nn.Linear(6, 1))
        # stage 0 = Linear, ReLU; stage 1 = both dropouts
        pipe = pipegear.GPipe(model, [2, 4], chunks=4, checkpoint=mode)
        x = torch.randn(8, 6)
        torch.manual_seed(4)
        y = pipe(x)
        y.sum().backward()
        return y, [p.grad for p in pipe.parameters()]

    y1, g1 = run("never")
    for mode in ("always", "except_last"):
        y2, g2 = run(mode)
        assert torch.equal(y1, y2)
        for a, b in zip(g1, g2):
            assert torch.equal(a, b)


def test_call_counts_follow_the_checkpoint_mode():
    class Count(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = self.recomputes = self.checkpointing = 0

        def forward(self, x):
            self.calls += 1
            self.recomputes += pipegear.is_recomputing()
            self.checkpointing += pipegear.is_checkpointing()
            return x

    for mode, recomputes in (("never", 0), ("except_last", 3), ("always", 4)):
        count = Count()
        pipe = pipegear.GPipe(nn.Sequential(nn.Linear(3, 3), count),
                              [1, 1], chunks=4, checkpoint=mode)
        pipe(torch.randn(8, 3)).sum().backward()
        assert (count.calls, count.recomputes, count.checkpointing) == (
            4 + recomputes, recomputes, recomputes)
        with torch.no_grad():
            pipe(torch.randn(8, 3))
        assert count.calls == 8 + recomputes  # no-grad never checkpoints


@pytest.mark.parametrize("checkpoint", ["always", "never"])
def test_in_place_layer_first_in_a_stage(checkpoint):
    torch.manual_seed(8)
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True),
                          nn.Linear(3, 3))
    pipe = pipegear.GPipe(copy.deepcopy(plain), [1, 2], chunks=2,
                          checkpoint=checkpoint)
    x = torch.randn(4, 3)
    pipe(x).sum().backward()
    plain(x).sum().backward()
    for p1, p2 in zip(plain.parameters(), pipe.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad)


class PassOnWithTanh(nn.Module):
    """Passes its input on (the output shares its memory) next to a tanh
    of it, which the recomputation reads from the kept input."""

    def forward(self, x):
        return x, torch.tanh(x)


class ReluInPlaceSum(nn.Module):
    def forward(self, t):
        a, b = t
        return torch.relu_(a) + b


@pytest.mark.parametrize("checkpoint", ["always", "except_last"])
def test_in_place_layer_after_a_stage_that_passes_its_input_on(checkpoint):
    """Stage 2 modifies in place memory stage 1 keeps for its own
    recomputation (a same-device message is not copied). Its forward runs
    on a copy, and so must its recomputation: run on the kept input, it
    raced with stage 1's (wrong gradients, now and then)."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(3, 3), PassOnWithTanh(), ReluInPlaceSum(),
                          nn.Linear(3, 3))
    x = torch.randn(8, 3)
    plain(x).sum().backward()
    for _ in range(5):
        pipe = pipegear.GPipe(copy.deepcopy(plain), [1, 1, 2], chunks=4,
                              checkpoint=checkpoint)
        for p in pipe.parameters():
            p.grad = None
        pipe(x).sum().backward()
        for p1, p2 in zip(plain.parameters(), pipe.parameters()):
            torch.testing.assert_close(p2.grad, p1.grad)


def test_no_grad_and_eval_keep_no_graph():
    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)),
                          [1, 1], chunks=2)
    with torch.no_grad():
        y = pipe(torch.randn(4, 3))
    assert not y.requires_grad and y.grad_fn is None
    pipe.eval()
    assert all(not m.training for m in pipe.partitions.modules())
    with torch.inference_mode():
        assert pipe(torch.randn(4, 3)).is_inference()


def test_exception_in_a_python_layer_keeps_type_and_message():
    class Boom(nn.Module):
        def forward(self, x):
            if x.shape[0] == 1:
                raise KeyError("boom at the small micro-batch")
            return x

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 2), Boom(), nn.Linear(2, 2))
    pipe = pipegear.GPipe(model, [1, 1, 1], chunks=3)
    start = time.monotonic()
    with pytest.raises(KeyError, match="boom at the small micro-batch") as info:
        pipe(torch.randn(5, 2))  # micro-batches 2, 2, 1
    assert time.monotonic() - start < 5
    assert any("stage 1" in n for n in getattr(info.value, "__notes__", []))
    y = pipe(torch.randn(6, 2))  # the pipeline still works
    assert y.shape == (6, 2)


def test_state_dict_round_trip_with_the_plain_model():
    torch.manual_seed(6)
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 1])
    assert pipe.state_dict().keys() == plain.state_dict().keys()
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    other.load_state_dict(pipe.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1)
    pipe.load_state_dict(other.state_dict())
    for p1, p2 in zip(other.parameters(), pipe.parameters()):
        assert torch.equal(p1, p2)


def _prefixed(prefix, key):
    return key[len(prefix):] if key.startswith(prefix) else None


def _save_as_v2(module, state, prefix, metadata):
    """A public post-hook: "0.weight" -> "v2.0.weight", in place."""
    items = list(state.items())
    state.clear()
    for k, v in items:
        rest = _prefixed(prefix, k)
        state[k if rest is None else f"{prefix}v2.{rest}"] = v


def _load_v2(module, state, prefix, *_):
    for k in [k for k in state if _prefixed(prefix, k) is not None]:
        if k[len(prefix):].startswith("v2."):
            state[prefix + k[len(prefix) + 3:]] = state.pop(k)


def _save_with_step(module, state, prefix, metadata):
    """A private hook (the old API) may return a new dict."""
    return OrderedDict(list(state.items()) + [(prefix + "step", 7)])


def _loaded(module, incompatible):
    module.loaded = getattr(module, "loaded", 0) + 1


def _v2_model():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model.register_state_dict_post_hook(_save_as_v2)
    model._register_state_dict_hook(_save_with_step)
    model.register_load_state_dict_pre_hook(_load_v2)
    model.register_load_state_dict_post_hook(_loaded)
    return model


def test_the_models_state_dict_hooks_hold_for_the_pipeline():
    """A model whose own hooks rename its state (gpt2_sequential gives the
    Hugging Face model's keys) keeps that state through the pipeline:
    saved, loaded, inside a larger module, copied and pickled."""
    plain = _v2_model()
    keys = list(plain.state_dict())
    assert keys == ["v2.0.weight", "v2.0.bias", "v2.2.weight", "v2.2.bias",
                    "step"]
    pipe = pipegear.GPipe(_v2_model(), [2, 1])
    assert list(pipe.state_dict()) == keys
    state = {k: v + 1 if torch.is_tensor(v) else v
             for k, v in plain.state_dict().items() if k != "step"}
    pipe.load_state_dict(state)  # strict, through the load pre-hook
    assert pipe.loaded == 1
    assert torch.equal(pipe[2].bias, state["v2.2.bias"])
    plain.load_state_dict(pipe.state_dict(), strict=False)
    for name in ("copy", "pickle"):
        other = (copy.deepcopy(pipe) if name == "copy"
                 else pickle.loads(pickle.dumps(pipe)))
        assert list(other.state_dict()) == keys, name
        assert torch.equal(other.state_dict()["v2.0.weight"],
                           state["v2.0.weight"]), name
    outer = nn.Sequential(OrderedDict(pipe=pipe))
    assert list(outer.state_dict()) == [f"pipe.{k}" for k in keys[:-1]]
    outer.load_state_dict({f"pipe.{k}": v for k, v in state.items()})
    assert pipe.loaded == 2


class TorchgpipeLayout(nn.Module):
    """How torchgpipe's GPipe registers a model: partitions.<j> is an
    nn.Sequential of partition j's layers under their names in the model
    (torchgpipe.gpipe.split_module), so its state_dict keys are
    partitions.<j>.<name>.<tensor>."""

    def __init__(self, module, balance):
        super().__init__()
        named, parts, offset = list(module.named_children()), [], 0
        for size in balance:
            parts.append(nn.Sequential(OrderedDict(named[offset:offset + size])))
            offset += size
        self.partitions = nn.ModuleList(parts)


@pytest.mark.parametrize("names", ["indices", "custom"])
def test_torchgpipe_state_dict_loads_with_another_balance(names):
    torch.manual_seed(7)

    def model():
        layers = [nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(),
                  nn.Linear(4, 2)]
        if names == "indices":
            return nn.Sequential(*layers)
        return nn.Sequential(OrderedDict(zip(["fc", "bn", "act", "out"],
                                             layers)))

    saved = model()
    saved(torch.randn(6, 3))  # running statistics differ from a fresh model's
    state = TorchgpipeLayout(saved, [2, 2]).state_dict()
    assert next(iter(state)) == ("partitions.0.0.weight" if names == "indices"
                                 else "partitions.0.fc.weight")
    pipe = pipegear.GPipe(model(), [1, 3])
    pipe.load_state_dict(state)  # strict: every key found
    for key, value in saved.state_dict().items():
        assert torch.equal(pipe.state_dict()[key], value), key
    # Inside a larger module (a prefix), and the plain keys still load.
    outer = nn.Sequential(OrderedDict(pipe=pipegear.GPipe(model(), [3, 1])))
    outer.load_state_dict({f"pipe.{k}": v for k, v in state.items()})
    assert torch.equal(outer.pipe[1].running_mean, saved[1].running_mean)
    pipe.load_state_dict(saved.state_dict())


def test_torchgpipe_keys_of_unknown_layers_stay_unexpected():
    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(2, 2)), [1])
    state = {"partitions.0.0.weight": torch.zeros(2, 2),
             "partitions.0.0.bias": torch.zeros(2),
             "partitions.0.9.weight": torch.zeros(2, 2)}
    with pytest.raises(RuntimeError, match="partitions.0.9.weight"):
        pipe.load_state_dict(state)
    state = {"partitions.0.0.weight": torch.zeros(2, 2),
             "0.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match="both 'partitions.0.0.weight'"):
        pipe.load_state_dict(state)


def test_sequential_face():
    layers = [nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)]
    pipe = pipegear.GPipe(nn.Sequential(*layers), [2, 1], chunks=2)
    assert len(pipe) == 3
    assert list(pipe) == layers
    assert pipe[2] is layers[2] and pipe[-1] is layers[2]
    with pytest.raises(IndexError):
        pipe[3]
    assert pipe.balance == [2, 1] and pipe.chunks == 2
    assert pipe.devices == [torch.device("cpu")] * 2
    assert isinstance(pipe.partitions, nn.ModuleList)
    assert len(pipe.partitions) == 2


def test_trace_and_plot(tmp_path):
    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                          [1, 1], chunks=4)
    pipe(torch.randn(8, 4)).sum().backward()
    trace = pipe.last_trace
    cells = [e for e in trace.events if not e.recompute]
    assert len(cells) == 16  # 2 stages x 4 micro-batches x 2 phases
    assert sum(e.recompute for e in trace.events) == 6  # except_last
    assert 0 <= trace.bubble_fraction < 1
    assert trace.theoretical_bubble_fraction == pytest.approx(1 / 5)
    trace.to_chrome_trace(tmp_path / "t.json")
    trace.plot(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert "F0" in pipe.schedule_table()


def test_one_pipeline_from_two_threads():
    torch.manual_seed(7)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 1], chunks=4)
    x = torch.randn(8, 4)
    ref = plain(x).detach()
    errors = []

    def work():
        try:
            for _ in range(20):
                with torch.no_grad():
                    torch.testing.assert_close(pipe(x), ref)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((nn.Linear(2, 2), [1]), {}, TypeError, "nn.Sequential"),
    ((nn.Sequential(), [1]), {}, ValueError, "at least 1 layer"),
    ((nn.Sequential(nn.ReLU(), nn.ReLU()), [1]), {}, ValueError,
     "sum to the 2 layers"),
    ((nn.Sequential(nn.ReLU(), nn.ReLU()), [2, 0]), {}, ValueError,
     r"balance\[1\] must be at least 1, got 0"),
    ((nn.Sequential(nn.ReLU(), nn.ReLU()), [1.5, 0.5]), {}, TypeError, "int"),
    ((nn.Sequential(nn.ReLU(), nn.ReLU()), [1, 1]), {"chunks": 0}, ValueError,
     "chunks must be at least 1, got 0"),
    ((nn.Sequential(nn.ReLU(), nn.ReLU()), [1, 1]), {"checkpoint": "sometimes"},
     ValueError, "sometimes"),
    ((nn.Sequential(nn.ReLU(), nn.ReLU()), [1, 1]), {"devices": ["cpu"]},
     IndexError, "too few devices"),
])
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipegear.GPipe(*args, **kwargs)


def test_layer_used_twice_and_shared_parameter():
    relu = nn.ReLU()
    with pytest.raises(ValueError, match="same module"):
        pipegear.GPipe(nn.Sequential(relu, relu), [1, 1])
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight = a.weight  # a tie (test_tied.py), not a module used twice
    pipe = pipegear.GPipe(nn.Sequential(a, b), [1, 1])
    assert len(list(pipe.parameters())) == 3
    with pytest.raises(ValueError, match="cannot be in two partitions"):
        pipegear.GPipe(nn.Sequential(a, nn.Sequential(b, a)), [1, 1])


def test_bad_calls():
    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(2, 2)), [1], chunks=2)
    with pytest.raises(TypeError, match="tensor or a non-empty tuple"):
        pipe([torch.ones(2, 2)])
    with pytest.raises(ValueError, match="tensor 0 has 2, tensor 1 has 3"):
        pipe((torch.ones(2, 2), torch.ones(3, 2)))
    with pytest.raises(ValueError, match="at least 1 sample"):
        pipe(torch.ones(0, 2))
    with pytest.raises(TypeError, match="loss function"):
        pipe.step(torch.ones(2, 2), torch.ones(2, 2), None)
    with pytest.raises(ValueError, match="input has 2, target has 3"):
        pipe.step(torch.ones(2, 2), torch.ones(3, 2), nn.functional.mse_loss)


def test_a_second_backward_raises_a_clear_error():
    torch.manual_seed(8)
    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
                          [1, 1], chunks=2)
    y = pipe(torch.randn(4, 2)).sum()
    y.backward(retain_graph=True)
    grads = [p.grad.clone() for p in pipe.parameters()]
    with pytest.raises(RuntimeError, match="ran a second time"):
        y.backward()
    for p, g in zip(pipe.parameters(), grads):
        torch.testing.assert_close(p.grad, g)  # nothing accumulated twice


def test_worker_threads_stay_set_when_the_caller_changes_its_count():
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    old = torch.get_num_threads()
    try:
        pipe = pipegear.GPipe(nn.Sequential(Record(), Record()), [1, 1],
                              chunks=2, worker_threads=1)
        torch.set_num_threads(2)  # after the workers started
        pipe(torch.randn(4, 2))
        torch.set_num_threads(3)
        pipe(torch.randn(4, 2))
    finally:
        torch.set_num_threads(old)
    assert seen and set(seen) == {1}, seen


def test_a_worker_keeps_its_python_thread_state_for_a_whole_pass():
    """Python state of a worker thread (threading.local, which lives in the
    thread state) lasts from one cell to the next within a pass: a worker
    does not pay for a new Python thread state at every cell."""
    local = threading.local()
    seen = []

    class Count(nn.Module):
        def forward(self, x):
            local.calls = getattr(local, "calls", 0) + 1
            seen.append(local.calls)
            return x

    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(2, 2), Count()), [1, 1],
                          chunks=4)
    with torch.no_grad():
        pipe(torch.randn(8, 2))
    assert seen == [1, 2, 3, 4]
