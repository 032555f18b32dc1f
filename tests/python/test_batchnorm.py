import contextlib
import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pipegear import _C
from pipegear.batchnorm import DeferredBatchNorm, convert_deferred_batch_norm

_REFERENCE = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@contextlib.contextmanager
def recomputing():
    """Marks this thread as recomputing a checkpointed forward, as the
    engine does before a backward."""
    _C._recomputing_enter()
    try:
        yield
    finally:
        _C._recomputing_exit()


def make_input(batch, channels, dim, dtype=torch.float32):
    shape = (batch, channels) + (3,) * (dim - 2)
    offset = torch.arange(channels, dtype=dtype).view((1, channels) + (1,) * (dim - 2))
    return torch.randn(shape, dtype=dtype) * 2.0 + offset


def pipelined_step(dbn, x, chunks, recompute):
    """One step as the engine runs it: reset, every micro-batch's forward,
    the checkpointed ones recomputed (gathering nothing), commit."""
    dbn.reset_accumulated()
    parts = x.tensor_split(min(chunks, x.size(0)))
    outputs = [dbn(part) for part in parts]
    if recompute:
        with recomputing():
            assert _C._is_recomputing()
            for part, output in zip(parts[:-1], outputs[:-1]):
                torch.testing.assert_close(dbn(part), output)
    assert not _C._is_recomputing()
    dbn.commit()
    return outputs


def assert_same_stats(dbn, bn, atol=1e-6):
    torch.testing.assert_close(dbn.running_mean, bn.running_mean, rtol=1e-6, atol=atol)
    torch.testing.assert_close(dbn.running_var, bn.running_var, rtol=1e-6, atol=atol)
    assert dbn.num_batches_tracked.item() == bn.num_batches_tracked.item()


