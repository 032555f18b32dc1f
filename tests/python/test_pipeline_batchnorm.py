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


def test_plain_batchnorm_warns():
    """What happens without deferred_batch_norm: a warning, as in C++."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.warns(UserWarning, match="once per micro-batch "
                      r"\(recomputations do not count\)"):
        pipegear.GPipe(model, [2], chunks=4, checkpoint="always")
    with pytest.warns(UserWarning, match="once per micro-batch"):
        pipegear.GPipe(nn.Sequential(nn.BatchNorm1d(2)), [1], chunks=2,
                       checkpoint="never")


def plain_norms():
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Linear(6, 6), nn.BatchNorm1d(6, momentum=None), nn.Tanh(),
        nn.Unflatten(1, (2, 3)), nn.InstanceNorm1d(2, track_running_stats=True),
        nn.Flatten(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
@pytest.mark.parametrize("face", ["module", "step"])
def test_plain_norms_count_each_micro_batch_once(checkpoint, face):
    """A recomputation updates no running statistics: after one step with
    chunks=4 num_batches_tracked is 4 (was 7 with except_last, 8 with
    always), and the statistics are those of the plain model run on the 4
    micro-batches in turn."""
    torch.manual_seed(5)
    plain = plain_norms()
    with pytest.warns(UserWarning, match="once per micro-batch"):
        pipe = pipegear.GPipe(copy.deepcopy(plain), [3, 4, 3], chunks=4,
                              checkpoint=checkpoint)
    x, t = torch.randn(8, 4).double(), torch.randn(8, 3).double()
    if face == "module":
        nn.functional.mse_loss(pipe(x), t).backward()
    else:
        pipe.step(x, t, nn.functional.mse_loss)
    for part in x.split(2):
        plain(part)
    assert int(pipe[1].num_batches_tracked) == 4
    assert int(pipe[4].num_batches_tracked) == 4
    assert int(pipe[7].num_batches_tracked) == 0  # InstanceNorm: not counted
    for (key, got), want in zip(pipe.state_dict().items(),
                                plain.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=key)
    for i in (1, 4, 7):  # put back after every recomputation
        assert pipe[i].track_running_stats
        assert all(isinstance(pipe[i]._buffers[k], torch.Tensor) for k in
                   ("running_mean", "running_var", "num_batches_tracked"))


def test_recomputed_norms_compute_what_their_forward_did():
    """With the running statistics hidden, a recomputation normalises with
    the micro-batch's statistics, as its forward: the same gradients
    whether micro-batches are recomputed or kept."""
    grads = []
    for checkpoint in ["never", "always"]:
        torch.manual_seed(6)
        with pytest.warns(UserWarning):
            pipe = pipegear.GPipe(plain_norms(), [3, 7], chunks=4,
                                  checkpoint=checkpoint)
        pipe.step(torch.randn(8, 4).double(), torch.randn(8, 3).double(),
                  nn.functional.mse_loss)
        grads.append([p.grad for p in pipe.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_eval_mode_batchnorm_in_a_training_pipeline_keeps_its_stats():
    torch.manual_seed(7)
    model = plain_norms()
    model[1].eval()
    with pytest.warns(UserWarning):
        pipe = pipegear.GPipe(model, [2, 8], chunks=2, checkpoint="always")
    before = model[1].running_mean.clone()
    pipe.step(torch.randn(4, 4).double(), torch.randn(4, 3).double(),
              nn.functional.mse_loss)
    assert torch.equal(model[1].running_mean, before)
    assert int(model[1].num_batches_tracked) == 0
    assert int(model[4].num_batches_tracked) == 2


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
