"""DeferredBatchNorm inside a pipeline: the running statistics of the whole
mini-batch, under every checkpoint mode and chunk count."""
import copy

import pytest
import torch
from torch import nn

import pipegear


def conv_bn(momentum):
    # One BatchNorm: one behind another would see micro-batch-normalised
    # input, which no whole-batch reference reproduces (docs/batchnorm.md).
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()


@pytest.mark.parametrize("chunks", [1, 2, 4, 5])
@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("face", ["module", "step"])
def test_running_stats_equal_whole_batch(chunks, checkpoint, momentum, face):
    torch.manual_seed(0)
    plain = conv_bn(momentum)
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 5], chunks=chunks,
                          checkpoint=checkpoint, deferred_batch_norm=True)
    for step in range(3):
        x = torch.randn(12 - step, 3, 5, 5, dtype=torch.float64)  # 12, 11, 10
        plain(x)
        if face == "module":
            pipe(x).sum().backward()
        else:
            pipe.step(x, None, lambda y, _: y.sum(), reduction="sum")
    for name in ("3",):
        bn_plain, bn_pipe = plain.get_submodule(name), pipe.get_submodule(name)
        assert isinstance(bn_pipe, pipegear.DeferredBatchNorm)
        torch.testing.assert_close(bn_pipe.running_mean, bn_plain.running_mean,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bn_pipe.running_var, bn_plain.running_var,
                                   rtol=1e-6, atol=1e-6)
        assert int(bn_pipe.num_batches_tracked) == int(
            bn_plain.num_batches_tracked) == 3
    plain.eval()
    pipe.eval()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), plain(x), rtol=1e-6, atol=1e-6)


def test_training_output_is_per_micro_batch_batchnorm():
    torch.manual_seed(1)
    plain = conv_bn(0.1)
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 5], chunks=2,
                          deferred_batch_norm=True)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = pipe(x)
        ref = torch.cat([copy.deepcopy(plain)(part) for part in x.split(4)])
    torch.testing.assert_close(y, ref)


def test_failed_step_leaks_nothing_into_the_next():
    class FailOnce(nn.Module):
        armed = True

        def forward(self, x):
            if self.armed and x.shape[0] == 2:
                FailOnce.armed = False
                raise RuntimeError("injected")
            return x

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), FailOnce())
    plain = copy.deepcopy(model)
    pipe = pipegear.GPipe(model, [3], chunks=3, deferred_batch_norm=True)
    with pytest.raises(RuntimeError, match="injected"):
        pipe(torch.randn(6, 3))  # BN saw micro-batch 0 before the failure
    x = torch.randn(6, 3)
    pipe(x)
    plain(x)
    torch.testing.assert_close(pipe[1].running_mean, plain[1].running_mean)
    assert int(pipe[1].num_batches_tracked) == 1


def test_plain_batchnorm_warns_and_counts_recomputations():
    """What happens without deferred_batch_norm: documented and tested."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.warns(UserWarning, match="once more by every recomputation"):
        pipe = pipegear.GPipe(model, [2], chunks=4, checkpoint="always")
    pipe(torch.randn(8, 2)).sum().backward()
    # 4 micro-batches, each counted in the forward and in its recomputation.
    assert int(model[1].num_batches_tracked) == 8
    with pytest.warns(UserWarning, match="once per micro-batch"):
        pipegear.GPipe(nn.Sequential(nn.BatchNorm1d(2)), [1], chunks=2,
                       checkpoint="never")


@pytest.mark.parametrize("face", ["module", "step"])
def test_a_failure_in_a_later_stage_commits_nothing(face):
    """Stage 0 ends its forward cells long before stage 1 fails: the failed
    step must still leave stage 0's running statistics as they were."""
    import time

    class SlowFailLast(nn.Module):
        calls = 0

        def forward(self, x):
            SlowFailLast.calls += 1
            if SlowFailLast.calls == 3:  # the last micro-batch
                time.sleep(0.2)  # stage 0 is done with every forward cell
                raise RuntimeError("injected in stage 1")
            return x

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), SlowFailLast())
    pipe = pipegear.GPipe(model, [2, 1], chunks=3, deferred_batch_norm=True)
    before = {k: v.clone() for k, v in pipe.state_dict().items()}
    x = torch.randn(6, 3)
    with pytest.raises(RuntimeError, match="injected in stage 1"):
        if face == "module":
            pipe(x)
        else:
            pipe.step(x, torch.randn(6, 3), nn.functional.mse_loss)
    for key, value in pipe.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0,
                                   msg=f"{key} changed by a failed step")
