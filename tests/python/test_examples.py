"""The Python examples run: train_gpt2.py in one process (GPipe) and
under torchrun with two ranks (DistributedGPipe), a few steps each, and the
plain GPT2LMHeadModel takes the trained weights (strict) in both."""
import os
import subprocess
import sys

import pytest

import pipegear
from ranks import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GPT2 = os.path.join(ROOT, "examples", "python", "train_gpt2.py")


def _run(argv, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(pipegear.__file__)),
         os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    proc = subprocess.run(
        argv + ["--steps", "2", "--eval-every", "2", "--sample", "8",
                "--layers", "2", "--width", "32", "--heads", "2",
                "--seq-len", "32", "--batch", "4", "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=300, cwd=ROOT)
    log = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, log
    assert "sample from the plain GPT2LMHeadModel" in log, log
    lines = (out / "gpt2_loss.csv").read_text().splitlines()
    assert lines[0] == "step,train_loss,held_out_loss" and len(lines) == 3
    return log


@pytest.mark.slow
def test_train_gpt2_in_one_process(tmp_path):
    pytest.importorskip("transformers")
    log = _run([sys.executable, GPT2], tmp_path)
    assert "balance [" in log


@pytest.mark.slow
def test_train_gpt2_under_torchrun(tmp_path):
    pytest.importorskip("transformers")
    log = _run([sys.executable, "-m", "torch.distributed.run",
                "--nproc_per_node=2", f"--master_port={free_port()}", GPT2],
               tmp_path)
    assert "over 2 ranks" in log
    assert "rank 0: embed" in log and "lm_head" in log
