"""The zero-bubble schedules ('zb-h1', 'zb-h2', 'interleaved-zb') and
interleaved 1F1B: each backward split into B (the input gradient) and W (the
weight gradients), or several partitions per worker; the pipeline must
still equal the plain model in its loss, input and parameter gradients."""
import copy

import pytest
import torch
from torch import nn

import pipegear
from pipegear.trace import Trace, TraceEvent


class Scale(torch.autograd.Function):
    """A custom autograd Function (a Python node in the graph)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


class ScaleLayer(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=torch.float64))

    def forward(self, x):
        return Scale.apply(x, self.w)


class SharedTwice(nn.Module):
    """One weight used twice and alone: W reaches it from two frontier nodes
    and from a path that never meets the input."""

    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n).double()

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x))) + self.lin.weight.sum(0)


def make_model():
    return nn.Sequential(
        nn.Linear(6, 6), nn.ReLU(inplace=True), ScaleLayer(6),
        nn.Linear(6, 6), nn.Tanh(), SharedTwice(6), nn.Linear(6, 6),
        nn.Tanh(), nn.Linear(6, 3)).double()


BALANCES = {2: [4, 5], 3: [3, 3, 3], 4: [2, 2, 3, 2]}


def step_matches_plain(plain, pipe):
    """One step of `pipe` against `plain` on the same batch: the loss, the
    input gradient and every parameter's gradient, float64 to 1e-10."""
    x = torch.randn(9, 6, dtype=torch.float64)
    t = torch.randn(9, 3, dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ref_loss = nn.functional.mse_loss(plain(x1), t)
    ref_loss.backward()
    loss = pipe.step(x2, t, nn.functional.mse_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-10)
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(),
                                  pipe.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-h2"])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("chunks", [1, 3, 4, 8])
@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_transparency(schedule, k, chunks, checkpoint):
    torch.manual_seed(0)
    plain = make_model()
    pipe = pipegear.GPipe(copy.deepcopy(plain), BALANCES[k], chunks=chunks,
                          checkpoint=checkpoint, schedule=schedule)
    step_matches_plain(plain, pipe)
    phases = {e.phase for e in pipe.last_trace.events}
    assert phases == {"forward", "backward_input", "backward_weight"}


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-h2"])
@pytest.mark.parametrize("checkpoint", ["always", "never"])
def test_deferred_batch_norm_equals_gpipe(schedule, checkpoint):
    """DeferredBatchNorm: the same gradients and running statistics as the
    fill/drain schedule (whose equality with the whole batch is tested in
    test_pipeline_batchnorm.py)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    pipes = [pipegear.GPipe(copy.deepcopy(model), [2, 5], chunks=4,
                            checkpoint=checkpoint, deferred_batch_norm=True,
                            schedule=s) for s in ("gpipe", schedule)]
    for step in range(2):
        x = torch.randn(12 - step, 3, 5, 5, dtype=torch.float64)
        t = torch.randn(12 - step, 3, dtype=torch.float64)
        losses = [p.step(x, t, nn.functional.mse_loss) for p in pipes]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-10)
    a, b = pipes
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-10, atol=1e-10)
    for (n1, b1), (n2, b2) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(b2, b1, rtol=1e-10, atol=1e-10)


def test_zero_bubble_is_step_style_only():
    pipe = pipegear.GPipe(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)),
                          [1, 1], schedule="zb-h1")
    with pytest.raises(ValueError, match="module-style forward needs a "
                       "fill/drain schedule"):
        pipe(torch.ones(2, 2))
    with torch.no_grad():  # no backward: no B, no W
        loss = pipe.step(torch.ones(4, 2), torch.zeros(4, 2),
                         nn.functional.mse_loss)
    assert loss.shape == ()


def test_clock_table_and_trace_show_b_and_w():
    table = pipegear.render_schedule("zb-h1", 3, 4)
    assert table.splitlines() == [
        " clock  0  1  2  3  4  5  6  7  8  9 10 11 12 13",
        "stage0 F0 F1 F2       B0 W0 F3 B1 W1 B2 W2 B3 W3",
        "stage1    F0 F1    B0 F2 B1 W0 F3 B2 W1 B3 W2 W3",
        "stage2       F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3",
    ]
    assert "W" in pipegear.render_schedule("zb-h2", 2, 3)
    e = TraceEvent(0, 1, "backward_weight", False, 10, 20)
    assert e.phase == "backward_weight"
    trace = Trace(1, 2, [(0, 1, "backward_input", False, 0, 5), e])
    assert [x.phase for x in trace.events] == ["backward_input",
                                               "backward_weight"]
    with pytest.raises(ValueError, match="phase must be 'forward', 'backward'"):
        Trace(1, 1, [(0, 0, "sideways", False, 0, 1)])


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="zb-h1"):
        pipegear.GPipe(nn.Sequential(nn.Linear(2, 2)), [1], schedule="zb-h3")


@pytest.mark.parametrize("schedule", ["interleaved", "interleaved-zb"])
@pytest.mark.parametrize("k, v", [(2, 2), (3, 2), (4, 2), (2, 3), (3, 3)])
@pytest.mark.parametrize("chunks", [1, 3, 4, 8])
@pytest.mark.parametrize("checkpoint", ["always", "except_last", "never"])
def test_interleaved_transparency(schedule, k, v, chunks, checkpoint):
    torch.manual_seed(0)
    plain = make_model()  # 9 layers: up to K * v = 9 partitions
    n = k * v
    balance = [len(plain) // n + (i < len(plain) % n) for i in range(n)]
    pipe = pipegear.GPipe(copy.deepcopy(plain), balance, chunks=chunks,
                          checkpoint=checkpoint, schedule=schedule,
                          virtual_stages=v)
    assert pipe.virtual_stages == v
    step_matches_plain(plain, pipe)
    assert pipe.last_trace.stages == k  # a row per worker
    phases = {e.phase for e in pipe.last_trace.events}
    assert ("backward_weight" in phases) == (schedule == "interleaved-zb")


@pytest.mark.parametrize("checkpoint", ["always", "never"])
def test_interleaved_zero_bubble_dropout_and_batch_norm_equal_gpipe(
        checkpoint):
    """Dropout and DeferredBatchNorm: the same partitions under 'gpipe'
    draw the same masks (seeded per step, layer and micro-batch) and commit
    the same running statistics; the gradients equal up to rounding."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(6, 6), nn.Dropout(0.3), nn.BatchNorm1d(6), nn.Tanh(),
        nn.Linear(6, 6), nn.Dropout(0.2), nn.BatchNorm1d(6),
        nn.Linear(6, 3)).double()
    pipes = [pipegear.GPipe(copy.deepcopy(model), [2, 2, 2, 2], chunks=4,
                            checkpoint=checkpoint, deferred_batch_norm=True,
                            schedule=s, virtual_stages=v)
             for s, v in (("gpipe", 1), ("interleaved-zb", 2))]
    for step in range(2):
        x = torch.randn(12 - step, 6, dtype=torch.float64)
        t = torch.randn(12 - step, 3, dtype=torch.float64)
        losses, grads = [], []
        for p in pipes:
            torch.manual_seed(100 + step)
            xi = x.clone().requires_grad_()
            losses.append(p.step(xi, t, nn.functional.mse_loss))
            grads.append(xi.grad)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    a, b = pipes
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-12, atol=1e-12)
    for (n1, b1), (n2, b2) in zip(a.named_buffers(), b.named_buffers()):
        assert n1 == n2
        torch.testing.assert_close(b2, b1, rtol=1e-12, atol=1e-12)


