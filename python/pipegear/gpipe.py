"""GPipe over ``torch.nn.Sequential`` on the C++ engine.

The layers run on the engine's stage workers (one thread per stage); the GIL
is taken only around each partition's Python call and released while the
caller waits, so stages overlap wherever ATen kernels run.
"""
from __future__ import annotations

import contextlib
import operator
import re
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from pipegear import _C
from pipegear.loss import Count, plan_loss
from pipegear import tied
from pipegear.skip import SkipTracker, skip_layout, use_skip_tracker
from pipegear.tied import Ties, find_ties, untie_replicas

Tensors = Union[torch.Tensor, tuple[torch.Tensor, ...]]
Device = Union[torch.device, str, int]

CHECKPOINT_MODES = ("always", "except_last", "never")
SCHEDULES = ("gpipe", "1f1b", "zb-h1", "zb-h2", "interleaved",
             "interleaved-zb")
# The schedules that run several partitions per worker (virtual_stages).
VIRTUAL_STAGE_SCHEDULES = ("interleaved", "interleaved-zb")

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


def _device_count(kind: str) -> int:
    """How many devices of type `kind` (``'cuda'``, ``'mps'``, ...) this
    process can use: 0 when torch has no such backend or it is unavailable."""
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available) or not is_available():
        return 0
    return backend.device_count()


def _parse_device(value: Any, where: str) -> torch.device:
    """One device (an int is a CUDA index); `where` names it in messages
    (``devices[1]``, ``device``)."""
    if not isinstance(value, (str, torch.device, int)) or isinstance(
            value, bool):
        raise TypeError("devices must hold torch.device, str or int, "
                        f"got {type(value).__name__}")
    try:
        return (torch.device("cuda", value) if isinstance(value, int)
                else torch.device(value))
    except RuntimeError as e:  # torch's parser: a bad name or index
        raise ValueError(f"{where} is not a device: {value!r} ({e})") from None


def _check_available(device: torch.device, where: str) -> None:
    """A partition can run on `device` here: the CPU, or an accelerator
    this process has (not ``meta``, which holds no data)."""
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise ValueError(f"{where} is meta: a partition runs on a device "
                         "that holds data, and meta tensors hold none; use "
                         "cpu or an accelerator")
    count = _device_count(device.type)
    kind = device.type.upper()
    if count == 0:
        raise ValueError(f"{where} is {device} but {kind} is not available")
    if device.index is not None and device.index >= count:
        raise IndexError(f"{where} is {device} but there are only {count} "
                         f"{kind} devices")


def _resolve_devices(devices: Optional[Iterable[Device]],
                     stages: int) -> list[torch.device]:
    if devices is None:
        count = _device_count("cuda")
        resolved = ([torch.device("cuda", i) for i in range(count)]
                    if count else [torch.device("cpu")] * stages)
    else:
        if isinstance(devices, (str, bytes, torch.device, int)) or \
                not isinstance(devices, Iterable):
            raise TypeError("devices must be a sequence of devices, one per "
                            "partition (e.g. ['cpu', 'cpu']), got "
                            f"{type(devices).__name__}")
        resolved = [_parse_device(d, f"devices[{i}]")
                    for i, d in enumerate(devices)]
    if len(resolved) < stages:
        raise IndexError(f"too few devices: {stages} stages need {stages} "
                         f"devices, got {len(resolved)} ({resolved})")
    resolved = resolved[:stages]
    for i, d in enumerate(resolved):
        _check_available(d, f"devices[{i}]")
    return resolved


