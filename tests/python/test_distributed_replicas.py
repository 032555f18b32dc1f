"""DistributedGPipe with data-parallel replicas (a pp x dp mesh, Gloo on
loopback): after several optimizer steps every rank's parameters equal the
plain model trained on the global batch.

This file is also the worker script: the tests launch it with
``python test_distributed_replicas.py KIND RANK WORLD PORT OUT`` once per
rank; one launch runs every configuration of its layouts in a row.
"""
import functools
import json
import os
import sys
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ranks import init_gloo, launch_kind

D, H, C = 5, 7, 4
STEPS = 3
LR = 0.1


def layer_factories(seed):
    """Deterministic layers; `seed` changes every initial value (replicas
    other than the first start elsewhere: the broadcast must fix it)."""
    def make(i, ctor):
        def factory():
            torch.manual_seed(seed * 100 + i)
            return ctor()
        return factory
    ctors = [lambda: nn.Linear(D, H), nn.Tanh, lambda: nn.Linear(H, H),
             nn.ReLU, lambda: nn.Linear(H, H), nn.Tanh,
             lambda: nn.Linear(H, C)]
    return [make(i, c) for i, c in enumerate(ctors)]


LOSSES = {
    "mse": (nn.functional.mse_loss, "float"),
    "sum": (functools.partial(F.mse_loss, reduction="sum"), "float"),
    # mean over targets not ignored, weighted by class
    "ce-ignore": (nn.CrossEntropyLoss(ignore_index=-1,
                                      weight=torch.tensor([1.0, 2.0, 0.5, 1.5],
                                                          dtype=torch.float64)),
                  "class"),
}


def replica_batch(loss, step, replica):
    """Replica `replica`'s batch at `step`: uneven sizes across replicas;
    replica 1 of step 2 ignores every target of a class-index loss."""
    n = 3 + 2 * replica + step
    g = torch.Generator().manual_seed(1000 * step + replica)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    if LOSSES[loss][1] == "float":
        t = torch.randn(n, C, generator=g, dtype=torch.float64)
    else:
        t = torch.randint(0, C, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.3] = -1
        if step == 2 and replica == 1:
            t[:] = -1
    return x, t


def cfg(name, checkpoint, schedule, loss, chunks=3, overlap=True,
        tied=False, accumulate=1, virtual_stages=1, balance=None,
        in_cell=None):
    """`tied`: layers 2 and 4 share their weight (a tie across stages
    with K=2); `accumulate`: steps per optimizer step (no zero_grad
    between them); `balance`: instead of the layout's (K * v entries with
    `virtual_stages`); `in_cell`: whether every bucket starts within the
    rank's last backward cell (default: `overlap`)."""
    return dict(name=name, checkpoint=checkpoint, schedule=schedule,
                loss=loss, chunks=chunks, overlap=overlap, tied=tied,
                accumulate=accumulate, virtual_stages=virtual_stages,
                balance=balance,
                in_cell=overlap if in_cell is None else in_cell)


TIE = [["2.weight", "4.weight"]]


ALL = [cfg("always-gpipe-mse", "always", "gpipe", "mse"),
       cfg("except_last-gpipe-ce", "except_last", "gpipe", "ce-ignore"),
       cfg("never-gpipe-sum-after", "never", "gpipe", "sum", overlap=False),
       cfg("always-1f1b-ce", "always", "1f1b", "ce-ignore"),
       cfg("except_last-1f1b-sum", "except_last", "1f1b", "sum"),
       cfg("never-1f1b-mse", "never", "1f1b", "mse", chunks=2),
       cfg("tied-accumulate-ce", "except_last", "gpipe", "ce-ignore",
           tied=True, accumulate=2),
       # Split backward: the buckets start within the last W cell.
       cfg("always-zb-h1-ce", "always", "zb-h1", "ce-ignore"),
       # Two partitions per rank: the buckets of the later partition, whose
       # gradients are final before the rank's last backward cell (the
       # earlier partition's), start after that cell.
       cfg("interleaved-ce", "except_last", "interleaved", "ce-ignore",
           chunks=4, virtual_stages=2, balance=[2, 2, 2, 1], in_cell=False)]