def test_interleaved_zero_bubble_clock_table():
    table = pipegear.render_schedule("interleaved-zb", 2, 4, 2)
    assert table.splitlines()[1:] == [
        "stage0 F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 W0.1 F3.0 B1.1 W1.1 F2.1 B0.0"
        " W0.0 F3.1 B1.0 B2.1 W1.0 W2.1 B3.1 B2.0 B3.0 W3.1 W2.0 W3.0",
        "stage1      F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 W0.1 F3.0 B1.0"
        " W1.1 F2.1 B2.1 W0.0 F3.1 B3.1 B2.0 B3.0 W1.0 W2.1 W3.1 W2.0 W3.0",
    ]
    # 3vM + K - 1 clocks (unit cells), interleaved 1F1B's memory.
    assert table.splitlines()[0].split()[-1] == "24"
    pipe = pipegear.GPipe(nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)]),
                          [1] * 6, schedule="interleaved-zb", virtual_stages=2,
                          chunks=6)
    assert pipe.schedule == "interleaved-zb" and pipe.virtual_stages == 2
    assert "W5.1" in pipe.schedule_table()
    # Interleaved 1F1B's peak, min(2(K-1) + (v-1)K + 1, vM), on every
    # worker (interleaved's later workers hold less).
    assert pipegear.peak_activations("interleaved-zb", 3, 6, 2) == [8, 8, 8]
    assert pipegear.peak_activations("interleaved", 3, 6, 2) == [8, 6, 4]
    assert pipegear.peak_activations("zb-h1", 3, 6) == [3, 3, 3]
    with pytest.raises(ValueError, match="module-style forward needs"):
        pipe(torch.ones(2, 2))


