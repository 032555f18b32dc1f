"""DistributedGPipe with several partitions per rank (schedule='interleaved',
virtual_stages=v), across 2, 3 and 4 processes (Gloo on loopback), against
the plain model.

This file is also the worker script: ``python test_distributed_interleaved.py
KIND RANK WORLD PORT OUT``. Each rank builds the plain model too and
compares its own parameters' gradients, the loss (every rank) and the input
gradient (rank 0) with it; the reports say the largest differences.
"""
import json
import os
import sys

import pytest
import torch
from torch import nn

from ranks import init_gloo, launch_kind
# A tuple across a boundary: the activation, a float tensor nobody uses
# (its gradient is None), an int64 tensor and the row sums.
from test_distributed import _Fork, _Join

D, H, O = 6, 8, 3


class _Boom(nn.Module):
    """Raises in its forward or backward while armed."""
    where = None

    def forward(self, x):
        if _Boom.where == "forward":
            raise ValueError("boom in the forward")
        if _Boom.where == "backward":
            return _BoomGrad.apply(x)
        return x


class _BoomGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise ValueError("boom in the backward")


def layers(c, world):
    """The model: one Linear per partition at least, deterministic (each
    layer seeds its own initialisation), with BatchNorm, a tuple across a
    boundary, a raising layer, a tie or in-place activations when the
    configuration asks."""
    stages = world * c["v"]
    built = []

    def add(ctor):
        torch.manual_seed(1000 + len(built))
        built.append(ctor())

    add(lambda: nn.Linear(D, H))
    for i in range(stages - 1):
        # In place on what the Linear before returned (with its balance, the
        # first layer of a partition: in place on the received activation).
        add((lambda: nn.ReLU(inplace=True)) if c.get("inplace") else nn.Tanh)
        if c.get("bn") and i == 0:
            add(lambda: nn.BatchNorm1d(H))
        if c.get("fork") and i == 0:
            add(_Fork)
            add(lambda: nn.Sequential(_Join(), nn.Linear(H, H)))
        else:
            add(lambda: nn.Linear(H, H))
        if c.get("boom") and i == stages // 2:
            add(_Boom)
    add(lambda: nn.Linear(H, O))
    if c.get("tied"):
        # The first hidden Linear shares its weight with the last one (on
        # other ranks, as GPT-2's embedding and head) and its bias with the
        # one before (wherever the balance puts it).
        hidden = [m for m in built if isinstance(m, nn.Linear)
                  and m.in_features == H and m.out_features == H]
        hidden[-1].weight = hidden[0].weight
        hidden[-2].bias = hidden[0].bias
    return built


