"""Evaluation batches: a finite, unshuffled pass over a split where every real token is a target
exactly once, padded with PAD_ID / weight 0 at the end (`EvalIterable`), and its span-corruption
counterpart (`SpanEvalIterable`). `input_pipeline.make_eval_iterator` builds them.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from stmoe_jax.data import span_corruption
from stmoe_jax.data import tokenizer as tokenizer_lib
from stmoe_jax.data.sources import Batch, ToTokens, shard


def _num_eval_batches(source, key, index, count, seq_len, batch_size, to_tokens) -> int:
  """Number of eval batches of one process's shard (reads every record)."""
  stream_len = sum((len(source[i][key]) if to_tokens is None
                    else to_tokens.map(source[i])['tokens'].size - 2) + 2
                   for i in range(index, len(source), count))
  n_windows = -(-(stream_len - 1) // seq_len) if stream_len > 1 else 0
  return -(-n_windows // batch_size)


class EvalIterable:
  """Finite, deterministic, re-iterable evaluation batches.

  Windows have L + 1 tokens with stride L, so consecutive windows share one
  token and every token of the stream except the very first is a target
  exactly once (non-overlapping windows would never score each window's first
  token). Targets equal to BOS get weight 0: predicting BOS after EOS is
  trivial and would dilute the per-token loss. Hence
  sum(weights) == sum over documents of (n_tokens + 1).

  The last window and batch are padded with the tokenizer's PAD (weight 0). With
  process_count > 1 every process yields the same number of batches (extra
  all-padding batches), so collective eval steps never deadlock.

  Each batch: {'inputs': int32[B, L], 'targets': int32[B, L],
  'weights': float32[B, L]}.
  """

  def __init__(self, source, *, feature_key: str, seq_len: int,
               batch_size: int, process_index: int, process_count: int,
               max_batches: int | None, tokenizer: str = tokenizer_lib.BYTES):
    self._source, self._key = source, feature_key
    self._to_tokens = ToTokens(feature_key, tokenizer)
    tok = tokenizer_lib.load(tokenizer)
    self._pad_id, self._bos_id = tok.pad_id, tok.bos_id
    self._byte_level = tokenizer == tokenizer_lib.BYTES
    self._seq_len, self._batch_size = seq_len, batch_size
    self._index, self._count = process_index, process_count
    self._max_batches = max_batches
    self._num_batches: int | None = None

  def __len__(self) -> int:
    if self._num_batches is None:
      # Single process: no other shard to agree with, count our own stream.
      indices = range(self._count) if self._count > 1 else [self._index]
      n = max(_num_eval_batches(self._source, self._key, i, self._count,
                                self._seq_len, self._batch_size,
                                None if self._byte_level else self._to_tokens)
              for i in indices)
      if self._max_batches is not None:
        n = min(n, self._max_batches)
      self._num_batches = n
    return self._num_batches

  def _windows(self) -> Iterator[np.ndarray]:
    """Yields int32[k, L + 1] blocks of windows, last one PAD-padded."""
    L = self._seq_len  # pylint: disable=invalid-name
    ds = shard(grain.MapDataset.source(self._source), self._index,
                self._count).map(self._to_tokens)
    pending: list[np.ndarray] = []
    pending_len = 0
    for doc in ds.to_iter_dataset(grain.ReadOptions(num_threads=0)):
      pending.append(doc['tokens'])
      pending_len += doc['tokens'].size
      if pending_len < 4 * (L + 1):  # amortize concatenation cost
        continue
      stream = np.concatenate(pending)
      k = (stream.size - 1) // L
      yield stream[np.arange(k)[:, None] * L + np.arange(L + 1)]
      # The last token of the last window starts the next window.
      pending, pending_len = [stream[k * L:]], stream.size - k * L
    if pending_len > 1:
      stream = np.concatenate(pending)
      k = -(-(stream.size - 1) // L)
      padded = np.full(k * L + 1, self._pad_id, np.int32)
      padded[:stream.size] = stream
      yield padded[np.arange(k)[:, None] * L + np.arange(L + 1)]

  def _make_batch(self, rows: np.ndarray) -> Batch:
    B, L = self._batch_size, self._seq_len  # pylint: disable=invalid-name
    if rows.shape[0] < B:
      pad = np.full((B - rows.shape[0], L + 1), self._pad_id, np.int32)
      rows = np.concatenate([rows, pad])
    targets = np.ascontiguousarray(rows[:, 1:])
    weights = ((targets != self._pad_id) & (targets != self._bos_id))
    return {'inputs': np.ascontiguousarray(rows[:, :-1]), 'targets': targets,
            'weights': weights.astype(np.float32)}

  def __iter__(self) -> Iterator[Batch]:
    # A single process needs no count up front, which saves a pass.
    n_batches = len(self) if self._count > 1 else self._max_batches
    if n_batches is None:
      n_batches = np.inf
    emitted = 0
    rows = np.zeros((0, self._seq_len + 1), np.int32)
    for block in self._windows():
      rows = np.concatenate([rows, block]) if rows.size else block
      while rows.shape[0] >= self._batch_size and emitted < n_batches:
        yield self._make_batch(rows[:self._batch_size])
        rows = rows[self._batch_size:]
        emitted += 1
      if emitted >= n_batches:
        return
    if rows.shape[0] and emitted < n_batches:
      yield self._make_batch(rows)
      emitted += 1
    empty = np.zeros((0, self._seq_len + 1), np.int32)
    while emitted < n_batches and self._count > 1:
      yield self._make_batch(empty)
      emitted += 1


class SpanEvalIterable:
  """Finite, deterministic, re-iterable span-corruption evaluation batches of a whole split
  (`span_corruption.eval_batches`: every token in exactly one window, the same noise on every
  pass)."""

  def __init__(self, source, *, feature_key: str, max_batches: int | None, **span_kwargs):
    self._source, self._key = source, feature_key
    self._max_batches, self._kwargs = max_batches, span_kwargs

  def __iter__(self) -> Iterator[Batch]:
    ds = grain.MapDataset.source(self._source).map(ToTokens(self._key))
    documents = (doc['tokens'] for doc in ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    return span_corruption.eval_batches(documents, max_batches=self._max_batches,
                                        **self._kwargs)
