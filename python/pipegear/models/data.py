"""Real text without a download: the sources of Python's standard library.

A language model needs text nobody here wrote, and this machine has no
network. Every Python installation carries megabytes of it: the ``.py``
files under ``sysconfig.get_paths()['stdlib']``. They are tokenized at the
byte level (token = byte, 256 tokens, plus :data:`PAD`), so no tokenizer
needs to be downloaded either, and packed into fixed-length sequences::

    text = stdlib_text(max_bytes=1 << 20)       # bytes, files in sorted order
    inputs, targets = pack(text, seq_len=128)   # (N, 128) each

``targets[i, t]`` is the token after ``inputs[i, t]``; the last sequence is
padded (inputs with :data:`PAD`, targets with :data:`IGNORE`), so a mean
loss counts only real targets.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Optional

import torch

__all__ = ["IGNORE", "PAD", "VOCAB_SIZE", "pack", "stdlib_files",
           "stdlib_text"]

PAD = 256         #: the padding token of the inputs (after the 256 bytes)
VOCAB_SIZE = 257  #: 256 bytes + PAD
IGNORE = -100     #: the padding of the targets (cross-entropy's ignore_index)

# Third-party packages installed into the standard library's directory are
# not the standard library (and differ from machine to machine).
_SKIPPED = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: Optional[str] = None) -> list[str]:
    """The ``.py`` files under `root` (default: this Python's standard
    library), sorted by their path relative to it, so that the text is the
    same on every run (and on every machine with the same Python)."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED)
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found.append((os.path.relpath(path, root), path))
    return [path for _, path in sorted(found)]


def stdlib_text(max_bytes: Optional[int] = None,
                root: Optional[str] = None) -> bytes:
    """The standard library's sources, one file after the other (each
    ending with a newline), cut at `max_bytes` (all of it when None).

    Raises:
        ValueError: `max_bytes` below 2 (no input-target pair), or no
            ``.py`` file under `root`.
    """
    if max_bytes is not None and max_bytes < 2:
        raise ValueError(f"max_bytes must be at least 2, got {max_bytes}")
    files = stdlib_files(root)
    if not files:
        raise ValueError(f"no .py files under {root or 'the standard library'}")
    chunks, size = [], 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        if not data.endswith(b"\n"):
            data += b"\n"
        chunks.append(data)
        size += len(data)
        if max_bytes is not None and size >= max_bytes:
            break
    text = b"".join(chunks)
    return text if max_bytes is None else text[:max_bytes]


def pack(text: bytes, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of `text` as next-token pairs of `seq_len` tokens.

    Returns ``(inputs, targets)``, int64 tensors of shape (N, seq_len) with
    N = ceil((len(text) - 1) / seq_len): sequence i covers bytes
    ``i*seq_len .. (i+1)*seq_len`` of the text and its targets are the
    bytes one further. The last sequence is padded when the text does not
    fill it: inputs with :data:`PAD`, targets with :data:`IGNORE`.

    Raises:
        ValueError: `seq_len` below 1, or a text of fewer than 2 bytes.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) \
            or seq_len < 1:
        raise ValueError(f"seq_len must be an int of at least 1, got "
                         f"{seq_len!r}")
    if len(text) < 2:
        raise ValueError("pack needs at least 2 bytes of text (one input and "
                         f"its target), got {len(text)}")
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    pairs = len(tokens) - 1
    rows = -(-pairs // seq_len)
    inputs = torch.full((rows * seq_len,), PAD, dtype=torch.long)
    targets = torch.full((rows * seq_len,), IGNORE, dtype=torch.long)
    inputs[:pairs] = tokens[:-1]
    targets[:pairs] = tokens[1:]
    return inputs.view(rows, seq_len), targets.view(rows, seq_len)
