"""Byte-level tokenizer: ids 0..255 are raw utf-8 bytes, plus three specials.

A byte vocabulary needs no training data or vocabulary file, so every corpus
(stdlib source, lm1b, ...) is tokenized identically and checkpoints stay
comparable across datasets.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from stmoe_jax.config import options

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259


@options.add_check
def _check_vocab(config) -> None:
  if config.model.vocab_size < VOCAB_SIZE:
    raise options.ConfigError(
        f'config.model.vocab_size={config.model.vocab_size!r} is invalid: expected at least '
        f'{VOCAB_SIZE} (bytes + pad/bos/eos; smaller would clip token ids).')


def encode(text: str | bytes) -> np.ndarray:
  """Encodes text as its utf-8 bytes, without special tokens.

  Args:
    text: a str (encoded as utf-8) or already-encoded bytes.

  Returns:
    int32[len(utf8_bytes)] with values in [0, 255].
  """
  data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
  # frombuffer is a zero-copy view; astype gives the int32 the model expects.
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def decode(ids: Iterable[int] | np.ndarray) -> str:
  """Decodes ids back to text, dropping PAD/BOS/EOS.

  Args:
    ids: int[n] (any integer array-like, any leading shape is flattened).

  Returns:
    The decoded str; invalid utf-8 (e.g. a window that cuts a multi-byte
    character in half) becomes U+FFFD instead of raising.
  """
  arr = np.asarray(ids, dtype=np.int64).reshape(-1)
  arr = arr[(arr >= 0) & (arr < 256)]
  return arr.astype(np.uint8).tobytes().decode('utf-8', errors='replace')
