"""Training text every machine has: the Python standard library's own sources.

Files are split into train and held-out sets by a hash of their relative path,
so the split is stable across runs and machines with the same Python version.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
HELD_OUT_EVERY = 50  # one file in 50 is held out


@dataclass
class Corpus:
    train_files: list[str]
    held_out_files: list[str]
    root: str


def stdlib_corpus(root: str | None = None, max_bytes: int = 64 << 20) -> Corpus:
    """The `.py` files under `root` (default: this interpreter's stdlib),
    without site-packages, in sorted order, capped at `max_bytes` in total."""
    root = root or sysconfig.get_paths()["stdlib"]
    paths, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if total + size > max_bytes:
                break
            paths.append(path)
            total += size
    if not paths:
        raise ValueError(f"no .py files found under {root}")
    train, held_out = [], []
    for path in paths:
        rel = os.path.relpath(path, root).encode()
        (held_out if zlib.crc32(rel) % HELD_OUT_EVERY == 0 else train).append(path)
    return Corpus(train, held_out, root)


def read_texts(paths: list[str]) -> list[str]:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) with `EOS_TOKEN` as token 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode_stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one token stream, each followed by the end-of-text token."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    pieces = []
    for encoding in tokenizer.encode_batch(texts):
        pieces.append(np.asarray(encoding.ids, np.int32))
        pieces.append(np.asarray([eos], np.int32))
    return np.concatenate(pieces)


def sample_windows(stream: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """`batch` random windows of `length` consecutive tokens: [batch, length]."""
    if len(stream) <= length:
        raise ValueError(f"token stream of {len(stream)} tokens is too short for windows of {length}")
    starts = rng.integers(0, len(stream) - length, size=batch)
    return np.stack([stream[s : s + length] for s in starts])
