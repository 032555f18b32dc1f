"""GPipe across processes: one pipeline stage per rank of a process group.

Each rank keeps only its slice of the model. Activations and gradients move
between neighbouring ranks with c10d point-to-point send/recv (Gloo on CPU,
NCCL on GPUs), driven by the C++ ``pipegear::DistributedPipeline``; rank 0
sends every rank the step header and relays the loss and the outcome of
the step (docs/distributed.md). Launch with torchrun::

    torchrun --nproc_per_node=2 train.py

>>> pipegear.distributed.init_from_env()            # Gloo, from torchrun's env
>>> pipe = pipegear.DistributedGPipe(layers, balance=[2, 1], chunks=4)
>>> loss = pipe.step(x if pipe.is_first else None,
...                  t if pipe.is_last else None, F.cross_entropy)
"""
import contextlib
import math
import os
from collections import OrderedDict
from datetime import timedelta
from typing import (Callable, Iterable, Iterator, Optional, Sequence,
                    Union)

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipegear import _C
from pipegear.skip import rank_skips, routes_across_ranks
from pipegear.gpipe import (CHECKPOINT_MODES, SCHEDULES, GPipe, _Partition,
                            _check_available, _check_int,
                            _check_virtual_stages, _parse_device,
                            _Placed, _prepare_batch_norm, state_dict_hooks)
from pipegear.loss import Count, plan_loss
from pipegear.replicas import (Replicas, local_count, mesh_groups,
                               scaled_loss)
from pipegear.tied import DistributedTies, find_ties

__all__ = ["DistributedGPipe", "init_from_env"]

Tensors = Union[Tensor, tuple]
LayerSpec = Union[nn.Sequential, Sequence[Union[nn.Module, Callable[[], nn.Module]]]]


def init_from_env(backend: str = "gloo", timeout: float = 60.0):
    """Initialises the default process group from torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and returns it. With
    ``backend='nccl'`` the current CUDA device becomes LOCAL_RANK's.

    Does nothing but return the default group when one exists already.
    """
    if dist.is_initialized():
        return dist.group.WORLD
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise RuntimeError("init_from_env needs the environment variables "
                           f"{', '.join(missing)} (set by torchrun)")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://",
                            rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=timedelta(seconds=timeout))
    return dist.group.WORLD


def _layers(module: LayerSpec) -> list:
    """(name, layer-or-factory) pairs, in order."""
    if isinstance(module, nn.Sequential):
        return list(module._modules.items())
    if isinstance(module, nn.Module):
        raise TypeError("module must be an nn.Sequential or a list of layers "
                        f"or layer factories, got {type(module).__name__}")
    if not isinstance(module, Iterable):
        raise TypeError("module must be an nn.Sequential or a list of layers "
                        f"or layer factories, got {type(module).__name__}")
    return [(str(i), layer) for i, layer in enumerate(module)]


