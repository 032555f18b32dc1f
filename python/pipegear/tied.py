"""Parameters tied across partitions (an embedding and the output head that
reuses its weight, as GPT-2's ``lm_head.weight is transformer.wte.weight``).

A parameter held by modules of several partitions is one parameter of the
pipeline: ``parameters()`` yields it once and ``state_dict()`` lists it under
every name that holds it, exactly as for the plain model. The first
partition using it (the *owner*) computes with the parameter itself; every
other partition computes with a *replica* of its own, installed in place of
the parameter in that partition's modules:

- on the owner's device, an *alias*: a leaf sharing the parameter's storage
  (no copy, in-place updates seen at once) with a gradient of its own;
- on another device, a *copy* on that device, refreshed from the parameter
  before every forward (and step).

After every drain each replica's gradient is added into the parameter's
``.grad``, in partition order, once per step, so the optimizer sees one
parameter with the gradient of all its uses.

Why an alias rather than the parameter itself on one device: two workers
would then add into one ``.grad`` concurrently. That is safe (autograd's
``AccumulateGrad`` node locks a mutex around each addition, and a leaf has
one such node while any graph uses it), but the order of the additions
follows the timing, so the sum differs in its last bits from run to run,
and a pipeline reproduces a seeded step bit for bit (docs/engine.md,
"Randomness"). Each replica is accumulated by one worker, in its schedule's
order, and the sums after the drain run in a fixed order.
"""
from __future__ import annotations

import datetime

from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["DistributedTies", "Tie", "Ties", "find_ties", "needs_copy",
           "untie_replicas"]


def needs_copy(owner: torch.device, device: torch.device) -> bool:
    """Whether a partition on `device` computes with a copy of a parameter
    owned by a partition on `owner` (else with an alias of its storage).
    Tests replace this function to run the copy path on the CPU."""
    from pipegear.gpipe import _same_device

    return not _same_device(owner, device)


class Replica:
    """What partition `partition` computes with instead of the tied
    parameter: a copy on its device, or an alias of the parameter."""

    def __init__(self, partition: int, param: nn.Parameter,
                 copy: bool) -> None:
        self.partition = partition
        self.param = param
        self.copy = copy


class Tie:
    """One parameter used by several partitions.

    ``slots`` lists every place holding it: (partition, qualified name in
    the pipeline, module, attribute name), in module order; ``replicas``
    one :class:`Replica` per partition other than the owner, in order.
    """

    def __init__(self, master: nn.Parameter) -> None:
        self.master = master
        self.slots: list[tuple[int, str, nn.Module, str]] = []
        self.replicas: list[Replica] = []

    @property
    def owner(self) -> int:
        return self.slots[0][0]

    @property
    def partitions(self) -> list[int]:
        return sorted({p for p, _, _, _ in self.slots})

    @property
    def names(self) -> list[str]:
        return [name for _, name, _, _ in self.slots]


def _holds_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def find_ties(named: list[tuple[str, nn.Module]],
              balance: list[int]) -> list[Tie]:
    """The parameters of `named` that modules of more than one partition
    hold, in order of first use.

    Raises:
        ValueError: a module holding parameters is in two partitions (a
            module used twice, not a tie: its forward would run on two
            workers, and a replica could not be installed in it for one
            partition only). Give each use its own module sharing the
            parameter (``head.weight = embedding.weight``).
    """
    module_at: dict[int, tuple[int, str]] = {}
    uses: dict[int, Tie] = {}
    offset = 0
    for partition, size in enumerate(balance):
        for layer_name, layer in named[offset:offset + size]:
            # remove_duplicate=False: a parameter held by two modules of
            # one layer has two names, as in the plain model's state_dict.
            for path, module in layer.named_modules(remove_duplicate=False):
                where = f"{layer_name}.{path}" if path else layer_name
                if _holds_parameters(module):
                    first = module_at.setdefault(id(module),
                                                 (partition, where))
                    if first[0] != partition:
                        raise ValueError(
                            f"module {where!r} (partition {partition}) is "
                            f"module {first[1]!r} (partition {first[0]}): a "
                            "module with parameters cannot be in two "
                            "partitions; to tie parameters across partitions "
                            "give each use its own module holding the same "
                            "parameter (e.g. head.weight = embedding.weight)")
                for attr, p in module._parameters.items():
                    if p is None:
                        continue
                    tie = uses.setdefault(id(p), Tie(p))
                    name = f"{where}.{attr}"
                    if name not in tie.names:
                        tie.slots.append((partition, name, module, attr))
        offset += size
    return [t for t in uses.values() if len(t.partitions) > 1]


