import itertools
import math
import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipegear.balance import (
    LayerProfile,
    balance_by_cost,
    balance_by_size,
    balance_by_time,
    profile_layers,
)


def compositions(n, k):
    """Every way to write n as k positive parts, in order."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0,) + cuts + (n,)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def stage_sums(sizes, values):
    sums, at = [], 0
    for n in sizes:
        sums.append(sum(values[at : at + n]))
        at += n
    return sums


def score(sizes, costs):
    sums = stage_sums(sizes, costs)
    return max(sums), sum(c * c for c in sums)


def brute_force(k, costs, memory=None, capacity=None):
    best = None
    for sizes in compositions(len(costs), k):
        if memory is not None and max(stage_sums(sizes, memory)) > capacity:
            continue
        s = score(sizes, costs)
        # Ties only up to rounding: the partitioner minimises the bottleneck
        # exactly, so 60 beats 60.00000006 (a looser tie would let a lower
        # variance win with a larger bottleneck).
        if best is None or s[0] < best[0] - 1e-12 * max(1.0, best[0]) or (
            math.isclose(s[0], best[0], rel_tol=1e-12, abs_tol=1e-15)
            and s[1] < best[1]
        ):
            best = s
    return best


def test_a_tiny_cost_does_not_tie_two_bottlenecks():
    # Found by hypothesis: [1, 1, 2] (bottleneck 60) beats [2, 1, 1]
    # (bottleneck 60 + 6e-8) although the latter has the lower variance.
    assert balance_by_cost(3, [5.960464477539063e-08, 60.0, 1.0, 1.0]) == [1, 1, 2]
    assert_optimal(3, [5.960464477539063e-08, 60.0, 1.0, 1.0])


def assert_optimal(k, costs, memory=None, capacity=None):
    sizes = balance_by_cost(k, costs, memory=memory, capacity=capacity)
    assert len(sizes) == k and all(n >= 1 for n in sizes)
    assert sum(sizes) == len(costs)
    if memory is not None:
        assert max(stage_sums(sizes, memory)) <= capacity
    got, want = score(sizes, costs), brute_force(k, costs, memory, capacity)
    assert got[0] == pytest.approx(want[0], rel=1e-9, abs=1e-12)
    assert got[1] == pytest.approx(want[1], rel=1e-9, abs=1e-12)


# ---- balance_by_cost -----------------------------------------------------


@pytest.mark.parametrize(
    "partitions, costs, balance",
    [
        (2, [1, 1, 1, 1, 1, 1, 1, 10], [7, 1]),  # torchgpipe: [4, 4]
        (3, [5, 1, 1, 1, 1, 5], [1, 4, 1]),  # torchgpipe: [2, 2, 2]
        (3, [1, 2, 3, 4, 5, 6], [3, 2, 1]),
        (3, [1] * 8, [3, 3, 2]),
        (3, [0.1] * 9, [3, 3, 3]),
        (3, [0] * 7, [3, 2, 2]),
        (1, [3, 1, 2], [3]),
        (4, [3, 1, 2, 5], [1, 1, 1, 1]),
    ],
)
def test_known_balances(partitions, costs, balance):
    assert balance_by_cost(partitions, costs) == balance


def test_every_small_case_against_brute_force():
    rng = random.Random(2024)
    for _ in range(3):
        for n in range(1, 10):
            for k in range(1, min(n, 5) + 1):
                costs = [
                    rng.choice([0, 0, 1, 2, 3, rng.uniform(0, 5), 100])
                    for _ in range(n)
                ]
                assert_optimal(k, costs)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 4),
            st.floats(0, 1000, allow_nan=False, allow_infinity=False),
        ),
        min_size=1,
        max_size=9,
    ),
    st.data(),
)
def test_optimal_on_generated_costs(costs, data):
    k = data.draw(st.integers(1, len(costs)))
    assert_optimal(k, [float(c) for c in costs])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=8), st.data())
def test_optimal_under_a_memory_capacity(costs, data):
    n = len(costs)
    k = data.draw(st.integers(1, n))
    memory = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    capacity = data.draw(st.integers(0, sum(memory) + 1))
    if brute_force(k, costs, memory, capacity) is None:
        with pytest.raises(ValueError, match="too small"):
            balance_by_cost(k, costs, memory=memory, capacity=capacity)
    else:
        assert_optimal(k, costs, memory, capacity)


def test_memory_capacity():
    costs = [1, 2, 3, 4]
    assert balance_by_cost(2, costs) == [3, 1]
    assert balance_by_cost(2, costs, memory=[4, 1, 1, 1], capacity=4) == [1, 3]
    assert balance_by_cost(2, costs, memory=[4, 1, 1, 1]) == [3, 1]
    with pytest.raises(ValueError, match=r"capacity of 4.*needs 6, 2 more"):
        balance_by_cost(3, [1] * 4, memory=[3] * 4, capacity=4)


def test_costs_may_be_tensors_or_numpy_like():
    assert balance_by_cost(2, torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 10])) == [
        7,
        1,
    ]
    assert balance_by_cost(2, (x for x in [1, 1, 1, 1])) == [2, 2]


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, [1, 2]), {}, ValueError, "at least 1, got 0"),
        ((3, [1, 2]), {}, ValueError, "cannot split 2 layers into 3"),
        ((1, []), {}, ValueError, "at least one layer"),
        ((1, [1, -2]), {}, ValueError, r"costs\[1\].*-2"),
        ((1, [float("nan")]), {}, ValueError, r"costs\[0\]"),
        ((1, [1, float("inf")]), {}, ValueError, r"costs\[1\]"),
        ((1, [1, 2]), {"memory": [1]}, ValueError, "2 costs but 1 memory"),
        ((1, [1, 2]), {"memory": [1, -1]}, ValueError, r"memory\[1\]"),
        ((1, [1, 2]), {"capacity": 3}, ValueError, "without memory"),
        ((1, [1, "2"]), {}, TypeError, r"costs\[1\]"),
        ((1, "12"), {}, TypeError, "sequence of numbers"),
        ((1.5, [1, 2]), {}, TypeError, "partitions must be an int"),
        (
            (1, [1, 2]),
            {"memory": [1, 1], "capacity": "x"},
            TypeError,
            "capacity",
        ),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        balance_by_cost(*args, **kwargs)


def test_large_inputs_are_fast():
    # Not a benchmark (benchmarks/bench_partition.py): a guard against a
    # quadratic algorithm, with a bound far above the measured time.
    rng = random.Random(0)
    costs = [rng.random() for _ in range(10000)]
    start = time.perf_counter()
    sizes = balance_by_cost(64, costs)
    assert time.perf_counter() - start < 2.0
    assert sum(sizes) == 10000 and len(sizes) == 64
    assert max(stage_sums(sizes, costs)) <= sum(costs) / 64 + 1.0


# ---- profiling -----------------------------------------------------------


class Sleep(nn.Module):
    """Sleeps a known time, then scales by a parameter."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        time.sleep(self.seconds)
        return x * self.weight


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("shape mismatch 7 != 9")


