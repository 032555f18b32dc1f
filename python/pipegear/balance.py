"""Balance: how many consecutive layers each pipeline stage gets.

A balance is a list of layer counts, one per stage, e.g. ``[3, 2, 1]``.
:func:`balance_by_cost` splits given per-layer costs optimally;
:func:`balance_by_time` and :func:`balance_by_size` profile an
``nn.Sequential`` first (:func:`profile_layers`) and split the measured
times or sizes. The names and arguments follow ``torchgpipe.balance``.

>>> import torch
>>> from pipegear.balance import balance_by_cost, balance_by_time
>>> balance_by_cost(2, [1, 1, 1, 1, 1, 1, 1, 10])
[7, 1]
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(),
...                             torch.nn.Linear(64, 8))
>>> balance = balance_by_time(2, model, torch.randn(4, 8))
>>> sum(balance), len(balance)
(3, 2)
"""
from __future__ import annotations

import contextlib
import copy
import math
import operator
import time
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from pipegear import _C
from pipegear.skip import SkipTracker, use_skip_tracker

__all__ = [
    "LayerProfile",
    "balance_by_cost",
    "balance_by_size",
    "balance_by_time",
    "profile_layers",
]

#: What flows between layers: a tensor or a tuple of tensors.
TensorOrTensors = Union[Tensor, Tuple[Tensor, ...]]
Device = Union[torch.device, str, int]


@dataclass(frozen=True)
class LayerProfile:
    """What :func:`profile_layers` measured for one layer.

    ``forward_seconds`` and ``backward_seconds`` are medians over the
    measured rounds (the backward is 0 when the output needs no gradient);
    ``parameter_bytes`` counts the layer's parameters, ``activation_bytes``
    its output for the sample, ``skip_bytes`` the skip tensors it stashes
    and pops (``pipegear.skip``): a skip is held on the stage that stashes
    it and on the stage that pops it, never on the stages between.
    """

    forward_seconds: float
    backward_seconds: float
    parameter_bytes: int
    activation_bytes: int
    skip_bytes: int = 0


class _ProfileTracker(SkipTracker):
    """The skips of a profiling round: each layer's backward stops at its
    own layer, so a popped tensor is a leaf of its own (as in a pipeline);
    the bytes each layer stashes and pops are counted."""

    def __init__(self, layers: int, grad: bool) -> None:
        super().__init__()
        self.layer = 0
        self.grad = grad
        self.skip_bytes = [0] * layers

    def _count(self, tensor: Optional[Tensor]) -> None:
        if isinstance(tensor, Tensor):
            self.skip_bytes[self.layer] += tensor.numel() * tensor.element_size()

    def save(self, key: Any, tensor: Optional[Tensor]) -> None:
        self._count(tensor)
        if isinstance(tensor, Tensor):
            tensor = tensor.detach().requires_grad_(
                self.grad and tensor.is_floating_point())
        super().save(key, tensor)

    def load(self, key: Any) -> Optional[Tensor]:
        tensor = super().load(key)
        self._count(tensor)
        return tensor


def _index(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int, got {type(value).__name__}"
        ) from None


def _number(name: str, value: Any) -> float:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number, got {type(value).__name__}"
        ) from None


def _numbers(name: str, values: Any) -> List[float]:
    if isinstance(values, Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(
            f"{name} must be a sequence of numbers, got "
            f"{type(values).__name__}"
        )
    values = list(values)
    if all(type(v) is float or type(v) is int for v in values):
        return [float(v) for v in values]
    return [_number(f"{name}[{i}]", v) for i, v in enumerate(values)]


def balance_by_cost(
    partitions: int,
    costs: Sequence[float],
    *,
    memory: Optional[Sequence[float]] = None,
    capacity: Optional[float] = None,
) -> List[int]:
    """Splits layers with the given costs into ``partitions`` stages.

    Returns the number of layers of each stage (each at least 1). The split
    minimises the largest stage cost exactly, then, among those splits, the
    variance of the stage costs; then the variance of the layer counts, and
    remaining ties leave the last stages shortest. With ``memory`` (per
    layer) and ``capacity`` (per stage), every stage's memory stays within
    the capacity.

    >>> balance_by_cost(2, [1, 1, 1, 1, 1, 1, 1, 10])
    [7, 1]
    >>> balance_by_cost(3, [1] * 8)
    [3, 3, 2]
    >>> balance_by_cost(2, [1, 2, 3, 4], memory=[4, 1, 1, 1], capacity=4)
    [1, 3]

    Raises:
        ValueError: partitions < 1 or more than the layers, no costs, a
            negative, NaN or infinite cost or memory, ``memory`` of another
            length, ``capacity`` without ``memory``, or a capacity no split
            meets (the message gives the smallest one that would).
        TypeError: arguments that are not numbers.
    """
    partitions = _index("partitions", partitions)
    cost_list = _numbers("costs", costs)
    memory_list = None if memory is None else _numbers("memory", memory)
    cap = None if capacity is None else _number("capacity", capacity)
    return _C.balance_by_cost(partitions, cost_list, memory_list, cap)


# ---- profiling -----------------------------------------------------------


def _check_module(module: Any) -> nn.Sequential:
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"module must be an nn.Sequential, got {type(module).__name__}"
        )
    if len(module) == 0:
        raise ValueError("cannot profile an empty nn.Sequential")
    return module