def _interleaved_devices(devices: Optional[Iterable[Device]], stages: int,
                         virtual_stages: int) -> list[torch.device]:
    """The device of each partition. Interleaved (``virtual_stages`` v > 1):
    worker d runs partitions d, d + K, ...; ``devices`` names one device per
    worker (K) or one per partition."""
    if virtual_stages > 1 and devices is not None:
        devices = list(devices)
        if len(devices) == stages:
            return _resolve_devices(devices, stages)
    if virtual_stages == 1:
        return _resolve_devices(devices, stages)
    workers = stages // virtual_stages
    per_worker = _resolve_devices(devices, workers)
    return [per_worker[s % workers] for s in range(stages)]


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a tensor moved to `a` lands on `b` (an accelerator without
    an index means the current device of its type)."""
    if a.type != b.type:
        return False
    if a.type == "cpu" or a.index == b.index:
        return True
    current = torch.empty(0, device=torch.device(a.type)).device.index
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current)


def _prepare_batch_norm(module: nn.Module, chunks: int, deferred: bool,
                        who: str = "") -> nn.Module:
    """Converts BatchNorm layers to DeferredBatchNorm (``deferred``), or
    warns that plain ones count every micro-batch (as the C++ GPipe does)."""
    if deferred:
        from pipegear.batchnorm import convert_deferred_batch_norm

        return convert_deferred_batch_norm(module, chunks)
    if chunks > 1 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats for m in module.modules()):
        warnings.warn(
            f"{who}a BatchNorm layer with running statistics is pipelined "
            f"with chunks={chunks}: its running statistics will be "
            "updated once per micro-batch (recomputations do not count); "
            "pass deferred_batch_norm=True for the statistics of the whole "
            "mini-batch", UserWarning, stacklevel=3)
    return module


def _check_virtual_stages(virtual_stages: Any, schedule: str) -> int:
    """`virtual_stages` as an int >= 1 that `schedule` takes (both
    pipelines' check)."""
    virtual_stages = _check_int("virtual_stages", virtual_stages, 1)
    if virtual_stages > 1 and schedule not in VIRTUAL_STAGE_SCHEDULES:
        raise ValueError(f"virtual_stages = {virtual_stages} needs "
                         "schedule='interleaved' or 'interleaved-zb', "
                         f"got {schedule!r}")
    return virtual_stages


def _check_input(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, tuple) and value and all(
            isinstance(t, torch.Tensor) for t in value):
        return
    raise TypeError(f"{name} must be a tensor or a non-empty tuple of tensors, "
                    f"got {type(value).__name__}")


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _running_stats_hidden(module: nn.Module) -> Iterator[None]:
    """While a checkpointed forward is recomputed: the norm layers of
    `module` in training mode that track running statistics (BatchNorm,
    SyncBatchNorm, InstanceNorm) see none, so the recomputation neither
    moves them nor counts the micro-batch again, and normalises with the
    micro-batch's own statistics as the forward did. The C++ stage does
    the same (stage.cpp, HideRunningStats)."""
    hidden = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._NormBase)
              and m.training and m.track_running_stats]
    saved = [{k: m._buffers[k] for k in _RUNNING_STATS if k in m._buffers}
             for m in hidden]
    try:
        for m, buffers in zip(hidden, saved):
            # BatchNorm passes no running statistics when it does not track
            # them (SyncBatchNorm asserts a count when it does); InstanceNorm
            # passes its buffers whatever the flag, hence both.
            m.track_running_stats = False
            for k in buffers:
                m._buffers[k] = None
        yield
    finally:
        for m, buffers in zip(hidden, saved):
            m.track_running_stats = True
            m._buffers.update(buffers)


class _Partition(nn.Sequential):
    """One stage's layers. Inside a cell, each layer draws its random
    numbers from a stream of its own (keyed by its index in the whole
    model, docs/engine.md "Randomness"), so the same seed gives the same
    masks whatever the balance; outside a pipeline it is an nn.Sequential.
    Hooks registered on it run as on any module. A recomputation leaves
    the running statistics of plain norm layers alone."""

    def forward(self, input):  # noqa: A002
        if _C.is_recomputing():
            with _running_stats_hidden(self):
                return self._run(input)
        return self._run(input)

    def _run(self, input):  # noqa: A002
        for i, module in enumerate(self):
            _C.set_random_layer(i)
            input = module(input)
        return input

    # The skips crossing the partition's boundaries (skip.py), set by the
    # pipeline: the keys it pops and stashes, in the engine's order.
    _skip_pops: tuple = ()
    _skip_stashes: tuple = ()

    def _forward_skips(self, input, popped):  # noqa: A002
        """The engine's call of a stage with skips: the popped skips'
        tensors in, (output, the stashed skips' tensors) out. Skips
        between the partition's own layers stay in its tracker."""
        tracker = SkipTracker()
        for key, tensor in zip(self._skip_pops, popped):
            tracker.save(key, tensor)
        with use_skip_tracker(tracker):
            output = self(input)
        stashed = tuple(tracker.tensors.pop(key) for key in self._skip_stashes)
        return output, stashed