class Pair(nn.Module):
    """Takes and returns a tuple of tensors."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, xs):
        a, b = xs
        return self.linear(a), b + 1


class First(nn.Module):
    def forward(self, xs):
        return xs[0]


class Text(nn.Module):
    def forward(self, x):
        return "not a tensor"


def test_balance_by_time_recovers_known_times():
    # 80, 40, 40, 80 ms: the optimum [1, 2, 1] (80 ms per stage) beats the
    # next best by 40 ms, more than a loaded machine's sleep overshoots.
    model = nn.Sequential(*[Sleep(ms / 1000) for ms in [80, 40, 40, 80]])
    sample = torch.ones(2, 3)
    assert balance_by_time(3, model, sample, repeats=3) == [1, 2, 1]

    profiles = profile_layers(model, sample, repeats=3)
    assert len(profiles) == 4 and isinstance(profiles[0], LayerProfile)
    for i, p in enumerate(profiles):
        want = 0.08 if i in (0, 3) else 0.04
        assert want <= p.forward_seconds < want + 0.04
        assert 0 <= p.backward_seconds < 0.04
        assert p.parameter_bytes == 4
        assert p.activation_bytes == 2 * 3 * 4


def test_timeout_bounds_the_rounds():
    model = nn.Sequential(Sleep(0.02), Sleep(0.02))
    start = time.perf_counter()
    profile_layers(model, torch.ones(1), repeats=100, timeout=0.05)
    # Warm-up and one round (80 ms), not 100 rounds (4 s).
    assert time.perf_counter() - start < 1.0


def test_tuples_flow_between_layers():
    model = nn.Sequential(Pair(), Pair(), First(), nn.Linear(4, 2))
    sample = (torch.randn(3, 4), torch.zeros(3, 5))
    profiles = profile_layers(model, sample, repeats=1)
    assert [p.activation_bytes for p in profiles] == [
        3 * 4 * 4 + 3 * 5 * 4,
        3 * 4 * 4 + 3 * 5 * 4,
        3 * 4 * 4,
        3 * 2 * 4,
    ]
    assert profiles[0].parameter_bytes == (16 + 4) * 4
    assert len(balance_by_time(2, model, sample, repeats=1)) == 2


def test_profiling_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)
    )
    model(torch.randn(5, 4)).sum().backward()
    model[3].weight.grad = None
    model[3].bias.grad = None
    model.eval()
    model[1].train()

    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [
        None if p.grad is None else p.grad.clone() for p in model.parameters()
    ]
    training = [m.training for m in model.modules()]

    sample = torch.randn(6, 4)
    profile_layers(model, sample, repeats=2)
    balance_by_time(2, model, sample, repeats=1)
    balance_by_size(2, model, sample, chunks=2)

    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == training
    assert not sample.requires_grad and sample.grad is None


def test_a_failing_layer_is_named():
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(4, 4))
    model.add_module("relu", nn.ReLU())
    model.add_module("broken", Boom())
    with pytest.raises(ValueError) as info:
        profile_layers(model, torch.randn(2, 4))
    message = str(info.value)
    assert "layer 2 ('broken', Boom)" in message
    assert "shape mismatch 7 != 9" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    # No gradient is left behind although layer 2 failed mid-profile.
    assert all(p.grad is None for p in model.parameters())

    wrong = nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"layer 1 \('1', Linear\)"):
        balance_by_time(2, wrong, torch.randn(2, 4))


def test_balance_by_size():
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 256)
    )
    sample = torch.randn(4, 8)
    profiles = profile_layers(model, sample, repeats=1)
    assert profiles[0].parameter_bytes == (64 + 8) * 4
    assert profiles[3].activation_bytes == 4 * 256 * 4
    # chunks=2: one micro-batch of 2 samples counts.
    sizes = [3 * p.parameter_bytes + p.activation_bytes / 2 for p in profiles]
    balance = balance_by_size(2, model, sample, chunks=2, param_scale=3)
    assert balance == balance_by_cost(2, sizes) == [3, 1]
    # More chunks than samples: micro-batches of one sample.
    assert balance_by_size(2, model, sample, chunks=9) == [3, 1]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda m, x: profile_layers([nn.ReLU()], x),
            TypeError,
            "nn.Sequential",
        ),
        (lambda m, x: profile_layers(nn.Sequential(), x), ValueError, "empty"),
        (lambda m, x: profile_layers(m, "x"), TypeError, "tensor or a tuple"),
        (lambda m, x: profile_layers(m, x, repeats=0), ValueError, "got 0"),
        (lambda m, x: profile_layers(m, x, timeout=0), ValueError, "timeout"),
        (lambda m, x: balance_by_time(3, m, x), ValueError, "2 layers into 3"),
        (lambda m, x: balance_by_time(0, m, x), ValueError, "at least 1"),
        (lambda m, x: balance_by_size(3, m, x), ValueError, "2 layers into 3"),
        (lambda m, x: balance_by_size(1, m, x, chunks=0), ValueError, "chunks"),
        (
            lambda m, x: balance_by_size(1, m, x, param_scale=-1),
            ValueError,
            "param_scale",
        ),
        (
            lambda m, x: profile_layers(nn.Sequential(nn.ReLU(), Text()), x),
            TypeError,
            r"output of layer 1 \('1', Text\)",
        ),
    ],
)
def test_bad_profiling_arguments(call, error, match):
    model = nn.Sequential(nn.ReLU(), nn.ReLU())
    with pytest.raises(error, match=match):
        call(model, torch.ones(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profiling_on_cuda_copies_a_cpu_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    profiles = profile_layers(model, torch.randn(3, 4), device="cuda")
    assert len(profiles) == 3
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
