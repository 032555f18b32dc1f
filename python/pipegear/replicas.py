"""Data-parallel replicas of a distributed pipeline (a 2-D layout: pipeline
stages along ``pp``, replicas along ``dp``; docs/distributed.md, "Replicas").

Every rank runs one stage of one replica. The ranks running the same stage
in every replica form that stage's *dp group*; this module is one rank's
side of what they do together:

- at construction, check that they run the same configuration and make
  their parameters and buffers equal (the first replica's, broadcast);
- before a step, the last stages exchange what their mean loss counts (rows,
  targets that are not ``ignore_index``, class weights, ``count=``), so that
  each replica weighs its loss by its share of the *global* batch;
- after each stage's drain, sum the step's gradients over the dp group in
  buckets: with the loss weighted above, the sum is the gradient of the
  loss on the global batch, exactly, for uneven replicas too;
- after the step, agree on its outcome: a replica that failed makes every
  other one raise, naming the rank and its (dp, pp) coordinates.

Why pipegear's own buckets rather than DistributedDataParallel:
docs/design.md ("Gradients of replicas").
"""
from __future__ import annotations

import datetime
import functools
import re
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Replicas", "mesh_groups"]

_ORIGIN = re.compile(r"rank (\d+) failed|waiting for rank (\d+)|"
                     r"from rank (\d+)|to rank (\d+)")


def mesh_groups(mesh: Any) -> tuple[Any, Any]:
    """(pp group, dp group) of a ``DeviceMesh`` with dimensions named
    ``"dp"`` and ``"pp"``."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError("mesh must be a torch.distributed.DeviceMesh, got "
                        f"{type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim != 2 or sorted(names) != ["dp", "pp"]:
        raise ValueError("mesh must have 2 dimensions named 'dp' and 'pp' "
                         "(init_device_mesh(..., mesh_dim_names=('dp', "
                         f"'pp'))), got {mesh.ndim} named {names}")
    return mesh.get_group("pp"), mesh.get_group("dp")


def _origin(error: BaseException, own: int) -> int:
    """The pipeline rank whose failure `error` reports (pipegear's messages
    name it), else `own`: the error is this rank's."""
    m = _ORIGIN.search(str(error))
    if m is None:
        return own
    return int(next(g for g in m.groups() if g is not None))