def balance_of(n, stages):
    """Near-equal layers per partition, at least one each."""
    base = [n // stages] * stages
    for i in range(n - sum(base)):
        base[i] += 1
    return base


def batch(c, step):
    """Step `step`'s input and target: class indices with every third one
    ignored (padding) for the cross-entropy."""
    n = c["sizes"][step]
    g = torch.Generator().manual_seed(10 * step + 1)
    x = torch.randn(n, D, generator=g)
    if c.get("loss") == "ce-ignore":
        t = torch.randint(0, O, (n,), generator=g)
        t[::3] = -100
        return x, t
    return x, torch.randn(n, O, generator=g)


def mse(y, t):
    return nn.functional.mse_loss(y, t)


# The loss of a configuration (default: mse); the pipeline reads the
# reduction and what a mean counts from the loss module.
LOSSES = {"sum": nn.MSELoss(reduction="sum"),
          "ce-ignore": nn.CrossEntropyLoss(ignore_index=-100)}


def cfg(name, v, chunks, checkpoint, sizes=(10, 7), schedule="interleaved",
        **extra):
    return dict(name=name, v=v, chunks=chunks, checkpoint=checkpoint,
                sizes=list(sizes), schedule=schedule, **extra)


CONFIGS = {
    2: [
        cfg("k2-v2-c1-never", 2, 1, "never"),
        cfg("k2-v2-c3-except_last", 2, 3, "except_last"),
        cfg("k2-v2-c4-always", 2, 4, "always"),
        cfg("k2-v2-c8-except_last-bn", 2, 8, "except_last", (16, 24), bn=True),
        cfg("k2-v3-c4-never-tuple", 3, 4, "never", fork=True),
        cfg("k2-v2-c4-except_last-tied", 2, 4, "except_last", tied=True),
        cfg("k2-v3-c8-always", 3, 8, "always", (11, 16)),
        cfg("k2-v2-c4-always-zb", 2, 4, "always", schedule="interleaved-zb"),
        cfg("k2-v2-c3-never-zb-bn", 2, 3, "never", (12, 9), bn=True,
            schedule="interleaved-zb"),
        cfg("k2-v3-c8-except_last-zb-tuple-tied", 3, 8, "except_last",
            (16, 11), fork=True, tied=True, schedule="interleaved-zb"),
        cfg("k2-v2-c1-except_last-zb", 2, 1, "except_last",
            schedule="interleaved-zb"),
        # Partitions 1 to 3 start with an in-place ReLU on their input.
        cfg("k2-v2-c4-always-inplace-sum", 2, 4, "always", inplace=True,
            balance=[1, 2, 2, 3], loss="sum"),
        cfg("k2-v2-c3-except_last-zb-inplace-ce", 2, 3, "except_last",
            (10, 11), inplace=True, balance=[1, 2, 2, 3], loss="ce-ignore",
            schedule="interleaved-zb"),
    ],
    3: [
        cfg("k3-v2-c1-always", 2, 1, "always"),
        cfg("k3-v2-c3-never", 2, 3, "never"),
        cfg("k3-v2-c4-except_last-bn", 2, 4, "except_last", (12, 8), bn=True),
        cfg("k3-v2-c8-except_last-tuple", 2, 8, "except_last", (16, 9),
            fork=True),
        cfg("k3-v2-c4-always-tied", 2, 4, "always", tied=True),
        cfg("k3-v2-c4-except_last-zb", 2, 4, "except_last",
            schedule="interleaved-zb"),
        cfg("k3-v2-c8-always-zb-bn", 2, 8, "always", (16, 24), bn=True,
            schedule="interleaved-zb"),
        cfg("k3-v2-c3-never-zb", 2, 3, "never", schedule="interleaved-zb"),
        cfg("k3-v2-c4-always-zb-ce", 2, 4, "always", (12, 9),
            loss="ce-ignore", schedule="interleaved-zb"),
    ],
    4: [
        cfg("k4-v2-c4-never", 2, 4, "never"),
        cfg("k4-v2-c8-always", 2, 8, "always", (16, 11)),
        cfg("k4-v2-c3-except_last", 2, 3, "except_last"),
        cfg("k4-v2-c8-except_last-zb", 2, 8, "except_last", (16, 11),
            schedule="interleaved-zb"),
        cfg("k4-v2-c4-always-zb", 2, 4, "always", schedule="interleaved-zb"),
    ],
}


# ---------------------------------------------------------------- workers
def _reference(c, world, step):
    """The plain model's loss, input gradient, parameter gradients (by
    name) and buffers after the step. With BatchNorm each micro-batch is
    normalised with its own statistics (by design), so the loss and the
    gradients are the plain model's on each micro-batch, weighed by its
    rows (the batch sizes of BatchNorm configurations are multiples of
    chunks, where every split agrees); the running statistics are the whole
    batch's."""
    model = nn.Sequential(*layers(c, world))
    model.train()
    x, t = batch(c, step)
    x.requires_grad_(True)
    if c.get("bn"):
        parts = zip(x.chunk(c["chunks"]), t.chunk(c["chunks"]))
        with torch.no_grad():
            stats = nn.Sequential(*layers(c, world)).train()
            stats(x.detach())
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.track_running_stats = False
                m.running_mean = m.running_var = None
        loss = sum(mse(model(xi), ti) * (xi.size(0) / x.size(0))
                   for xi, ti in parts)
        buffers = dict(stats.named_buffers())
    else:
        loss = LOSSES.get(c.get("loss"), mse)(model(x), t)
        buffers = dict(model.named_buffers())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    return loss.detach(), x.grad, grads, buffers


def worker_compare(rank, world, port, out):
    import pipegear
    dist = init_gloo(rank, world, port)
    report = {}
    for c in CONFIGS[world]:
        built = layers(c, world)
        model = nn.Sequential(*built)
        balance = c.get("balance") or balance_of(len(built), world * c["v"])
        pipe = pipegear.DistributedGPipe(
            model, balance, chunks=c["chunks"], checkpoint=c["checkpoint"],
            schedule=c["schedule"], virtual_stages=c["v"],
            deferred_batch_norm=bool(c.get("bn")), timeout=30.0)
        pipe.train()
        errors = {"loss": 0.0, "input": 0.0, "grad": 0.0, "buffer": 0.0}
        names = set()
        for step in range(len(c["sizes"])):
            x, t = batch(c, step)
            x.requires_grad_(True)
            loss = pipe.step(x if rank == 0 else None,
                             t if rank == world - 1 else None,
                             LOSSES.get(c.get("loss"), mse))
            ref_loss, ref_input, ref_grads, ref_buffers = _reference(c, world, step)
            errors["loss"] = max(errors["loss"], abs(float(loss - ref_loss)))
            if rank == 0:
                errors["input"] = max(errors["input"], float(
                    (x.grad - ref_input).abs().max()))
            for name, p in pipe.named_parameters(remove_duplicate=False):
                names.add(name)
                errors["grad"] = max(errors["grad"], float(
                    (p.grad - ref_grads[name]).abs().max()))
            for p in pipe.parameters():
                p.grad = None
            if c.get("bn"):
                for name, b in pipe.named_buffers():
                    errors["buffer"] = max(errors["buffer"], float(
                        (b.double() - ref_buffers[name].double()).abs().max()))
                # The next step starts from the plain model's statistics.
                with torch.no_grad():
                    for name, b in pipe.named_buffers():
                        b.copy_(dict(nn.Sequential(*layers(c, world))
                                     .named_buffers())[name])
        report[c["name"]] = dict(errors=errors, names=sorted(names),
                                 cells=[e[1] + str(e[5])
                                        for e in pipe.last_events()])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


# (where the layer raises, schedule); the backward of interleaved-zb fails
# in a B cell (the raising node is on the input's path).
RAISE_SCENARIOS = [("forward", "interleaved"), ("backward", "interleaved"),
                   ("backward", "interleaved-zb")]


def worker_raise(rank, world, port, out):
    """A layer of a middle partition raises in step 1 (forward, then
    backward): every rank raises, the rank holding it its own error, the
    others naming it; steps 0 and 2 equal the plain model."""
    import pipegear
    dist = init_gloo(rank, world, port)
    c = cfg("raise", 2, 4, "except_last", (8, 8, 8), boom=True)
    report = {}
    for where, schedule in RAISE_SCENARIOS:
        built = layers(c, world)
        holder = [i for i, m in enumerate(built) if isinstance(m, _Boom)][0]
        balance = balance_of(len(built), world * 2)
        pipe = pipegear.DistributedGPipe(
            nn.Sequential(*built), balance, chunks=4, schedule=schedule,
            virtual_stages=2, timeout=30.0)
        steps = []
        for step in range(3):
            _Boom.where = where if step == 1 else None
            x, t = batch(c, step)
            try:
                loss = pipe.step(x if rank == 0 else None,
                                 t if rank == world - 1 else None, mse)
                ref = _reference(c, world, step)[0]
                steps.append(dict(error=None, diff=abs(float(loss - ref))))
            except Exception as e:  # noqa: BLE001
                steps.append(dict(error=f"{type(e).__name__}: {e}"))
            for p in pipe.parameters():
                p.grad = None
        stage = next(s for s in range(len(balance))
                     if sum(balance[:s + 1]) > holder)
        report[f"{where}-{schedule}"] = dict(steps=steps, holder=stage % world,
                                             broken=pipe.broken)
    _Boom.where = None
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def worker_refuse(rank, world, port, out):
    """A skip across partitions with virtual_stages = 2: every rank raises
    the same ValueError at construction (no rank waits for another), and
    the group still works."""
    import pipegear
    from test_skip import WIDTH, ResIn, ResOut

    dist = init_gloo(rank, world, port)
    # partition 0 (rank 0) stashes, partition 2 (rank 0 again) pops
    model = nn.Sequential(ResIn(), nn.Linear(WIDTH, WIDTH), ResOut(),
                          nn.Linear(WIDTH, WIDTH))
    try:
        pipegear.DistributedGPipe(model, [1, 1, 1, 1], chunks=2,
                                  schedule="interleaved", virtual_stages=2)
        error = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(error=error), f)
    dist.destroy_process_group()


