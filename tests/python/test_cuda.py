"""pipegear on a CUDA device: transparency with stages sharing the GPU and
with CPU/GPU pipelines, training with cross-device copies, copies under
allocator pressure (record_stream), an input still being computed when the
step starts, CUDA dropout replay, DeferredBatchNorm, a parameter tied
across a CPU and a GPU partition, every schedule (split backwards,
interleaved partitions sharing a device).

Every test is marked `cuda` and skipped without a CUDA device. On a GPU
machine: `python3 -m pytest -q -m cuda tests/python/test_cuda.py`, or, where
pytest is not installed, `python3 tests/python/test_cuda.py` (runs every
test_* function and prints "N passed, N failed, N skipped").
scripts/gpu_check.sh does either; see docs/gpu.md.

`PIPEGEAR_TEST_DEVICE=cpu` runs the same tests with "the GPU" replaced by the
CPU (smaller sizes): a dry run of the tests' own logic on a CPU-only machine.
It proves nothing about the CUDA path.
"""
import contextlib
import copy
import faulthandler
import os
import sys
import traceback

import torch
from torch import nn

import pipegear

try:
    import pytest
except ImportError:  # plain-script mode on a machine without pytest
    pytest = None

DEV = os.environ.get("PIPEGEAR_TEST_DEVICE", "cuda:0")
ON_CUDA = torch.device(DEV).type == "cuda"
RUNNABLE = torch.cuda.is_available() if ON_CUDA else True
SKIP_REASON = "needs a CUDA device"
# A hung pipeline must not eat the GPU session: dump every thread's stack and
# exit after this many seconds in one test.
WATCHDOG_S = float(os.environ.get("PIPEGEAR_TEST_WATCHDOG_S", "150"))

if pytest is not None:
    pytestmark = [pytest.mark.cuda,
                  pytest.mark.skipif(not RUNNABLE, reason=SKIP_REASON)]

    @pytest.fixture(autouse=True)
    def _watchdog():
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
        yield
        faulthandler.cancel_dump_traceback_later()
        sync()

MODES = ("never", "except_last", "always")
F64 = torch.float64


def sync():
    if ON_CUDA and torch.cuda.is_available():
        torch.cuda.synchronize()


def mlp(width=32, blocks=4, dtype=F64):
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers).to(dtype)


