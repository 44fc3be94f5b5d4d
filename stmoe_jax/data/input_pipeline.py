"""Grain input pipelines over TFDS array_record data sources.

Training: documents are sharded per process, shuffled per epoch, tokenized as
`[BOS] + utf8 bytes + [EOS]`, concatenated and cut into windows of
`seq_len + 1` tokens (concat-then-split, no padding); inputs/targets are the
window shifted by one. The iterator is checkpointable with a JSON-friendly
state (see `TrainIterator`).

Evaluation: a finite, unshuffled pass over a split where every real token is a
target exactly once, padded with PAD_ID / weight 0 at the end (`eval_pipeline`).

Batch layout everywhere:
  {'inputs': int32[batch, seq_len], 'targets': int32[batch, seq_len],
   'weights': float32[batch, seq_len]}

Reading and tokenizing the documents is `sources`; its names used by callers are re-exported
here.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping

from absl import flags
import grain
import numpy as np

from stmoe_jax.config import ConfigError
from stmoe_jax.data import span_corruption
from stmoe_jax.data import tokenizer as tokenizer_lib
from stmoe_jax.data.eval_pipeline import EvalIterable, SpanEvalIterable
# pylint: disable=unused-import
# get_data_source is called by its name in this module, so a test may replace it here.
from stmoe_jax.data.sources import (EMBEDDED, Batch, CheckedSource, DataError, ToTokens,
                                    get_data_source, shard)
# pylint: enable=unused-import


def _checked_source(name: str, split: str, data_dir, feature_key: str) -> CheckedSource:
  """`get_data_source` with the split and feature key checked and every record checked on
  read."""
  try:
    source = get_data_source(name, split, data_dir)
  except ValueError as e:  # TFDS: "Unknown split 'tran'. Should be one of [...]", bad slices.
    if isinstance(e, DataError) or 'split' not in str(e).lower():
      raise
    why = ' '.join(str(e).split())
    raise DataError(f'{name}[{split}] cannot be read: {why}') from None
  if not len(source):
    raise DataError(f'{name}[{split}] has no records: nothing to train or evaluate on')
  _check_feature(source, name, feature_key)
  return CheckedSource(source, name, split, feature_key)


def check_split(*, name: str, split: str, data_dir: str | os.PathLike | None, feature_key: str,
                **unused) -> None:
  """Raises DataError (or ConfigError for the feature key) if `split` cannot feed a pipeline:
  what `make_train_iterator`/`make_eval_iterator` would find first, without building one."""
  del unused  # Accepts `Trainer.data_kwargs` as they are.
  _checked_source(name, split, data_dir, feature_key)


def _check_feature(source, name: str, feature_key: str) -> None:
  """Refuses a feature key the dataset does not have, before any batch is built."""
  if len(source) and feature_key not in source[0]:
    raise ConfigError(f'config.data.feature_key={feature_key!r} is not a feature of {name!r}; '
                      f'it has {sorted(source[0])}')


# Training.


def _json_state(state: Any) -> Any:
  """Converts a grain state to plain JSON types (tuples -> lists, np -> py)."""
  return json.loads(json.dumps(state, default=lambda x: x.item()))


def _grain_state(state: Any) -> Any:
  """Inverse of `_json_state` for the one place grain needs tuples.

  grain's concat-then-split compares `remainder_slices` values with the tuple
  (-1, -1); after a JSON round trip they are lists, the comparison is always
  unequal and restoring silently yields wrong windows.
  """
  if isinstance(state, Mapping):
    return {k: ({f: tuple(sl) for f, sl in v.items()}
                if k == 'remainder_slices' else _grain_state(v))
            for k, v in state.items()}
  if isinstance(state, list):
    return [_grain_state(v) for v in state]
  return state


class TrainIterator(grain.DatasetIterator):
  """Infinite iterator of training batches with JSON-serializable state.

  Each `next()` returns {'inputs': int32[B, L], 'targets': int32[B, L],
  'weights': float32[B, L]} with B = per-process batch size, L = seq_len.

  `get_state()` returns a dict of plain JSON types; `set_state(s)` accepts it
  (also after `json.loads(json.dumps(s))`) and the following batches are
  exactly those the uninterrupted iterator would have produced. Being a
  grain DatasetIterator, it also works with `grain.checkpoint.CheckpointSave`
  / `CheckpointRestore` (one JSON file per process) inside Orbax.
  """

  def __init__(self, ds: grain.IterDataset, config: Mapping[str, Any]):
    super().__init__(iter(ds))
    self.config = dict(config)

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    """The iterator's position (grain state) and the config it was built with."""
    # The config lets set_state reject a state from another pipeline (other
    # seed/seq_len/shard) instead of silently misaligning.
    return {'grain': _json_state(self._parent.get_state()),
            'config': copy.deepcopy(self.config)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a `get_state` position; raises ValueError if it came from another pipeline."""
    saved = state.get('config')
    if saved is not None and dict(saved) != self.config:
      raise ValueError(f'Iterator state is for {saved}, not {self.config}.')
    self._parent.set_state(_grain_state(state['grain']))


def _to_lm_batch(batch: Mapping[str, np.ndarray]) -> Batch:
  # The packer's tokens_segment_ids/positions are not part of the contract.
  windows = batch['tokens']  # int32[B, L + 1]
  inputs = np.ascontiguousarray(windows[:, :-1])
  return {'inputs': inputs, 'targets': np.ascontiguousarray(windows[:, 1:]),
          'weights': np.ones(inputs.shape, np.float32)}


def make_train_iterator(
    *, name: str, split: str, data_dir: str | os.PathLike | None,
    feature_key: str, seq_len: int, batch_size: int, seed: int,
    process_index: int = 0, process_count: int = 1, num_threads: int = 0,
    worker_count: int = 0, objective: str = 'causal_lm', noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0, tokenizer: str = 'bytes') -> TrainIterator:
  """Returns an infinite, checkpointable iterator of packed LM batches.

  Args:
    name, split, data_dir: see `get_data_source`.
    feature_key: text feature of each record ('text').
    seq_len: L, tokens per row of inputs/targets (windows are L + 1 long).
    batch_size: B, rows per batch for THIS process (global = B * count).
    seed: documents are shuffled with this seed, reshuffled every epoch.
    process_index, process_count: this process gets documents
      process_index::process_count (disjoint across processes).
    num_threads: grain read threads; 0 reads inline (cheapest on few cores).
    worker_count: >0 runs the pipeline in that many worker processes; each
      worker packs its own slice of the documents, so the batch stream
      differs from worker_count=0 (still deterministic and restorable).
    objective: 'causal_lm', or 'span_corruption' (`span_corruption`: windows
      of its raw_len tokens, corrupted with noise_density and
      mean_noise_span_length, encoder inputs of seq_len tokens).
    tokenizer: the `data.tokenizer` spec ('bytes', a SentencePiece model, a tokenizer.json
      directory).

  Returns:
    A `TrainIterator` yielding {'inputs': int32[B, L], 'targets': int32[B, L],
    'weights': float32[B, L] (all ones)}, targets[:, t] == inputs[:, t + 1];
    for span corruption the batches of `span_corruption.to_batch`.
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'Need seq_len, batch_size >= 1: {seq_len}, {batch_size}')
  source = _checked_source(name, split, data_dir, feature_key)
  ds = shard(grain.MapDataset.source(source), process_index, process_count)
  if len(ds) == 0:
    raise DataError(f'{name}[{split}] has {len(source)} records: none for process '
                    f'{process_index} of {process_count}')
  # shuffle before repeat: repeat reseeds the shuffle per epoch, so every
  # epoch is a fresh permutation and epochs never mix.
  ds = ds.shuffle(seed=seed).repeat(None).map(ToTokens(feature_key, tokenizer))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(16, 4 * num_threads)))
  span = objective == 'span_corruption'
  window = (span_corruption.lengths(seq_len, noise_density, mean_noise_span_length).raw_len
            if span else seq_len + 1)
  it_ds = grain.experimental.ConcatThenSplitIterDataset(it_ds, length_struct={'tokens': window})
  if span:
    it_ds = span_corruption.train_dataset(
        it_ds, seq_len=seq_len, batch_size=batch_size, seed=seed, noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length)
  else:
    it_ds = it_ds.batch(batch_size, drop_remainder=True).map(_to_lm_batch)
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when it starts workers and raises
      # outside absl.app (google/grain#1355); defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count))
  # Everything that changes the window stream; batch_size does not (the
  # state is taken between windows), so a resumed run may change it.
  config = dict(name=name, split=split, feature_key=feature_key,
                seq_len=seq_len, seed=seed, process_index=process_index,
                process_count=process_count, worker_count=worker_count)
  if span:
    config.update(objective=objective, noise_density=noise_density,
                  mean_noise_span_length=mean_noise_span_length)
  # The vocabulary by content: a byte run's saved state restores, so does a moved vocabulary's.
  if tokenizer != 'bytes':
    config.update(tokenizer=tokenizer_lib.load(tokenizer).content_hash)
  return TrainIterator(it_ds, config)