def worker_dropout(rank, world, port, out):
    """Dropout in every partition: with every rank seeded alike, each
    step's loss and this rank's gradients equal the in-process GPipe's
    running the same interleaved schedule on the same cut (each cell draws
    from streams keyed by the step's seed, the layer and the micro-batch),
    in every checkpoint mode (a recomputation replays its masks)."""
    import pipegear
    dist = init_gloo(rank, world, port)
    report = {}
    for schedule in ("interleaved", "interleaved-zb"):
        for checkpoint in ("always", "except_last", "never"):
            def model():
                torch.manual_seed(3)
                layers = [nn.Linear(D, H)]
                for _ in range(2 * world * 2 - 1):
                    layers += [nn.Dropout(0.3), nn.Tanh(), nn.Linear(H, H)]
                return nn.Sequential(*layers, nn.Linear(H, O))
            n = len(model())
            balance = balance_of(n, world * 2)
            kwargs = dict(chunks=4, checkpoint=checkpoint, schedule=schedule,
                          virtual_stages=2)
            pipe = pipegear.DistributedGPipe(model(), balance, timeout=30.0,
                                             **kwargs)
            local = pipegear.GPipe(model(), balance, **kwargs)
            worst = 0.0
            for step in range(2):
                x, t = batch(dict(sizes=[10, 10]), step)
                torch.manual_seed(100 + step)
                loss = pipe.step(x if rank == 0 else None,
                                 t if rank == world - 1 else None, mse)
                torch.manual_seed(100 + step)
                ref = local.step(x, t, mse)
                worst = max(worst, abs(float(loss - ref)))
                grads = dict(local.named_parameters())
                for name, p in pipe.named_parameters():
                    worst = max(worst, float((p.grad - grads[name].grad)
                                             .abs().max()))
                pipe.zero_grad(set_to_none=True)
                local.zero_grad(set_to_none=True)
            report[f"{schedule}-{checkpoint}"] = worst
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ tests
def _run(kind, world, tmp_path, timeout=180):
    codes, logs = launch_kind(__file__, kind, world, str(tmp_path),
                              timeout=timeout)
    assert codes == [0] * world, "\n".join(logs)
    return [json.loads((tmp_path / f"rank{r}.json").read_text())
            for r in range(world)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_interleaved_matches_the_plain_model(tmp_path, world):
    """Every configuration (interleaved and interleaved-zb, v = 2 and 3,
    chunks 1, 3, 4 and 8 with M not a multiple of K, every checkpoint mode,
    a sum loss and a cross-entropy with ignored targets (padding),
    partitions starting with an in-place ReLU on their input, DeferredBatchNorm, a tuple with a
    None gradient and an int tensor across a boundary, a tie across ranks
    and one within a rank, two steps of other batch sizes): the loss on
    every rank, the input gradient and every parameter's gradient equal
    the plain model's; each rank holds its partitions' parameters only,
    and runs the cells of all its partitions."""
    reports = _run("compare", world, tmp_path)
    for c in CONFIGS[world]:
        owned = []
        for r, rep in enumerate(reports):
            got = rep[c["name"]]
            for what, err in got["errors"].items():
                assert err < 1e-5, (c["name"], r, what, err)
            owned.append(set(got["names"]))
            # v partitions' forwards per micro-batch on this rank
            forwards = [e for e in got["cells"] if e.startswith("F")]
            stages = {int(e[1:]) for e in forwards}
            assert stages == {k * world + r for k in range(c["v"])}, got["cells"]
            # split backwards: one W per B
            weights = sum(e.startswith("W") for e in got["cells"])
            split = c["schedule"] == "interleaved-zb"
            assert weights == (len(forwards) if split else 0), got["cells"]
        every = set(owned[0]).union(*owned[1:])
        if not c.get("tied"):
            for a in range(world):
                for b in range(a + 1, world):
                    assert not owned[a] & owned[b], c["name"]
        model = nn.Sequential(*layers(c, world))
        assert every == {n for n, _ in model.named_parameters(
            remove_duplicate=False)}, c["name"]


def test_a_failing_layer_fails_every_rank_and_the_next_step_works(tmp_path):
    """An exception in a layer of a middle partition (forward or backward,
    interleaved and interleaved-zb) raises on every rank within the step, the holder's own error and the
    others' naming the holder; no rank is broken and the next step equals
    the plain model."""
    world = 3
    reports = _run("raise", world, tmp_path)
    for where, schedule in RAISE_SCENARIOS:
        key = f"{where}-{schedule}"
        holder = reports[0][key]["holder"]
        for r, rep in enumerate(reports):
            steps = rep[key]["steps"]
            assert steps[0]["error"] is None and steps[0]["diff"] < 1e-5
            assert steps[2]["error"] is None and steps[2]["diff"] < 1e-5, steps
            error = steps[1]["error"]
            assert error is not None and f"boom in the {where}" in error, error
            if r != holder:
                assert f"rank {holder} failed" in error, error
            assert not rep[key]["broken"]


def test_dropout_draws_the_masks_of_the_in_process_pipeline(tmp_path):
    """Distributed (2 ranks) and in-process interleaved pipelines seeded
    alike give the same losses and gradients with dropout in every
    partition, for both interleaved schedules and every checkpoint mode."""
    for r, rep in enumerate(_run("dropout", 2, tmp_path)):
        assert len(rep) == 6
        for key, worst in rep.items():
            assert worst < 1e-6, (r, key, worst)


def test_a_skip_across_partitions_is_refused_on_every_rank(tmp_path):
    reports = _run("refuse", 2, tmp_path)
    for rep in reports:
        assert rep["error"] == (
            "ValueError: skip connections across partitions are not "
            "supported with virtual_stages = 2 (ranks [0] hold one); keep "
            "each skip within a partition"), rep


class _Group:
    def __init__(self, size, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("kwargs, size, error, match", [
    (dict(balance=[1] * 4, virtual_stages=2), 2, ValueError,
     "virtual_stages = 2 needs schedule='interleaved' or 'interleaved-zb', "
     "got 'gpipe'"),
    (dict(balance=[1] * 4, virtual_stages=2, schedule="1f1b"), 2, ValueError,
     "needs schedule='interleaved' or 'interleaved-zb', got '1f1b'"),
    (dict(balance=[2, 2], virtual_stages=2, schedule="interleaved"), 2,
     ValueError, "balance has 2 partitions but 2 ranks with virtual_stages = 2 "
     "run 4"),
    (dict(balance=[2, 2], virtual_stages=2, schedule="interleaved"), 1,
     ValueError, "virtual_stages = 2 needs at least 2 ranks"),
    (dict(balance=[1] * 4, virtual_stages=0, schedule="interleaved"), 2,
     ValueError, "virtual_stages must be at least 1, got 0"),
    (dict(balance=[1] * 4, virtual_stages=2.0, schedule="interleaved"), 2,
     TypeError, "virtual_stages must be an int, got float"),
])
def test_bad_virtual_stages_are_typed_errors(kwargs, size, error, match):
    """Checked before any rank talks to another."""
    import pipegear
    balance = kwargs.pop("balance")
    if size == 1:
        balance = [2, 2]
    with pytest.raises(error, match=match):
        pipegear.DistributedGPipe([nn.Linear(2, 2) for _ in range(4)], balance,
                                  process_group=_Group(size), **kwargs)


if __name__ == "__main__":
    kind, rank, world, port, out = sys.argv[1:6]
    fn = {"compare": worker_compare, "raise": worker_raise,
          "refuse": worker_refuse, "dropout": worker_dropout}[kind]
    fn(int(rank), int(world), int(port), out)
