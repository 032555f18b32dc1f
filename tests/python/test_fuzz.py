"""Property-based fuzzing of the pure pieces (bounded: 200 examples each).

- the partitioner (balance_by_cost) against brute force for small L;
- render_schedule for random K, M;
- micro-batching through a GPipe of identities: output == input.
"""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import pipegear

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def compositions(n: int, k: int):
    """Every balance of n layers into k stages (each >= 1)."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        yield [edges[i + 1] - edges[i] for i in range(k)]


def stage_sums(values, balance):
    out, i = [], 0
    for b in balance:
        out.append(sum(values[i:i + b]))
        i += b
    return out


def key(costs, balance):
    """The partitioner's documented order: bottleneck, then variance of the
    stage costs, then of the layer counts, then the last stage shortest,
    then the second-to-last, ..."""
    sums = stage_sums(costs, balance)
    return (max(sums), sum(s * s for s in sums), sum(b * b for b in balance),
            tuple(reversed(balance)))


@st.composite
def problems(draw, integer: bool):
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, n))
    if integer:
        costs = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    else:
        costs = draw(st.lists(st.floats(0, 1e3, allow_nan=False,
                                        allow_infinity=False),
                              min_size=n, max_size=n))
    return k, costs


@FUZZ
@given(problems(integer=True))
def test_balance_by_cost_is_the_brute_force_optimum_on_integers(problem):
    """Integer costs: sums are exact, so the whole order is checked."""
    k, costs = problem
    got = pipegear.balance_by_cost(k, [float(c) for c in costs])
    best = min(compositions(len(costs), k), key=lambda b: key(costs, b))
    assert got == best


@FUZZ
@given(problems(integer=False))
def test_balance_by_cost_is_optimal_on_floats(problem):
    """Float costs: the bottleneck and then the sum of squares are optimal
    within the partitioner's tolerance (L * 2^-52 of the total)."""
    k, costs = problem
    got = pipegear.balance_by_cost(k, costs)
    assert len(got) == k and all(b >= 1 for b in got)
    assert sum(got) == len(costs)
    total = sum(costs)
    tol = 4 * len(costs) * 2.0 ** -52 * max(total, 1e-300)
    all_splits = list(compositions(len(costs), k))
    best_max = min(max(stage_sums(costs, b)) for b in all_splits)
    assert max(stage_sums(costs, got)) <= best_max + tol
    near = [b for b in all_splits
            if max(stage_sums(costs, b)) <= best_max + tol]
    best_sq = min(sum(s * s for s in stage_sums(costs, b)) for b in near)
    got_sq = sum(s * s for s in stage_sums(costs, got))
    assert got_sq <= best_sq + 4 * tol * max(total, 1.0)


@FUZZ
@given(st.integers(1, 7).flatmap(lambda n: st.tuples(
    st.integers(1, n),
    st.lists(st.integers(0, 9), min_size=n, max_size=n),
    st.lists(st.integers(0, 9), min_size=n, max_size=n),
    st.integers(0, 30))))
def test_balance_by_cost_with_capacity_is_the_feasible_optimum(problem):
    k, costs, memory, capacity = problem
    feasible = [b for b in compositions(len(costs), k)
                if max(stage_sums(memory, b)) <= capacity]
    args = ([float(c) for c in costs],)
    kwargs = {"memory": [float(m) for m in memory],
              "capacity": float(capacity)}
    if not feasible:
        with pytest.raises(ValueError, match="too small"):
            pipegear.balance_by_cost(k, *args, **kwargs)
        return
    got = pipegear.balance_by_cost(k, *args, **kwargs)
    assert max(stage_sums(memory, got)) <= capacity
    best = min(feasible, key=lambda b: key(costs, b))
    # Among feasible splits: the same bottleneck and sum of squares.
    assert key(costs, got)[:2] == key(costs, best)[:2]


@FUZZ
@given(st.sampled_from(["gpipe", "1f1b"]), st.integers(1, 8),
       st.integers(1, 12))
