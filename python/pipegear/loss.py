"""How a step-style loss reduces, read from the loss itself.

``step`` runs ``loss_fn`` once per micro-batch and combines the results so
that the loss and the gradients equal those of ``loss_fn`` on the whole
batch. That needs two facts about the loss:

- its *reduction*: ``'sum'`` adds the micro-batch losses, ``'mean'`` weighs
  micro-batch j by its share of the terms the mean averages over;
- for a mean, how many terms it averages over (its *count*): the rows,
  unless the loss says otherwise. ``nn.CrossEntropyLoss`` and
  ``nn.NLLLoss`` (and ``F.cross_entropy`` / ``F.nll_loss``) average over
  the targets that are not ``ignore_index``, each weighted by its class
  ``weight``, so a micro-batch that is mostly padding counts for little.

Both are read from the loss: ``reduction`` of a ``torch.nn`` loss module,
the keywords of a ``functools.partial``, the defaults of a function's
``reduction`` / ``ignore_index`` / ``weight`` parameters.
:func:`plan_loss` checks them against what the caller passed.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn import _reduction

Count = Callable[[Any], Union[int, float, torch.Tensor]]

__all__ = ["Count", "plan_loss"]

# Losses whose mean averages over the class-index targets they do not ignore,
# each weighted by its class weight (PyTorch's denominator), not over rows.
_CLASS_INDEX_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)
_CLASS_INDEX_FUNCTIONS = (F.cross_entropy, F.nll_loss)


class _Described:
    """What a loss says about itself: the callable that computes it, the
    keywords it is called with (defaults and ``functools.partial``
    keywords) and a name for messages."""

    def __init__(self, loss_fn: Callable[..., Any]) -> None:
        self.module: Optional[nn.modules.loss._Loss] = None
        self.function: Optional[Callable[..., Any]] = None
        self.keywords: dict[str, Any] = {}
        self.required: set[str] = set()
        # functools.partial flattens nested partials: one level to unwrap.
        function = loss_fn.func if isinstance(loss_fn, functools.partial) \
            else loss_fn
        if isinstance(function, nn.modules.loss._Loss):
            self.module = function
            self.name = type(function).__name__
            return
        self.name = getattr(function, "__qualname__", type(function).__name__)
        if isinstance(loss_fn, functools.partial):
            self.name = f"functools.partial({self.name})"
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # no signature (some builtins)
            parameters = ()
        self.function = function
        for p in parameters:
            if p.default is inspect.Parameter.empty:
                self.required.add(p.name)
            else:
                self.keywords[p.name] = p.default
        if isinstance(loss_fn, functools.partial):
            self.keywords.update(loss_fn.keywords)
            self.required -= loss_fn.keywords.keys()

    def reduction(self) -> Optional[str]:
        """The reduction the loss applies, or None when it does not say."""
        if self.module is not None:
            return self.module.reduction
        kw = self.keywords
        if kw.get("size_average") is not None or kw.get("reduce") is not None:
            # The legacy arguments override `reduction` (as torch does).
            return _reduction.legacy_get_string(kw.get("size_average"),
                                                kw.get("reduce"),
                                                emit_warning=False)
        reduction = kw.get("reduction")
        return reduction if isinstance(reduction, str) else None

    def class_index_loss(self) -> Optional[tuple[int, Optional[torch.Tensor]]]:
        """(ignore_index, weight) of a cross-entropy / NLL loss, else None."""
        if isinstance(self.module, _CLASS_INDEX_MODULES):
            return self.module.ignore_index, self.module.weight
        if any(self.function is f for f in _CLASS_INDEX_FUNCTIONS):
            return self.keywords["ignore_index"], self.keywords["weight"]
        return None

    def needs_target(self) -> bool:
        """Whether the loss cannot run without a target: every ``torch.nn``
        loss module, and ``torch.nn.functional`` losses taking one."""
        if self.module is not None:
            return True
        return (getattr(self.function, "__module__", None)
                == "torch.nn.functional" and "target" in self.required)


def _resolve_reduction(described: _Described,
                       reduction: Optional[str]) -> str:
    declared = described.reduction()
    says = "mean" if declared == "batchmean" else declared
    hint = ("" if declared is None
            else f" ({described.name} reduces with {declared!r})")
    if reduction is not None and reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' or 'sum', got "
                         f"{reduction!r}{hint}")
    if says is None:
        return reduction or "mean"
    if says not in ("mean", "sum"):
        raise ValueError(
            f"{described.name} reduces with {declared!r} but step needs a "
            "loss that reduces each micro-batch to a scalar, by 'mean' or "
            f"'sum' (reduction={reduction!r}); construct the loss with "
            "reduction='mean' or 'sum'")
    if reduction is not None and reduction != says:
        raise ValueError(
            f"reduction={reduction!r} disagrees with the loss: "
            f"{described.name} reduces with {declared!r}; leave "
            "reduction=None to use the loss's")
    return says


def _counts_targets(ignore_index: int,
                    weight: Optional[torch.Tensor]) -> Count:
    """The denominator of a mean cross-entropy / NLL loss for one
    micro-batch's class-index target: its targets that are not
    ``ignore_index``, each weighted by its class weight."""

    def count(target: torch.Tensor) -> torch.Tensor:
        kept = target != ignore_index
        if weight is None:
            return kept.sum()
        return weight.to(target.device)[target[kept]].sum()

    return count


def plan_loss(loss_fn: Callable[..., Any], target: Any,
              reduction: Optional[str],
              count: Optional[Count]) -> tuple[str, Optional[Count]]:
    """The reduction and the count function to hand the engine.

    Args:
        loss_fn: the step's loss (a callable; checked by the caller).
        target: the whole batch's target (tensor, tuple of tensors or None).
        reduction: what the caller passed: None (read it from the loss),
            ``'mean'`` or ``'sum'``.
        count: the caller's count function, or None (derived from the loss).

    Returns:
        ``(reduction, count)``: ``'mean'`` or ``'sum'``, and None (weigh
        micro-batches by rows) or a callable giving, for one micro-batch's
        target, the number of terms its mean averages over.

    Raises:
        ValueError: a reduction the loss contradicts, a loss that does not
            reduce to a scalar (``'none'``), a ``count`` with a sum, a
            missing target the loss or ``count`` needs.
        TypeError: a ``count`` that is not callable.
    """
    described = _Described(loss_fn)
    if target is None and described.needs_target():
        raise ValueError(f"step got target=None but the loss "
                         f"{described.name} needs a target: pass the "
                         "batch's target")
    reduction = _resolve_reduction(described, reduction)
    if count is not None:
        if not callable(count):
            raise TypeError("count must be callable (a micro-batch's target "
                            "-> the number of terms its mean averages "
                            f"over), got {type(count).__name__}")
        if reduction == "sum":
            raise ValueError("count is the denominator of a mean, but the "
                             "loss reduces with 'sum': a sum adds the "
                             "micro-batches' losses as they are; drop count")
        if target is None:
            raise ValueError("count is called on each micro-batch's target, "
                             "got target=None")
        return reduction, count
    if reduction == "sum":
        return reduction, None
    class_index = described.class_index_loss()
    if (class_index is None or not isinstance(target, torch.Tensor)
            or target.is_floating_point() or target.is_complex()):
        # Class probabilities (a float target) average over rows.
        return reduction, None
    return reduction, _counts_targets(*class_index)