def test_interleaved_zero_bubble_trace_names_the_chunks(tmp_path):
    """A row of the trace is a worker; each event names its chunk, and the
    Chrome trace and the plot show B and W cells as the clock table does."""
    import json
    pipe = pipegear.GPipe(nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)]),
                          [1] * 4, schedule="interleaved-zb", virtual_stages=2,
                          chunks=3)
    pipe.step(torch.randn(6, 2, requires_grad=True), torch.randn(6, 2),
              nn.functional.mse_loss)
    trace = pipe.last_trace
    cells = {(e.stage, e.chunk, e.phase, e.micro_batch)
             for e in trace.events if not e.recompute}
    assert cells == {(d, c, p, j) for d in (0, 1) for c in (0, 1)
                     for p in ("forward", "backward_input", "backward_weight")
                     for j in range(3)}
    path = tmp_path / "t.json"
    trace.to_chrome_trace(path)
    names = {e["name"] for e in json.loads(path.read_text())["traceEvents"]
             if e["ph"] == "X"}
    assert {"F2.1", "B0.1", "W1.0"} <= names
    pytest.importorskip("matplotlib")
    trace.plot(str(tmp_path / "t.png"))
    e = TraceEvent(1, 2, "backward_weight", False, 0, 5, chunk=1)
    assert e.chunk == 1 and "chunk=1" in repr(e)
    assert e != TraceEvent(1, 2, "backward_weight", False, 0, 5)
    assert tuple(e) == (1, 2, "backward_weight", False, 0, 5)
    t = Trace(2, 3, [e, (0, 0, "forward", False, 0, 5, 1)])
    assert [x.chunk for x in t.events] == [1, 1]
    with pytest.raises(ValueError, match="event 0 has chunk -1"):
        Trace(1, 1, [(0, 0, "forward", False, 0, 5, -1)])


def test_interleaved_arguments():
    seq = lambda: nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])  # noqa: E731
    with pytest.raises(ValueError, match="virtual_stages = 2 needs "
                       "schedule='interleaved' or 'interleaved-zb'"):
        pipegear.GPipe(seq(), [1, 1, 1, 1], virtual_stages=2)
    with pytest.raises(ValueError, match="virtual_stages = 2 needs "):
        pipegear.GPipe(seq(), [1, 1, 1, 1], schedule="zb-h1",
                       virtual_stages=2)
    with pytest.raises(ValueError, match="must divide the number of "
                       "partitions"):
        pipegear.GPipe(seq(), [2, 1, 1], schedule="interleaved",
                       virtual_stages=2)
    with pytest.raises(ValueError, match="virtual_stages"):
        pipegear.GPipe(seq(), [2, 2], schedule="interleaved", virtual_stages=0)
    with pytest.raises(ValueError, match="module-style forward needs"):
        pipegear.GPipe(seq(), [1, 1, 1, 1], schedule="interleaved",
                       virtual_stages=2)(torch.ones(2, 2))
    pipe = pipegear.GPipe(seq(), [1, 1, 1, 1], devices=["cpu", "cpu"],
                          schedule="interleaved", virtual_stages=2, chunks=4)
    assert [str(d) for d in pipe.devices] == ["cpu"] * 4
    table = pipe.schedule_table()
    assert "F0.1" in table and table.count("stage") == 2
    assert copy.deepcopy(pipe).virtual_stages == 2
    assert "F3.2" in pipegear.render_schedule("interleaved", 2, 4, 3)


