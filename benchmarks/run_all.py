"""Runs every benchmarks/bench_*.py in turn and prints its output.

`make bench` calls this. Each benchmark runs in its own interpreter (so one
benchmark's threads, allocator state and torch settings do not leak into the
next), in name order, with the repository's python/ on the import path.
Exits non-zero if any benchmark failed; the others still run.

Run: .venv/bin/python benchmarks/run_all.py [NAME_SUBSTRING ...]
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(a in s.name for a in argv)]
    if not scripts:
        print("no benchmarks matched", file=sys.stderr)
        return 1
    env = dict(os.environ)
    python_dir = str(ROOT / "python")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (python_dir, env.get("PYTHONPATH")) if p)
    failed = []
    for script in scripts:
        print(f"==> {script.relative_to(ROOT)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)], cwd=ROOT, env=env)
        took = time.perf_counter() - start
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"<== {script.name}: {status}, {took:.0f} s\n", flush=True)
        if rc != 0:
            failed.append(script.name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
