"""Grain input pipelines over TFDS array_record data sources.

Training: documents are sharded per process, shuffled per epoch, tokenized as
`[BOS] + utf8 bytes + [EOS]`, concatenated and cut into windows of
`seq_len + 1` tokens (concat-then-split, no padding); inputs/targets are the
window shifted by one. The iterator is checkpointable with a JSON-friendly
state (see `TrainIterator`).

Evaluation: a finite, unshuffled pass over a split where every real token is a
target exactly once, padded with PAD_ID / weight 0 at the end.

Batch layout everywhere:
  {'inputs': int32[batch, seq_len], 'targets': int32[batch, seq_len],
   'weights': float32[batch, seq_len]}
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds

from stmoe_jax.config import ConfigError
from stmoe_jax.data import func_name_corpus
from stmoe_jax.data import span_corruption
from stmoe_jax.data import stdlib_corpus
from stmoe_jax.data import tokenizer

Batch = dict[str, np.ndarray]
# Datasets built from the running interpreter's standard library on first use, by name.
EMBEDDED = {stdlib_corpus.NAME: stdlib_corpus.StdlibPy,
            func_name_corpus.NAME: func_name_corpus.StdlibFuncName}


def get_data_source(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> Sequence[Mapping[str, Any]]:
  """Returns a random-access TFDS data source for `name`/`split`.

  `stdlib_py` and `stdlib_func_name` (EMBEDDED) are prepared on first use (array_record,
  ~1 s and ~1 min, no network).
  Any other dataset must already be prepared in `data_dir` in array_record
  format; it is never downloaded. A corpus built from local files by
  `python -m stmoe_jax.data.build` is read by its name from its directory.

  Args:
    name: TFDS name, optionally with config/version ('lm1b', 'stdlib_py').
    split: TFDS split spec, e.g. 'train', 'validation', 'train[:10%]'.
    data_dir: TFDS data dir; None or '' means the TFDS default
      (~/tensorflow_datasets, or $TFDS_DATA_DIR).

  Returns:
    A sequence of length num_examples; item i is a dict of features, text
    features as `bytes`.

  Raises:
    FileNotFoundError: the dataset is not prepared in data_dir.
    ValueError: the dataset is prepared but not as array_record.
  """
  data_dir = os.fspath(data_dir) if data_dir else None
  base, _, config = name.partition(':')[0].partition('/')
  if base in EMBEDDED:
    if config not in ('', stdlib_corpus.config_name()):
      raise ValueError(f'{name!r}: only this interpreter\'s corpus '
                       f'({stdlib_corpus.config_name()}) can be prepared.')
    builder = EMBEDDED[base](data_dir=data_dir)
    if not builder.is_prepared():
      try:
        # try_download_gcs=False: otherwise tfds asks GCS whether a prepared
        # copy exists before even looking at the file format.
        builder.download_and_prepare(
            file_format='array_record',
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False))
      except Exception:  # pylint: disable=broad-except
        # Another process (another host on a shared FS) may have won the race
        # to rename its incomplete dir into place; its result is identical.
        if not EMBEDDED[base](data_dir=data_dir).is_prepared():
          raise
        builder = EMBEDDED[base](data_dir=data_dir)
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is neither registered with tensorflow-datasets nor '
          f'prepared in data_dir={data_dir or "~/tensorflow_datasets"!r}; build one from your '
          f'own files with `python -m stmoe_jax.data.build --name={base} --files=GLOB`') from e
    if not builder.is_prepared():
      root = os.fspath(builder.data_dir_root)
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared in data_dir={root!r}; '
          f'prepare it once (with network) via `tfds build {name} '
          f'--file_format=array_record --data_dir={root}`.')
  fmt = builder.info.file_format
  if fmt is not None and fmt.value != 'array_record':
    raise ValueError(
        f'TFDS dataset {name!r} in {builder.data_dir} is stored as '
        f'{fmt.value}; random access needs array_record: rebuild with '
        f'`tfds build {name} --file_format=array_record`.')
  return builder.as_data_source(split=split)


class DataError(ValueError):
  """A dataset, split or record the pipeline cannot use; the message names the record."""


class _CheckedSource:
  """Random access to `source` that names the record when one cannot be used.

  Record i that cannot be read (a damaged file), lacks `feature_key`, or whose feature is not
  text (bytes/str) raises DataError naming `name[split] record i`, instead of an error from deep
  inside grain or, worse, a silently wrong batch.
  """

  def __init__(self, source, name: str, split: str, feature_key: str):
    self._source, self._where, self._key = source, f'{name}[{split}]', feature_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    where = f'{self._where} record {index}'
    try:
      record = self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{where} cannot be read: {type(e).__name__}: {e}') from e
    if not isinstance(record, Mapping) or self._key not in record:
      keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
      raise DataError(f'{where} has no feature {self._key!r} (it has {keys})')
    if not isinstance(record[self._key], (bytes, str)):
      raise DataError(f'{where}: feature {self._key!r} is a {type(record[self._key]).__name__}, '
                      'not text (bytes or str)')
    return record


def _checked_source(name: str, split: str, data_dir, feature_key: str) -> _CheckedSource:
  """`get_data_source` with the split and feature key checked and every record checked on
  read."""
  try:
    source = get_data_source(name, split, data_dir)
  except ValueError as e:  # TFDS: "Unknown split 'tran'. Should be one of [...]", bad slices.
    if 'split' not in str(e).lower():
      raise
    why = ' '.join(str(e).split())
    raise DataError(f'{name}[{split}] cannot be read: {why}') from None
  if not len(source):
    raise DataError(f'{name}[{split}] has no records: nothing to train or evaluate on')
  _check_feature(source, name, feature_key)
  return _CheckedSource(source, name, split, feature_key)


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


def _shard(ds: grain.MapDataset, process_index: int, process_count: int):
  if not 0 <= process_index < process_count:
    raise ValueError(f'Bad process {process_index} of {process_count}.')
  # Strided (not contiguous) shards keep each share a uniform sample even if
  # the record files have some order.
  return ds[process_index::process_count]


class _ToTokens(grain.transforms.Map):
  """record -> {'tokens': int32[n_bytes + 2]} = [BOS] + bytes + [EOS]."""

  def __init__(self, feature_key: str):
    self._key = feature_key

  def map(self, record):
    data = record[self._key]
    if isinstance(data, str):
      data = data.encode('utf-8')
    raw = np.frombuffer(data, dtype=np.uint8)
    tokens = np.empty(raw.size + 2, dtype=np.int32)
    tokens[0] = tokenizer.BOS_ID
    tokens[1:-1] = raw
    tokens[-1] = tokenizer.EOS_ID
    return {'tokens': tokens}


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
    # The config lets set_state reject a state from another pipeline (other
    # seed/seq_len/shard) instead of silently misaligning.
    return {'grain': _json_state(self._parent.get_state()),
            'config': copy.deepcopy(self.config)}

  def set_state(self, state: Mapping[str, Any]) -> None:
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
    mean_noise_span_length: float = 3.0) -> TrainIterator:
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

  Returns:
    A `TrainIterator` yielding {'inputs': int32[B, L], 'targets': int32[B, L],
    'weights': float32[B, L] (all ones)}, targets[:, t] == inputs[:, t + 1];
    for span corruption the batches of `span_corruption.to_batch`.
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'Need seq_len, batch_size >= 1: {seq_len}, {batch_size}')
  source = _checked_source(name, split, data_dir, feature_key)
  ds = _shard(grain.MapDataset.source(source), process_index, process_count)
  if len(ds) == 0:
    raise DataError(f'{name}[{split}] has {len(source)} records: none for process '
                    f'{process_index} of {process_count}')
  # shuffle before repeat: repeat reseeds the shuffle per epoch, so every
  # epoch is a fresh permutation and epochs never mix.
  ds = ds.shuffle(seed=seed).repeat(None).map(_ToTokens(feature_key))
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
  return TrainIterator(it_ds, config)


# Evaluation.


def _num_eval_batches(source, key, index, count, seq_len, batch_size) -> int:
  """Number of eval batches of one process's shard (reads every record)."""
  stream_len = sum(len(source[i][key]) + 2
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
  sum(weights) == sum over documents of (n_bytes + 1).

  The last window and batch are padded with PAD_ID (weight 0). With
  process_count > 1 every process yields the same number of batches (extra
  all-padding batches), so collective eval steps never deadlock.

  Each batch: {'inputs': int32[B, L], 'targets': int32[B, L],
  'weights': float32[B, L]}.
  """

  def __init__(self, source, *, feature_key: str, seq_len: int,
               batch_size: int, process_index: int, process_count: int,
               max_batches: int | None):
    self._source, self._key = source, feature_key
    self._seq_len, self._batch_size = seq_len, batch_size
    self._index, self._count = process_index, process_count
    self._max_batches = max_batches
    self._num_batches: int | None = None

  def __len__(self) -> int:
    if self._num_batches is None:
      # Single process: no other shard to agree with, count our own stream.
      indices = range(self._count) if self._count > 1 else [self._index]
      n = max(_num_eval_batches(self._source, self._key, i, self._count,
                                self._seq_len, self._batch_size)
              for i in indices)
      if self._max_batches is not None:
        n = min(n, self._max_batches)
      self._num_batches = n
    return self._num_batches

  def _windows(self) -> Iterator[np.ndarray]:
    """Yields int32[k, L + 1] blocks of windows, last one PAD-padded."""
    L = self._seq_len  # pylint: disable=invalid-name
    ds = _shard(grain.MapDataset.source(self._source), self._index,
                self._count).map(_ToTokens(self._key))
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
      padded = np.full(k * L + 1, tokenizer.PAD_ID, np.int32)
      padded[:stream.size] = stream
      yield padded[np.arange(k)[:, None] * L + np.arange(L + 1)]

  def _make_batch(self, rows: np.ndarray) -> Batch:
    B, L = self._batch_size, self._seq_len  # pylint: disable=invalid-name
    if rows.shape[0] < B:
      pad = np.full((B - rows.shape[0], L + 1), tokenizer.PAD_ID, np.int32)
      rows = np.concatenate([rows, pad])
    targets = np.ascontiguousarray(rows[:, 1:])
    weights = ((targets != tokenizer.PAD_ID) & (targets != tokenizer.BOS_ID))
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


def make_eval_iterator(
    *, name: str, split: str, data_dir: str | os.PathLike | None,
    feature_key: str, seq_len: int, batch_size: int, process_index: int = 0,
    process_count: int = 1, max_batches: int | None = None, objective: str = 'causal_lm',
    noise_density: float = 0.15, mean_noise_span_length: float = 3.0):
  """Returns a finite, deterministic, re-iterable set of eval batches.

  Args:
    name, split, data_dir: see `get_data_source`.
    feature_key: text feature of each record ('text').
    seq_len: L; batch_size: B (per process).
    process_index, process_count: documents process_index::process_count.
    max_batches: stop after this many batches (None: the whole split).
    objective, noise_density, mean_noise_span_length: as `make_train_iterator`.

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
                      process_count=process_count, max_batches=max_batches)


class SpanEvalIterable:
  """Finite, deterministic, re-iterable span-corruption evaluation batches of a whole split
  (`span_corruption.eval_batches`: every token in exactly one window, the same noise on every
  pass)."""

  def __init__(self, source, *, feature_key: str, max_batches: int | None, **span_kwargs):
    self._source, self._key = source, feature_key
    self._max_batches, self._kwargs = max_batches, span_kwargs

  def __iter__(self) -> Iterator[Batch]:
    ds = grain.MapDataset.source(self._source).map(_ToTokens(self._key))
    documents = (doc['tokens'] for doc in ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
    return span_corruption.eval_batches(documents, max_batches=self._max_batches,
                                        **self._kwargs)