def test_split_backward_frees_each_micro_batch_by_its_w():
    """The tensors a micro-batch's forward saved are freed by its B and W,
    not at the end of the step: every worker's peak stays at what the
    schedule keeps alive, and nothing is left after the step."""
    import threading
    from collections import defaultdict
    alive, peak = defaultdict(int), defaultdict(int)
    lock = threading.Lock()

    class Held:
        def __init__(self, t):
            self.t, self.tid = t, threading.get_ident()
            self.n = 0 if t.requires_grad and t.is_leaf else t.numel()
            with lock:
                alive[self.tid] += self.n
                peak[self.tid] = max(peak[self.tid], alive[self.tid])

        def __del__(self):
            with lock:
                alive[self.tid] -= self.n

    layers = []
    for _ in range(4):
        layers += [nn.Linear(32, 32), nn.Tanh()]
    peaks = {}
    for schedule in ("gpipe", "zb-h1"):
        torch.manual_seed(0)
        pipe = pipegear.GPipe(nn.Sequential(*copy.deepcopy(layers)), [4, 4],
                              chunks=8, checkpoint="never", schedule=schedule)
        x, t = torch.randn(64, 32), torch.randn(64, 32)
        alive.clear()
        peak.clear()
        with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
            pipe.step(x, t, nn.functional.mse_loss)
        assert all(v == 0 for v in alive.values()), dict(alive)
        peaks[schedule] = max(peak.values())
    # GPipe holds all 8 micro-batches on a stage; ZB-H1 at most 2 (K=2),
    # plus what the loss saves on the last one.
    assert peaks["zb-h1"] <= peaks["gpipe"] * 3 / 8, peaks


class HookedLinear(nn.Module):
    """A Linear whose output's gradient a hook doubles, and whose
    retain_grad keeps it (gradient scaling as users write it)."""

    def __init__(self, width):
        super().__init__()
        self.l = nn.Linear(width, width)
        self.kept = []

    def forward(self, x):
        h = self.l(x)
        if h.requires_grad:
            h.register_hook(lambda g: 2 * g)
            h.register_hook(lambda g: self.kept.append(g.clone()))
        return torch.tanh(h)


@pytest.mark.parametrize("schedule", ["zb-h1", "zb-h2"])
@pytest.mark.parametrize("checkpoint", ["never", "always"])
def test_a_hook_on_an_output_tensor_runs_once_under_split_backward(
        schedule, checkpoint):
    """W runs the frontier nodes again from the gradients B kept, which
    their tensor hooks had already changed: the hooks are set aside for W
    (a doubling hook doubled the weight gradients twice before)."""
    def model():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 6), HookedLinear(6),
                             nn.Linear(6, 2)).double()

    x = torch.randn(8, 6, dtype=torch.float64)
    t = torch.randn(8, 2, dtype=torch.float64)
    plain = model()
    nn.functional.mse_loss(plain(x), t).backward()
    pipe = pipegear.GPipe(model(), [2, 1], chunks=4, checkpoint=checkpoint,
                          schedule=schedule)
    pipe.step(x, t, nn.functional.mse_loss)
    for (name, a), b in zip(pipe.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12,
                                   msg=name)
    # The hook saw each micro-batch's gradient once (a checkpointed forward
    # runs without a graph, so only its recomputation registers it).
    assert len(pipe[1].kept) == 4