SOME = [ALL[1], ALL[2], ALL[5]]

# (K stages, R replicas, balance, how the groups are made, configs)
LAYOUTS = {
    4: [(2, 2, [4, 3], "mesh", ALL)],
    3: [(3, 1, [3, 2, 2], "groups", SOME), (1, 3, [7], "mesh", SOME)],
}


# ---------------------------------------------------------------- workers
def _groups(dist, K, R, how):
    """(kwargs for DistributedGPipe, dp index, pp index) of this rank; rank
    g = dp * K + pp."""
    rank = dist.get_rank()
    dp, pp = divmod(rank, K)
    if how == "mesh":
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (R, K), mesh_dim_names=("dp", "pp"))
        return dict(mesh=mesh), dp, pp
    pp_groups = [dist.new_group([d * K + p for p in range(K)])
                 for d in range(R)]
    dp_groups = [dist.new_group([d * K + p for d in range(R)])
                 for p in range(K)]
    return (dict(process_group=pp_groups[dp], dp_group=dp_groups[pp]),
            dp, pp)


def worker_compare(rank, world, port, out):
    import pipegear
    torch.set_default_dtype(torch.float64)
    dist = init_gloo(rank, world, port)
    results = {}
    for K, R, balance, how, configs in LAYOUTS[world]:
        groups, dp, pp = _groups(dist, K, R, how)
        for c in configs:
            pipe = pipegear.DistributedGPipe(
                layer_factories(seed=1 + dp), c["balance"] or balance,
                chunks=c["chunks"], virtual_stages=c["virtual_stages"],
                checkpoint=c["checkpoint"], schedule=c["schedule"],
                timeout=20.0, overlap=c["overlap"], bucket_cap_mb=1e-4,
                tied_parameters=TIE if c["tied"] else None, **groups)
            assert pipe.coordinates == (dp, pp)
            opt = torch.optim.SGD(pipe.parameters(), lr=LR)
            loss_fn = LOSSES[c["loss"]][0]
            losses, started = [], []
            for step in range(STEPS):
                opt.zero_grad()
                for a in range(c["accumulate"]):
                    x, t = replica_batch(c["loss"],
                                         step * c["accumulate"] + a, dp)
                    loss = pipe.step(x if pipe.is_first else None,
                                     t if pipe.is_last else None, loss_fn)
                    losses.append(loss.item())
                    started.append((pipe._replicas.started_in_step,
                                    pipe._replicas.launched_in_cell
                                    == len(pipe._replicas.buckets)))
                    assert len(pipe.last_reductions()) == \
                        len(pipe._replicas.buckets) > 1
                opt.step()
            results[f"{K}x{R}-{c['name']}"] = dict(
                params={n: p.detach().clone()
                        for n, p in pipe.named_parameters()},
                losses=losses, dp=dp, pp=pp, started=started)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _cpp_pipe(factories, balance, pp_group, dp_group, c, timeout=20.0):
    """The C++ face's replicas (DistributedPipeline with a dp group) over
    this rank's slice, through the binding: (pipeline, slice)."""
    from collections import OrderedDict

    from pipegear import _C
    from pipegear.gpipe import GPipe, _Partition
    rank = pp_group.rank()
    offset = sum(balance[:rank])
    part = _Partition(OrderedDict(
        (str(i), factories[i]()) for i in range(offset, offset + balance[rank])))
    pipe = _C._DistributedPipeline(
        pp_group, [part], "cpu", [GPipe._hooks(part)], c["chunks"], c["checkpoint"],
        c["schedule"], timeout, 1800.0, list(balance), dp_group=dp_group,
        dp_parameters=list(part.parameters()),
        dp_buffers=list(part.buffers()), bucket_bytes=100)
    return pipe, part