class DistributedGPipe(_Placed):
    """GPipe over the ranks of a process group: rank r runs partition r.

    Args:
        module: an ``nn.Sequential``, or a list whose items are layers or
            *factories* (callables returning an ``nn.Module``). Only this
            rank's factories are called, so no process builds the whole model.
        balance: layers per partition; ``len(balance)`` must equal the world
            size of the group (times ``virtual_stages``).
        process_group: the group (rank r = stage r); ``None``: the default
            group (see :func:`init_from_env`).
        chunks: micro-batches per mini-batch.
        checkpoint: ``'always'``, ``'except_last'`` or ``'never'``.
        deferred_batch_norm: replace BatchNorm layers by DeferredBatchNorm.
        timeout: seconds any wait for a peer within a step may take before
            the call raises.
        idle_timeout: seconds a rank waits for the others to start the next
            step (default 1800, torch's default process-group timeout):
            between steps a rank may be busy for long (a checkpoint, an
            evaluation) while the others wait.
        device: where this rank's partition runs (default: CPU for Gloo, the
            current CUDA device for NCCL). The partition stays there: a move
            to another device (``.to(device)``, ``.cuda()``) is a
            ``ValueError``; dtype casts work.
        schedule: ``'gpipe'``, ``'1f1b'``, ``'zb-h1'``, ``'zb-h2'``,
            ``'interleaved'`` or ``'interleaved-zb'`` (all but ``'gpipe'``:
            :meth:`step` only).
        virtual_stages: partitions per rank (v) for ``'interleaved'`` and
            ``'interleaved-zb'``:
            ``len(balance)`` is then K * v for K ranks and rank r runs
            partitions r, r + K, ..., r + (v-1)K, so that a micro-batch
            visits every rank v times and the pipeline's bubble shrinks by
            about v (docs/distributed.md, "Interleaved"). Gloo only, without
            skip connections across partitions.
        tied_parameters: parameters that are one parameter of the model
            though held by layers of several ranks (GPT-2's head reusing the
            embedding's weight), each tie a list of names as in
            ``state_dict`` (layer name, then the path inside it:
            ``[["embed.wte.weight", "lm_head.weight"]]``; a list's layers
            are named by their index). None: found in an ``nn.Sequential``
            (or a list of modules) by identity, as :class:`GPipe` does;
            factories build their layers apart, so their ties must be
            named. The ranks holding a tie form a process group of their
            own: the first one's value is broadcast at construction, and
            after every drain they sum the step's gradient over it
            (docs/distributed.md, "Tied parameters").
        mesh: a ``torch.distributed.DeviceMesh`` with dimensions named
            ``"dp"`` and ``"pp"``: the pipeline runs along ``pp``, its
            replicas along ``dp`` (instead of ``process_group``).
        dp_group: with ``process_group`` (this replica's pipeline), the
            ranks running this rank's stage in every replica (replica d =
            rank d of the group). With replicas (``mesh`` or ``dp_group``)
            every replica starts from the first one's parameters and
            buffers (broadcast here), each step's loss is that of the
            global batch (the replicas' batches together, weighed as the
            loss counts: rows, targets not ignored, ``count=``), and the
            step's gradients are summed over each stage's replicas before
            :meth:`step` returns (docs/distributed.md, "Replicas").
        bucket_cap_mb: the size of a bucket of gradients summed over the
            replicas in one collective.
        overlap: start summing a stage's gradients over its replicas
            while the drain runs: a bucket as soon as all its parameters
            got their last gradient within this stage's last backward cell,
            the rest once that cell has run (False: after the step).

    Every rank makes the same calls. Step style::

        loss = pipe.step(x if pipe.is_first else None,
                         t if pipe.is_last else None, loss_fn)

    Module style (``'gpipe'``)::

        out = pipe(x if pipe.is_first else None)
        if pipe.is_last:
            loss_fn(out, t).backward()  # out: the model's output
        else:
            out.backward()              # out: a placeholder; or pipe.backward()

    A failure on one rank (an exception, a mistake in its arguments, a dead
    or hanging peer) makes every rank raise within ``timeout`` (a rank that
    does not come to a step: within ``idle_timeout``); after an exception
    raised by a layer or the loss, or a mistake, the next call works, after
    a lost peer ``broken`` is true and the process group must be recreated
    (docs/distributed.md).
    """

    def __init__(self, module: LayerSpec, balance: Sequence[int], *,
                 process_group=None, chunks: int = 1,
                 checkpoint: str = "except_last",
                 deferred_batch_norm: bool = False, timeout: float = 30.0,
                 device=None, schedule: str = "gpipe",
                 idle_timeout: float = 1800.0,
                 tied_parameters: Optional[Sequence[Sequence[str]]] = None,
                 mesh=None, dp_group=None, bucket_cap_mb: float = 25.0,
                 overlap: bool = True, virtual_stages: int = 1) -> None:
        super().__init__()
        if mesh is not None:
            if process_group is not None or dp_group is not None:
                raise ValueError("pass either mesh= or process_group= (and "
                                 "dp_group=), not both")
            process_group, dp_group = mesh_groups(mesh)
        if (isinstance(bucket_cap_mb, bool)
                or not isinstance(bucket_cap_mb, (int, float))
                or not math.isfinite(bucket_cap_mb) or bucket_cap_mb <= 0):
            raise ValueError("bucket_cap_mb must be a positive number of "
                             f"megabytes, got {bucket_cap_mb!r}")
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got "
                            f"{type(overlap).__name__}")
        if process_group is None:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(
                    "DistributedGPipe needs a process group: pass "
                    "process_group=, call torch.distributed.init_process_group"
                    " or pipegear.distributed.init_from_env() first")
            process_group = dist.group.WORLD
        if isinstance(balance, (str, bytes)) or not isinstance(balance, Sequence):
            raise TypeError("balance must be a sequence of ints, got "
                            f"{type(balance).__name__}")
        balance = [_check_int(f"balance[{i}]", b, 1)
                   for i, b in enumerate(balance)]
        world = process_group.size()
        rank = process_group.rank()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, "
                             f"got {schedule!r}")
        virtual_stages = _check_virtual_stages(virtual_stages, schedule)
        if virtual_stages == 1 and len(balance) != world:
            raise ValueError(f"balance has {len(balance)} partitions but the "
                             f"process group has {world} ranks: one rank "
                             "per partition")
        if virtual_stages > 1 and len(balance) != world * virtual_stages:
            raise ValueError(f"balance has {len(balance)} partitions but "
                             f"{world} ranks with virtual_stages = "
                             f"{virtual_stages} run {world * virtual_stages}")
        if virtual_stages > 1 and world < 2:
            raise ValueError(f"virtual_stages = {virtual_stages} needs at "
                             "least 2 ranks (with one, use pipegear.GPipe)")
        named = _layers(module)
        if sum(balance) != len(named):
            raise ValueError(f"balance sums to {sum(balance)} but the module "
                             f"has {len(named)} layers")
        chunks = _check_int("chunks", chunks, 1)
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, "
                             f"got {checkpoint!r}")
        for name, value in (("timeout", timeout), ("idle_timeout", idle_timeout)):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0.001):
                raise ValueError(f"{name} must be a finite number of seconds, "
                                 f"at least 0.001, got {value!r}")
        if device is not None:
            # GPipe's checks: TypeError / ValueError / IndexError naming it.
            device = _parse_device(device, "device")
            _check_available(device, "device")

        # This rank's partitions: r, r + K, ... (one unless interleaved).
        stages = [c * world + rank for c in range(virtual_stages)]
        chunked = []
        for stage in stages:
            offset = sum(balance[:stage])
            part = []
            for name, layer in named[offset:offset + balance[stage]]:
                if not isinstance(layer, nn.Module):
                    if not callable(layer):
                        raise TypeError(f"layer {name} is neither an "
                                        "nn.Module nor a factory: "
                                        f"{type(layer).__name__}")
                    layer = layer()
                    if not isinstance(layer, nn.Module):
                        raise TypeError(f"the factory of layer {name} "
                                        f"returned {type(layer).__name__}, "
                                        "not an nn.Module")
                part.append((name, layer))
            chunked.append(part)
        mine = [item for part in chunked for item in part]
        # Skips: every rank tells the others what it stashes for later
        # ranks and pops from earlier ones (one collective, also when
        # nobody has any: a rank cannot know), and all find the same routes
        # or the same error.
        share = rank_skips(mine)
        shares = [None] * world
        if virtual_stages > 1:
            # Whether a skip crosses one of this rank's partitions: the
            # interleaved pipeline routes none (every rank raises alike).
            crossing = any(out or into for _, out, into, _ in
                           map(rank_skips, chunked))
            dist.all_gather_object(shares, crossing, group=process_group)
            if any(shares):
                raise ValueError(
                    "skip connections across partitions are not supported "
                    f"with virtual_stages = {virtual_stages} (ranks "
                    f"{[r for r, c in enumerate(shares) if c]} hold one); "
                    "keep each skip within a partition")
            shares = [((), (), ())] * world
        else:
            dist.all_gather_object(shares, share[:3], group=process_group)
        problems, routes = routes_across_ranks(shares)
        if problems:
            raise TypeError("skip connections do not match (stash and pop "
                            "pairs in a namespace, across ranks):\n\n" +
                            "\n".join(f"* {p}" for p in problems))
        local = share[3]
        skip_pop = [(i, local[k]) for i, (_, to, k) in enumerate(routes)
                    if to == rank]
        skip_stash = [(i, local[k]) for i, (fr, _, k) in enumerate(routes)
                      if fr == rank]
        partitions = []
        for part in chunked:
            p = _prepare_batch_norm(_Partition(OrderedDict(part)), chunks,
                                    deferred_batch_norm, f"rank {rank}: ")
            partitions.append(p)
        partitions[0]._skip_pops = tuple(k for _, k in skip_pop)
        partitions[0]._skip_stashes = tuple(k for _, k in skip_stash)
        # All this rank's layers (after a DeferredBatchNorm conversion).
        partition = (partitions[0] if virtual_stages == 1 else _Partition(
            OrderedDict((n, m) for p in partitions
                        for n, m in p._modules.items())))
        if device is None:
            backend = dist.get_backend(process_group)
            device = (torch.device("cuda", torch.cuda.current_device())
                      if backend == "nccl" else torch.device("cpu"))
        partition.to(device)

        # The configuration lives in private fields behind read-only
        # properties, set before the layers join `_modules`, so that a layer
        # named like a property or method does not displace it (see GPipe).
        self._balance = balance
        self._rank = rank
        self._world_size = world
        self._chunks = chunks
        self._checkpoint = checkpoint
        self._schedule = schedule
        self._virtual_stages = virtual_stages
        self._timeout = float(timeout)
        self._idle_timeout = float(idle_timeout)
        self._device = device
        self._process_group = process_group
        object.__setattr__(self, "_partition", partition)
        # Tied parameters: every rank takes part in checking them (one
        # collective), the ranks holding one make its group.
        if tied_parameters is None:
            groups = ([t.names for t in find_ties(named, balance)]
                      if all(isinstance(layer, nn.Module)
                             for _, layer in named) else [])
        else:
            if isinstance(tied_parameters, (str, bytes)) or not isinstance(
                    tied_parameters, Iterable):
                raise TypeError("tied_parameters must be a list of lists of "
                                "parameter names, got "
                                f"{type(tied_parameters).__name__}")
            groups = [list(g) for g in tied_parameters]
        local = {f"{name}.{p}": param
                 for name, layer in partition._modules.items()
                 for p, param in layer.named_parameters(
                     remove_duplicate=False)}
        self._ties = DistributedTies(groups, [n for n, _ in named], balance,
                                     rank, local, process_group,
                                     float(timeout))
        self._replicas = None
        self._overlap = overlap
        if dp_group is not None:
            self._replicas = Replicas(
                process_group, dp_group, list(partition.parameters()),
                list(partition.buffers()),
                dict(balance=balance, chunks=chunks, checkpoint=checkpoint,
                     schedule=schedule, virtual_stages=virtual_stages,
                     layers=[n for n, _ in named],
                     deferred_batch_norm=bool(deferred_batch_norm)),
                float(timeout), float(idle_timeout), float(bucket_cap_mb))
            # Their statistics are summed over the replicas and committed
            # once every replica's step succeeded (Replicas.end).
            from pipegear.batchnorm import DeferredBatchNorm
            self._replicas.batch_norms = [
                m for m in partition.modules()
                if isinstance(m, DeferredBatchNorm)]
        self._pipeline = _C._DistributedPipeline(
            process_group, partitions, str(device),
            [GPipe._hooks(p, commit=self._replicas is None)
             for p in partitions],
            chunks, checkpoint, schedule, float(timeout), float(idle_timeout),
            balance, skip_pop=[i for i, _ in skip_pop],
            skip_stash=[i for i, _ in skip_stash],
            skip_routes=[r for fr, to, _ in routes for r in (fr, to)],
            skip_names=[k[1] for _, _, k in routes],
            virtual_stages=virtual_stages)
        if self._replicas is not None and overlap:
            self._pipeline.set_before_last_backward(self._replicas.arm)
            self._pipeline.set_after_backward(self._replicas.start_reduction)
        # This rank's layers, under their original names (state_dict keys as
        # the plain model's, for this slice); add_module() would refuse a
        # name that is an attribute of DistributedGPipe.
        for name, layer in partition._modules.items():
            self._modules[name] = layer
        if isinstance(module, nn.Module):
            # The model's own state-dict hooks (GPipe does the same).
            state_dict_hooks(module).register(self)

    # -- configuration (read-only) ---------------------------------------
    @property
    def rank(self) -> int:
        """This rank, the partition it runs."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The ranks of the group: the number of partitions."""
        return self._world_size

    @property
    def virtual_stages(self) -> int:
        """Partitions per rank (interleaved schedules; 1 otherwise)."""
        return self._virtual_stages

    @property
    def timeout(self) -> float:
        """Seconds any wait for a peer within a step may take."""
        return self._timeout

    @property
    def idle_timeout(self) -> float:
        """Seconds a rank waits for the others to start the next step."""
        return self._idle_timeout

    @property
    def device(self) -> torch.device:
        """Where this rank's partition runs."""
        return self._device

    @property
    def process_group(self):
        """The group, rank r running partition r."""
        return self._process_group

    @property
    def partition(self) -> nn.Sequential:
        """This rank's layers as an ``nn.Sequential`` (a view: the layers
        are the pipeline's children)."""
        return self._partition

    def _placement(self) -> tuple:
        return [self._device], ("build a new DistributedGPipe(..., "
                                "device=...) to run this rank's partition "
                                "elsewhere")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def train(self, mode: bool = True) -> "DistributedGPipe":
        super().train(mode)
        self._partition.train(mode)
        return self

    def step(self, input: Optional[Tensors], target: Optional[Tensors],
             loss_fn: Callable[..., Tensor],
             reduction: Optional[str] = None, *,
             count: Optional[Count] = None) -> Tensor:
        """One training step across all ranks; every rank calls it.

        Rank 0 passes the input, the last rank the target (other ranks
        ``None``; extra values are ignored). ``loss_fn(output, target)`` runs
        per micro-batch on the last rank; ``reduction`` and ``count`` are
        :meth:`pipegear.GPipe.step`'s (read from the loss when None) and
        matter on the last rank only. Parameter gradients accumulate in
        this rank's ``.grad``. Returns the mini-batch loss on every rank.
        In eval mode nothing is checkpointed. Raises (within ``timeout``)
        when a peer fails or disappears; a mistake in the last rank's
        arguments (a missing target, a reduction the loss contradicts) is
        raised there and makes every other rank raise at once.
        """
        with self._tied_step():
            replicas = self._replicas
            if replicas is None:
                return self._step(input, target, loss_fn, reduction, count)
            replicas.begin()
            loss = error = None
            try:
                loss = self._step(input, target, loss_fn, reduction, count)
            except BaseException as e:  # noqa: BLE001 - raised by end()
                error = e
            replicas.started_in_step = replicas.started
            return replicas.end(loss, error, torch.is_grad_enabled())

    def _step(self, input: Optional[Tensors], target: Optional[Tensors],
              loss_fn: Callable[..., Tensor], reduction: Optional[str],
              count: Optional[Count]) -> Tensor:
        # A missing input on rank 0 is reported by the pipeline itself, to
        # every rank at once (raising here would leave the others waiting).
        first_input = input if self.is_first else None
        if not self.is_last:
            # Only the last rank runs the loss: the others' values are unused.
            return self._pipeline.step(first_input, None, None, "mean",
                                       training=self.training)
        try:
            if loss_fn is not None and not callable(loss_fn):
                raise TypeError("loss_fn must be callable, got "
                                f"{type(loss_fn).__name__}")
            # No loss_fn at all: the pipeline reports it, on every rank.
            reduction, count = (("mean", None) if loss_fn is None else
                                plan_loss(loss_fn, target, reduction, count))
            total = (local_count(target, reduction, count, self._chunks)
                     if self._replicas is not None and loss_fn is not None
                     else 0.0)
        except (TypeError, ValueError) as e:
            mistake = e
        else:
            mistake = None
        if self._replicas is not None:
            # Every replica's last rank takes part, a failed one too.
            whole, other, kind = self._replicas.pre_step(total if mistake is
                                                         None else 0.0, mistake)
            if other is not None and mistake is None:
                self._pipeline.step(first_input, None, None, "mean",
                                    training=self.training, error=other,
                                    error_type=kind)
            if mistake is None and reduction == "mean" and loss_fn is not None:
                loss_fn = scaled_loss(loss_fn, total / whole if whole > 0
                                      else math.nan)
        if mistake is None:
            return self._pipeline.step(first_input, target, loss_fn,
                                       reduction, count=count,
                                       training=self.training)
        # Raising the mistake only here would leave the other ranks waiting
        # out the timeout: the step fails on every rank before any cell
        # runs, the others naming this rank and the mistake.
        kind = "TypeError" if isinstance(mistake, TypeError) else "ValueError"
        try:
            self._pipeline.step(first_input, None, None, "mean",
                                training=self.training, error=str(mistake),
                                error_type=kind)
        except (TypeError, ValueError):  # the mistake, raised by the pipeline
            pass
        raise mistake

    def forward(self, input: Optional[Tensors] = None) -> Tensors:  # noqa: A002
        """Module style, every rank calls it; rank 0 passes the input.

        The last rank gets the model's output; every other rank gets a
        placeholder scalar (zero). With grad enabled both are attached to
        autograd: the last rank calls ``backward`` on its loss and every
        other rank on the placeholder (or :meth:`backward`), which runs that
        rank's drain. Every rank must run the backward of a forward before
        its next forward (use ``torch.no_grad()`` for evaluation). In eval
        mode nothing is checkpointed.
        """
        if self._replicas is not None:
            raise ValueError("DistributedGPipe with data-parallel replicas "
                             "runs through step() only (module-style "
                             "forward/backward is not supported with mesh= "
                             "or dp_group=)")
        ties = self._ties
        if not ties:
            return self._pipeline.forward(input if self.is_first else None,
                                          training=self.training)
        out = self._pipeline.forward(input if self.is_first else None,
                                     training=self.training)
        first = out[0] if isinstance(out, tuple) else out
        if first.grad_fn is not None:
            # The drain is this node's backward: the gradients are set
            # aside when it starts (not at the forward: until the drain
            # the user's .grad is as the plain model's) and the members
            # sum after it.
            first.grad_fn.register_prehook(lambda grad_outputs: ties.begin())
            first.grad_fn.register_hook(lambda grad_inputs, grad_outputs:
                                        ties.end())
        return out

    @contextlib.contextmanager
    def _tied_step(self) -> Iterator[None]:
        """Around a step: the tied parameters' gradients summed over their
        ranks after a drain that succeeded (on every rank alike: a failed
        step raises on all of them)."""
        ties = self._ties
        if not ties:
            yield
            return
        ties.begin()
        try:
            yield
        except BaseException:
            ties.end(ok=False)
            raise
        ties.end()

    def backward(self, loss: Optional[Tensor] = None) -> None:
        """Runs this rank's drain of the last forward: ``loss.backward()``
        on the last rank (``loss`` required), the placeholder's backward on
        the others (``loss`` ignored)."""
        if self.is_last:
            if loss is None:
                raise ValueError("the last rank must pass the loss to "
                                 "backward()")
            loss.backward()
        else:
            self._pipeline.backward()

    @property
    def broken(self) -> bool:
        """True after a failure that left the process group in an unknown
        state (a timeout, a lost peer): destroy the group and restart."""
        return self._pipeline.broken or (self._replicas is not None
                                         and self._replicas.broken)

    def last_reductions(self) -> list:
        """The gradient sums over the replicas in the last step: (bucket,
        start_ns, end_ns), on the clock of :meth:`last_events`."""
        return [] if self._replicas is None else self._replicas.last_events()

    @property
    def dp_group(self):
        """The ranks running this rank's stage in every replica (None
        without replicas)."""
        return None if self._replicas is None else self._replicas.dp_group

    @property
    def coordinates(self) -> tuple:
        """(dp, pp): this rank's replica and stage ((0, rank) without
        replicas)."""
        if self._replicas is None:
            return (0, self._rank)
        return (self._replicas.dp, self._rank)

    def last_events(self) -> list:
        """This rank's cells of the last step: (micro_batch, 'F'|'B'|'W',
        recompute, start_ns, end_ns, partition), by start time."""
        return self._pipeline.last_events

    def extra_repr(self) -> str:
        stages = (f", virtual_stages={self._virtual_stages}"
                  if self._virtual_stages > 1 else "")
        return (f"rank={self._rank}/{self._world_size}, "
                f"balance={self._balance}, chunks={self._chunks}, "
                f"checkpoint={self._checkpoint!r}{stages}")
