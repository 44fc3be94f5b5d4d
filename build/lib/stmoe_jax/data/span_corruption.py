"""T5 span corruption (Raffel et al. 2020, section 3.1.4) over the byte token stream.

A raw window of `raw_len` tokens (the concat-then-split stream of `input_pipeline`: BOS + bytes
+ EOS per document) gets a random noise mask of round(raw_len * noise_density) tokens in
round(num_noise / mean_noise_span_length) spans. Each span is replaced in the encoder input by
one sentinel id, and the decoder target lists every span after its sentinel, then EOS:

  window   a b c d e f g h          (noise: c d and g)
  encoder  a b <s0> e f <s1> h
  target   <s0> c d <s1> g EOS

Sentinel i is id `tokenizer.VOCAB_SIZE + i`: the byte vocabulary grows by the number of spans of
a window (`num_sentinels`). The decoder reads the target shifted right behind BOS (the decoder
start token). `raw_len` is the longest window whose encoder input fits `data.seq_len` (t5's
`random_spans_helper`); the decoder length is the target length rounded up to a power of two,
so that MoE routing groups of power-of-two size tile it.

Batch layout (`to_batch`): {'encoder_inputs': int32[B, T], 'decoder_inputs': int32[B, L],
'targets': int32[B, L], 'weights': float32[B, L]}; PAD fills the rest of each row, and the
encoder mask is `encoder_inputs != PAD` (PAD never occurs in text).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from stmoe_jax.data import tokenizer
from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option, Range

OBJECTIVES = ('causal_lm', 'span_corruption')

options.declare(
    Option('data.objective', str, 'causal_lm', "What a batch is: 'causal_lm' (the decoder-only "
           "family) or 'span_corruption' (T5; the encoder-decoder).", OneOf(OBJECTIVES)),
    Option('data.noise_density', float, 0.15, "span_corruption: share of a window's tokens "
           'masked (T5: 0.15).', Range(0, 1, low_open=True, high_open=True)),
    Option('data.mean_noise_span_length', float, 3.0, 'span_corruption: mean tokens per masked '
           'span (T5: 3).', Range(1)),
    owner='data.span_corruption')
BATCH_KEYS = ('encoder_inputs', 'decoder_inputs', 'targets', 'weights')


def sentinel(i: int) -> int:
  """The id of span i's sentinel: the ids after the byte vocabulary's."""
  return tokenizer.VOCAB_SIZE + i


def noise_counts(length: int, noise_density: float,
                 mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of a `length`-token window, as t5's `random_spans_noise_mask`:
  at least one of each and at least one non-noise token (for length >= 2)."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  return num_noise, num_spans


@dataclasses.dataclass(frozen=True)
class Lengths:
  """Shapes of span corruption for one config.

  Attributes:
    raw_len: tokens of the uncorrupted window.
    encoder_len: T, the encoder input length (`data.seq_len`; the corrupted window fills
      raw_len - noise + spans <= T of it).
    targets_len: noise + spans + 1 (EOS), the real decoder tokens.
    decoder_len: L, targets_len rounded up to a power of two.
    num_sentinels: spans per window, the ids the vocabulary gains.
  """
  raw_len: int
  encoder_len: int
  targets_len: int
  decoder_len: int
  num_sentinels: int


def lengths(seq_len: int, noise_density: float, mean_noise_span_length: float) -> Lengths:
  """The `Lengths` for encoder inputs of `seq_len` tokens (seq_len >= 2)."""
  def inputs_len(raw):
    noise, spans = noise_counts(raw, noise_density, mean_noise_span_length)
    return raw - noise + spans

  raw = seq_len  # Corruption never lengthens a window (spans <= noise).
  while inputs_len(raw + 1) <= seq_len:
    raw += 1
  noise, spans = noise_counts(raw, noise_density, mean_noise_span_length)
  targets_len = noise + spans + 1
  return Lengths(raw_len=raw, encoder_len=seq_len, targets_len=targets_len,
                 decoder_len=1 << (targets_len - 1).bit_length(), num_sentinels=spans)


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
  """`num_items` split into `num_segments` random parts, each >= 1: int[num_segments] lengths,
  uniform over such compositions (a random choice of the num_segments - 1 cut points)."""
  first_in_segment = np.zeros(num_items, bool)
  cuts = rng.choice(num_items - 1, num_segments - 1, replace=False) + 1
  first_in_segment[cuts] = True
  segment_id = np.cumsum(first_in_segment)
  return np.bincount(segment_id, minlength=num_segments)


def noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
  """bool[length], True at noise: `noise_counts` noise tokens in that many spans, alternating
  with as many non-noise runs, starting with non-noise (t5's `random_spans_noise_mask`)."""
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  kept_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  run_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), run_lengths)