class _Placed(nn.Module):
    """A pipeline as a module: its configuration (``balance``, ``chunks``,
    ``checkpoint``, ``schedule``, ``virtual_stages``; read-only) and its
    layers, which it placed on its devices.

    Casts of the floating-point dtype (``.double()``, ``.half()``,
    ``.to(torch.float16)``) work as on any module; moving the layers to
    another device (``.to(device)``, ``.cuda()``, ``.cpu()``,
    ``.to_empty(device=...)``) is a ``TypeError``: the stage workers run
    each partition where it was placed. A move to the device every
    partition already sits on changes nothing.
    """

    # -- the configuration both pipelines share (read-only) --------------
    @property
    def balance(self) -> list[int]:
        """Layers per partition."""
        return list(self._balance)

    @property
    def chunks(self) -> int:
        """Micro-batches per mini-batch."""
        return self._chunks

    @property
    def checkpoint(self) -> str:
        """``'always'``, ``'except_last'`` or ``'never'``."""
        return self._checkpoint

    @property
    def schedule(self) -> str:
        """``'gpipe'``, ``'1f1b'``, ``'zb-h1'``, ``'zb-h2'``,
        ``'interleaved'`` or ``'interleaved-zb'``."""
        return self._schedule

    @property
    def virtual_stages(self) -> int:
        """Partitions per worker (v; above 1 only with ``'interleaved'``
        and ``'interleaved-zb'``)."""
        return self._virtual_stages

    def _placement(self) -> tuple[list[torch.device], str]:
        """The devices the layers sit on, and how to use other ones."""
        raise NotImplementedError

    def _check_stays(self, device: Device, call: str) -> None:
        """Raises TypeError unless tensors moved to `device` stay on the
        devices of every partition; `call` is the call, for the message."""
        placed, remedy = self._placement()
        target = torch.device(device)
        if not all(_same_device(target, d) for d in placed):
            raise TypeError(
                f"{call} would move the layers of this "
                f"{type(self).__name__} off the devices its partitions are "
                f"placed on ({', '.join(str(d) for d in placed)}); {remedy}. "
                "Casts of the dtype (.double(), .to(torch.float16)) work")

    def to(self, *args: Any, **kwargs: Any) -> "_Placed":
        """``nn.Module.to``: casts the dtype; a device other than the
        partitions' is a TypeError."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self._check_stays(device, f".to({str(device)!r})")
        return super().to(*args, **kwargs)

    def to_empty(self, *, device: Optional[Device],
                 recurse: bool = True) -> "_Placed":
        """``nn.Module.to_empty`` on the partitions' devices only."""
        if device is not None:
            self._check_stays(device, f".to_empty(device={str(device)!r})")
        return super().to_empty(device=device, recurse=recurse)

    def cpu(self) -> "_Placed":
        """Nothing to do when every partition is on the CPU, else a
        TypeError."""
        self._check_stays("cpu", ".cpu()")
        return self

    def _accelerator(self, kind: str,
                     device: Optional[Union[int, torch.device]]) -> "_Placed":
        """``.cuda()``, ``.xpu()``, ...: nothing to do when every partition
        is on that device, else a TypeError."""
        target = (torch.device(kind) if device is None
                  else torch.device(kind, device) if isinstance(device, int)
                  else torch.device(device))
        shown = "" if device is None else device
        self._check_stays(target, f".{kind}({shown})")
        return self

    def cuda(self, device: Optional[Union[int, torch.device]] = None
             ) -> "_Placed":
        """See :meth:`_accelerator`."""
        return self._accelerator("cuda", device)

    def xpu(self, device: Optional[Union[int, torch.device]] = None
            ) -> "_Placed":
        """See :meth:`_accelerator`."""
        return self._accelerator("xpu", device)

    def mtia(self, device: Optional[Union[int, torch.device]] = None
             ) -> "_Placed":
        """See :meth:`_accelerator`."""
        return self._accelerator("mtia", device)

    def ipu(self, device: Optional[Union[int, torch.device]] = None
            ) -> "_Placed":
        """See :meth:`_accelerator`."""
        return self._accelerator("ipu", device)