def test_render_schedule_draws_every_cell_once(schedule, k, m):
    table = pipegear.render_schedule(schedule, k, m)
    lines = table.rstrip("\n").split("\n")
    assert len(lines) == k + 1  # the clock header and one row per stage
    clocks = lines[0].split()
    assert clocks[0] == "clock"
    # Unit-time cells: both schedules take 2 (M + K - 1) clocks.
    assert [int(c) for c in clocks[1:]] == list(range(2 * (m + k - 1)))
    for s, line in enumerate(lines[1:]):
        assert line.split()[0] == f"stage{s}"
        cells = [c.group() for c in re.finditer(r"[FB]\d+", line)]
        assert sorted(cells) == sorted(
            [f"F{j}" for j in range(m)] + [f"B{j}" for j in range(m)])
        for j in range(m):  # a micro-batch's forward before its backward
            assert cells.index(f"F{j}") < cells.index(f"B{j}")


@FUZZ
@given(st.sampled_from(["gpipe", "1f1b"]), st.integers(-3, 0),
       st.integers(-3, 12))
def test_render_schedule_rejects_empty_pipelines(schedule, k, m):
    with pytest.raises(ValueError, match="at least 1"):
        pipegear.render_schedule(schedule, k, m)
    if m >= 1:
        with pytest.raises(ValueError, match="at least 1 micro-batch"):
            pipegear.render_schedule(schedule, m, k)


class Sizes(nn.Identity):
    """An identity that records the batch size of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x):
        if not pipegear.is_recomputing():
            self.seen.append((x[0] if isinstance(x, tuple) else x).shape[0])
        return x


_pipes: dict = {}


def identity_pipe(chunks: int) -> pipegear.GPipe:
    """One pipeline per chunks value, created once (threads are reused)."""
    if chunks not in _pipes:
        _pipes[chunks] = pipegear.GPipe(
            nn.Sequential(Sizes(), nn.Identity(), nn.Identity()),
            [1, 1, 1], chunks=chunks, devices=["cpu"] * 3)
    return _pipes[chunks]


def expected_sizes(batch: int, chunks: int) -> list[int]:
    parts = min(batch, chunks)
    return [batch // parts + (1 if i < batch % parts else 0)
            for i in range(parts)]


@FUZZ
@given(batch=st.integers(1, 40), chunks=st.integers(1, 9),
       width=st.lists(st.integers(1, 3), max_size=2),
       pair=st.booleans(), grad=st.booleans())
def test_micro_batching_through_identities_is_the_identity(batch, chunks, width,
                                                           pair, grad):
    pipe = identity_pipe(chunks)
    x = torch.randn(batch, *width)
    inputs = (x, torch.arange(batch)) if pair else x
    pipe[0].seen.clear()
    with torch.set_grad_enabled(grad):
        y = pipe(inputs)
    if pair:
        assert isinstance(y, tuple) and len(y) == 2
        assert torch.equal(y[0], x) and torch.equal(y[1], torch.arange(batch))
    else:
        assert torch.equal(y, x)
    trace = pipe.last_trace
    assert trace.micro_batches == min(batch, chunks)
    # Stage 0's forward cells take micro-batches in order.
    forwards = sorted((e.start_ns, e.micro_batch) for e in trace.events
                      if e.stage == 0 and not e.recompute
                      and e.phase == "forward")
    assert [j for _, j in forwards] == list(range(min(batch, chunks)))
    # min(N, chunks) parts, sizes differing by at most one, larger first.
    assert pipe[0].seen == expected_sizes(batch, chunks)


@FUZZ
@given(batch=st.integers(1, 24), chunks=st.integers(1, 9))
def test_micro_batching_keeps_gradients_exact(batch, chunks):
    pipe = identity_pipe(chunks)
    x = torch.randn(batch, 3, requires_grad=True)
    w = torch.randn(batch, 3)
    (pipe(x) * w).sum().backward()
    assert torch.equal(x.grad, w)