def corrupt(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(encoder input, target) of int tokens [n] with noise `mask` [n] (see module docstring).

  Returns int32 [n - noise + spans] and int32 [noise + spans + 1]; span i's sentinel is
  `tokenizer.VOCAB_SIZE + i`.
  """
  tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, bool)
  starts = mask & ~np.concatenate([[False], mask[:-1]])
  sentinels = tokenizer.VOCAB_SIZE + np.cumsum(starts) - 1
  inputs = np.where(starts, sentinels, tokens)[~mask | starts]
  num_noise, num_spans = int(mask.sum()), int(starts.sum())
  targets = np.full(num_noise + num_spans + 1, tokenizer.EOS_ID, np.int32)
  # Noise token j moves right by one slot per sentinel at or before it.
  slot = np.arange(num_noise) + np.cumsum(starts[mask])
  targets[slot] = tokens[mask]
  targets[slot[starts[mask]] - 1] = sentinels[starts]
  return inputs.astype(np.int32), targets


class SpanCorrupt(grain.transforms.RandomMap):
  """{'tokens': int32[n]} -> {'encoder_inputs', 'targets'} (variable length), noise drawn from
  grain's per-element generator: deterministic and restorable with the iterator state."""

  def __init__(self, noise_density: float, mean_noise_span_length: float):
    self.density, self.mean = noise_density, mean_noise_span_length

  def random_map(self, element, rng: np.random.Generator):
    tokens = element['tokens']
    inputs, targets = corrupt(tokens, noise_mask(tokens.size, self.density, self.mean, rng))
    return {'encoder_inputs': inputs, 'targets': targets}


def to_batch(examples: list[dict], shape: Lengths, batch_size: int) -> dict[str, np.ndarray]:
  """Corrupted examples -> one padded batch of `batch_size` rows (see module docstring); rows
  past the examples are all padding (weight 0)."""
  B, T, L = batch_size, shape.encoder_len, shape.decoder_len
  batch = {'encoder_inputs': np.full((B, T), tokenizer.PAD_ID, np.int32),
           'decoder_inputs': np.full((B, L), tokenizer.PAD_ID, np.int32),
           'targets': np.full((B, L), tokenizer.PAD_ID, np.int32),
           'weights': np.zeros((B, L), np.float32)}
  for b, example in enumerate(examples):
    inputs, targets = example['encoder_inputs'], example['targets']
    batch['encoder_inputs'][b, :inputs.size] = inputs
    batch['targets'][b, :targets.size] = targets
    batch['decoder_inputs'][b, 0] = tokenizer.BOS_ID
    batch['decoder_inputs'][b, 1:targets.size] = targets[:-1]
    batch['weights'][b, :targets.size] = 1.0
  return batch


class _Batcher(grain.transforms.Map):
  """grain's list-of-examples batch (from `batch(..., batch_fn=list)`) -> `to_batch`."""

  def __init__(self, shape: Lengths, batch_size: int):
    self.shape, self.batch_size = shape, batch_size

  def map(self, examples):
    return to_batch(examples, self.shape, self.batch_size)


def train_dataset(windows: grain.IterDataset, *, seq_len: int, batch_size: int, seed: int,
                  noise_density: float, mean_noise_span_length: float) -> grain.IterDataset:
  """Raw windows {'tokens': int32[raw_len]} -> span-corrupted training batches."""
  shape = lengths(seq_len, noise_density, mean_noise_span_length)
  ds = windows.random_map(SpanCorrupt(noise_density, mean_noise_span_length), seed=seed)
  return ds.batch(batch_size, drop_remainder=True, batch_fn=list).map(_Batcher(shape, batch_size))


def eval_batches(documents: Iterator[np.ndarray], *, seq_len: int, batch_size: int,
                 noise_density: float, mean_noise_span_length: float, seed: int = 0,
                 max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Deterministic evaluation batches: the documents' token stream cut into consecutive
  `raw_len` windows (the last one shorter), window i corrupted with generator (seed, i), so
  every token is in exactly one window and every evaluation sees the same noise."""
  shape = lengths(seq_len, noise_density, mean_noise_span_length)
  stream, examples, emitted, index = np.zeros(0, np.int32), [], 0, 0

  def windows(final):
    nonlocal stream
    while stream.size >= shape.raw_len or final and stream.size >= 2:
      window, stream = stream[:shape.raw_len], stream[shape.raw_len:]
      yield window

  def emit(window):
    nonlocal index
    rng = np.random.default_rng([seed, index])
    index += 1
    mask = noise_mask(window.size, noise_density, mean_noise_span_length, rng)
    inputs, targets = corrupt(window, mask)
    return {'encoder_inputs': inputs, 'targets': targets}

  for tokens in documents:
    stream = np.concatenate([stream, tokens])
    for window in windows(final=False):
      examples.append(emit(window))
      if len(examples) == batch_size:
        yield to_batch(examples, shape, batch_size)
        examples, emitted = [], emitted + 1
        if max_batches is not None and emitted >= max_batches:
          return
  for window in windows(final=True):
    examples.append(emit(window))
  while examples:
    yield to_batch(examples[:batch_size], shape, batch_size)
    examples, emitted = examples[batch_size:], emitted + 1
    if max_batches is not None and emitted >= max_batches:
      return