class Replicas:
    """One rank's side of the data-parallel replicas of its stage.

    ``pp_group``: this replica's pipeline (rank r runs stage r);
    ``dp_group``: the ranks running this stage in every replica (rank d is
    replica d); ``params``: this rank's parameters (each once), ``buffers``
    its buffers; ``config``: what every replica must agree on.
    """

    def __init__(self, pp_group: Any, dp_group: Any, params: list,
                 buffers: list, config: dict, timeout: float,
                 idle_timeout: float, bucket_cap_mb: float) -> None:
        self.pp_group = pp_group
        self.dp_group = dp_group
        self.dp = dp_group.rank()
        self.pp = pp_group.rank()
        self.replicas = dp_group.size()
        self.stages = pp_group.size()
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.params = params
        self.batch_norms: list = []  # DeferredBatchNorm layers (distributed.py)
        self.broken = False
        self._stash: list = []
        self._pending: list = []  # (bucket, flat, work) in flight
        self._hook_error: Optional[BaseException] = None
        self._reduced = False
        self._events: list = []  # [bucket, start_ns, end_ns]
        # Whether the sums of the last step started within the pipeline's
        # step (after the last backward cell), not after it.
        self.started_in_step = False
        # How many buckets of the last step started within the last cell.
        self.launched_in_cell = 0
        # The whole mesh, [dp][pp] -> global rank, and the agreement on the
        # configuration: one gather over this stage's replicas.
        mine = dict(config, pipeline=dist.get_process_group_ranks(pp_group),
                    params=[(tuple(p.shape), str(p.dtype)) for p in params],
                    buffers=[(tuple(b.shape), str(b.dtype)) for b in buffers])
        every: list = [None] * self.replicas
        dist.all_gather_object(every, mine, group=dp_group)
        self.mesh = [e["pipeline"] for e in every]
        for d, other in enumerate(every):
            for key in mine:
                if key == "pipeline":
                    if len(other[key]) != len(mine[key]):
                        raise ValueError(
                            f"replica {d} has {len(other[key])} stages, this "
                            f"one (replica {self.dp}) {len(mine[key])}: every "
                            "replica needs the same pipeline")
                    continue
                if other[key] != mine[key]:
                    raise ValueError(
                        f"replicas disagree on {key}: {other[key]!r} on "
                        f"{self.where(self.pp, d)} but {mine[key]!r} on "
                        f"{self.where(self.pp)}; every replica must build "
                        "the same pipeline")
        # Every replica starts from the first one's values.
        src = dist.get_global_rank(dp_group, 0)
        with torch.no_grad():
            for t in list(params) + list(buffers):
                dist.broadcast(t.data, src=src, group=dp_group)
        self._buckets = self._make_buckets(int(bucket_cap_mb * 2 ** 20))
        # Within the last backward cell (arm()), a bucket whose parameters
        # all got their last gradient starts at once; buckets start in
        # index order on every replica (a collective's order must agree).
        self._armed = False
        self._ready = [0] * len(self._buckets)
        self._seen: set = set()
        self._next = 0  # the next bucket to start
        self._hooks: list = []  # while armed: one per parameter

    # -- naming ------------------------------------------------------------
    def global_rank(self, pp: int, dp: Optional[int] = None) -> int:
        return self.mesh[self.dp if dp is None else dp][pp]

    def where(self, pp: int, dp: Optional[int] = None) -> str:
        dp = self.dp if dp is None else dp
        return f"rank {self.global_rank(pp, dp)} (dp={dp}, pp={pp})"

    # -- buckets -----------------------------------------------------------
    def _make_buckets(self, cap: int) -> list:
        """Parameters that take gradients, last layers first (the order the
        drain produces them), in buckets of at most `cap` bytes (a larger
        parameter alone) of one dtype and device."""
        buckets: list = []
        current: list = []
        size = 0
        for p in reversed(self.params):
            if not p.requires_grad:
                continue
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > cap
                            or current[0].dtype != p.dtype
                            or current[0].device != p.device):
                buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            buckets.append(current)
        return buckets

    @property
    def buckets(self) -> list:
        return self._buckets

    @property
    def started(self) -> bool:
        """Whether this step's gradient sums have all started."""
        return self._reduced

    # -- a step --------------------------------------------------------------
    def begin(self) -> None:
        """Before a step: sets every gradient aside, so that only this
        step's is summed over the replicas (an earlier step's, accumulated,
        was summed then)."""
        self._stash = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self._pending = []
        self._hook_error = None
        self._reduced = False
        self._events = []
        self._disarm()
        self._ready = [0] * len(self._buckets)
        self._seen = set()
        self._next = 0

    def arm(self) -> None:
        """Just before this stage's last backward cell: every gradient
        accumulated from now on is its parameter's last of the step. The
        hooks live only as long as that cell (no Python call for the
        other micro-batches' gradients)."""
        self._disarm()
        self._armed = True
        for b, bucket in enumerate(self._buckets):
            for p in bucket:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    functools.partial(self._accumulated, b)))

    def _disarm(self) -> None:
        self._armed = False
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _accumulated(self, b: int, param: Tensor) -> None:
        if not self._armed or self._reduced:
            return
        if id(param) in self._seen:
            # Accumulated again within the last cell (a parameter used twice
            # in one backward through a reentrant checkpoint): a sum started
            # already would miss it. Refused on every replica after the
            # step rather than summing a part.
            if b < self._next and self._hook_error is None:
                self._hook_error = ValueError(
                    f"pipegear: {self.where(self.pp)}: a parameter of shape "
                    f"{tuple(param.shape)} accumulated a gradient again after "
                    "the sum of its bucket over the replicas had started (a "
                    "parameter used twice in one backward pass, through a "
                    "reentrant torch.utils.checkpoint, say); pass "
                    "overlap=False to sum after the step")
            return
        self._seen.add(id(param))
        self._ready[b] += 1
        while (self._next < len(self._buckets) and
               self._ready[self._next] == len(self._buckets[self._next])):
            self._launch(self._next)
            self._next += 1

    def start_reduction(self, raise_refusal: bool = True) -> None:
        """Starts summing this step's gradients over the replicas, the
        buckets not started yet, without waiting: after this stage's last
        backward cell (called from within the step) or after the step.
        Within the step (`raise_refusal`), a sum this replica must refuse
        (a gradient accumulated after its bucket started) raises once every
        bucket started, as a failure of the step: every rank of the
        pipeline raises, and the other replicas learn it after the step."""
        if self._reduced:
            return
        self._reduced = True
        self._disarm()
        self.launched_in_cell = self._next
        while self._next < len(self._buckets):
            self._launch(self._next)
            self._next += 1
        if raise_refusal and isinstance(self._hook_error, ValueError):
            raise self._hook_error

    def _launch(self, i: int) -> None:
        bucket = self._buckets[i]
        try:
            start = time.monotonic_ns()
            # The gradients, then one flag per parameter: whether this
            # replica has a gradient for it (a parameter no replica used
            # keeps None, as in the plain model, not zeros that weight
            # decay or momentum would act on).
            flat = torch.cat([
                (p.grad if p.grad is not None else
                 torch.zeros_like(p)).reshape(-1) for p in bucket] + [
                torch.tensor([float(p.grad is not None) for p in bucket],
                             dtype=bucket[0].dtype, device=bucket[0].device)])
            work = dist.all_reduce(flat, group=self.dp_group, async_op=True)
            self._pending.append((bucket, flat, work))
            event = [i, start, None]
            self._events.append(event)
            # When the sum completed (the backend's thread), for the
            # timeline; the wait comes after the step.
            work.get_future().then(functools.partial(self._done, event))
        except BaseException as e:  # noqa: BLE001 - reported after the step
            if self._hook_error is None:
                self._hook_error = e

    @staticmethod
    def _done(event: list, _future: Any) -> None:
        event[2] = time.monotonic_ns()

    def last_events(self) -> list:
        """The gradient sums of the last step: (bucket, start_ns, end_ns),
        on the clock of the pipeline's cells (``last_events``)."""
        return [tuple(e) for e in self._events if e[2] is not None]

    def pre_step(self, total: float, error: Optional[BaseException]
                 ) -> tuple[float, Optional[str], str]:
        """Last stages, before the step: every replica's count (what its
        mean loss averages over) and whether it failed before the step.
        Returns (the global count, another replica's failure or None, its
        error type)."""
        mine = torch.tensor([float(total), 0.0 if error is None else
                             (2.0 if isinstance(error, TypeError) else 1.0)],
                            dtype=torch.float64)
        every = self._gather(mine, self.idle_timeout + self.timeout,
                             "the counts of the replicas' losses")
        failed = [d for d in range(self.replicas) if every[d][1] != 0]
        if not failed:
            return float(sum(e[0] for e in every)), None, "ValueError"
        # Every replica knows one failed: all of them gather the texts.
        texts: list = [None] * self.replicas
        dist.all_gather_object(texts, None if error is None else str(error),
                               group=self.dp_group)
        others = [d for d in failed if d != self.dp]
        if not others:
            return 0.0, None, "ValueError"
        d = others[0]
        kind = "TypeError" if every[d][1] == 2 else "ValueError"
        return 0.0, (f"pipegear: {self.where(self.pp)}: {self.where(self.pp, d)}"
                     f" failed before the step: {texts[d]}"), kind

    def end(self, loss: Optional[Tensor], error: Optional[BaseException],
            grad: bool) -> Optional[Tensor]:
        """After this rank's step (`error`: its failure): agrees with the
        replicas on the outcome, waits for the gradient sums (starting them
        if the step did not) and returns the loss of the global batch (the
        sum of the replicas' weighted losses). Raises when any replica
        failed, naming the rank that failed and its coordinates."""
        stash, self._stash = self._stash, []
        self._disarm()  # the step is over, whatever happened in it
        try:
            if self.broken:
                raise RuntimeError(
                    f"pipegear: {self.where(self.pp)}: the replicas of this "
                    "stage lost a peer in an earlier step: destroy the "
                    "process groups and restart")
            if grad:
                # A rank whose step failed still takes part, with zeros,
                # so that every replica makes the same collectives.
                self.start_reduction(raise_refusal=False)
            origin = -1 if error is None else _origin(error, self.pp)
            value = float(loss) if loss is not None else 0.0
            mine = torch.tensor([0.0 if error is None else 1.0, origin, value,
                                 1.0 if self._hook_error is not None else 0.0],
                                dtype=torch.float64)
            every = self._gather(mine, 2 * self.timeout,
                                 "the outcome of the step")
            for bucket, flat, work in self._pending:
                self._wait(work, self.timeout, "the gradient sum")
        except BaseException as e:
            self._pending = []
            self._restore(stash)
            if error is not None:
                raise error from None
            raise e
        pending, self._pending = self._pending, []
        if error is not None:
            self._restore(stash)
            if isinstance(error, BaseException):
                error.add_note(self._mesh_note())
            raise error
        failed = [d for d in range(self.replicas) if every[d][0] != 0]
        if failed:
            self._restore(stash)
            d = failed[0]
            pp = int(every[d][1])
            raise RuntimeError(
                f"pipegear: {self.where(self.pp)}: the step failed on "
                f"{self.where(pp, d)} (replica {d}'s pipeline raised; see "
                "that rank's error)")
        if self._hook_error is not None or any(e[3] for e in every):
            self._restore(stash)
            if isinstance(self._hook_error, ValueError):
                raise self._hook_error
            if self._hook_error is None:
                d = next(d for d in range(self.replicas) if every[d][3])
                raise RuntimeError(
                    f"pipegear: {self.where(self.pp)}: the gradient sum "
                    f"failed on {self.where(self.pp, d)} (see its error)")
            raise RuntimeError(
                f"pipegear: {self.where(self.pp)}: starting the gradient sum "
                f"failed: {self._hook_error}")
        with torch.no_grad():
            for bucket, flat, _ in pending:
                offset = 0
                flags = flat[-len(bucket):]
                for k, p in enumerate(bucket):
                    n = p.numel()
                    p.grad = (flat[offset:offset + n].view_as(p).clone()
                              if flags[k] > 0 else None)
                    offset += n
        self._restore(stash)
        self._commit_batch_norms()
        if loss is None:
            return None
        return torch.tensor(sum(e[2] for e in every), dtype=torch.float64
                            ).to(loss.dtype)

    def _commit_batch_norms(self) -> None:
        """After a step that succeeded on every replica: each
        DeferredBatchNorm's statistics (per-channel sums and sums of
        squares, counts) summed over the replicas, then committed, so that
        every replica's running statistics are those of the global batch,
        as the plain model's on it (the pipeline commits nothing itself
        with replicas: GPipe._hooks(commit=False)). One all-reduce for all
        the layers, on their device (NCCL sums device tensors), empty
        statistics as zeros."""
        if not self.batch_norms:
            return
        device = self.batch_norms[0].running_mean.device
        parts = []
        for bn in self.batch_norms:
            stats, c = bn._stats, bn.num_features
            if stats.empty():
                parts.append(torch.zeros(2 * c, dtype=torch.float64,
                                         device=device))
            else:
                parts += [stats.sum.detach().double().to(device),
                          stats.sum_squares.detach().double().to(device)]
            parts.append(torch.tensor([stats.count, stats.micro_batches],
                                      dtype=torch.float64, device=device))
        flat = torch.cat(parts)
        self._wait(dist.all_reduce(flat, group=self.dp_group, async_op=True),
                   self.timeout, "the BatchNorm statistics")
        offset = 0
        for bn in self.batch_norms:
            c = bn.num_features
            total, count, micro_batches = (
                flat[offset:offset + 2 * c], int(flat[offset + 2 * c]),
                int(flat[offset + 2 * c + 1]))
            offset += 2 * c + 2
            if micro_batches == 0:
                continue  # no replica accumulated (evaluation)
            where = bn.running_mean.device
            bn._stats.assign(total[:c].to(where), total[c:].to(where),
                             count, micro_batches)
            bn.commit()

    def _restore(self, stash: list) -> None:
        """Adds back the gradients set aside before the step."""
        for p, before in zip(self.params, stash):
            if before is None:
                continue
            if p.grad is None:
                p.grad = before
            else:
                p.grad = before.add_(p.grad)

    def _mesh_note(self) -> str:
        pipeline = ", ".join(f"{p}: {self.where(p)}"
                             for p in range(self.stages))
        return (f"pipegear: this is {self.where(self.pp)}; the ranks the "
                f"error names are replica {self.dp}'s pipeline ranks "
                f"({pipeline})")

    # -- collectives -------------------------------------------------------
    def _gather(self, mine: Tensor, seconds: float, what: str) -> list:
        out = [torch.empty_like(mine) for _ in range(self.replicas)]
        try:
            work = dist.all_gather(out, mine, group=self.dp_group,
                                   async_op=True)
        except BaseException as e:  # noqa: BLE001
            self._lost(what, e)
        self._wait(work, seconds, what)
        return [t.tolist() for t in out]

    def _wait(self, work: Any, seconds: float, what: str) -> None:
        try:
            work.wait(datetime.timedelta(seconds=seconds))
        except BaseException as e:  # noqa: BLE001
            self._lost(what, e)

    def _lost(self, what: str, e: BaseException) -> None:
        self.broken = True
        peers = ", ".join(self.where(self.pp, d) for d in range(self.replicas)
                          if d != self.dp)
        raise RuntimeError(
            f"pipegear: {self.where(self.pp)}: {what} with the other replicas"
            f" of stage {self.pp} ({peers}) failed: a replica is lost or "
            f"hangs: {e}") from e


