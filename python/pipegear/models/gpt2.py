"""Hugging Face GPT-2 as the ``nn.Sequential`` a pipeline takes.

``GPT2LMHeadModel`` is not a sequence of layers: its ``transformer`` adds
position embeddings to the token embeddings, builds the causal attention
mask and calls each block with it, and the head ``lm_head`` reuses the
token embedding's weight. :func:`gpt2_sequential` lays those steps out as
layers, each taking the previous one's tensor::

    embed (wte + wpe, dropout) -> h0 ... h{n-1} -> ln_f -> lm_head

The layers *are* the model's modules (no copy): the sequential computes
what ``model(input_ids).logits`` computes, with the same parameters, and
``lm_head.weight is embed.wte.weight`` as in the model; its state_dict
has the model's keys. A pipeline keeps
that tie as one parameter across its stages (docs/engine.md, "Tied
parameters").

``transformers`` is imported only by :func:`gpt2_sequential` (and the
layers, when they run); tested with transformers 5.24.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping, Optional

import torch
from torch import nn

__all__ = ["CausalLMLoss", "GPT2Embeddings", "GPT2Layer", "gpt2_sequential",
           "gpt2_state_dict_from_hf", "gpt2_state_dict_to_hf"]


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    """GPT2Model's position ids without a cache: 0 .. T-1, one row."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


