"""Skip connections: a layer stashes a named tensor, a later layer pops it.

The API of torchgpipe's ``torchgpipe.skip`` (same names, same semantics),
so that a model written for it runs by changing the import::

    from pipegear.skip import pop, skippable, stash

    @skippable(stash=["down1"])
    class Down(nn.Module):
        def forward(self, x):
            yield stash("down1", x)
            return self.conv(x)

    @skippable(pop=["down1"])
    class Up(nn.Module):
        def forward(self, x):
            skip = yield pop("down1")
            return self.conv(x) + skip

In a pipeline (``pipegear.GPipe``), a skip between two partitions goes
straight from the stashing stage to the popping one (one copy, not through
the stages between) and its gradient straight back; a skip inside one
partition never leaves it. Outside a pipeline the layers hand skips over
through the calling thread's :class:`SkipTracker`, so the plain
``nn.Sequential`` computes the same thing. docs/skip.md has the details.
"""
from __future__ import annotations

import itertools
import threading
import types
from contextlib import contextmanager
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator,
                    Optional, Tuple, Type)

import torch
from torch import nn

__all__ = ["Namespace", "SkipError", "SkipTracker", "current_skip_tracker", "pop",
           "skippable", "stash", "use_skip_tracker", "verify_skippables"]


class Namespace:
    """Isolates skip names: two layers stash ``'x'`` without clashing when
    each pair of stash and pop is isolated in a namespace of its own
    (``Layer().isolate(ns)``). A copy equals its original.

    Namespaces are numbered in the order a process makes them, so that the
    ranks of a ``DistributedGPipe``, which build the model alike, name the
    same namespace alike."""

    __slots__ = ("id",)

    def __init__(self) -> None:
        self.id = next(_namespace_ids)

    def __repr__(self) -> str:
        return f"<Namespace {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Namespace) and self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __lt__(self, other: "Namespace") -> bool:
        return self.id < other.id


_namespace_ids = itertools.count(1)


class SkipError(ValueError, RuntimeError):
    """A layer stashed or popped what it did not declare, did not stash or
    pop what it declared, or popped a name nothing stashed. A ValueError
    (pipegear's type for a user mistake) that is also the RuntimeError
    torchgpipe raised, so code catching either keeps working."""


# Where a layer's skips live unless it was isolated.
_DEFAULT_NAMESPACE = Namespace()

SkipKey = Tuple[Namespace, str]


class stash:  # noqa: N801 - torchgpipe's name
    """``yield stash(name, tensor)`` in a skippable layer's forward: keeps
    ``tensor`` (or None) for the layer that pops ``name``."""

    __slots__ = ("name", "tensor")

    def __init__(self, name: str, tensor: Optional[torch.Tensor]) -> None:
        self.name = name
        self.tensor = tensor


class pop:  # noqa: N801 - torchgpipe's name
    """``tensor = yield pop(name)`` in a skippable layer's forward: the
    tensor an earlier layer stashed as ``name``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class SkipTracker:
    """The stashed tensors not popped yet, by (namespace, name)."""

    def __init__(self) -> None:
        self.tensors: Dict[SkipKey, Optional[torch.Tensor]] = {}

    def save(self, key: SkipKey, tensor: Optional[torch.Tensor]) -> None:
        self.tensors[key] = tensor

    def load(self, key: SkipKey) -> Optional[torch.Tensor]:
        try:
            return self.tensors.pop(key)
        except KeyError:
            raise SkipError(
                f"pop({key[1]!r}) found no tensor stashed under that name: no "
                "layer ran before it that stashed it (in a pipeline, the "
                "stash must be in an earlier layer of the same nn.Sequential)"
            ) from None


_local = threading.local()


def current_skip_tracker() -> SkipTracker:
    """The calling thread's tracker (a new one at a thread's first call)."""
    tracker = getattr(_local, "tracker", None)
    if tracker is None:
        tracker = _local.tracker = SkipTracker()
    return tracker


@contextmanager
def use_skip_tracker(tracker: SkipTracker) -> Iterator[SkipTracker]:
    """Makes ``tracker`` the calling thread's tracker inside the block."""
    previous = getattr(_local, "tracker", None)
    _local.tracker = tracker
    try:
        yield tracker
    finally:
        _local.tracker = previous