def scaled_loss(loss_fn: Callable[..., Tensor], scale: float
                ) -> Callable[..., Tensor]:
    """`loss_fn` times `scale` (a replica's share of the global count): the
    sum over replicas of their scaled means is the global batch's mean."""
    if scale == 1.0:
        return loss_fn

    def scaled(output: Any, target: Any) -> Tensor:
        if scale == 0.0:
            # Nothing of this replica's batch counts: its mean is 0/0, whose
            # gradient (nan) would poison the sum; its share is an exact
            # zero, still attached to the output so the drain runs.
            outputs = output if isinstance(output, tuple) else (output,)
            zero = None
            for t in outputs:
                if isinstance(t, Tensor) and t.is_floating_point():
                    term = t.sum() * 0.0
                    zero = term if zero is None else zero + term
            if zero is not None:
                return zero
        return loss_fn(output, target) * scale

    return scaled


def local_count(target: Any, reduction: str, count: Optional[Callable],
                chunks: int) -> float:
    """What this replica's mean loss averages over, as the engine counts it:
    ``count`` of each micro-batch's target (split as the engine splits it),
    else the rows. A sum counts nothing (0)."""
    if reduction == "sum":
        return 0.0
    if target is None:
        raise ValueError("with data-parallel replicas a mean loss needs the "
                         "target on the last rank: its rows (or count=) weigh "
                         "this replica's share of the global batch")
    tensors = list(target) if isinstance(target, (tuple, list)) else [target]
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("the target must be a tensor or a tuple of tensors, "
                        f"got {type(target).__name__}")
    rows = tensors[0].size(0) if tensors[0].dim() else 0
    if rows < 1:
        raise ValueError(f"the target has no rows (shape "
                         f"{tuple(tensors[0].shape)})")
    parts = min(rows, chunks)
    sizes = [rows // parts + (1 if i < rows % parts else 0)
             for i in range(parts)]
    if count is None:
        return float(rows)
    split = [t.split(sizes, 0) for t in tensors]
    total = 0.0
    for j in range(parts):
        part = (tuple(s[j] for s in split) if isinstance(target, tuple)
                else split[0][j])
        total += float(count(part))
    return total

