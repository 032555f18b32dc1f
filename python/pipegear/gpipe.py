"""GPipe over ``torch.nn.Sequential`` on the C++ engine.

The layers run on the engine's stage workers (one thread per stage); the GIL
is taken only around each partition's Python call and released while the
caller waits, so stages overlap wherever ATen kernels run.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from pipegear import _C

Tensors = Union[torch.Tensor, tuple[torch.Tensor, ...]]
Device = Union[torch.device, str, int]

CHECKPOINT_MODES = ("always", "except_last", "never")
SCHEDULES = ("gpipe", "1f1b")

__all__ = ["GPipe", "Trace"]


class Trace:
    """The timeline of the last step: one event per executed cell.

    ``bubble_fraction`` is measured from real timestamps;
    ``theoretical_bubble_fraction`` is GPipe's (K-1)/(M+K-1).
    """

    def __init__(self, trace: "_C.Trace") -> None:
        self._trace = trace

    @property
    def stages(self) -> int:
        return self._trace.stages

    @property
    def micro_batches(self) -> int:
        return self._trace.micro_batches

    @property
    def events(self) -> list:
        return list(self._trace.events)

    @property
    def makespan(self) -> float:
        return self._trace.makespan

    @property
    def bubble_fraction(self) -> float:
        return self._trace.bubble_fraction

    @property
    def theoretical_bubble_fraction(self) -> float:
        return self._trace.theoretical_bubble_fraction

    def to_chrome_trace(self, path: str) -> None:
        """Writes the Chrome trace JSON (Perfetto, chrome://tracing)."""
        self._trace.save_chrome_trace(str(path))

    def plot(self, path: str, title: Optional[str] = None) -> None:
        """Saves a PNG timeline: one row per stage, as GPipe's figure 2."""
        from pipegear.trace import plot_trace

        plot_trace(self._trace, str(path), title=title)

    def __repr__(self) -> str:
        return (f"Trace(stages={self.stages}, micro_batches="
                f"{self.micro_batches}, cells={len(self.events)}, "
                f"bubble_fraction={self.bubble_fraction:.3f})")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _resolve_devices(devices: Optional[Iterable[Device]],
                     stages: int) -> list[torch.device]:
    if devices is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        resolved = ([torch.device("cuda", i) for i in range(count)]
                    if count else [torch.device("cpu")] * stages)
    else:
        resolved = []
        for i, d in enumerate(devices):
            if not isinstance(d, (str, torch.device, int)) or isinstance(
                    d, bool):
                raise TypeError("devices must hold torch.device, str or int, "
                                f"got {type(d).__name__}")
            try:
                resolved.append(torch.device("cuda", d) if isinstance(d, int)
                                else torch.device(d))
            except RuntimeError as e:  # torch's parser: a bad name or index
                raise ValueError(f"devices[{i}] is not a device: {d!r} "
                                 f"({e})") from None
    if len(resolved) < stages:
        raise IndexError(f"too few devices: {stages} stages need {stages} "
                         f"devices, got {len(resolved)} ({resolved})")
    resolved = resolved[:stages]
    for i, d in enumerate(resolved):
        if d.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError(f"devices[{i}] is {d} but CUDA is not "
                                 "available")
            if d.index is not None and d.index >= count:
                raise IndexError(f"devices[{i}] is {d} but there are only "
                                 f"{count} CUDA devices")
    return resolved


def _prepare_batch_norm(module: nn.Module, chunks: int, checkpoint: str,
                        deferred: bool, who: str = "") -> nn.Module:
    """Converts BatchNorm layers to DeferredBatchNorm (``deferred``), or
    warns that plain ones count every micro-batch (and recomputation)."""
    if deferred:
        from pipegear.batchnorm import convert_deferred_batch_norm

        return convert_deferred_batch_norm(module, chunks)
    if chunks > 1 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats for m in module.modules()):
        warnings.warn(
            f"{who}a BatchNorm layer with running statistics is pipelined "
            f"with chunks={chunks}: its running statistics will be "
            "updated once per micro-batch"
            + (", and once more by every recomputation"
               if checkpoint != "never" else "")
            + "; pass deferred_batch_norm=True for the statistics of the "
            "whole mini-batch", UserWarning, stacklevel=3)
    return module