class Skippable(nn.Module):
    """A layer made by :func:`skippable`: it wraps the decorated class's
    module (``self.module``) and runs its generator forward."""

    module_cls: Type[nn.Module]
    stashable_names: FrozenSet[str]
    poppable_names: FrozenSet[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.module = self.module_cls(*args, **kwargs)
        self.namespaces: Dict[str, Namespace] = {}

    def __repr__(self) -> str:
        return f"@skippable({self.module})"

    def namespaced(self, name: str) -> SkipKey:
        """The (namespace, name) key of one of the layer's skip names."""
        return self.namespaces.get(name, _DEFAULT_NAMESPACE), name

    def stashable(self) -> Iterable[SkipKey]:
        """The keys the layer stashes."""
        return [self.namespaced(n) for n in sorted(self.stashable_names)]

    def poppable(self) -> Iterable[SkipKey]:
        """The keys the layer pops."""
        return [self.namespaced(n) for n in sorted(self.poppable_names)]

    def isolate(self, ns: Namespace, *,
                only: Optional[Iterable[str]] = None) -> "Skippable":
        """Puts the layer's skip names (or those in ``only``) in ``ns``;
        returns the layer."""
        names = (self.stashable_names | self.poppable_names
                 if only is None else frozenset(only))
        for name in names:
            self.namespaces[name] = ns
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        tracker = current_skip_tracker()
        result = self.module(*args, **kwargs)
        stashed, popped = set(), set()
        if isinstance(result, types.GeneratorType):
            result = self._drive(result, tracker, stashed, popped)
        missing = self.stashable_names - stashed
        if missing:
            raise SkipError(f"{type(self).__name__} declared "
                            f"{_names(missing)} as stashable but did not "
                            "stash them")
        missing = self.poppable_names - popped
        if missing:
            raise SkipError(f"{type(self).__name__} declared "
                            f"{_names(missing)} as poppable but did not "
                            "pop them")
        return result

    def _drive(self, gen: Any, tracker: SkipTracker, stashed: set,
               popped: set) -> Any:
        sent: Any = None
        while True:
            try:
                command = gen.send(sent)
            except StopIteration as stop:
                return stop.value
            sent = None
            if isinstance(command, stash):
                if command.name not in self.stashable_names:
                    raise SkipError(
                        f"{type(self).__name__} stashed {command.name!r}, which "
                        "it did not declare: @skippable(stash=[...]) lists "
                        f"{_names(self.stashable_names) or 'nothing'}")
                tracker.save(self.namespaced(command.name), command.tensor)
                stashed.add(command.name)
            elif isinstance(command, pop):
                if command.name not in self.poppable_names:
                    raise SkipError(
                        f"{type(self).__name__} popped {command.name!r}, which "
                        "it did not declare: @skippable(pop=[...]) lists "
                        f"{_names(self.poppable_names) or 'nothing'}")
                sent = tracker.load(self.namespaced(command.name))
                popped.add(command.name)
            else:
                raise TypeError(
                    f"{type(self).__name__}.forward yielded a "
                    f"{type(command).__name__}; a skippable layer yields "
                    "stash(name, tensor) or pop(name) only")


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in sorted(names))


def skippable(stash: Iterable[str] = (),
              pop: Iterable[str] = ()) -> Callable[[Type[nn.Module]],
                                                   Type[Skippable]]:
    """Class decorator: the decorated module's ``forward`` may be a
    generator that yields ``stash(name, tensor)`` for each name in
    ``stash`` and ``pop(name)`` for each name in ``pop``."""
    stashable_names = frozenset(stash)
    poppable_names = frozenset(pop)

    def extend(module_cls: Type[nn.Module]) -> Type[Skippable]:
        return type(module_cls.__name__, (Skippable,), {
            "module_cls": module_cls,
            "stashable_names": stashable_names,
            "poppable_names": poppable_names,
            "__qualname__": module_cls.__qualname__,
            "__module__": module_cls.__module__,
            "__doc__": module_cls.__doc__,
        })

    return extend


def verify_skippables(module: nn.Sequential) -> None:
    """Checks the skip connections of the layers of ``module`` (its
    children, in order): each stashed key popped once by a later layer,
    each popped key stashed by an earlier one, no key stashed or popped
    twice, no layer stashing and popping one name. TypeError listing every
    mismatch otherwise."""
    problems = _skip_problems(list(module._modules.items()))
    if problems:
        raise TypeError("skip connections do not match (stash and pop pairs "
                        "in a namespace):\n\n" +
                        "\n".join(f"* {p}" for p in problems))