class GPipe(_Placed):
    """GPipe pipeline parallelism (Huang et al. 2019, arXiv 1811.06965).

    Splits ``module`` into ``len(balance)`` contiguous partitions, places
    partition ``i`` on ``devices[i]`` and runs mini-batches as ``chunks``
    micro-batches through them on the C++ engine.

    Args:
        module: an ``nn.Sequential``; between its layers flows a tensor or a
            tuple of tensors.
        balance: layers per partition, summing to ``len(module)``; see
            :func:`pipegear.balance_by_time`.
        devices: device of each partition, a list (``['cpu', 'cuda:0']``).
            ``None``: every CUDA device, or ``cpu`` for every partition when
            there is none. Partitions may share a device.
        chunks: micro-batches per mini-batch (M).
        checkpoint: ``'always'``, ``'except_last'`` (default) or ``'never'``.
            In eval mode (``pipe.eval()``) nothing is checkpointed.
        deferred_batch_norm: replace BatchNorm layers by
            :class:`pipegear.DeferredBatchNorm` (mini-batch running stats).
        schedule: ``'gpipe'`` (fill/drain, both faces), ``'interleaved'``
            (:meth:`step` only; 1F1B with ``virtual_stages`` partitions per
            worker: ``balance`` has K * v entries, worker d runs partitions
            d, d + K, ..., and the bubble shrinks about v times),
            ``'1f1b'``
            (:meth:`step` only; keeps fewer activations alive), or the
            zero-bubble ``'zb-h1'`` (1F1B's memory) and ``'zb-h2'``
            (:meth:`step` only; each backward split into B, the input
            gradient, and W, the weight gradients, run later to fill the
            bubble: docs/engine.md), or ``'interleaved-zb'`` (:meth:`step`
            only; ``'interleaved'`` with split backwards: zb-h1's bubble
            divided by v, at the memory of ``'interleaved'``).
        virtual_stages: partitions per worker (v) for ``'interleaved'`` and
            ``'interleaved-zb'``; ``devices`` then names one device per
            worker or per partition.
        worker_threads: intra-op threads per CPU stage worker; 0 splits
            ``torch.get_num_threads()`` between the CPU stages.

    The layers are the pipeline's children under their names in ``module``,
    so the pipeline's ``state_dict`` keys are ``module``'s and a state saved
    from either loads into the other; so does a torchgpipe checkpoint
    (``partitions.<j>.<name>.`` keys, renamed by a load pre-hook). A layer may be named like an
    attribute of the pipeline (``checkpoint``, ``step``, ...): the
    configuration (``balance``, ``devices``, ``chunks``, ``checkpoint``,
    ``schedule``, ``partitions``) and the methods keep their meaning, the
    layer is ``pipe[i]`` / ``pipe._modules[name]``. The pipeline starts in
    ``module``'s mode (``training``).

    A parameter held by modules of several partitions (an output head tied
    to the embedding, ``head.weight = embed.weight``) stays one parameter:
    ``parameters()`` yields it once, ``state_dict()`` lists it under each
    name, as the plain model's. The partitions after the first one using it
    compute with replicas (an alias of its storage on the same device, a
    copy refreshed before every forward on another), whose gradients are
    added into the parameter's after every drain (docs/engine.md, "Tied
    parameters"). A module holding parameters may not be in two
    partitions.

    The partitions stay on ``devices``: ``.to(device)``, ``.cuda()``,
    ``.cpu()`` to another device raise ``TypeError`` (build a new
    ``GPipe(..., devices=[...])``); dtype casts (``.double()``) work.
    ``copy.deepcopy``, ``pickle`` and ``torch.save`` make a new pipeline of
    copies of the layers with the same configuration.

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
                 virtual_stages: int = 1, worker_threads: int = 0) -> None:
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
        virtual_stages = _check_virtual_stages(virtual_stages, schedule)
        if len(balance) % virtual_stages:
            raise ValueError(f"virtual_stages = {virtual_stages} must divide "
                             f"the number of partitions, got {len(balance)} "
                             f"({balance})")
        # named_children() would skip the repeats we are looking for.
        named = list(module._modules.items())
        seen: dict[int, str] = {}
        for name, layer in named:
            if id(layer) in seen:
                raise ValueError(f"layer {name!r} is the same module as layer "
                                 f"{seen[id(layer)]!r}; a pipeline needs "
                                 "distinct layers")
            seen[id(layer)] = name
        # A parameter held by modules of two partitions is tied (tied.py);
        # a module holding parameters in two partitions is refused here,
        # before anything is converted or moved.
        find_ties(named, balance)
        skip_layout(named, balance)  # TypeError when stashes and pops differ
        devices = _interleaved_devices(devices, len(balance), virtual_stages)

        # Everything is checked before the module is converted or moved.
        module = _prepare_batch_norm(module, chunks, deferred_batch_norm)
        self._build(list(module._modules.items()), balance, devices, chunks,
                    checkpoint, schedule, worker_threads, module.training,
                    virtual_stages, state_dict_hooks(module))

    def _build(self, named: list[tuple[str, nn.Module]], balance: list[int],
               devices: list[torch.device], chunks: int, checkpoint: str,
               schedule: str, worker_threads: int, training: bool,
               virtual_stages: int = 1,
               hooks: Optional["StateDictHooks"] = None) -> None:
        """Places the checked layers and starts the engine."""
        partitions = []
        offset = 0
        for size in balance:
            part = _Partition(OrderedDict(named[offset:offset + size]))
            partitions.append(part)
            offset += size
        layout = skip_layout(named, balance)
        for part, (pops, stashes) in zip(partitions, layout):
            part._skip_pops = tuple(key for _, key in pops)
            part._skip_stashes = tuple(key for _, key in stashes)
        # Replicas of tied parameters go into the partitions on other
        # devices before the partitions move (moving a partition that still
        # held the owner's parameter would move it off the owner's device).
        ties = Ties(find_ties(named, balance), devices, tied.needs_copy)
        for part, device in zip(partitions, devices):
            part.to(device)
        # Skip names by id, for the engine's errors.
        names = {i: key[1] for pops, stashes in layout for i, key in pops + stashes}
        names = [names[i] for i in range(len(names))]
        stages = [(part, str(device), self._hooks(part),
                   [i for i, _ in pops], [i for i, _ in stashes], names)
                  for part, device, (pops, stashes)
                  in zip(partitions, devices, layout)]
        # The configuration lives in private fields behind read-only
        # properties, set before the layers join `_modules`, so that a layer
        # named like a property or method of GPipe does not displace it.
        self._balance = balance
        self._devices = devices
        self._chunks = chunks
        self._checkpoint = checkpoint
        self._schedule = schedule
        self._virtual_stages = virtual_stages
        self._worker_threads = worker_threads
        self._ties = ties
        ties.refresh()  # aliases moved with their partitions share again
        # Not a child: the layers are this module's children, under their
        # names in the module (state_dict keys as the plain model's).
        object.__setattr__(self, "_partitions", nn.ModuleList(partitions))
        self._pipeline = _C._Pipeline(stages, chunks, checkpoint, schedule,
                                      worker_threads, virtual_stages)
        for name, layer in named:
            # add_module() refuses a name that is an attribute of GPipe.
            self._modules[name] = layer
        self.register_load_state_dict_pre_hook(_rename_partition_keys)
        # The tied parameters' own values go in before the module's hooks
        # see the state (they may rename its keys).
        self.register_state_dict_pre_hook(_remember_keep_vars)
        self.register_state_dict_post_hook(_tied_values)
        if hooks is None:
            hooks = StateDictHooks()
        self._state_dict_hooks_of_module = hooks
        hooks.register(self)
        self.training = training
        self._partitions.training = training
        for part in partitions:
            part.training = training

    @staticmethod
    def _hooks(part: nn.Module, commit: bool = True
               ) -> Optional[Callable[[str], None]]:
        """The stage's begin/end hook for its DeferredBatchNorm layers (None
        without any): the accumulated statistics dropped before a step's
        first forward, committed after the forwards of every stage
        succeeded; `commit=False` leaves the commit to the caller (replicas
        commit the statistics of the global batch)."""
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
                elif commit:
                    bn.commit()

        return hook

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """``pickle``, ``copy.deepcopy`` and ``torch.save``: a copy is a new
        pipeline of (copies of) the layers with this one's configuration.
        The engine itself is not copied; DeferredBatchNorm layers are copied
        as they are."""
        config = dict(balance=self._balance, devices=self._devices,
                      chunks=self._chunks, checkpoint=self._checkpoint,
                      schedule=self._schedule,
                      virtual_stages=self._virtual_stages,
                      worker_threads=self._worker_threads)
        return (_restore, (type(self), list(self._modules.items()), config,
                           self.training, self._ties.spec(),
                           self._state_dict_hooks_of_module))

    # -- configuration (read-only) ---------------------------------------
    @property
    def devices(self) -> list[torch.device]:
        """The device of each partition."""
        return list(self._devices)

    @property
    def partitions(self) -> nn.ModuleList:
        """One ``nn.Sequential`` per partition, holding its layers (a view:
        the layers are the pipeline's children)."""
        return self._partitions

    def _placement(self) -> tuple[list[torch.device], str]:
        return self._devices, ("build a new GPipe(module, balance, "
                               "devices=[...]) to use other devices")

    def train(self, mode: bool = True) -> "GPipe":
        super().train(mode)
        self._partitions.train(mode)  # the containers too, not only layers
        return self

    # -- tied parameters (tied.py) -----------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, nn.Parameter]]:
        """``nn.Module.named_parameters``, as the plain model's: a parameter
        tied across partitions is yielded once (with ``remove_duplicate``),
        under its first name, and never as a partition's replica of it.
        ``parameters()`` (and so the optimizer, ``zero_grad``) go through
        here."""
        seen: set[int] = set()
        for name, p in super().named_parameters(prefix, recurse,
                                                remove_duplicate=False):
            p = self._ties.master_of(p)
            if remove_duplicate:
                if id(p) in seen:
                    continue
                seen.add(id(p))
            yield name, p

    # -- the Sequential face ---------------------------------------------
    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, index: Union[int, slice]) -> nn.Module:
        """Layer ``index``; a slice gives an ``nn.Sequential`` of those
        layers under their names, as ``nn.Sequential`` does (the layers stay
        where they are placed)."""
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict(
                list(self._modules.items())[index]))
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError("layer index must be an int or a slice, got "
                            f"{type(index).__name__}") from None
        layers = list(self._modules.values())
        if not -len(layers) <= i < len(layers):
            raise IndexError(f"layer index {index} out of range for "
                             f"{len(layers)} layers")
        return layers[i]

    # -- running ------------------------------------------------------------
    def forward(self, input: Tensors) -> Tensors:  # noqa: A002
        """Module style: the output of the last partition, on its device.

        ``loss(pipe(x)).backward()`` runs the drain on the engine's workers.
        In eval mode nothing is checkpointed.
        """
        _check_input("input", input)
        ties = self._ties
        if not ties:
            return self._pipeline.forward(input, training=self.training)
        ties.refresh()
        output = self._pipeline.forward(input, training=self.training)
        # The drain runs in the backward of the pipeline's autograd node
        # (every output's grad_fn): a hook after it adds the replicas'
        # gradients into the tied parameters, once per step.
        for t in output if isinstance(output, tuple) else (output,):
            if t.grad_fn is not None:
                t.grad_fn.register_hook(
                    lambda grad_inputs, grad_outputs: ties.accumulate())
                break
        return output

    def step(self, input: Tensors, target: Optional[Tensors],
             loss_fn: Callable[..., torch.Tensor], *,
             reduction: Optional[str] = None,
             count: Optional[Count] = None) -> torch.Tensor:
        """Step style: forward and backward of the whole schedule.

        ``loss_fn(output, target)`` runs per micro-batch on the last
        partition; the returned loss and the accumulated gradients equal
        those of ``loss_fn(module(input), target)`` on the whole batch.

        Args:
            input: the mini-batch (a tensor or a tuple of tensors).
            target: its target, split like the input; None only for a loss
                that takes none.
            loss_fn: ``loss_fn(output, target) -> scalar tensor``.
            reduction: how ``loss_fn`` reduces, ``'mean'`` or ``'sum'``.
                None (default): read from the loss (``reduction`` of a
                ``torch.nn`` loss module or of a ``functools.partial``;
                ``'batchmean'`` is a mean over rows), else ``'mean'``. A
                value the loss contradicts, or a loss reducing with
                ``'none'``, is a ``ValueError``.
            count: for a mean, a callable giving one micro-batch's target
                the number (an int, float or 0-dim tensor) of terms its
                mean averages over; micro-batch j weighs
                ``count_j / sum(count)``. None: the rows, except for
                ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` and
                ``F.cross_entropy`` / ``F.nll_loss`` with class-index
                targets, whose targets equal to ``ignore_index`` do not
                count and the others count their class ``weight``. Pass it
                for other losses whose mean skips terms, e.g. a lambda over
                ``F.cross_entropy(..., ignore_index=-100)`` with
                ``count=lambda t: (t != -100).sum()``.
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
        reduction, count = plan_loss(loss_fn, target, reduction, count)
        ties = self._ties
        if ties:
            ties.refresh()
        loss = self._pipeline.step(input, target, loss_fn, reduction,
                                   count=count, training=self.training)
        if ties:
            ties.accumulate()  # the drain is over
        return loss

    @property
    def last_trace(self) -> Trace:
        """The timeline of the last completed step."""
        return Trace(self._pipeline.last_trace)

    def schedule_table(self, micro_batches: Optional[int] = None) -> str:
        """The engine's schedule as an ASCII clock table."""
        m = self._chunks if micro_batches is None else _check_int(
            "micro_batches", micro_batches, 1)
        return self._pipeline.schedule_table(m)

    def extra_repr(self) -> str:
        return (f"balance={self._balance}, "
                f"devices={[str(d) for d in self._devices]}, "
                f"chunks={self._chunks}, checkpoint={self._checkpoint!r}")


