"""Starting the ranks of a multi-process test: each rank is a process
running a test file as a script, on 127.0.0.1, one intra-op thread each,
with this checkout's pipegear first on its path."""
import json
import os
import socket
import subprocess
import sys
from typing import Callable, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, world: int, argv: Callable[[int, int], Sequence[str]],
           *, timeout: float = 120, env_extra: Optional[dict] = None,
           wait_for: Optional[Sequence[int]] = None
           ) -> tuple[list[Optional[int]], list[str]]:
    """Runs `script` as `world` processes with arguments ``argv(rank,
    port)``; waits for all of them, or only for the ranks in `wait_for`
    (the others are killed afterwards). Returns the exit codes and the
    output of each rank."""
    import pipegear

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(pipegear.__file__)),
         env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    port = free_port()
    procs = [subprocess.Popen([sys.executable, script,
                               *map(str, argv(r, port))],
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = [""] * world
    try:
        for r in (range(world) if wait_for is None else wait_for):
            logs[r] = procs[r].communicate(timeout=timeout)[0].decode(
                errors="replace")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], logs


def run_ranks(script: str, world: int, out: "os.PathLike[str]", *extra: str,
              timeout: float = 240) -> list:
    """Runs ``script RANK WORLD PORT OUT *extra`` as `world` ranks, checks
    that every one exits with 0 (showing their output otherwise) and
    returns the JSON each wrote to ``OUT/rank<r>.json``."""
    codes, logs = launch(script, world,
                         lambda r, port: [r, world, port, out, *extra],
                         timeout=timeout)
    assert codes == [0] * world, "\n".join(logs)
    reports = []
    for r in range(world):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            reports.append(json.load(f))
    return reports


def launch_kind(script: str, kind: str, world: int, out: str, **options
                ) -> tuple[list[Optional[int]], list[str]]:
    """``script KIND RANK WORLD PORT OUT`` as `world` ranks: the form of
    the test files whose worker runs one of several kinds of work
    (options: those of :func:`launch`)."""
    return launch(script, world, lambda r, port: [kind, r, world, port, out],
                  **options)


def init_gloo(rank: int, world: int, port: int, timeout: float = 60):
    """In a worker: one intra-op thread, and the default Gloo group of
    `world` ranks on 127.0.0.1:`port`. Returns torch.distributed."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    return dist


def init_mesh(rank: int, world: int, port: int, stages: int) -> dict:
    """In a worker: joins the Gloo group of `world` ranks and makes the
    groups of a (world // stages) x `stages` layout, rank g = dp * stages +
    pp. Returns the DistributedGPipe arguments of this rank
    (``process_group``, ``dp_group``) and its coordinates (``dp``,
    ``pp``)."""
    dist = init_gloo(rank, world, port)
    replicas = world // stages
    dp, pp = divmod(rank, stages)
    # Every rank makes every group, in the same order (new_group's rule).
    pp_groups = [dist.new_group([d * stages + p for p in range(stages)])
                 for d in range(replicas)]
    dp_groups = [dist.new_group([d * stages + p for d in range(replicas)])
                 for p in range(stages)]
    return {"dp": dp, "pp": pp, "groups": dict(
        process_group=pp_groups[dp], dp_group=dp_groups[pp])}