def _cpp_step(pipe, x, t, loss_fn):
    from pipegear.loss import plan_loss
    first, last = pipe.rank == 0, pipe.rank == pipe.world_size - 1
    if not last:
        return pipe.step(x if first else None, None, None, "mean")
    reduction, count = plan_loss(loss_fn, t, None, None)
    return pipe.step(x if first else None, t, loss_fn, reduction, count=count)


def worker_cpp(rank, world, port, out):
    """The C++ face (2 x 2): every configuration but the tie (a tie is the
    Python face's)."""
    torch.set_default_dtype(torch.float64)
    dist = init_gloo(rank, world, port)
    groups, dp, pp = _groups(dist, 2, 2, "groups")
    results = {}
    for c in ALL:
        if c["tied"]:
            continue
        pipe, part = _cpp_pipe(layer_factories(seed=1 + dp), [4, 3],
                               groups["process_group"], groups["dp_group"], c)
        assert (pipe.replica, pipe.replicas) == (dp, 2)
        opt = torch.optim.SGD(part.parameters(), lr=LR)
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            for a in range(c["accumulate"]):
                x, t = replica_batch(c["loss"], step * c["accumulate"] + a, dp)
                losses.append(_cpp_step(pipe, x, t,
                                        LOSSES[c["loss"]][0]).item())
            opt.step()
        results[c["name"]] = dict(
            params={n: p.detach().clone()
                    for n, p in part.named_parameters()},
            losses=losses, dp=dp, pp=pp)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


class _Exit(nn.Linear):
    """The last layer, with the same parameters (the replicas agree on
    them), dying in its forward."""

    def __init__(self):
        super().__init__(H, C)

    def forward(self, x):
        os._exit(3)