class StateDictHooks:
    """The state-dict hooks registered on a model itself (not on its
    layers, which the pipeline holds as they are), so that a pipeline over
    it saves and loads the state as the model does: a model whose hooks
    rename its keys (``pipegear.models.gpt2_sequential`` gives the plain
    ``GPT2LMHeadModel``'s) keeps its keys through ``GPipe`` and
    ``DistributedGPipe``. The load pre-hooks are kept unwrapped (a wrapped
    one holds a weak reference to the model), so a pipeline re-registers
    them on itself and pickles them with its layers."""

    def __init__(self, save_pre: Sequence[Callable] = (),
                 save_post: Sequence[Callable] = (),
                 load_pre: Sequence[tuple[Callable, bool]] = (),
                 load_post: Sequence[Callable] = ()) -> None:
        self.save_pre = list(save_pre)
        self.save_post = list(save_post)
        self.load_pre = list(load_pre)
        self.load_post = list(load_post)

    def register(self, target: nn.Module) -> None:
        """Registers the hooks on `target`, after its own, in their order."""
        from torch.utils.hooks import RemovableHandle

        for table, hooks in ((target._state_dict_pre_hooks, self.save_pre),
                             (target._state_dict_hooks, self.save_post)):
            for hook in hooks:
                # Inserted as registered, so that a public post-hook keeps
                # its "returns None" contract and a private one may return
                # a new dict, as on the model.
                table[RemovableHandle(table).id] = hook
        for hook, with_module in self.load_pre:
            target._register_load_state_dict_pre_hook(hook, with_module)
        for hook in self.load_post:
            table = target._load_state_dict_post_hooks
            table[RemovableHandle(table).id] = hook