class Ties:
    """The ties of one pipeline: installs the replicas, refreshes them
    before a pass and adds their gradients into the parameters after one."""

    def __init__(self, ties: list[Tie], devices: list[torch.device],
                 copy: Optional[Callable[[torch.device, torch.device],
                                         bool]] = None) -> None:
        copy = copy or needs_copy
        self.ties = ties
        for tie in ties:
            for partition in tie.partitions[1:]:
                if copy(devices[tie.owner], devices[partition]):
                    # Moved to the partition's device with the partition.
                    param = nn.Parameter(tie.master.detach().clone(),
                                         tie.master.requires_grad)
                    tie.replicas.append(Replica(partition, param, True))
                else:
                    # Shares the storage and the version counter.
                    param = nn.Parameter(tie.master.detach(),
                                         tie.master.requires_grad)
                    tie.replicas.append(Replica(partition, param, False))
            for partition, _, module, attr in tie.slots:
                for r in tie.replicas:
                    if r.partition == partition:
                        module._parameters[attr] = r.param
        # replica -> its parameter, for named_parameters() / state_dict().
        self._master_of = {id(r.param): t.master for t in ties
                           for r in t.replicas}
        self._replica_names = [(name, t.master) for t in ties
                               for p, name, _, _ in t.slots if p != t.owner]

    def __bool__(self) -> bool:
        return bool(self.ties)

    def master_of(self, p: nn.Parameter) -> nn.Parameter:
        """The pipeline's parameter for `p` (`p` itself unless a replica)."""
        return self._master_of.get(id(p), p)

    def replica_names(self) -> list[tuple[str, nn.Parameter]]:
        """(qualified name, parameter) of every slot holding a replica."""
        return list(self._replica_names)

    def refresh(self) -> None:
        """Before a pass, every replica takes its parameter's value, dtype
        and requires_grad. An alias whose parameter got new storage (a
        dtype cast, ``param.data = ...``) shares the new one; a copy is
        copied into (whatever changed the parameter: the optimizer,
        ``load_state_dict``, a write through ``.data``). A copy goes into
        ``replica.data``, leaving the replica's version counter alone, so a
        forward whose backward is still pending does not fail its version
        check because a later forward refreshed the same value. Gradients a
        failed drain left on a replica are dropped (the parameter keeps what
        the owner's cells accumulated: zero the gradients before retrying,
        as after any failed step)."""
        with torch.no_grad():
            for tie in self.ties:
                source = tie.master.detach()
                for r in tie.replicas:
                    replica = r.param
                    if not r.copy:
                        if replica.data_ptr() != source.data_ptr() or \
                                replica.dtype != source.dtype or \
                                replica.shape != source.shape:
                            replica.data = tie.master.data
                    elif (replica.dtype != source.dtype
                          or replica.shape != source.shape):
                        replica.data = source.to(replica.device, copy=True)
                    else:
                        replica.data.copy_(source)
                    replica.requires_grad_(tie.master.requires_grad)
                    replica.grad = None

    def accumulate(self) -> None:
        """After a drain: adds each replica's gradient into its parameter's
        ``.grad`` (as AccumulateGrad would), in partition order, and clears
        the replica's."""
        with torch.no_grad():
            for tie in self.ties:
                master = tie.master
                for r in tie.replicas:
                    grad = r.param.grad
                    if grad is None:
                        continue
                    r.param.grad = None
                    grad = grad.to(master.device)
                    if master.grad is None:
                        master.grad = grad
                    else:
                        master.grad.add_(grad)

    def spec(self) -> list[tuple[nn.Parameter, list[str]]]:
        """(parameter, names of the slots holding a replica), for copies of
        the pipeline: the copy puts the parameter back into those slots and
        ties again."""
        return [(t.master, [name for p, name, _, _ in t.slots
                            if p != t.owner]) for t in self.ties]


