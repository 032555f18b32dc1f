"""Parameters tied across partitions (an embedding and the output head that
reuses its weight, as GPT-2's ``lm_head.weight is transformer.wte.weight``).

A parameter held by modules of several partitions is one parameter of the
pipeline: ``parameters()`` yields it once and ``state_dict()`` lists it under
every name that holds it, exactly as for the plain model. How the stages
compute with it depends on where they are:

- partitions on the device of the first partition using it (the *owner*)
  use the parameter itself. Their workers' backward cells may accumulate its
  gradient at the same time: autograd's ``AccumulateGrad`` node holds a
  mutex around each accumulation, and a leaf has one such node while any
  graph uses it, so no addition is lost (tests/python/test_tied.py checks
  this with integer-valued gradients, whose sums are exact in any order);
- a partition on another device computes with a *replica* on its device (one
  per device, shared by the partitions there), installed in place of the
  parameter in that partition's modules. Before every forward (and step)
  the replicas are refreshed from the parameter, and after every drain their
  gradients are added into the parameter's ``.grad``, once per step, so the
  optimizer sees one parameter with the gradient of all its uses.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["Tie", "Ties", "find_ties", "needs_replica"]


def needs_replica(owner: torch.device, device: torch.device) -> bool:
    """Whether a partition on `device` computes with a replica of a
    parameter owned by a partition on `owner` (tests replace this function
    to run the replica path on the CPU)."""
    from pipegear.gpipe import _same_device

    return not _same_device(owner, device)


class Tie:
    """One parameter used by several partitions.

    ``slots`` lists every place holding it: (partition, qualified name in
    the pipeline, module, attribute name), in module order; ``replicas`` the
    replica of each device other than the owner's (device, replica,
    partitions using it).
    """

    def __init__(self, master: nn.Parameter) -> None:
        self.master = master
        self.slots: list[tuple[int, str, nn.Module, str]] = []
        self.replicas: list[tuple[torch.device, nn.Parameter, list[int]]] = []

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
                 replicate: Optional[Callable[[torch.device, torch.device],
                                              bool]] = None) -> None:
        replicate = replicate or needs_replica
        self.ties = ties
        for tie in ties:
            owner_device = devices[tie.owner]
            for partition in tie.partitions:
                device = devices[partition]
                if partition == tie.owner or not replicate(owner_device,
                                                           device):
                    continue
                for d, _, parts in tie.replicas:
                    if d == device:
                        parts.append(partition)
                        break
                else:
                    # The partition is moved to `device` after this, with
                    # the replica in its modules.
                    replica = nn.Parameter(tie.master.detach().clone(),
                                           tie.master.requires_grad)
                    tie.replicas.append((device, replica, [partition]))
            for partition, _, module, attr in tie.slots:
                for _, replica, parts in tie.replicas:
                    if partition in parts:
                        module._parameters[attr] = replica
        # replica -> its parameter, for named_parameters() / state_dict().
        self._master_of = {id(r): t.master for t in ties
                           for _, r, _ in t.replicas}
        self._replica_names = [(name, t.master) for t in ties
                               for p, name, _, _ in t.slots
                               if any(p in parts for _, _, parts in t.replicas)]

    def __bool__(self) -> bool:
        return any(t.replicas for t in self.ties)

    def master_of(self, p: nn.Parameter) -> nn.Parameter:
        """The pipeline's parameter for `p` (`p` itself unless a replica)."""
        return self._master_of.get(id(p), p)

    def replica_names(self) -> list[tuple[str, nn.Parameter]]:
        """(qualified name, parameter) of every slot holding a replica."""
        return list(self._replica_names)

    def _replicas(self) -> Iterable[tuple[nn.Parameter, nn.Parameter]]:
        for tie in self.ties:
            for _, replica, _ in tie.replicas:
                yield tie.master, replica

    def refresh(self) -> None:
        """Before a pass: every replica takes its parameter's value, dtype
        and requires_grad. The copy goes into ``replica.data``, leaving the
        replica's version counter alone, so a forward whose backward is
        still pending does not fail its version check because a later
        forward refreshed the same, unchanged value. Gradients a failed
        drain left on a replica are dropped (the parameter keeps what the
        owner's cells accumulated: zero the gradients before retrying)."""
        with torch.no_grad():
            for master, replica in self._replicas():
                source = master.detach()
                if (replica.dtype != source.dtype
                        or replica.shape != source.shape):
                    replica.data = source.to(replica.device, copy=True)
                else:
                    replica.data.copy_(source)
                replica.requires_grad_(master.requires_grad)
                replica.grad = None

    def accumulate(self) -> None:
        """After a drain: adds each replica's gradient into its parameter's
        ``.grad`` (as AccumulateGrad would) and clears the replica's."""
        with torch.no_grad():
            for master, replica in self._replicas():
                grad = replica.grad
                if grad is None:
                    continue
                replica.grad = None
                grad = grad.to(master.device)
                if master.grad is None:
                    master.grad = grad
                else:
                    master.grad.add_(grad)

    def spec(self) -> list[tuple[nn.Parameter, list[str]]]:
        """(parameter, names of the slots holding a replica), for copies:
        the copy puts the parameter back into those slots and ties again."""
        return [(t.master, [name for p, name, _, _ in t.slots
                            if any(p in parts for _, _, parts in t.replicas)])
                for t in self.ties if t.replicas]


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
