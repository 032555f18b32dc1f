"""Hugging Face GPT-2 end to end through pipegear (issue #20).

A tiny ``GPT2LMHeadModel`` (random init, no download) turned into an
``nn.Sequential`` by ``pipegear.models.gpt2_sequential``, trained on byte
tokens of Python's standard library sources (each batch's last sequence
padded, so the loss ignores targets), with its head tied to the embedding
across the first and the last stage:

- dropout off, float64: 20 AdamW steps of the pipeline (K = 1, 2, 4;
  chunks 1, 3, 4; every checkpoint mode; both schedules) give the plain
  model's losses at every step and its parameters at the end (1e-9),
  the tied weight included, under both of its names;
- dropout on: the same seed gives the same losses, bit for bit, run to run
  and across checkpoint modes and schedules, and dropout does act;
- the state_dict loads into the plain model with strict=True and back.

Skipped when transformers is not installed (requirements-dev.txt installs
it).
"""
import copy
import functools
import itertools
import pickle

import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (an optional "
    "dependency: pip install transformers, or scripts/setup_env.sh)")

import pipegear  # noqa: E402
from pipegear.models import (CausalLMLoss, data, gpt2_sequential,  # noqa: E402
                             gpt2_state_dict_from_hf, gpt2_state_dict_to_hf)

T, ROWS, STEPS = 16, 6, 20  # tokens per sequence, rows per batch, steps
TOL = dict(rtol=1e-9, atol=1e-9)


def config(dropout=0.0, layers=3):
    return transformers.GPT2Config(
        vocab_size=data.VOCAB_SIZE, n_positions=T, n_embd=16, n_layer=layers,
        n_head=2, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout, bos_token_id=data.PAD, eos_token_id=data.PAD)


@functools.lru_cache(maxsize=None)
def _base(dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config(dropout)).to(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def plain_model(dropout=0.0, dtype=torch.float64):
    return copy.deepcopy(_base(dropout, dtype))


@functools.lru_cache(maxsize=None)
def batches():
    """STEPS batches of ROWS sequences from consecutive stretches of the
    standard library's sources; each stretch is 5 bytes short of filling
    its rows, so the last sequence of every batch ends in padding."""
    size = ROWS * T - 5
    text = data.stdlib_text(STEPS * size + 1)
    out = []
    for i in range(STEPS):
        x, y = data.pack(text[i * size:(i + 1) * size + 1], T)
        assert x.shape == (ROWS, T) and (y == data.IGNORE).sum() == 5
        out.append((x, y))
    return out


@functools.lru_cache(maxsize=None)
def plain_run():
    """The plain model's losses on batches() and its final state."""
    model = plain_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = CausalLMLoss()
    losses = []
    for x, y in batches():
        loss = loss_fn(model(x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, model.state_dict()


BALANCES = {1: [6], 2: [3, 3], 4: [2, 1, 1, 2]}  # embed, h0-h2, ln_f, lm_head


def pipeline(k, chunks, checkpoint="except_last", schedule="gpipe",
             dropout=0.0, dtype=torch.float64):
    seq = gpt2_sequential(plain_model(dropout, dtype))
    return pipegear.GPipe(seq, BALANCES[k], devices=["cpu"] * k,
                          chunks=chunks, checkpoint=checkpoint,
                          schedule=schedule)


def test_the_sequential_computes_the_model():
    model = plain_model()
    seq = gpt2_sequential(copy.deepcopy(model))
    assert [name for name, _ in seq.named_children()] == \
        ["embed", "h0", "h1", "h2", "ln_f", "lm_head"]
    assert seq.lm_head.weight is seq.embed.wte.weight
    x, y = batches()[0]
    for mode in (True, False):
        model.train(mode)
        seq.train(mode)
        torch.testing.assert_close(seq(x), model(x).logits, rtol=0, atol=0)
    # CausalLMLoss on shifted targets is the model's own loss on labels
    # (which transformers computes in float32).
    shifted = torch.cat([x[:, 1:], torch.full((ROWS, 1), -100)], 1)
    torch.testing.assert_close(CausalLMLoss()(seq(x), shifted).float(),
                               model(x, labels=x).loss, rtol=1e-6, atol=1e-6)


# Every K, chunks, checkpoint mode and schedule: 54 runs of 20 steps.
GRID = list(itertools.product([1, 2, 4], [1, 3, 4],
                              ["always", "except_last", "never"],
                              ["gpipe", "1f1b"]))


@pytest.mark.parametrize("k, chunks, checkpoint, schedule", GRID)
def test_training_equals_the_plain_model(k, chunks, checkpoint, schedule):
    ref_losses, ref_state = plain_run()
    pipe = pipeline(k, chunks, checkpoint, schedule)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    loss_fn = CausalLMLoss()
    for step, (x, y) in enumerate(batches()):
        loss = pipe.step(x, y, loss_fn)
        torch.testing.assert_close(loss, ref_losses[step], **TOL,
                                   msg=f"step {step}")
        opt.step()
        opt.zero_grad()
    state = pipe.state_dict()  # under the plain model's keys
    assert list(state) == list(ref_state)
    for key in ref_state:  # transformer.wte.weight and lm_head.weight too
        torch.testing.assert_close(state[key], ref_state[key], **TOL,
                                   msg=key)


def test_module_style_equals_the_plain_model():
    ref_losses, ref_state = plain_run()
    pipe = pipeline(2, 3, "always")
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    loss_fn = CausalLMLoss()
    for step, (x, y) in enumerate(batches()):
        loss = loss_fn(pipe(x), y)
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref_losses[step], **TOL)
        opt.step()
        opt.zero_grad()
    state = pipe.state_dict()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], **TOL,
                                   msg=key)