def untie_replicas(named: list[tuple[str, nn.Module]],
                   spec: Optional[list[tuple[nn.Parameter, list[str]]]]
                   ) -> None:
    """Puts each parameter of `spec` back into the slots its replicas held
    (a copied pipeline's layers), so that it is tied again when built."""
    layers = dict(named)
    for master, names in spec or ():
        for name in names:
            layer_name, _, rest = name.partition(".")
            path, _, attr = rest.rpartition(".")
            module = layers[layer_name]
            if path:
                module = module.get_submodule(path)
            module._parameters[attr] = master


# ---- across ranks (DistributedGPipe) --------------------------------------


def _layer_of(name: str) -> str:
    return name.partition(".")[0]


class DistributedTies:
    """Parameters tied across the ranks of a :class:`DistributedGPipe`.

    Each rank holds its own copy of a tied parameter (its slice is all it
    has). The ranks holding one (the tie's *members*) share a process
    group of just them, made with ``torch.distributed.new_group`` as
    Megatron-LM makes its embedding group: at construction the first
    member broadcasts the value, and after every drain the members sum the
    step's gradient over that group, so every copy receives the gradient
    of all uses and, updated by the same optimizer, stays equal.

    ``groups``: the ties, each a list of qualified parameter names (layer
    name, then the path inside the layer); ``layer_names``: every layer's
    name, in order; ``rank``'s parameters by name in ``local``.
    """

    def __init__(self, groups: list[list[str]], layer_names: list[str],
                 balance: list[int], rank: int,
                 local: dict[str, nn.Parameter], process_group: Any,
                 timeout: float) -> None:
        import torch.distributed as dist

        self.ties: list[tuple[list[str], list[int], Optional[nn.Parameter],
                              Any]] = []
        self._stashed: list[Optional[torch.Tensor]] = []
        if not groups:  # no collective at all: any process group works
            return
        # The rank of each layer (partition s runs on rank s % K: several
        # partitions per rank when interleaved).
        stage_of = {}
        offset = 0
        for stage, size in enumerate(balance):
            for name in layer_names[offset:offset + size]:
                stage_of[name] = stage % process_group.size()
            offset += size
        # (member ranks, this rank's parameter or None) per tie; every rank
        # computes the members of every tie from the names alone.
        resolved = []
        for i, group in enumerate(groups):
            if isinstance(group, (str, bytes)) or len(group) < 2:
                raise ValueError(f"tied_parameters[{i}] must name at least 2 "
                                 f"parameters, got {group!r}")
            for name in group:
                if _layer_of(name) not in stage_of:
                    raise ValueError(
                        f"tied_parameters[{i}] names {name!r}, but the model "
                        f"has no layer {_layer_of(name)!r} (layers: "
                        f"{', '.join(layer_names)})")
            members = sorted({stage_of[_layer_of(n)] for n in group})
            resolved.append((list(group), members))

        # What this rank holds of each tie it is a member of; gathered from
        # every rank so that each raises the same error for a mistake only
        # one rank can see (a missing parameter, another shape).
        mine: dict[int, Any] = {}
        params: dict[int, nn.Parameter] = {}
        for i, (group, members) in enumerate(resolved):
            if rank not in members:
                continue
            held = [n for n in group if stage_of[_layer_of(n)] == rank]
            missing = [n for n in held if n not in local]
            found = [local[n] for n in held if n in local]
            distinct = len({id(p) for p in found})
            mine[i] = dict(names=held, missing=missing, distinct=distinct,
                           shape=tuple(found[0].shape) if found else None,
                           dtype=str(found[0].dtype) if found else None)
            if found and not missing and distinct == 1:
                params[i] = found[0]
        reports: list = [None] * process_group.size()
        dist.all_gather_object(reports, mine, group=process_group)
        for i, (group, members) in enumerate(resolved):
            seen = [(r, reports[r][i]) for r in members]
            for r, info in seen:
                if info["missing"]:
                    raise ValueError(
                        f"tied_parameters[{i}]: rank {r} holds layer "
                        f"{_layer_of(info['missing'][0])!r} but it has no "
                        f"parameter {info['missing'][0]!r}")
                if info["distinct"] > 1:
                    raise ValueError(
                        f"tied_parameters[{i}]: {', '.join(info['names'])} "
                        f"are {info['distinct']} different parameters on "
                        f"rank {r}; within a rank, tie them as modules do "
                        "(b.weight = a.weight)")
            first_rank, first = seen[0]
            for r, info in seen[1:]:
                for what in ("shape", "dtype"):
                    if info[what] != first[what]:
                        raise ValueError(
                            f"tied_parameters[{i}]: a tie across ranks needs "
                            f"one {what}, but {first['names'][0]!r} on rank "
                            f"{first_rank} has {what} {first[what]} and "
                            f"{info['names'][0]!r} on rank {r} has {what} "
                            f"{info[what]}")

        # One group per set of members; made in the same order everywhere.
        whole = process_group.size() == dist.get_world_size()
        self._groups: dict[tuple[int, ...], Any] = {}
        seconds = datetime.timedelta(seconds=timeout)
        for i, (group, members) in enumerate(resolved):
            if len(members) < 2:
                continue  # all on one rank: one parameter there already
            key = tuple(members)
            if key not in self._groups:
                ranks = [dist.get_global_rank(process_group, r)
                         for r in members]
                if whole:  # every rank of the job creates every group
                    self._groups[key] = dist.new_group(ranks, timeout=seconds)
                elif rank in members:  # only the members, in the same order
                    self._groups[key] = dist.new_group(
                        ranks, timeout=seconds,
                        use_local_synchronization=True)
            if rank in members:
                self.ties.append((group, members, params[i],
                                  self._groups[key]))
        # The first member's value, everywhere.
        with torch.no_grad():
            for group, members, param, sub in self.ties:
                src = dist.get_global_rank(process_group, members[0])
                dist.broadcast(param.data, src=src, group=sub)

    def __bool__(self) -> bool:
        return bool(self.ties)

    def begin(self) -> None:
        """Before a step: sets each tied parameter's gradient aside, so
        that the sum after the drain adds only this step's (a gradient
        accumulated over earlier steps was summed then already). What a
        drain that failed before its end left set aside is given back
        first."""
        if self._stashed:
            self.end(ok=False)
        self._stashed = []
        for _, _, param, _ in self.ties:
            self._stashed.append(param.grad)
            param.grad = None

    def end(self, ok: bool = True) -> None:
        """After the drain (every member calls it): sums the step's
        gradient of each tied parameter over its members and adds back what
        was set aside. ``ok=False`` (the step failed on every rank) sums
        nothing, only adds back."""
        import torch.distributed as dist

        stashed, self._stashed = self._stashed, []
        with torch.no_grad():
            for (_, _, param, sub), before in zip(self.ties, stashed or
                                                  [None] * len(self.ties)):
                grad = param.grad
                if ok:
                    # Every member takes part, whether or not it has a
                    # gradient (a member whose uses got none adds zeros).
                    if grad is None:
                        grad = torch.zeros_like(param)
                    dist.all_reduce(grad, group=sub)
                    if not param.requires_grad:
                        grad = None
                if before is not None and grad is not None:
                    grad = before.add_(grad)
                elif before is not None:
                    grad = before
                param.grad = grad
