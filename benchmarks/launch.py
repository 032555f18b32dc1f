"""Starting the ranks of a multi-process benchmark on this machine."""
import os
import socket
import subprocess
import sys
from typing import Optional, Sequence


def run_ranks(script: str, world: int, argv: Sequence[str],
              env_extra: Optional[dict] = None) -> list[str]:
    """Runs ``script --worker RANK WORLD PORT *argv`` as `world` processes
    on 127.0.0.1, one intra-op thread each, with this checkout's python/
    first on the import path. Returns each rank's output; exits with all
    of them when a rank fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(here, "..", "python"), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen(
        [sys.executable, script, "--worker", str(r), str(world), str(port),
         *map(str, argv)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT) for r in range(world)]
    outs = [p.communicate()[0].decode(errors="replace") for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("\n".join(outs))
    return outs