def worker_crash(rank, world, port, out):
    """2 x 2 mesh; global rank PIPEGEAR_TEST_DYING dies in its forward."""
    import pipegear
    dist = init_gloo(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    dying = int(os.environ["PIPEGEAR_TEST_DYING"])
    layers = [lambda: nn.Linear(D, H), lambda: nn.Linear(H, C)]
    if rank == dying:
        layers[rank % 2] = _Exit
    timeout = float(os.environ["PIPEGEAR_TEST_TIMEOUT"])
    cpp = os.environ.get("PIPEGEAR_TEST_FACE") == "cpp"
    if cpp:
        pipe, _ = _cpp_pipe(layers, [1, 1], mesh.get_group("pp"),
                            mesh.get_group("dp"), cfg("", "except_last",
                                                      "gpipe", "mse", chunks=2),
                            timeout=timeout)
    else:
        pipe = pipegear.DistributedGPipe(layers, [1, 1], chunks=2, mesh=mesh,
                                         timeout=timeout)
    x, t = torch.randn(6, D), torch.randn(6, C)
    start = time.monotonic()
    try:
        if cpp:
            _cpp_step(pipe, x, t, F.mse_loss)
        else:
            pipe.step(x if pipe.is_first else None,
                      t if pipe.is_last else None, F.mse_loss)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001
        result = {"error": f"{type(e).__name__}: {e}",
                  "notes": getattr(e, "__notes__", [])}
    result["elapsed"] = time.monotonic() - start
    result["broken"] = pipe.broken
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # no teardown against a dead peer


def worker_mistake(rank, world, port, out):
    """2 x 2 mesh; replica 1's last rank passes no target to a loss that
    needs one: every rank raises, the next step works everywhere."""
    import pipegear
    dist = init_gloo(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    pipe = pipegear.DistributedGPipe(
        [lambda: nn.Linear(D, H), lambda: nn.Linear(H, C)], [1, 1], chunks=2,
        mesh=mesh, timeout=20.0)
    x, t = torch.randn(6, D), torch.randn(6, C)
    result = {}
    try:
        pipe.step(x if pipe.is_first else None,
                  None if rank == 3 else (t if pipe.is_last else None),
                  nn.MSELoss())
        result["error"] = None
    except Exception as e:  # noqa: BLE001
        result["error"] = f"{type(e).__name__}: {e}"
    result["after"] = float(pipe.step(x if pipe.is_first else None,
                                      t if pipe.is_last else None,
                                      nn.MSELoss()))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ tests
def _launch(kind, world, out, env_extra=None, **options):
    options.setdefault("timeout", 240)
    return launch_kind(__file__, kind, world, out, env_extra=env_extra,
                       **options)


def _reference(c, R):
    """The plain model (replica 0's initial values) trained on the global
    batch: every replica's batch of the step, concatenated."""
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Sequential(*[f() for f in layer_factories(seed=1)])
        if c["tied"]:
            model[4].weight = model[2].weight
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loss_fn = LOSSES[c["loss"]][0]
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            for a in range(c["accumulate"]):
                xs, ts = zip(*[replica_batch(
                    c["loss"], step * c["accumulate"] + a, d)
                    for d in range(R)])
                loss = loss_fn(model(torch.cat(xs)), torch.cat(ts))
                loss.backward()
                losses.append(loss.item())
            opt.step()
        return dict(model.named_parameters(remove_duplicate=False)), losses
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module", params=[4, 3], ids=["2x2", "3x1+1x3"])
def launched(request, tmp_path_factory):
    world = request.param
    out = str(tmp_path_factory.mktemp(f"replicas{world}"))
    codes, logs = _launch("compare", world, out)
    assert codes == [0] * world, "\n".join(logs)
    return world, [torch.load(os.path.join(out, f"rank{r}.pt"))
                   for r in range(world)]


def test_replicas_train_like_the_plain_model_on_the_global_batch(launched):
    """After 3 SGD steps every rank's parameters (and every step's loss)
    equal the plain model's trained on the global batch, float64, to 1e-10:
    every checkpoint mode, both schedules, uneven replica batches, a mean, a
    sum and a weighted cross-entropy with ignore_index (one replica's batch
    entirely ignored in a step), replicas initialised differently, many
    buckets, the sums started after each stage's last backward cell (and,
    in one configuration, after the step), a parameter tied across
    stages, and gradients accumulated over 2 steps per optimizer step."""
    world, ranks = launched
    for K, R, balance, how, configs in LAYOUTS[world]:
        for c in configs:
            key = f"{K}x{R}-{c['name']}"
            ref_params, ref_losses = _reference(c, R)
            seen = {d: set() for d in range(R)}
            for r, res in enumerate(ranks):
                got = res[key]
                # overlapped: started after the last backward cell, within
                # the pipeline's step; else after it
                # and every bucket within the last cell, as soon as its
                # parameters had their last gradient
                assert got["started"] == [(c["overlap"], c["in_cell"])] * \
                    (STEPS * c["accumulate"]), (key, r)
                for step, (a, b) in enumerate(zip(got["losses"], ref_losses)):
                    assert abs(a - b) <= 1e-10 * max(1.0, abs(b)), \
                        (key, r, step, a, b)
                for name, p in got["params"].items():
                    torch.testing.assert_close(
                        p, ref_params[name].detach(), rtol=1e-10, atol=1e-10,
                        msg=lambda m: f"{key} rank {r} {name}: {m}")
                    seen[got["dp"]].add(name)
            for d in range(R):  # every replica holds the whole model
                assert seen[d] == set(ref_params), (key, d)


@pytest.fixture(scope="module")
def launched_cpp(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("replicas_cpp"))
    codes, logs = _launch("cpp", 4, out)
    assert codes == [0] * 4, "\n".join(logs)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(4)]


def test_the_cpp_face_trains_like_the_plain_model_on_the_global_batch(
        launched_cpp):
    """The C++ DistributedPipeline with a dp group (2 x 2), through the
    binding: the same configurations as the Python face but the tie
    (every checkpoint mode, both schedules, mean / sum / cross-entropy with
    ignore_index and class weights, uneven replicas, accumulation)."""
    for c in ALL:
        if c["tied"]:
            continue
        ref_params, ref_losses = _reference(c, 2)
        for r, res in enumerate(launched_cpp):
            got = res[c["name"]]
            for step, (a, b) in enumerate(zip(got["losses"], ref_losses)):
                assert abs(a - b) <= 1e-10 * max(1.0, abs(b)), \
                    (c["name"], r, step, a, b)
            for name, p in got["params"].items():
                torch.testing.assert_close(
                    p, ref_params[name].detach(), rtol=1e-10, atol=1e-10,
                    msg=lambda m: f"{c['name']} rank {r} {name}: {m}")


@pytest.mark.parametrize("face", ["python", "cpp"])
def test_a_killed_rank_makes_every_rank_of_the_mesh_raise(tmp_path, face):
    """Global rank 3 (dp=1, pp=1) dies mid-step: its pipeline peer raises
    from the pipeline, the other replica's ranks raise naming it (or, for
    its dp peer, the lost replica), all within the timeouts."""
    timeout = 4.0
    survivors = [0, 1, 2]
    codes, logs = _launch("crash", 4, str(tmp_path),
                          {"PIPEGEAR_TEST_DYING": "3",
                           "PIPEGEAR_TEST_TIMEOUT": str(timeout),
                           "PIPEGEAR_TEST_FACE": face},
                          timeout=90, wait_for=survivors)
    assert codes[3] == 3, logs
    results = {}
    for r in survivors:
        with open(tmp_path / f"rank{r}.json") as f:
            results[r] = json.load(f)
        assert results[r]["error"] is not None, logs
        assert results[r]["elapsed"] < 2 * timeout + 6.0, results[r]
        assert results[r]["broken"] or r == 0, results[r]
    # the same replica's first stage: the pipeline's error (naming the
    # pipeline rank), mapped to the mesh by a note (Python face)
    assert "rank 1" in results[2]["error"], results[2]
    dead = "rank 3 (dp=1, pp=1)" if face == "python" else "(dp=1, pp=1)"
    if face == "python":
        assert any(dead in n for n in results[2]["notes"]), results[2]
    # the other replica's first stage: told by its dp peer (rank 2)
    assert dead in results[0]["error"], results[0]
    # the other replica's last stage: its dp peer is the dead rank
    assert dead in results[1]["error"], results[1]


def test_a_mistake_on_one_replica_fails_every_rank_and_the_next_step_works(
        tmp_path):
    codes, logs = _launch("mistake", 4, str(tmp_path), timeout=120)
    assert codes == [0] * 4, "\n".join(logs)
    after = set()
    for r in range(4):
        with open(tmp_path / f"rank{r}.json") as f:
            result = json.load(f)
        assert result["error"] is not None, result
        assert "target" in result["error"], result
        if r in (0, 1):  # the other replica names the rank and coordinates
            assert "rank 3 (dp=1, pp=1)" in result["error"], result
        after.add(result["after"])
    assert len(after) == 1  # one loss, of the global batch, everywhere


def test_bad_mesh_arguments_are_typed_errors():
    import pipegear
    with pytest.raises(TypeError, match="DeviceMesh"):
        pipegear.DistributedGPipe([nn.Linear(2, 2)], [1], mesh=object())
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        pipegear.DistributedGPipe([nn.Linear(2, 2)], [1], bucket_cap_mb=0,
                                  process_group=object())


if __name__ == "__main__":
    kind, rank, world, port, out = sys.argv[1:]
    globals()[f"worker_{kind}"](int(rank), int(world), int(port), out)