def state_dict_hooks(module: nn.Module) -> StateDictHooks:
    """The state-dict hooks registered on `module` itself."""
    return StateDictHooks(
        module._state_dict_pre_hooks.values(),
        module._state_dict_hooks.values(),
        [(getattr(h, "hook", h), getattr(h, "with_module", False))
         for h in module._load_state_dict_pre_hooks.values()],
        list(module._load_state_dict_post_hooks.values()))


def _remember_keep_vars(pipe: GPipe, prefix: str, keep_vars: bool) -> None:
    pipe._keep_vars = keep_vars  # for _tied_values, which is not told


def _tied_values(pipe: GPipe, state_dict: dict[str, Any], prefix: str,
                 local_metadata: Any) -> None:
    """``state_dict`` post-hook: a parameter tied across partitions is
    listed under every name holding it, with its own value (not a partition
    replica's, which may be a step old between an optimizer step and the
    next forward), as in the plain model."""
    keep_vars = getattr(pipe, "_keep_vars", False)
    for name, master in pipe._ties.replica_names():
        state_dict[prefix + name] = master if keep_vars else master.detach()


_PARTITION_KEY = re.compile(r"partitions\.(\d+)\.([^.]+)\.(.+)")


def _rename_partition_keys(pipe: GPipe, state_dict: dict[str, Any],
                           prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook: accepts the keys of torchgpipe's GPipe
    (and of the C++ GPipe of earlier pipegear versions, read in Python with
    torch.jit.load), which register their partitions:
    ``partitions.<j>.<name>.weight`` for the layer ``<name>`` of the plain
    model in partition j. torchgpipe keeps the layers' names inside its
    partitions, so the key is ``<name>.weight`` here whatever the balance
    the checkpoint was saved with. Only keys whose ``<name>`` is a layer of
    this pipeline are renamed (others stay, and ``strict`` reports them);
    none when a layer is itself named ``partitions``. A key present in both
    layouts is a ValueError."""
    if "partitions" in pipe._modules:
        return
    metadata = getattr(state_dict, "_metadata", None)
    head = prefix + "partitions."
    for key in [k for k in state_dict if k.startswith(head)]:
        match = _PARTITION_KEY.fullmatch(key[len(prefix):])
        if match is None or match.group(2) not in pipe._modules:
            continue
        stage, name, rest = match.groups()
        new = f"{prefix}{name}.{rest}"
        if new in state_dict:
            raise ValueError(
                f"the state dict holds both {key!r} (torchgpipe's layout, "
                f"partition {stage}) and {new!r}; keep one of them")
        state_dict[new] = state_dict.pop(key)
        if metadata is not None:
            # Per-module metadata (BatchNorm's version) moves along.
            old = f"{prefix}partitions.{stage}.{name}"
            for mkey in [k for k in metadata
                         if k == old or k.startswith(old + ".")]:
                metadata.setdefault(f"{prefix}{name}{mkey[len(old):]}",
                                    metadata[mkey])


def _restore(cls: type, named: list[tuple[str, nn.Module]],
             config: dict[str, Any], training: bool,
             ties: Optional[list] = None,
             hooks: Optional["StateDictHooks"] = None) -> GPipe:
    """Unpickles a :class:`GPipe` (see ``GPipe.__reduce_ex__``): a new
    pipeline over `named` with the configuration it was saved with. The
    devices are checked again (the process may be another); BatchNorm layers
    are taken as they are (converted, or warned about, when first built)."""
    pipe = cls.__new__(cls)
    nn.Module.__init__(pipe)
    # The copied layers hold copies of the replicas: the tied parameter goes
    # back into their slots, and _build ties it again.
    untie_replicas(named, ties)
    balance = config["balance"]
    pipe._build(named, balance, _resolve_devices(config["devices"],
                                                 len(balance)),
                config["chunks"], config["checkpoint"], config["schedule"],
                config["worker_threads"], training,
                config.get("virtual_stages", 1),
                hooks if hooks is not None else StateDictHooks())
    return pipe
