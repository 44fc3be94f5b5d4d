"""The documents every pipeline reads: TFDS data sources, checked records, per-process shards.

`get_data_source` resolves a dataset name to random access over its array_record files
(preparing the EMBEDDED standard-library datasets on first use); `CheckedSource` names the record
when one cannot be used; `shard` gives a process its documents and `ToTokens` turns a record into
`[BOS] + utf8 bytes + [EOS]`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from stmoe_jax.data import func_name_corpus
from stmoe_jax.data import stdlib_corpus
from stmoe_jax.data import tokenizer

# What the pipelines yield: {'inputs', 'targets', 'weights'} arrays (see `input_pipeline`).
Batch = dict[str, np.ndarray]
# name[/config][:version][/kwargs], as tfds.builder parses it; never a path.
_NAME_RE = re.compile(r'[a-zA-Z][\w]*(/[\w.-]+)?(:[\d.*]+)?(/[\w=,.-]+)?')


class DataError(ValueError):
  """A dataset, split or record the pipeline cannot use; the message names the record."""


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
  if not _NAME_RE.fullmatch(name):
    raise DataError(
        f'config.data.name={name!r} is not a TFDS dataset name (name[/config][:version], e.g. '
        "'stdlib_py' or 'lm1b:1.1.0'); a corpus of your own files is built with `python -m "
        'stmoe_jax.data.build --name=NAME --files=GLOB` and read by its NAME')
  base, _, config = name.partition(':')[0].partition('/')
  version = name.partition(':')[2].partition('/')[0]
  if base in EMBEDDED:
    if config not in ('', stdlib_corpus.config_name()):
      raise DataError(f'{name!r}: only this interpreter\'s corpus '
                      f'({stdlib_corpus.config_name()}) can be prepared.')
    built = str(EMBEDDED[base].VERSION)
    if version and version != built:  # A pin is a promise about the data: never substituted.
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared: {base} is built here at version {built} '
          f"only; pin ':{built}' or leave the version out")
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
      root = os.path.join(data_dir or os.fspath(tfds.core.constants.DATA_DIR), base)
      prepared = sorted(str(v) for v in tfds.core.utils.version.list_all_versions(root))
      if version and prepared:
        raise FileNotFoundError(
            f'TFDS dataset {name!r} is not prepared: {root} holds versions {prepared}, not '
            f'{version}') from None
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
  try:
    return builder.as_data_source(split=split)
  except ValueError as e:
    if 'Paths sequence can not be of 0 length' in str(e):  # array_record, on an empty slice.
      raise DataError(f'{name}[{split}] selects no records: nothing to train or evaluate '
                      'on') from None
    raise DataError(f'{name}[{split}] cannot be read: {" ".join(str(e).split())}') from None




class CheckedSource:
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


def shard(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
  """The records of `ds` that process `process_index` of `process_count` reads."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'Bad process {process_index} of {process_count}.')
  # Strided (not contiguous) shards keep each share a uniform sample even if
  # the record files have some order.
  return ds[process_index::process_count]


class ToTokens(grain.transforms.Map):
  """record -> {'tokens': int32[n + 2]} = [BOS] + the text's n tokens + [EOS]."""

  def __init__(self, feature_key: str, tokenizer_spec: str = tokenizer.BYTES):
    # The spec, not the tokenizer: the transform is pickled into grain's workers.
    self._key, self._spec = feature_key, tokenizer_spec

  def map(self, record):
    data = record[self._key]
    if self._spec != tokenizer.BYTES:
      tok = tokenizer.load(self._spec)
      return {'tokens': np.concatenate([[tok.bos_id], tok.encode(data),
                                        [tok.eos_id]]).astype(np.int32)}
    if isinstance(data, str):
      data = data.encode('utf-8')
    raw = np.frombuffer(data, dtype=np.uint8)
    tokens = np.empty(raw.size + 2, dtype=np.int32)
    tokens[0] = tokenizer.BOS_ID
    tokens[1:-1] = raw
    tokens[-1] = tokenizer.EOS_ID
    return {'tokens': tokens}