@pytest.mark.parametrize("chunks", [1, 2, 4, 5])
@pytest.mark.parametrize("batch", [10, 12])
@pytest.mark.parametrize("dim", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("recompute", [False, True])
def test_running_stats_equal_whole_batch(chunks, batch, dim, momentum, recompute):
    torch.manual_seed(chunks * 100 + batch + dim)
    dbn = DeferredBatchNorm(3, momentum=momentum, chunks=chunks)
    bn = _REFERENCE[dim](3, momentum=momentum)
    for step in range(4):
        x = make_input(batch, 3, dim)
        pipelined_step(dbn, x, chunks, recompute)
        bn(x)
        assert dbn.accumulated_micro_batches == 0
        assert dbn.num_batches_tracked.item() == step + 1
        assert_same_stats(dbn, bn)

    dbn.eval()
    bn.eval()
    x = make_input(batch, 3, dim)
    torch.testing.assert_close(dbn(x), bn(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunks", [1, 2, 4, 5])
def test_training_output_and_gradients_are_per_micro_batch(chunks):
    torch.manual_seed(chunks)
    dbn = DeferredBatchNorm(4, chunks=chunks)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        w, b = torch.rand(4) + 0.5, torch.randn(4)
        for m in (dbn, bn):
            m.weight.copy_(w)
            m.bias.copy_(b)
    x = make_input(12, 4, 4)
    x_dbn = x.clone().requires_grad_()
    x_bn = x.clone().requires_grad_()
    grad = torch.randn_like(x)

    y_dbn = torch.cat(pipelined_step(dbn, x_dbn, chunks, recompute=False))
    y_bn = torch.cat([bn(part) for part in x_bn.tensor_split(chunks)])
    torch.testing.assert_close(y_dbn, y_bn, rtol=1e-5, atol=1e-5)

    y_dbn.backward(grad)
    y_bn.backward(grad)
    assert dbn.weight.grad is not None and dbn.weight.grad.abs().sum() > 0
    torch.testing.assert_close(dbn.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbn.bias.grad, bn.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_dbn.grad, x_bn.grad, rtol=1e-5, atol=1e-5)


def test_commits_by_itself_after_chunks_micro_batches():
    dbn = DeferredBatchNorm(2, chunks=3)
    x = make_input(6, 2, 2)
    dbn(x[0:2])
    dbn(x[2:4])
    assert dbn.accumulated_micro_batches == 2
    assert dbn.num_batches_tracked.item() == 0
    torch.testing.assert_close(dbn.running_mean, torch.zeros(2))
    dbn(x[4:6])
    assert dbn.accumulated_micro_batches == 0
    assert dbn.commit() is False  # the engine's commit is then a no-op
    bn = nn.BatchNorm1d(2)
    bn(x)
    assert_same_stats(dbn, bn)


def test_fewer_micro_batches_than_chunks_commit_on_commit():
    dbn = DeferredBatchNorm(2, chunks=4)
    bn = nn.BatchNorm1d(2)
    x = make_input(3, 2, 3)  # 3 samples: 3 micro-batches of 4 asked for
    for part in x.tensor_split(3):
        dbn(part)
    assert dbn.accumulated_micro_batches == 3
    assert dbn.num_batches_tracked.item() == 0
    assert dbn.commit() is True
    bn(x)
    assert_same_stats(dbn, bn)


def test_reset_accumulated_drops_a_failed_step():
    dbn = DeferredBatchNorm(3, chunks=4)
    bn = nn.BatchNorm1d(3)
    failed = make_input(8, 3, 2) + 10.0
    dbn(failed[0:2])
    dbn(failed[2:4])
    assert dbn.accumulated_micro_batches == 2
    x = make_input(8, 3, 2)
    pipelined_step(dbn, x, 4, recompute=True)
    bn(x)
    assert_same_stats(dbn, bn)
    assert dbn.num_batches_tracked.item() == 1


def test_recomputation_gathers_nothing():
    dbn = DeferredBatchNorm(2, chunks=2)
    x = make_input(4, 2, 2)
    dbn(x[:2])
    with recomputing():
        with recomputing():
            dbn(x[:2])
        assert _C._is_recomputing()  # nested exits restore the outer state
        dbn(x[:2])
    assert dbn.accumulated_micro_batches == 1
    with pytest.raises(ValueError, match="_recomputing_enter"):
        _C._recomputing_exit()


def test_eval_uses_running_stats_and_gathers_nothing():
    dbn = DeferredBatchNorm(3, chunks=2)
    with torch.no_grad():
        dbn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        dbn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    dbn.eval()
    x = make_input(5, 3, 4)
    expected = nn.functional.batch_norm(
        x, dbn.running_mean, dbn.running_var, dbn.weight, dbn.bias, False, 0.0, 1e-5
    )
    torch.testing.assert_close(dbn(x), expected)
    assert dbn.accumulated_micro_batches == 0
    assert dbn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_matches_batch_norm(affine):
    dbn = DeferredBatchNorm(3, affine=affine)
    bn = nn.BatchNorm2d(3, affine=affine)
    bn.train()
    bn(torch.randn(4, 3, 2, 2))
    assert list(dbn.state_dict()) == list(bn.state_dict())
    dbn.load_state_dict(bn.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(dbn.state_dict()[key], value)
    bn.load_state_dict(DeferredBatchNorm(3, affine=affine).state_dict())
    assert bn.num_batches_tracked.item() == 0
    # A state saved before num_batches_tracked existed still loads.
    old = OrderedDict(
        (k, v) for k, v in bn.state_dict().items() if k != "num_batches_tracked"
    )
    old._metadata = {"": {"version": 1}}
    dbn.num_batches_tracked.fill_(5)
    dbn.load_state_dict(old)
    assert dbn.num_batches_tracked.item() == 0


def test_deepcopy_and_save_keep_accumulated_stats():
    dbn = DeferredBatchNorm(2, chunks=2)
    x = make_input(4, 2, 2)
    dbn(x[:2])
    clone = copy.deepcopy(dbn)
    assert clone.accumulated_micro_batches == 1
    buffer = io.BytesIO()
    torch.save(dbn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (dbn, clone, loaded):
        m(x[2:])
        assert m.num_batches_tracked.item() == 1
    torch.testing.assert_close(clone.running_mean, dbn.running_mean)
    torch.testing.assert_close(loaded.running_var, dbn.running_var)


def test_convert_keeps_parameters_buffers_and_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 4),
        nn.BatchNorm1d(4, momentum=None, eps=1e-3),
        nn.BatchNorm1d(4, track_running_stats=False),
        nn.Sequential(nn.BatchNorm1d(4, affine=False), nn.ReLU()),
        nn.Linear(4, 2),
    )
    for _ in range(3):
        model(torch.randn(8, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model[3].eval()
    reference = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())

    converted = convert_deferred_batch_norm(model, chunks=4)
    assert converted is model
    assert isinstance(model[1], DeferredBatchNorm)
    assert model[1].chunks == 4 and model[1].eps == 1e-3 and model[1].momentum is None
    assert isinstance(model[2], nn.BatchNorm1d)  # no running stats: left alone
    assert isinstance(model[3][0], DeferredBatchNorm)
    assert not model[3][0].affine and not model[3][0].training
    assert model[1].training
    assert list(model.state_dict()) == list(state)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
        assert model.state_dict()[key].dtype == value.dtype

    # Pipelined over 4 micro-batches, it tracks what the original tracks on
    # whole mini-batches.
    model[3].train()
    reference[3].train()
    for _ in range(3):
        x = torch.randn(12, 6)
        for part in x.tensor_split(4):
            model(part)
        reference(x)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_convert_a_batch_norm_itself_keeps_dtype():
    bn = nn.BatchNorm2d(3, dtype=torch.float64)
    dbn = DeferredBatchNorm.convert_deferred_batch_norm(bn, chunks=2)
    assert isinstance(dbn, DeferredBatchNorm)
    assert dbn.weight.dtype == torch.float64
    assert dbn.num_batches_tracked.dtype == torch.long
    x = make_input(6, 3, 4, dtype=torch.float64)
    for part in x.tensor_split(2):
        dbn(part)
    bn(x)
    assert_same_stats(dbn, bn, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_whole_batch():
    dbn = DeferredBatchNorm(3, chunks=4).cuda()
    bn = nn.BatchNorm2d(3).cuda()
    converted = convert_deferred_batch_norm(nn.Sequential(nn.BatchNorm2d(3).cuda()))
    assert converted[0].running_mean.is_cuda
    for _ in range(3):
        x = make_input(12, 3, 4).cuda()
        pipelined_step(dbn, x, 4, recompute=True)
        bn(x)
    assert_same_stats(dbn, bn, atol=1e-5)


def test_bad_inputs_and_arguments():
    dbn = DeferredBatchNorm(3)
    with pytest.raises(ValueError, match="3 features"):
        dbn(torch.randn(4, 5))
    with pytest.raises(ValueError, match="2D to 5D"):
        dbn(torch.randn(4))
    with pytest.raises(ValueError, match="more than 1 value"):
        dbn(torch.randn(1, 3))
    with pytest.raises(ValueError):
        DeferredBatchNorm(3, chunks=0)
    with pytest.raises(ValueError):
        convert_deferred_batch_norm(nn.BatchNorm1d(3), chunks=0)
    with pytest.raises(TypeError):
        convert_deferred_batch_norm(nn.BatchNorm1d(3), chunks=2.0)
    with pytest.raises(TypeError):
        convert_deferred_batch_norm("model")


def test_converting_a_deferred_batch_norm_of_other_chunks_replaces_it():
    dbn = DeferredBatchNorm(3, chunks=4)
    with torch.no_grad():
        dbn.running_mean.fill_(2.0)
        dbn.weight.fill_(3.0)
    assert convert_deferred_batch_norm(dbn, chunks=4) is dbn
    again = convert_deferred_batch_norm(dbn, chunks=5)
    assert again is not dbn and again.chunks == 5
    assert torch.equal(again.running_mean, dbn.running_mean)
    assert torch.equal(again.weight, dbn.weight)