def _check_partitions(partitions: Any, module: nn.Sequential) -> int:
    partitions = _index("partitions", partitions)
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    if partitions > len(module):
        raise ValueError(
            f"cannot split {len(module)} layers into {partitions} "
            "partitions: each needs at least one layer"
        )
    return partitions


def _tensors(value: Any, what: str) -> Tuple[Tensor, ...]:
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(
        isinstance(t, Tensor) for t in value
    ):
        if not value:
            raise ValueError(f"{what} is an empty tuple")
        return tuple(value)
    raise TypeError(
        f"{what} must be a tensor or a tuple of tensors, got "
        f"{type(value).__name__}"
    )


def _repack(value: TensorOrTensors, tensors: Sequence[Tensor]) -> Any:
    return tensors[0] if isinstance(value, Tensor) else tuple(tensors)


def _detach(value: TensorOrTensors, requires_grad: bool) -> Any:
    tensors = [
        t.detach().requires_grad_(requires_grad and t.is_floating_point())
        for t in _tensors(value, "the input")
    ]
    return _repack(value, tensors)


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _lives_on(module: nn.Module, device: torch.device) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return all(_same_device(t.device, device) for t in tensors)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return a.index == b.index or a.index is None or b.index is None


@contextlib.contextmanager
def _restored(layer: nn.Module) -> Iterator[None]:
    """Puts ``layer`` back as it was: training flags, buffers, gradients.

    Inside, its parameters start without gradients.
    """
    training = [(m, m.training) for m in layer.modules()]
    params = list(layer.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    with torch.no_grad():
        buffers = [(b, b.clone()) for b in layer.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in zip(params, grads):
            p.grad = g
        for m, flag in training:
            m.training = flag


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: List[float]) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    mid = len(values) // 2
    if len(values) % 2:
        return values[mid]
    return (values[mid - 1] + values[mid]) / 2


def _run_profile(
    module: nn.Sequential,
    sample: TensorOrTensors,
    device: Optional[Device],
    repeats: int,
    timeout: float,
    timed: bool,
) -> List[LayerProfile]:
    module = _check_module(module)
    sample_tensors = _tensors(sample, "sample")
    repeats = _index("repeats", repeats)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    timeout = _number("timeout", timeout)
    if not timeout > 0:
        raise ValueError(
            f"timeout must be a positive number of seconds, got {timeout}"
        )
    if device is None:
        on = _module_device(module) or sample_tensors[0].device
    else:
        try:
            on = torch.device(device)
        except (RuntimeError, TypeError) as e:  # torch's parser
            raise (ValueError if isinstance(e, RuntimeError) else TypeError)(
                f"device is not a device: {device!r} ({e})"
            ) from None

    # nn.Sequential's own names; named_children() would skip a repeated layer.
    named = list(module._modules.items())
    labels = [
        f"layer {i} ('{name}', {type(layer).__name__})"
        for i, (name, layer) in enumerate(named)
    ]
    parameter_bytes = [
        sum(p.numel() * p.element_size() for p in layer.parameters())
        for _, layer in named
    ]
    activation_bytes = [0] * len(named)
    skip_bytes = [0] * len(named)
    forward: List[List[float]] = [[] for _ in named]
    backward: List[List[float]] = [[] for _ in named]

    with contextlib.ExitStack() as stack:
        layers = []
        for i, (_, layer) in enumerate(named):
            if _lives_on(layer, on):
                stack.enter_context(_restored(layer))
            else:
                try:
                    layer = copy.deepcopy(layer).to(on)
                except Exception as e:
                    raise ValueError(
                        f"cannot profile {labels[i]} on {on}: it is elsewhere "
                        f"and cannot be copied there: {type(e).__name__}: {e}"
                    ) from e
            layer.train()
            layers.append(layer)

        first = _repack(
            sample,
            [
                t.detach()
                .to(on)
                .requires_grad_(t.requires_grad and t.is_floating_point())
                for t in sample_tensors
            ],
        )

        def measure(fn, failure: str):
            """(fn(), seconds), device-synchronised; a failure of fn is a
            ValueError starting with `failure`."""
            try:
                _sync(on)
                start = time.perf_counter()
                result = fn()
                _sync(on)
                return result, time.perf_counter() - start
            except Exception as e:
                raise ValueError(f"{failure}: {type(e).__name__}: {e}") from e

        def one_round(record: bool) -> None:
            tracker = _ProfileTracker(len(layers), timed)
            with use_skip_tracker(tracker):
                layer_by_layer(record, tracker)
            if not record:
                skip_bytes[:] = tracker.skip_bytes

        def layer_by_layer(record: bool, tracker: _ProfileTracker) -> None:
            x = first
            for i, layer in enumerate(layers):
                if i > 0:
                    x = _detach(x, requires_grad=timed)
                tracker.layer = i
                y, forward_seconds = measure(
                    lambda: layer(x), f"{labels[i]} failed while profiling")
                try:
                    outputs = _tensors(y, f"the output of {labels[i]}")
                except (TypeError, ValueError) as e:
                    raise TypeError(
                        f"{e}; every layer must return a tensor or a tuple "
                        "of tensors"
                    ) from None
                needs_grad = [t for t in outputs if t.requires_grad]
                backward_seconds = 0.0
                if needs_grad:
                    grads = [torch.ones_like(t) for t in needs_grad]
                    _, backward_seconds = measure(
                        lambda: torch.autograd.backward(needs_grad, grads),
                        f"{labels[i]} failed in backward while profiling")
                    for p in layer.parameters():
                        p.grad = None
                if record:
                    forward[i].append(forward_seconds)
                    backward[i].append(backward_seconds)
                else:
                    activation_bytes[i] = sum(
                        t.numel() * t.element_size() for t in outputs
                    )
                x = y

        began = time.perf_counter()
        if not timed:
            with torch.no_grad():
                one_round(record=False)
        else:
            one_round(record=False)
            for r in range(repeats):
                if r > 0 and time.perf_counter() - began >= timeout:
                    break
                one_round(record=True)

    return [
        LayerProfile(
            forward_seconds=_median(forward[i]),
            backward_seconds=_median(backward[i]),
            parameter_bytes=parameter_bytes[i],
            activation_bytes=activation_bytes[i],
            skip_bytes=skip_bytes[i],
        )
        for i in range(len(named))
    ]


def profile_layers(
    module: nn.Sequential,
    sample: TensorOrTensors,
    *,
    device: Optional[Device] = None,
    repeats: int = 5,
    timeout: float = 60.0,
) -> List[LayerProfile]:
    """Profiles every layer of ``module`` on ``sample``.

    The layers run one after the other as in training: each takes the
    previous one's output, detached (a backward stops at its layer) and
    requiring a gradient if floating point; the first takes the sample as it
    is. After one warm-up round, up to ``repeats`` rounds are timed (forward,
    then backward with a gradient of ones) and each time is their median. No
    new round starts after ``timeout`` seconds; the warm-up and one measured
    round always run. On CUDA the device is synchronised around each timing.

    ``device`` defaults to the module's (the sample's for a module without
    parameters or buffers); the sample is moved there. The module is left
    as it was: a layer on that device runs in place and gets back its
    training flags, buffers (BatchNorm's running statistics) and gradients
    (none are left behind, existing ones are kept); a layer elsewhere runs
    as a temporary deep copy.

    A layer takes what the previous one returned, a tensor or a tuple of
    tensors, as its one argument (as ``nn.Sequential`` does).

    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU())
    >>> [p.activation_bytes for p in profile_layers(model, torch.randn(4, 8))]
    [1024, 1024]

    Raises:
        TypeError: ``module`` is not an ``nn.Sequential``, the sample or a
            layer's output is not a tensor or tuple of tensors.
        ValueError: an empty module, repeats < 1, timeout <= 0, or a layer
            that raises (the message names the layer's index, name and type
            and repeats the original error).
    """
    return _run_profile(module, sample, device, repeats, timeout, timed=True)


def balance_by_time(
    partitions: int,
    module: nn.Sequential,
    sample: TensorOrTensors,
    *,
    device: Optional[Device] = None,
    repeats: int = 5,
    timeout: float = 60.0,
) -> List[int]:
    """A balance by time: each layer costs its forward + backward time.

    The times come from :func:`profile_layers`; :func:`balance_by_cost`
    splits them exactly. Profile with a sample of one micro-batch, what each
    stage runs at a time.

    >>> layers = [torch.nn.Linear(64, 64) for _ in range(4)]
    >>> model = torch.nn.Sequential(*layers)
    >>> balance = balance_by_time(2, model, torch.randn(8, 64))
    >>> len(balance), sum(balance)
    (2, 4)

    Raises:
        ValueError: partitions < 1 or more than the layers (checked before
            profiling), and as :func:`profile_layers`.
        TypeError: as :func:`profile_layers`.
    """
    partitions = _check_partitions(partitions, _check_module(module))
    profiles = profile_layers(
        module, sample, device=device, repeats=repeats, timeout=timeout
    )
    costs = [p.forward_seconds + p.backward_seconds for p in profiles]
    return balance_by_cost(partitions, costs)


def _first_micro_batch(sample: TensorOrTensors, chunks: int) -> Any:
    tensors = _tensors(sample, "sample")
    for i, t in enumerate(tensors):
        if t.dim() == 0:
            raise ValueError(
                f"sample tensor {i} is 0-dimensional; micro-batching "
                "splits dim 0"
            )
    batch = tensors[0].size(0)
    if any(t.size(0) != batch for t in tensors):
        sizes = [t.size(0) for t in tensors]
        raise ValueError(
            f"every sample tensor must have the same batch size, got {sizes}"
        )
    if batch < 1:
        raise ValueError(f"a batch needs at least 1 sample, got {batch}")
    # As pipegear's micro-batching: min(batch, chunks) parts, larger first.
    size = math.ceil(batch / min(batch, chunks))
    return _repack(sample, [t[:size] for t in tensors])


def balance_by_size(
    partitions: int,
    module: nn.Sequential,
    sample: TensorOrTensors,
    *,
    chunks: int = 1,
    param_scale: float = 2.0,
    device: Optional[Device] = None,
) -> List[int]:
    """A balance by memory: parameters and one micro-batch's activations.

    Each layer costs ``parameter_bytes * param_scale`` plus the bytes of its
    output and of the skips it stashes or pops (``pipegear.skip``: held on
    the stashing and the popping stage only) for one micro-batch of
    ``sample`` (split into ``chunks``), found
    by one forward without gradients (:func:`profile_layers`'s rules);
    :func:`balance_by_cost` splits those sizes exactly. ``param_scale`` is
    the bytes held per parameter byte: 2 for SGD (weights and gradients), 3
    with momentum, 4 to 5 for Adam.

    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8),
    ...                             torch.nn.Linear(8, 8),
    ...                             torch.nn.Linear(8, 1024))
    >>> balance_by_size(2, model, torch.randn(4, 8), chunks=2)
    [2, 1]

    Raises:
        ValueError: partitions < 1 or more than the layers, chunks < 1, a
            negative or non-finite ``param_scale``, and as
            :func:`profile_layers`.
        TypeError: as :func:`profile_layers`.
    """
    partitions = _check_partitions(partitions, _check_module(module))
    chunks = _index("chunks", chunks)
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    scale = _number("param_scale", param_scale)
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(
            f"param_scale must be a finite number >= 0, got {param_scale}"
        )
    micro_batch = _first_micro_batch(sample, chunks)
    profiles = _run_profile(
        module, micro_batch, device, repeats=1, timeout=1.0, timed=False
    )
    sizes = [
        p.parameter_bytes * scale + p.activation_bytes + p.skip_bytes
        for p in profiles
    ]
    return balance_by_cost(partitions, sizes)
