"""Micro-batch-aware BatchNorm (torchgpipe's DeferredBatchNorm).

In training, each micro-batch is normalised with its own statistics, but the
running statistics are updated once per mini-batch, from statistics gathered
over all its micro-batches, so they match ``nn.BatchNorm`` on whole
mini-batches. Recomputations of checkpointed forwards gather nothing. The
arithmetic lives in the C++ core (``pipegear::DeferredBatchNormImpl``).

>>> model = convert_deferred_batch_norm(model, chunks=4)
"""
from typing import Optional, TypeVar

import torch
from torch import Tensor, nn

from pipegear import _C

__all__ = ["DeferredBatchNorm", "convert_deferred_batch_norm"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

M = TypeVar("M", bound=nn.Module)


class DeferredBatchNorm(nn.Module):
    """BatchNorm whose running statistics cover the whole mini-batch.

    Accepts inputs of shape (N, C), (N, C, L), (N, C, H, W) or
    (N, C, D, H, W). Its ``state_dict`` has the keys of ``nn.BatchNorm``
    (weight, bias, running_mean, running_var, num_batches_tracked), so the
    two load each other's state.

    In training the statistics of each micro-batch are accumulated and folded
    into the running statistics by :meth:`commit`. Standalone
    (``auto_commit`` true) it runs by itself after ``chunks`` micro-batches.
    A pipeline sets ``auto_commit = False``, calls :meth:`reset_accumulated`
    before a step and :meth:`commit` once the forward of every stage
    succeeded: a step with fewer micro-batches than ``chunks`` counts too,
    and a failed step commits nothing.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for stability.
        momentum: running-average factor; ``None`` for a cumulative average.
        affine: whether to learn a per-channel ``weight`` and ``bias``.
        chunks: micro-batches per mini-batch.
    """

    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        chunks: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        if chunks < 1:
            raise ValueError(f"chunks must be at least 1, got {chunks}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.chunks = chunks
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked",
            torch.tensor(0, dtype=torch.long, device=device),
        )
        self._stats = _C.DeferredBatchNormStats()
        #: Commit by itself after ``chunks`` micro-batches (off in a pipeline).
        self.auto_commit: bool = True

    def forward(self, input: Tensor) -> Tensor:
        output = _C.deferred_batch_norm_forward(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self._stats,
            self.training,
            self.eps,
        )
        if (self.auto_commit and self.training
                and self._stats.micro_batches >= self.chunks):
            self.commit()
        return output

    def commit(self) -> bool:
        """Folds the accumulated statistics into the running ones; returns
        False, doing nothing, when nothing was accumulated."""
        return _C.deferred_batch_norm_commit(
            self._stats,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.momentum,
        )

    def reset_accumulated(self) -> None:
        """Drops the statistics accumulated since the last commit."""
        self._stats.reset()

    @property
    def accumulated_micro_batches(self) -> int:
        """Micro-batches accumulated since the last commit."""
        return self._stats.micro_batches

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        self._stats.reset()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, chunks={self.chunks}"
        )

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        # As nn.BatchNorm: states saved before num_batches_tracked existed.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    @classmethod
    def convert_deferred_batch_norm(cls, module: M, chunks: int = 1) -> M:
        """See :func:`convert_deferred_batch_norm`."""
        return convert_deferred_batch_norm(module, chunks)


def _from_batch_norm(bn: nn.Module, chunks: int) -> DeferredBatchNorm:
    dbn = DeferredBatchNorm(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        chunks=chunks,
        device=bn.running_mean.device,
        dtype=bn.running_mean.dtype,
    )
    with torch.no_grad():
        if bn.affine:
            dbn.weight.copy_(bn.weight)
            dbn.bias.copy_(bn.bias)
            dbn.weight.requires_grad_(bn.weight.requires_grad)
            dbn.bias.requires_grad_(bn.bias.requires_grad)
        dbn.running_mean.copy_(bn.running_mean)
        dbn.running_var.copy_(bn.running_var)
        dbn.num_batches_tracked.copy_(bn.num_batches_tracked)
    dbn.train(bn.training)
    return dbn


def convert_deferred_batch_norm(module: M, chunks: int = 1) -> M:
    """Replaces, recursively and in place, every ``nn.BatchNorm1d/2d/3d``
    that tracks running statistics by a :class:`DeferredBatchNorm` with the
    same parameters, buffers, eps, momentum, device, dtype and mode; returns
    the module (the new DeferredBatchNorm when ``module`` is a BatchNorm). A
    DeferredBatchNorm of other ``chunks`` is replaced the same way (one of
    the same ``chunks`` is kept).

    >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    >>> model = convert_deferred_batch_norm(model, chunks=4)
    """
    if not isinstance(chunks, int) or isinstance(chunks, bool):
        raise TypeError(f"chunks must be an int, got {type(chunks).__name__}")
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, _BATCH_NORMS) and module.track_running_stats:
        return _from_batch_norm(module, chunks)  # type: ignore[return-value]
    if isinstance(module, DeferredBatchNorm):
        if module.chunks == chunks:
            return module
        return _from_batch_norm(module, chunks)  # type: ignore[return-value]
    for name, child in module.named_children():
        converted = convert_deferred_batch_norm(child, chunks)
        if converted is not child:
            setattr(module, name, converted)
    return module
