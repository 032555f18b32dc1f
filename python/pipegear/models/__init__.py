"""Recipes turning real models into the ``nn.Sequential`` a pipeline takes.

Importing this package imports no model library: each recipe imports its
own (``transformers`` for GPT-2) when called, so ``import pipegear`` and
``import pipegear.models`` work without them.

- :func:`gpt2_sequential`: Hugging Face ``GPT2LMHeadModel`` as embeddings,
  blocks, final norm and the head tied to the embedding, saving and loading
  the plain model's state_dict keys; :func:`gpt2_state_dict_to_hf` /
  :func:`gpt2_state_dict_from_hf` rename between the layers' names and
  the model's; :class:`CausalLMLoss` the next-token loss for ``step``;
- :mod:`pipegear.models.data`: byte-level text from Python's standard
  library sources, packed into padded sequences.
"""
from pipegear.models.gpt2 import (CausalLMLoss, GPT2Embeddings, GPT2Layer,
                                  gpt2_sequential, gpt2_state_dict_from_hf,
                                  gpt2_state_dict_to_hf)

__all__ = ["CausalLMLoss", "GPT2Embeddings", "GPT2Layer",
           "gpt2_sequential", "gpt2_state_dict_from_hf",
           "gpt2_state_dict_to_hf"]