def even_balance(layers, k):
    return [layers // k + (1 if i < layers % k else 0) for i in range(k)]


def assert_close(actual, expected, what, rtol=1e-9, atol=1e-12):
    """Elementwise, on the CPU; float64 by default, so tight."""
    assert actual is not None, f"{what}: missing"
    assert expected is not None, f"{what}: reference missing"
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if not torch.allclose(a, e, rtol=rtol, atol=atol):
        diff = (a - e).abs().max().item()
        raise AssertionError(f"{what}: max abs diff {diff:.3g} "
                             f"(rtol={rtol}, atol={atol}; max |expected| "
                             f"{e.abs().max().item():.3g})")


def assert_rel(actual, expected, what, tol=1e-9):
    """Relative L2 error, scale-free (gradients of a mean loss are tiny);
    NaN garbage fails it."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = ((a - e).norm() / e.norm().clamp_min(1e-300)).item()
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol:g}")


def compare_once(plain, devices, ref_device, chunks, checkpoint, face,
                 batch=12, width=32, input_device=None, input_grad=True,
                 schedule="gpipe", virtual_stages=1):
    """One forward/backward of the pipelined copy of `plain` on `devices`
    (one per worker: `virtual_stages` partitions each) against `plain`
    itself on `ref_device`."""
    torch.manual_seed(0)
    pipe = pipegear.GPipe(copy.deepcopy(plain).cpu(),
                          even_balance(len(plain),
                                       len(devices) * virtual_stages),
                          devices=devices, chunks=chunks,
                          checkpoint=checkpoint, schedule=schedule,
                          virtual_stages=virtual_stages)
    ref_model = copy.deepcopy(plain).to(ref_device)
    x = torch.randn(batch, width, dtype=F64)
    t = torch.randn(batch, width, dtype=F64)
    x1 = x.to(ref_device).requires_grad_(input_grad)
    ref = ref_model(x1)
    ref_loss = nn.functional.mse_loss(ref, t.to(ref_device))
    ref_loss.backward()

    first, last = torch.device(devices[0]), torch.device(devices[-1])
    x2 = x.to(input_device or first).requires_grad_(input_grad)
    t2 = t.to(last)
    tag = (f"devices={devices} input on {x2.device} chunks={chunks} "
           f"checkpoint={checkpoint} {face} {schedule}")
    if face == "module":
        y = pipe(x2)
        assert y.device == last, f"{tag}: output on {y.device}"
        assert_close(y, ref, f"{tag} output")
        nn.functional.mse_loss(y, t2).backward()
    else:
        loss = pipe.step(x2, t2, nn.functional.mse_loss)
        assert_close(loss, ref_loss, f"{tag} loss")
    if input_grad:
        assert x2.grad is not None, f"{tag}: no input gradient"
        assert x2.grad.device == x2.device, (
            f"{tag}: input gradient on {x2.grad.device}")
        assert_close(x2.grad, x1.grad, f"{tag} input grad")
    for part, device in zip(pipe.partitions, pipe.devices):
        for p in part.parameters():
            assert p.device == device, f"{tag}: parameter on {p.device}"
    for (name, p1), (name2, p2) in zip(ref_model.named_parameters(),
                                       pipe.named_parameters()):
        assert name == name2
        assert_close(p2.grad, p1.grad, f"{tag} grad {name}")
    sync()


def test_transparent_with_stages_sharing_the_gpu():
    for k in (2, 3):
        for checkpoint in MODES:
            for face in ("module", "step"):
                compare_once(mlp(), [DEV] * k, DEV, 4, checkpoint, face)


def test_transparent_with_cpu_and_gpu_stages():
    # [DEV, cpu, DEV]: module style drains stages 0 and 2 on the autograd
    # thread and stage 1 on its worker (docs/engine.md, "Explicit backward").
    for devices in (["cpu", DEV], [DEV, "cpu"], [DEV, "cpu", DEV],
                    ["cpu", DEV, "cpu"]):
        for checkpoint in MODES:
            for face in ("module", "step"):
                compare_once(mlp(), devices, "cpu", 4, checkpoint, face)


def test_every_schedule_on_the_gpu_and_across_cpu_and_gpu():
    """1F1B, the split backwards of the zero-bubble schedules (a W cell runs
    on the stage's stream after other cells) and the interleaved schedules
    (a worker's partitions share its device), on the GPU alone and with a
    CPU worker, every checkpoint mode."""
    for schedule, v in (("1f1b", 1), ("zb-h1", 1), ("zb-h2", 1),
                        ("interleaved", 2), ("interleaved-zb", 2)):
        for devices in ([DEV, DEV], ["cpu", DEV], [DEV, "cpu"]):
            for checkpoint in MODES:
                compare_once(mlp(), devices, "cpu", 4, checkpoint, "step",
                             schedule=schedule, virtual_stages=v)


def test_input_on_another_device_than_stage_0_is_copied():
    # The engine copies stage 0's micro-batches to its device.
    for devices, where in (([DEV, DEV], "cpu"), (["cpu", DEV], DEV)):
        for face in ("module", "step"):
            compare_once(mlp(), devices, "cpu", 4, "except_last", face,
                         input_device=where, input_grad=False)


def test_input_on_another_device_than_stage_0_gets_its_gradient():
    # x.grad must land on x's device, as with a plain `model(x.to(dev))`.
    for devices, where in (([DEV, DEV], "cpu"), (["cpu", DEV], DEV)):
        for face in ("module", "step"):
            compare_once(mlp(), devices, "cpu", 4, "except_last", face,
                         input_device=where, input_grad=True)


def test_an_input_still_being_computed_reaches_a_cpu_stage_0_intact():
    # Stage 0 on the CPU copies its input from the GPU on a copy stream; that
    # copy must wait for the kernels still producing the input on the
    # caller's stream (tens of ms of matmuls queued just before the step).
    n = 4096 if ON_CUDA else 64
    for face in ("module", "step"):
        torch.manual_seed(6)
        plain = mlp()
        pipe = pipegear.GPipe(copy.deepcopy(plain), [4, 4],
                              devices=["cpu", DEV], chunks=4)
        a = torch.randn(n, n, device=DEV)
        w = torch.randn(n, n, device=DEV) / n ** 0.5
        t = torch.randn(16, 32, device=DEV, dtype=F64)
        sync()
        for _ in range(12):
            a = torch.tanh(a @ w)
        x = a[:16, :32].double()  # a fresh block, written last
        if face == "module":
            out = pipe(x).detach()
            ref = plain(x.cpu())
        else:
            out = pipe.step(x, t, nn.functional.mse_loss).detach()
            ref = nn.functional.mse_loss(plain(x.cpu()), t.cpu())
        assert_close(out, ref, f"{face}: output from an in-flight input")


def test_an_input_made_on_a_side_stream_reaches_a_gpu_stage_0_intact():
    # Stage 0 on the input's own GPU takes it without a copy, on its worker's
    # stream; the input is still being written on the caller's side stream,
    # so stage 0 must wait for that stream (the step records an event).
    n = 4096 if ON_CUDA else 64
    side = torch.cuda.Stream() if ON_CUDA else None
    for face in ("module", "step"):
        torch.manual_seed(7)
        plain = mlp().to(DEV)
        pipe = pipegear.GPipe(copy.deepcopy(plain), [4, 4],
                              devices=[DEV, DEV], chunks=4)
        t = torch.randn(16, 32, device=DEV, dtype=F64)
        sync()
        ctx = torch.cuda.stream(side) if ON_CUDA else contextlib.nullcontext()
        with ctx:
            a = torch.randn(n, n, device=DEV)
            w = torch.randn(n, n, device=DEV) / n ** 0.5
            for _ in range(12):
                a = torch.tanh(a @ w)
            x = a[:16, :32].double()  # written last, on the side stream
            if face == "module":
                out = pipe(x).detach()
            else:
                out = pipe.step(x, t, nn.functional.mse_loss).detach()
        sync()
        if face == "module":
            ref = plain(x)
        else:
            ref = nn.functional.mse_loss(plain(x), t)
        assert_close(out, ref, f"{face}: output from a side-stream input")


def test_fifty_training_steps_with_copies_match_the_plain_model():
    # Every hand-off crosses devices (GPU -> CPU -> GPU), forward and
    # backward; the loss is compared at every step.
    torch.manual_seed(2)
    plain = mlp(width=256, blocks=6)
    pipe = pipegear.GPipe(copy.deepcopy(plain), [4, 4, 4],
                          devices=[DEV, "cpu", DEV], chunks=4,
                          checkpoint="except_last")
    plain = plain.to(DEV)
    opt1 = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    opt2 = torch.optim.SGD(pipe.parameters(), lr=0.05, momentum=0.9)
    for step in range(50):
        x = torch.randn(64, 256, device=DEV, dtype=F64)
        t = torch.randn(64, 256, device=DEV, dtype=F64)
        opt1.zero_grad()
        ref = nn.functional.mse_loss(plain(x), t)
        ref.backward()
        opt1.step()
        opt2.zero_grad()
        if step % 2:
            loss = nn.functional.mse_loss(pipe(x), t)
            loss.backward()
        else:
            loss = pipe.step(x, t, nn.functional.mse_loss)
        opt2.step()
        assert_close(loss, ref, f"step {step} loss", rtol=1e-8, atol=1e-12)
    for (name, p1), p2 in zip(plain.named_parameters(), pipe.parameters()):
        assert_close(p2, p1, f"param {name}", rtol=1e-8, atol=1e-10)


def _churn(n_bytes):
    """Allocator churn: NaN-filled blocks on the current and on a side
    stream, then empty_cache. A block the pipeline freed too early would be
    handed out and overwritten here."""
    if not ON_CUDA:
        garbage = [torch.full((n_bytes // 8,), float("nan"))
                   for _ in range(4)]
        del garbage
        return
    blocks = [torch.full((n_bytes // 8,), float("nan"), device=DEV)
              for _ in range(8)]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        more = [torch.full((n_bytes // 8,), float("nan"), device=DEV)
                for _ in range(8)]
    del blocks, more
    torch.cuda.empty_cache()


def test_record_stream_stress_big_activations_many_micro_batches():
    width, batch, chunks = (2048, 512, 32) if ON_CUDA else (128, 64, 16)
    act_bytes = batch // chunks * width * 8
    torch.manual_seed(3)
    plain = nn.Sequential(*[m for _ in range(3)
                            for m in (nn.Linear(width, width), nn.ReLU())])
    plain = plain.to(F64)
    ref_model = copy.deepcopy(plain).to(DEV)
    for devices in ([DEV, DEV, DEV], [DEV, "cpu", DEV]):
        for checkpoint in ("never", "except_last"):
            pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 2, 2],
                                  devices=devices, chunks=chunks,
                                  checkpoint=checkpoint)
            for step in range(6):
                x = torch.randn(batch, width, device=DEV, dtype=F64)
                t = torch.randn(batch, width, device=DEV, dtype=F64)
                ref_model.zero_grad()
                ref_y = ref_model(x)
                nn.functional.mse_loss(ref_y, t).backward()
                pipe.zero_grad()
                tag = f"devices={devices} checkpoint={checkpoint} step {step}"
                if step % 2:
                    y = pipe(x)
                    _churn(act_bytes * 4)  # between forward and backward
                    nn.functional.mse_loss(y, t).backward()
                    assert_rel(y, ref_y, f"{tag} output")
                else:
                    loss = pipe.step(x, t, nn.functional.mse_loss)
                    assert_rel(loss.reshape(1), nn.functional.mse_loss(
                        ref_y, t).reshape(1), f"{tag} loss")
                _churn(act_bytes * 4)  # between steps
                for (name, p1), p2 in zip(ref_model.named_parameters(),
                                          pipe.parameters()):
                    assert_rel(p2.grad, p1.grad, f"{tag} grad {name}")
                del x, t, ref_y
            del pipe
            sync()


def _dropout_run(model, devices, checkpoint, face, x, t, seed):
    pipe = pipegear.GPipe(copy.deepcopy(model), [3, 3], devices=devices,
                          chunks=4, checkpoint=checkpoint)
    x = x.to(devices[0]).clone().requires_grad_()
    t = t.to(devices[-1])
    torch.manual_seed(seed)  # seeds the CUDA generators too
    if face == "module":
        y = pipe(x)
        nn.functional.mse_loss(y, t).backward()
        out = y.detach()
    else:
        out = pipe.step(x, t, nn.functional.mse_loss).detach()
    sync()
    grads = [p.grad.detach().clone() for p in pipe.parameters()]
    return out, x.grad.detach().clone(), grads


def test_gpu_dropout_replay_is_bitwise():
    # Dropout in one stage only: stages sharing a device share its generator
    # (docs/engine.md, "Randomness").
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 64),
                          nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    x = torch.randn(32, 64)
    t = torch.randn(32, 64)
    for devices in ([DEV, DEV], [DEV, "cpu"]):
        for face in ("module", "step"):
            never = _dropout_run(model, devices, "never", face, x, t, 1234)
            for mode in ("always", "except_last"):
                other = _dropout_run(model, devices, mode, face, x, t, 1234)
                tag = f"devices={devices} {face} {mode} vs never"
                assert torch.equal(other[0], never[0]), f"{tag}: outputs differ"
                assert torch.equal(other[1], never[1]), (
                    f"{tag}: input gradients differ")
                for i, (a, b) in enumerate(zip(other[2], never[2])):
                    assert torch.equal(a, b), f"{tag}: gradient {i} differs"
            # Dropout did act: another seed gives another output.
            again = _dropout_run(model, devices, "never", face, x, t, 99)
            assert not torch.equal(again[0], never[0]), (
                f"devices={devices} {face}: dropout had no effect")


def test_deferred_batch_norm_on_the_gpu_matches_whole_batch():
    torch.manual_seed(5)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).to(F64)
    for devices in ([DEV, DEV], ["cpu", DEV]):
        for checkpoint in MODES:
            for face in ("module", "step"):
                ref = copy.deepcopy(plain).to(DEV)
                pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 5],
                                      devices=devices, chunks=4,
                                      checkpoint=checkpoint,
                                      deferred_batch_norm=True)
                for step in range(3):
                    x = torch.randn(16 - step, 3, 6, 6, device=DEV, dtype=F64)
                    ref(x)
                    x = x.to(devices[0])
                    if face == "module":
                        pipe(x).sum().backward()
                    else:
                        pipe.step(x, None, lambda y, _: y.sum(),
                                  reduction="sum")
                bn_ref = ref.get_submodule("3")
                bn_pipe = pipe.get_submodule("3")
                tag = f"devices={devices} checkpoint={checkpoint} {face}"
                assert isinstance(bn_pipe, pipegear.DeferredBatchNorm), tag
                assert bn_pipe.running_mean.device == torch.device(DEV), tag
                assert_close(bn_pipe.running_mean, bn_ref.running_mean,
                             f"{tag} running_mean", rtol=1e-7, atol=1e-9)
                assert_close(bn_pipe.running_var, bn_ref.running_var,
                             f"{tag} running_var", rtol=1e-7, atol=1e-9)
                assert int(bn_pipe.num_batches_tracked) == 3, tag
                sync()


class _TiedEmbed(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, ids):
        return nn.functional.embedding(ids, self.weight)


def _tied_lm(vocab=50, width=32):
    """embed -> 4 x (Linear, Tanh) -> head, the head's weight the
    embedding's (GPT-2's tie), float64."""
    torch.manual_seed(4)
    head = nn.Linear(width, vocab, bias=False)
    layers = [_TiedEmbed(head.weight)]
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, head).to(F64)


def test_tied_parameter_across_cpu_and_gpu_trains_like_the_plain_model():
    # The owner's device holds the parameter; a partition on the other
    # device computes with a copy refreshed before every pass, one on the
    # owner's device with an alias (docs/engine.md, "Tied parameters").
    vocab = 50
    for devices in ([DEV, "cpu"], ["cpu", DEV], [DEV, "cpu", DEV]):
        for face in ("step", "module"):
            plain = _tied_lm(vocab)
            pipe = pipegear.GPipe(copy.deepcopy(plain),
                                  even_balance(len(plain), len(devices)),
                                  devices=devices, chunks=3,
                                  checkpoint="except_last")
            tag = f"devices={devices} {face}"
            (tie,) = pipe._ties.ties
            # The head (last partition): a copy unless on the owner's device.
            assert [r.copy for r in tie.replicas] == [
                torch.device(devices[-1]) != torch.device(devices[0])], tag
            opt1 = torch.optim.AdamW(plain.parameters(), lr=0.01)
            opt2 = torch.optim.AdamW(pipe.parameters(), lr=0.01)
            g = torch.Generator().manual_seed(5)
            for step in range(10):
                ids = torch.randint(0, vocab, (9, 7), generator=g)
                t = torch.randint(0, vocab, (9, 7), generator=g)

                def loss_fn(out, t):
                    return nn.functional.cross_entropy(
                        out.flatten(0, 1), t.flatten())

                opt1.zero_grad()
                ref = loss_fn(plain(ids), t)
                ref.backward()
                opt1.step()
                opt2.zero_grad()
                first = torch.device(devices[0])
                last = torch.device(devices[-1])
                if face == "module":
                    loss = loss_fn(pipe(ids.to(first)), t.to(last))
                    loss.backward()
                else:
                    loss = pipe.step(ids.to(first), t.to(last), loss_fn,
                                     count=lambda t: t.numel())
                opt2.step()
                assert_close(loss, ref, f"{tag} step {step} loss")
            for (name, p1), (name2, p2) in zip(plain.named_parameters(),
                                               pipe.named_parameters()):
                assert name == name2, tag
                assert_close(p2, p1, f"{tag} param {name}", rtol=1e-8,
                             atol=1e-10)
            state = pipe.state_dict()
            assert list(state) == list(plain.state_dict()), tag
            sync()


def _main() -> int:
    """The runner without pytest: every test_* function, in file order."""
    tests = [(name, fn) for name, fn in globals().items()
             if name.startswith("test_") and callable(fn)]
    if not RUNNABLE:
        print(f"0 passed, 0 failed, {len(tests)} skipped ({SKIP_REASON})")
        return 0
    print(f"device {DEV}; torch {torch.__version__}", flush=True)
    passed = failed = 0
    for name, fn in tests:
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
        try:
            fn()
            sync()
        except Exception:  # noqa: BLE001 -- report and go on
            failed += 1
            print(f"FAILED {name}", flush=True)
            traceback.print_exc()
            sys.stdout.flush()
        else:
            passed += 1
            print(f"PASSED {name}", flush=True)
        finally:
            faulthandler.cancel_dump_traceback_later()
    print(f"{passed} passed, {failed} failed, 0 skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