def _check_input(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, tuple) and value and all(
            isinstance(t, torch.Tensor) for t in value):
        return
    raise TypeError(f"{name} must be a tensor or a non-empty tuple of tensors, "
                    f"got {type(value).__name__}")


class GPipe(nn.Module):
    """GPipe pipeline parallelism (Huang et al. 2019, arXiv 1811.06965).

    Splits ``module`` into ``len(balance)`` contiguous partitions, places
    partition ``i`` on ``devices[i]`` and runs mini-batches as ``chunks``
    micro-batches through them on the C++ engine.

    Args:
        module: an ``nn.Sequential``; between its layers flows a tensor or a
            tuple of tensors.
        balance: layers per partition, summing to ``len(module)``; see
            :func:`pipegear.balance_by_time`.
        devices: device of each partition. ``None``: every CUDA device, or
            ``cpu`` for every partition when there is none. Partitions may
            share a device.
        chunks: micro-batches per mini-batch (M).
        checkpoint: ``'always'``, ``'except_last'`` (default) or ``'never'``.
        deferred_batch_norm: replace BatchNorm layers by
            :class:`pipegear.DeferredBatchNorm` (mini-batch running stats).
        schedule: ``'gpipe'`` (fill/drain, both faces) or ``'1f1b'``
            (:meth:`step` only; keeps fewer activations alive).
        worker_threads: intra-op threads per CPU stage worker; 0 splits
            ``torch.get_num_threads()`` between the CPU stages.

    The pipeline's ``state_dict`` keys are those of ``module``, so a state
    saved from either loads into the other. Do not move the pipeline with
    ``.to()``: its partitions are placed.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> pipe = pipegear.GPipe(model, balance=[2, 1], chunks=4)
        >>> y = pipe(torch.randn(16, 8))          # module style
        >>> y.sum().backward()
        >>> loss = pipe.step(torch.randn(16, 8), torch.randn(16, 2),
        ...                  nn.functional.mse_loss)  # step style
    """

    def __init__(self, module: nn.Sequential, balance: Sequence[int], *,
                 devices: Optional[Iterable[Device]] = None, chunks: int = 1,
                 checkpoint: str = "except_last",
                 deferred_batch_norm: bool = False, schedule: str = "gpipe",
                 worker_threads: int = 0) -> None:
        super().__init__()
        if not isinstance(module, nn.Sequential):
            raise TypeError("module must be an nn.Sequential, got "
                            f"{type(module).__name__}")
        if len(module) == 0:
            raise ValueError("module must have at least 1 layer, got an "
                             "empty nn.Sequential")
        if isinstance(balance, (str, bytes)) or not isinstance(
                balance, Sequence):
            raise TypeError("balance must be a sequence of ints, got "
                            f"{type(balance).__name__}")
        balance = [_check_int(f"balance[{i}]", b, 1)
                   for i, b in enumerate(balance)]
        if not balance:
            raise ValueError("balance must have at least 1 partition")
        if sum(balance) != len(module):
            raise ValueError(f"balance must sum to the {len(module)} layers "
                             f"of the module, got {sum(balance)} ({balance})")
        chunks = _check_int("chunks", chunks, 1)
        worker_threads = _check_int("worker_threads", worker_threads, 0)
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, "
                             f"got {checkpoint!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, "
                             f"got {schedule!r}")
        # named_children() would skip the repeats we are looking for.
        named = list(module._modules.items())
        seen: dict[int, str] = {}
        for name, layer in named:
            if id(layer) in seen:
                raise ValueError(f"layer {name!r} is the same module as layer "
                                 f"{seen[id(layer)]!r}; a pipeline needs "
                                 "distinct layers")
            seen[id(layer)] = name
        owner: dict[int, int] = {}
        offset = 0
        for i, size in enumerate(balance):
            for _, layer in named[offset:offset + size]:
                for p in layer.parameters():
                    j = owner.setdefault(id(p), i)
                    if j != i:
                        raise ValueError(
                            f"a parameter is shared by partition {j} and "
                            f"partition {i}; partitions on different workers "
                            "cannot share one")
            offset += size
        devices = _resolve_devices(devices, len(balance))

        module = _prepare_batch_norm(module, chunks, checkpoint,
                                     deferred_batch_norm)
        named = list(module._modules.items())

        # Everything is checked before the module is converted or moved.
        partitions = []
        offset = 0
        for size in balance:
            part = nn.Sequential(OrderedDict(named[offset:offset + size]))
            partitions.append(part)
            offset += size
        for part, device in zip(partitions, devices):
            part.to(device)
        # The layers are this module's children under their original names
        # (state_dict keys as the plain model's); `partitions` is a view.
        for name, layer in named:
            self.add_module(name, layer)
        object.__setattr__(self, "partitions", nn.ModuleList(partitions))
        self.balance: list[int] = balance
        self.devices: list[torch.device] = devices
        self.chunks: int = chunks
        self.checkpoint: str = checkpoint
        self.schedule: str = schedule

        stages = [(part, str(device), self._hooks(part))
                  for part, device in zip(partitions, devices)]
        self._pipeline = _C._Pipeline(stages, chunks, checkpoint, schedule,
                                      worker_threads)

    @staticmethod
    def _hooks(part: nn.Module) -> Optional[Callable[[str], None]]:
        from pipegear.batchnorm import DeferredBatchNorm

        bns = [m for m in part.modules() if isinstance(m, DeferredBatchNorm)]
        if not bns:
            return None
        for bn in bns:
            bn.auto_commit = False  # the pipeline commits (see DeferredBatchNorm)

        def hook(when: str) -> None:
            for bn in bns:
                if when == "begin":
                    bn.reset_accumulated()
                else:
                    bn.commit()

        return hook

    def train(self, mode: bool = True) -> "GPipe":
        super().train(mode)
        self.partitions.train(mode)  # the containers too, not only layers
        return self

    # -- the Sequential face ---------------------------------------------
    def __len__(self) -> int:
        return sum(self.balance)

    def __iter__(self) -> Iterator[nn.Module]:
        for part in self.partitions:
            yield from part

    def __getitem__(self, index: int) -> nn.Module:
        layers = list(self)
        if not -len(layers) <= index < len(layers):
            raise IndexError(f"layer index {index} out of range for "
                             f"{len(layers)} layers")
        return layers[index]

    # -- running ------------------------------------------------------------
    def forward(self, input: Tensors) -> Tensors:  # noqa: A002
        """Module style: the output of the last partition, on its device.

        ``loss(pipe(x)).backward()`` runs the drain on the engine's workers.
        """
        _check_input("input", input)
        return self._pipeline.forward(input)

    def step(self, input: Tensors, target: Optional[Tensors],
             loss_fn: Callable[..., torch.Tensor], *,
             reduction: str = "mean") -> torch.Tensor:
        """Step style: forward and backward of the whole schedule.

        ``loss_fn(output, target)`` runs per micro-batch on the last
        partition; ``reduction`` says how it reduces (``'mean'`` or
        ``'sum'``) so that the returned loss and the accumulated gradients
        equal ``loss_fn(module(input), target)`` on the whole batch.
        """
        _check_input("input", input)
        if target is not None:
            _check_input("target", target)
            targets = target if isinstance(target, tuple) else (target,)
            for i, t in enumerate(targets):
                if t.dim() == 0:
                    raise ValueError(f"target tensor {i} is 0-dimensional; "
                                     "micro-batching splits dim 0")
                if t.size(0) != targets[0].size(0):
                    raise ValueError("every target tensor must have the same "
                                     "batch size (dim 0): tensor 0 has "
                                     f"{targets[0].size(0)}, tensor {i} has "
                                     f"{t.size(0)}")
        if loss_fn is None:
            raise TypeError("step needs a loss function, got None")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable, got "
                            f"{type(loss_fn).__name__}")
        if reduction not in ("mean", "sum"):
            raise ValueError("reduction must be 'mean' or 'sum', got "
                             f"{reduction!r}")
        return self._pipeline.step(input, target, loss_fn, reduction)

    @property
    def last_trace(self) -> Trace:
        """The timeline of the last completed step."""
        return Trace(self._pipeline.last_trace)

    def schedule_table(self, micro_batches: Optional[int] = None) -> str:
        """The engine's schedule as an ASCII clock table."""
        m = self.chunks if micro_batches is None else _check_int(
            "micro_batches", micro_batches, 1)
        return self._pipeline.schedule_table(m)

    def extra_repr(self) -> str:
        return (f"balance={self.balance}, devices={[str(d) for d in self.devices]}, "
                f"chunks={self.chunks}, checkpoint={self.checkpoint!r}")
