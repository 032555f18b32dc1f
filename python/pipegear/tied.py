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

from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["Tie", "Ties", "find_ties", "needs_copy", "untie_replicas"]


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