# Evaluation.


def make_eval_iterator(
    *, name: str, split: str, data_dir: str | os.PathLike | None,
    feature_key: str, seq_len: int, batch_size: int, process_index: int = 0,
    process_count: int = 1, max_batches: int | None = None, objective: str = 'causal_lm',
    noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
    tokenizer: str = 'bytes'):
  """Returns a finite, deterministic, re-iterable set of eval batches.

  Args:
    name, split, data_dir: see `get_data_source`.
    feature_key: text feature of each record ('text').
    seq_len: L; batch_size: B (per process).
    process_index, process_count: documents process_index::process_count.
    max_batches: stop after this many batches (None: the whole split).
    objective, noise_density, mean_noise_span_length, tokenizer: as `make_train_iterator`.

  Returns:
    An `EvalIterable`; iterating yields {'inputs': int32[B, L],
    'targets': int32[B, L], 'weights': float32[B, L]} (see its docstring for
    exactly which tokens are weighted). `len()` is the batch count.
    For span corruption a `SpanEvalIterable`.
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'Need seq_len, batch_size >= 1: {seq_len}, {batch_size}')
  source = _checked_source(name, split, data_dir, feature_key)
  if objective == 'span_corruption':
    if process_count > 1:
      raise NotImplementedError('span-corruption evaluation runs on one process')
    return SpanEvalIterable(source, feature_key=feature_key, seq_len=seq_len,
                            batch_size=batch_size, max_batches=max_batches,
                            noise_density=noise_density,
                            mean_noise_span_length=mean_noise_span_length)
  return EvalIterable(source, feature_key=feature_key, seq_len=seq_len,
                      batch_size=batch_size, process_index=process_index,
                      process_count=process_count, max_batches=max_batches,
                      tokenizer=tokenizer)