def _skip_problems(named: list) -> list:
    stashed: Dict[SkipKey, str] = {}
    popped: Dict[SkipKey, str] = {}
    problems = []
    for layer_name, layer in named:
        if not isinstance(layer, Skippable):
            continue
        both = layer.stashable_names & layer.poppable_names
        for name in sorted(both):
            problems.append(f"{layer_name!r} declared {name!r} both as "
                            "stashable and as poppable")
        for key in layer.stashable():
            if key[1] in both:
                continue
            if key in stashed:
                problems.append(f"{layer_name!r} redeclared {key[1]!r} as "
                                f"stashable (stashed by {stashed[key]!r}); "
                                "isolate each pair in its own Namespace")
            else:
                stashed[key] = layer_name
        for key in layer.poppable():
            if key[1] in both:
                continue
            if key in popped:
                problems.append(f"{layer_name!r} redeclared {key[1]!r} as "
                                f"poppable (popped by {popped[key]!r}); "
                                "isolate each pair in its own Namespace")
            elif key not in stashed:
                problems.append(f"{layer_name!r} declared {key[1]!r} as "
                                "poppable but it was not stashed by an "
                                "earlier layer")
            else:
                popped[key] = layer_name
    for key, layer_name in stashed.items():
        if key not in popped:
            problems.append(f"no module declared {key[1]!r} as poppable but "
                            f"stashed (by {layer_name!r})")
    return problems


def rank_skips(named: list) -> tuple:
    """One rank's share of the skips of a pipeline across ranks: (its
    problems, the keys it stashes for later ranks, the keys it pops from
    earlier ranks), keys in layer order, as (namespace id, name) pairs
    that mean the same on every rank, and the local key of each."""
    stashed: Dict[SkipKey, str] = {}
    problems = []
    for problem in _skip_problems(named):
        # A stash popped elsewhere and a pop stashed elsewhere are the
        # rank's skips across ranks, matched once the ranks compare them.
        if (" as poppable but it was not stashed" in problem
                or problem.startswith("no module declared")):
            continue
        problems.append(problem)
    popped_here = set()
    out, into, local = [], [], {}
    for _, layer in named:
        if not isinstance(layer, Skippable):
            continue
        for key in layer.poppable():
            if key in stashed:
                popped_here.add(key)
            elif key[1] not in layer.stashable_names:
                into.append((key[0].id, key[1]))
                local[(key[0].id, key[1])] = key
        for key in layer.stashable():
            if key[1] not in layer.poppable_names:
                stashed[key] = ""
    for key in stashed:
        if key not in popped_here:
            out.append((key[0].id, key[1]))
            local[(key[0].id, key[1])] = key
    return problems, out, into, local


def routes_across_ranks(shares: list) -> tuple:
    """From every rank's (problems, stashes out, pops in) (rank_skips, in
    rank order): the problems of the whole pipeline, and the skips' routes
    [(stash rank, pop rank, key)] numbered in stash order."""
    problems = [f"rank {r}: {p}" for r, (ps, _, _) in enumerate(shares)
                for p in ps]
    stash_rank: Dict[tuple, int] = {}
    routes = []
    for r, (_, out, _) in enumerate(shares):
        for key in out:
            if key in stash_rank:
                problems.append(f"rank {r} redeclared {key[1]!r} as stashable "
                                f"(stashed by rank {stash_rank[key]})")
            else:
                stash_rank[key] = r
    popped: Dict[tuple, int] = {}
    for r, (_, _, into) in enumerate(shares):
        for key in into:
            if key in popped:
                problems.append(f"rank {r} redeclared {key[1]!r} as poppable "
                                f"(popped by rank {popped[key]})")
            elif stash_rank.get(key, r) >= r:
                problems.append(f"rank {r} declared {key[1]!r} as poppable but "
                                "it was not stashed by an earlier layer")
            else:
                popped[key] = r
    for key, r in stash_rank.items():
        if key not in popped:
            problems.append(f"no module declared {key[1]!r} as poppable but "
                            f"stashed (by rank {r})")
    for r, (_, out, _) in enumerate(shares):
        for key in out:
            if stash_rank.get(key) == r and key in popped:
                routes.append((r, popped[key], key))
    return problems, routes


def skip_layout(named: list, balance: list) -> list:
    """For each partition of ``balance`` over the layers ``named``: the
    (popped, stashed) lists of (skip id, key) of the skips crossing its
    boundaries, ids numbered by stash order. Skips inside one partition
    are not listed. TypeError when the skips do not match."""
    problems = _skip_problems(named)
    if problems:
        raise TypeError("skip connections do not match (stash and pop pairs "
                        "in a namespace):\n\n" +
                        "\n".join(f"* {p}" for p in problems))
    stage_of = [s for s, size in enumerate(balance) for _ in range(size)]
    stash_at: Dict[SkipKey, int] = {}
    layout: list = [([], []) for _ in balance]
    pops: list = []
    for i, (_, layer) in enumerate(named):
        if isinstance(layer, Skippable):
            for key in layer.poppable():
                if stage_of[stash_at[key]] != stage_of[i]:
                    pops.append((stash_at[key], i, key))
            for key in layer.stashable():
                stash_at[key] = i
    for skip_id, (at, to, key) in enumerate(sorted(
            pops, key=lambda p: (p[0], p[1]))):
        layout[stage_of[at]][1].append((skip_id, key))
        layout[stage_of[to]][0].append((skip_id, key))
    return layout