class GPT2Embeddings(nn.Module):
    """Token ids (batch, T) -> hidden states (batch, T, n_embd): ``wte(ids)
    + wpe(positions)``, then the embedding dropout, as GPT2Model does
    before its first block."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding,
                 drop: nn.Module) -> None:
        super().__init__()
        self.wte = wte
        self.wpe = wpe
        self.drop = drop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("GPT2Embeddings takes token ids of shape (batch, "
                             f"sequence), got a {input_ids.dtype} tensor of "
                             f"shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.wpe.num_embeddings:
            raise ValueError(f"sequences of {input_ids.shape[1]} tokens are "
                             "longer than the model's n_positions="
                             f"{self.wpe.num_embeddings}")
        hidden = self.wte(input_ids)
        return self.drop(hidden + self.wpe(_positions(input_ids)).to(
            hidden.device))


class GPT2Layer(nn.Module):
    """One ``GPT2Block`` on hidden states alone: builds the causal mask
    GPT2Model would hand it (``None`` under SDPA, which then attends
    causally by itself; a materialised mask under ``eager``), calls it
    without a cache and returns the hidden states (older transformers
    return a tuple from a block: its first item)."""

    def __init__(self, block: nn.Module, config: Any) -> None:
        super().__init__()
        self.block = block
        self.config = config  # not a module: read for the mask

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        positions = _positions(hidden)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden,
                                  attention_mask=None, cache=None,
                                  position_ids=positions)
        out = self.block(hidden, attention_mask=mask, use_cache=False,
                         position_ids=positions)
        return out[0] if isinstance(out, tuple) else out


def gpt2_sequential(model: nn.Module) -> nn.Sequential:
    """``transformers.GPT2LMHeadModel`` as an ``nn.Sequential`` of
    ``2 + n_layer + 1`` layers: ``embed`` (:class:`GPT2Embeddings`),
    ``h0`` ... ``h{n-1}`` (:class:`GPT2Layer`), ``ln_f``, ``lm_head``.

    It maps token ids (batch, T) to logits (batch, T, vocab): what
    ``model(input_ids).logits`` gives, in train and eval mode. The layers are
    the model's modules, shared, not copied (``copy.deepcopy(model)`` first
    to keep a separate plain model): ``lm_head.weight`` is
    ``embed.wte.weight`` when the model ties them. Its ``state_dict`` has
    the model's keys (``transformer.h.0.attn.c_attn.weight``, not the
    layers' ``h0.block.attn.c_attn.weight``), through state-dict hooks that
    :class:`pipegear.GPipe` and :class:`pipegear.DistributedGPipe` adopt:
    a pipeline's checkpoint loads into ``GPT2LMHeadModel`` with
    ``strict=True``, and the model's into the pipeline (which also takes
    the layers' keys). :func:`gpt2_state_dict_to_hf` and
    :func:`gpt2_state_dict_from_hf` rename between the two explicitly.

    Raises:
        TypeError: `model` is not a GPT2LMHeadModel.
        ValueError: a configuration the sequence does not cover: cross
            attention (``add_cross_attention``: a block would need the
            encoder's states).
    """
    from transformers import GPT2LMHeadModel

    if not isinstance(model, GPT2LMHeadModel):
        raise TypeError("gpt2_sequential takes a transformers."
                        f"GPT2LMHeadModel, got {type(model).__name__}")
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError("gpt2_sequential: add_cross_attention=True needs "
                         "the encoder's hidden states in every block; a "
                         "sequence of layers passes only the hidden states")
    t = model.transformer
    layers: list[tuple[str, nn.Module]] = [
        ("embed", GPT2Embeddings(t.wte, t.wpe, t.drop))]
    layers += [(f"h{i}", GPT2Layer(block, model.config))
               for i, block in enumerate(t.h)]
    layers += [("ln_f", t.ln_f), ("lm_head", model.lm_head)]
    seq = nn.Sequential(OrderedDict(layers))
    seq.train(model.training)
    # The model's keys, in the sequential and in any pipeline over it
    # (pipelines adopt the hooks of the module they split).
    seq.register_state_dict_post_hook(_save_hf_keys)
    seq.register_load_state_dict_pre_hook(_load_hf_keys)
    return seq


# (sequential key pattern, plain model key pattern)
_RENAMES = [
    (r"embed\.(wte|wpe)\.(.+)", r"transformer.\1.\2"),
    (r"h(\d+)\.block\.(.+)", r"transformer.h.\1.\2"),
    (r"ln_f\.(.+)", r"transformer.ln_f.\1"),
    (r"lm_head\.(.+)", r"lm_head.\1"),
]
_TO_HF = [(re.compile(a), b) for a, b in _RENAMES]


def _try_rename(key: str, rules: list[tuple[re.Pattern, str]]
                ) -> Optional[str]:
    for pattern, replacement in rules:
        match = pattern.fullmatch(key)
        if match:
            return match.expand(replacement)
    return None


def _rename(key: str, rules: list[tuple[re.Pattern, str]],
            already: list[tuple[re.Pattern, str]], what: str) -> str:
    """`key` renamed by `rules`; a key `already` in the target naming (one
    the inverse rules would rename) stays as it is."""
    new = _try_rename(key, rules)
    if new is not None:
        return new
    if _try_rename(key, already) is not None:
        return key
    raise ValueError(f"{what}: {key!r} is not a key of the GPT-2 "
                     "state_dict this function renames")


def _save_hf_keys(module: nn.Module, state_dict: dict[str, Any],
                  prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook of :func:`gpt2_sequential`: the layers'
    keys under ``prefix`` become the plain model's, in place and in order
    (a public post-hook may not return a new dict)."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix):
            new = _try_rename(key[len(prefix):], _TO_HF)
            key = key if new is None else prefix + new
        state_dict[key] = value


def _load_hf_keys(module: nn.Module, state_dict: dict[str, Any],
                  prefix: str, *_: Any) -> None:
    """``load_state_dict`` pre-hook of :func:`gpt2_sequential`: the plain
    model's keys under ``prefix`` become the layers'. Keys in the layers'
    naming (saved before the sequential named its state as the model) load
    too; any other key stays, for ``strict`` to report."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = _try_rename(key[len(prefix):], _FROM_HF_RULES)
        if new is not None and prefix + new != key:
            state_dict[prefix + new] = state_dict.pop(key)


def gpt2_state_dict_to_hf(state_dict: Mapping[str, Any]
                          ) -> "OrderedDict[str, Any]":
    """A state_dict under :func:`gpt2_sequential`'s layer keys (from
    ``named_parameters``, or saved by pipegear before the sequential named
    its state as the model) under the plain ``GPT2LMHeadModel``'s keys:
    ``embed.wte.weight`` -> ``transformer.wte.weight``,
    ``h3.block.ln_1.bias`` -> ``transformer.h.3.ln_1.bias``,
    ``lm_head.weight`` stays. Keys already the model's stay as they are
    (``state_dict()`` of the sequential and of pipelines over it already
    gives them).

    Raises:
        ValueError: a key that is neither the layers' nor the model's.
    """
    return OrderedDict((_rename(k, _TO_HF, _FROM_HF_RULES,
                                "gpt2_state_dict_to_hf"), v)
                       for k, v in state_dict.items())


_FROM_HF_RULES = [
    (re.compile(r"transformer\.(wte|wpe)\.(.+)"), r"embed.\1.\2"),
    (re.compile(r"transformer\.h\.(\d+)\.(.+)"), r"h\1.block.\2"),
    (re.compile(r"transformer\.ln_f\.(.+)"), r"ln_f.\1"),
    (re.compile(r"lm_head\.(.+)"), r"lm_head.\1"),
]


def gpt2_state_dict_from_hf(state_dict: Mapping[str, Any]
                            ) -> "OrderedDict[str, Any]":
    """The inverse of :func:`gpt2_state_dict_to_hf`: a ``GPT2LMHeadModel``
    state_dict under :func:`gpt2_sequential`'s layer keys (the names of
    ``named_parameters``); keys already the layers' stay. The sequential
    and pipelines over it load either.

    Raises:
        ValueError: a key that is neither the model's nor the layers'.
    """
    return OrderedDict((_rename(k, _FROM_HF_RULES, _TO_HF,
                                "gpt2_state_dict_from_hf"), v)
                       for k, v in state_dict.items())


class CausalLMLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` over logits (batch, T, vocab) and next-token
    targets (batch, T): the loss of ``GPT2LMHeadModel(..., labels=)``
    when the targets are already shifted (target[:, t] is the token after
    input[:, t]), averaged over the targets that are not ``ignore_index``
    (-100, padding). 16-bit logits are upcast first, as transformers does.

    Being a CrossEntropyLoss, ``pipe.step`` reads its reduction and
    ``ignore_index`` from it and weighs each micro-batch by the targets it
    counts (docs/engine.md, "Losses"), so a padded micro-batch counts for
    what it holds.
    """

    def forward(self, logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return super().forward(logits.flatten(0, -2), target.flatten())
