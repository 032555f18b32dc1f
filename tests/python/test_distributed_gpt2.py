"""GPT-2 (transformers) through DistributedGPipe against the plain
GPT2LMHeadModel (issue #20): 2 and 3 ranks over Gloo, each rank a process,
the tied embedding and head on the first and the last rank.

Dropout off, float64: 20 AdamW steps for every chunks (1, 3, 4),
checkpoint mode and schedule give the plain model's loss at every step (on
every rank) and its parameters at the end (1e-9) on every rank's slice,
under the plain model's keys; the two copies of the tied weight are equal
bit for bit. Each rank also trains the plain model (on the same batches,
seeded alike) and reports its largest errors only.

This file is also the worker script: ``python test_distributed_gpt2.py
RANK WORLD PORT OUT``.
"""
import copy
import hashlib
import itertools
import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (an optional "
    "dependency: pip install transformers, or scripts/setup_env.sh)")

import pipegear  # noqa: E402

T, ROWS, STEPS = 16, 6, 20
# embed, h0, h1, ln_f, lm_head: the tie spans the first and the last rank.
BALANCES = {2: [2, 3], 3: [2, 1, 2]}
CONFIGS = list(itertools.product([1, 3, 4], ["always", "except_last", "never"],
                                 ["gpipe", "1f1b"]))


def _model():
    from pipegear.models import data

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=data.VOCAB_SIZE, n_positions=T, n_embd=16, n_layer=2,
        n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=data.PAD, eos_token_id=data.PAD)
    return transformers.GPT2LMHeadModel(config).double()


def _batches():
    """STEPS batches of ROWS sequences, each batch's last one padded (5
    ignored targets)."""
    from pipegear.models import data

    size = ROWS * T - 5
    text = data.stdlib_text(STEPS * size + 1)
    return [data.pack(text[i * size:(i + 1) * size + 1], T)
            for i in range(STEPS)]


def _worker(rank, world, port, out):
    import torch.distributed as dist
    from pipegear.models import CausalLMLoss, gpt2_sequential

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    batches = _batches()
    loss_fn = CausalLMLoss()
    plain = _model()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    ref_losses = []
    for x, y in batches:
        loss = loss_fn(plain(x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    ref_state = plain.state_dict()

    report = {}
    for chunks, checkpoint, schedule in CONFIGS:
        pipe = pipegear.DistributedGPipe(
            gpt2_sequential(copy.deepcopy(_model())), BALANCES[world],
            chunks=chunks, checkpoint=checkpoint, schedule=schedule,
            timeout=60.0)
        opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
        losses = []
        for x, y in batches:
            losses.append(pipe.step(x if pipe.is_first else None,
                                    y if pipe.is_last else None,
                                    loss_fn).item())
            opt.step()
            opt.zero_grad()
        state = pipe.state_dict()  # this rank's slice, the model's keys
        tie = state.get("transformer.wte.weight", state.get("lm_head.weight"))
        report[f"{chunks}-{checkpoint}-{schedule}"] = {
            "loss_error": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "state_error": max((state[k] - ref_state[k]).abs().max().item()
                               for k in state),
            "keys": list(state),
            "tie": None if tie is None else hashlib.sha256(
                tie.numpy().tobytes()).hexdigest(),
        }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_gpt2_across_ranks_trains_like_the_plain_model(world, tmp_path):
    from ranks import run_ranks

    reports = run_ranks(__file__, world, tmp_path, timeout=600)
    ref_keys = list(_model().state_dict())
    for chunks, checkpoint, schedule in CONFIGS:
        config = f"{chunks}-{checkpoint}-{schedule}"
        keys = []
        for rank, report in enumerate(reports):
            r = report[config]
            assert r["loss_error"] <= 1e-9, (config, rank, r)
            assert r["state_error"] <= 1e-9, (config, rank, r)
            keys += r["keys"]
        # The slices together hold the plain model's keys, the tied weight
        # on the first rank (as the embedding) and the last (as the head).
        assert sorted(keys) == sorted(ref_keys), config
        first, last = reports[0][config]["tie"], reports[-1][config]["tie"]
        assert first is not None and first == last, config
        assert all(r[config]["tie"] is None for r in reports[1:-1]), config


if __name__ == "__main__":
    _worker(*map(int, sys.argv[1:4]), sys.argv[4])