def _dropout_losses(checkpoint, schedule, steps=4):
    pipe = pipeline(2, 4, checkpoint, schedule, dropout=0.1,
                    dtype=torch.float32)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    torch.manual_seed(7)
    losses = []
    for x, y in batches()[:steps]:
        losses.append(pipe.step(x, y, CausalLMLoss()))
        opt.step()
        opt.zero_grad()
    return torch.stack(losses), pipe.embed.wte.weight.detach().clone()


def test_dropout_the_same_seed_gives_the_same_losses():
    """Bit for bit run to run and across checkpoint modes (each cell draws
    its masks from streams of its own; docs/engine.md, "Randomness"); the
    schedules draw the same masks but sum weight gradients in their own
    order, so 1f1b equals gpipe up to rounding and itself bit for bit."""
    losses, wte = _dropout_losses("except_last", "gpipe")
    for checkpoint in ("except_last", "always", "never"):
        again, wte_again = _dropout_losses(checkpoint, "gpipe")
        assert torch.equal(again, losses), checkpoint
        assert torch.equal(wte_again, wte), checkpoint
    other, wte_other = _dropout_losses("always", "1f1b")
    again, wte_again = _dropout_losses("always", "1f1b")
    assert torch.equal(again, other) and torch.equal(wte_again, wte_other)
    torch.testing.assert_close(other, losses, rtol=1e-5, atol=1e-5)
    # Dropout does act: without it the same steps give other losses.
    pipe = pipeline(2, 4, dropout=0.1, dtype=torch.float32).eval()
    x, y = batches()[0]
    with torch.no_grad():
        assert not torch.equal(pipe.step(x, y, CausalLMLoss()), losses[0])


def test_the_state_dict_loads_into_the_plain_model_and_back():
    """The sequential and any pipeline over it save and load the plain
    GPT2LMHeadModel's keys (its state-dict hooks, which pipelines adopt):
    no renaming between a pipeline's checkpoint and the model."""
    ref_keys = list(plain_model().state_dict())
    assert list(gpt2_sequential(plain_model()).state_dict()) == ref_keys
    pipe = pipeline(2, 4)
    x, y = batches()[0]
    pipe.step(x, y, CausalLMLoss())
    torch.optim.AdamW(pipe.parameters(), lr=1e-2).step()
    assert list(pipe.state_dict()) == ref_keys

    model = transformers.GPT2LMHeadModel(config()).double()
    model.load_state_dict(pipe.state_dict(), strict=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    pipe.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), model(x).logits, **TOL)

        # And back: a fresh pipeline takes the plain model's state.
        other = pipeline(4, 3).eval()
        other.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(other(x), model(x).logits, **TOL)
        # A state saved under the layers' keys (pipegear before the hooks,
        # or gpt2_state_dict_from_hf) loads too.
        other = pipeline(1, 2).eval()
        other.load_state_dict(gpt2_state_dict_from_hf(model.state_dict()),
                              strict=True)
        torch.testing.assert_close(other(x), model(x).logits, **TOL)
        # Copies and pickles keep the keys.
        for copied in (copy.deepcopy(other),
                       pickle.loads(pickle.dumps(other))):
            assert list(copied.state_dict()) == ref_keys
    # The tie survives in the pipeline: one parameter, both names.
    assert len(list(other.parameters())) == len(list(model.parameters()))
    assert torch.equal(other.state_dict()["lm_head.weight"],
                       other.state_dict()["transformer.wte.weight"])
    # The renames go either way and leave keys already renamed alone.
    layer_keys = gpt2_state_dict_from_hf(model.state_dict())
    assert next(iter(layer_keys)) == "embed.wte.weight"
    assert list(gpt2_state_dict_to_hf(layer_keys)) == ref_keys
    assert list(gpt2_state_dict_to_hf(model.state_dict())) == ref_keys
    assert list(gpt2_state_dict_from_hf(layer_keys)) == list(layer_keys)


def test_renaming_rejects_foreign_keys():
    with pytest.raises(ValueError, match="'encoder.weight' is not a key"):
        gpt2_state_dict_to_hf({"encoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="'transformer.h.x.attn' is not"):
        gpt2_state_dict_from_hf({"transformer.h.x.attn": torch.zeros(1)})


def test_the_recipe_refuses_what_it_does_not_cover():
    with pytest.raises(TypeError, match="GPT2LMHeadModel, got Linear"):
        gpt2_sequential(torch.nn.Linear(2, 2))
    cross = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**{**config().to_dict(),
                                   "add_cross_attention": True}))
    with pytest.raises(ValueError, match="add_cross_attention"):
        gpt2_sequential(cross)
    seq = gpt2_sequential(plain_model())
    with pytest.raises(ValueError, match="longer than the model's "
                                         f"n_positions={T}"):
        seq(torch.zeros(1, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids of shape"):
        seq(torch.zeros(1, T))


def test_the_data_is_packed_with_padding():
    x, y = data.pack(b"abcdefg", 4)
    assert x.tolist() == [[97, 98, 99, 100], [101, 102, data.PAD, data.PAD]]
    assert y.tolist() == [[98, 99, 100, 101], [102, 103, -100, -100]]
    assert F.cross_entropy(torch.zeros(8, data.VOCAB_SIZE), y.flatten(),
                           reduction="sum").isfinite()
    text = data.stdlib_text(10_000)
    assert len(text) == 10_000 and text == data.stdlib_text(10_000)
    assert data.stdlib_files()[0].endswith(".py")
    with pytest.raises(ValueError, match="at least 2 bytes"):
        data.pack(b"a", 4)
    with pytest.raises(ValueError, match="seq_len must be an int"):
        data.pack(b"abc", 0)
