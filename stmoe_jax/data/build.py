r"""Builds a TFDS dataset from your own text or JSONL files, to train on by name.

  python -m stmoe_jax.data.build --name=mycorpus --files='~/corpus/**/*.txt'
  python -m stmoe_jax.data.build --name=chats --files='data/*.jsonl' --format=jsonl \
      --text_field=content --data_dir=/data/tfds
  python train.py --config=configs/default.py --workdir=runs/mycorpus --config.data.name=mycorpus

Run it again after the files change: an unchanged corpus is reused, a changed one becomes the
next version (stmoe_jax/data/local_corpus.py). Bad input stops it with one line naming the file,
line or pattern, and nothing written.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import tqdm

from stmoe_jax import errors
from stmoe_jax.data import local_corpus

_NAME = flags.DEFINE_string('name', None, 'Dataset name (lower_snake_case), as '
                            '--config.data.name takes it.')
_FILES = flags.DEFINE_multi_string('files', None, 'Glob of input files (** recurses); repeat '
                                   'the flag for several globs.')
_FORMAT = flags.DEFINE_enum('format', 'text', local_corpus.FORMATS,
                            'text: one document per file; jsonl: one per line.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text', 'jsonl: the field with the text.')
_VALIDATION_SHARE = flags.DEFINE_float('validation_share', 0.02,
                                       'Expected share of documents in the validation split.')
_DECODE_ERRORS = flags.DEFINE_enum('decode_errors', 'skip', local_corpus.DECODE_ERRORS,
                                   'Documents that are not UTF-8: skip them (counted), or '
                                   'replace the bad bytes with U+FFFD.')
_VERSION = flags.DEFINE_string('version', '', 'MAJOR.MINOR.PATCH to build; default: the next '
                               'version if the files changed, 1.0.0 for a new name.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data dir; default ~/tensorflow_datasets '
                                '(or $TFDS_DATA_DIR), as --config.data.data_dir=\'\'.')
flags.mark_flags_as_required(['name', 'files'])


def _mb(n: int) -> str:
  return f'{n / 1e6:.1f} MB'


def summary(result: local_corpus.BuildResult, data_dir_flag: str) -> str:
  """The lines printed after a build: what was found, where, and how to train on it."""
  stats, train, val = result.stats, local_corpus.TRAIN, local_corpus.VALIDATION
  docs = sum(stats.documents.values())
  state = 'already prepared, unchanged' if result.reused else 'prepared'
  lines = [
      f'{result.name}:{result.version} {state} in {result.path}',
      f'  files: {len(stats.files)}, documents: {docs} (train {stats.documents[train]}, '
      f'validation {stats.documents[val]}' + (
          f': none hashed below validation_share, so the {stats.moved_to_validation} with the '
          'smallest hash went there' if stats.moved_to_validation else '') + ')',
      f'  text: {_mb(sum(stats.bytes.values()))} (train {_mb(stats.bytes[train])}, '
      f'validation {_mb(stats.bytes[val])})',
      f'  skipped: {len(stats.skipped_empty)} empty, {len(stats.skipped_not_utf8)} not UTF-8'
      + (f' (e.g. {stats.skipped_not_utf8[0]})' if stats.skipped_not_utf8 else '')
      + (f'; decoded with replacement: {len(stats.replaced_not_utf8)}'
         if stats.replaced_not_utf8 else '')
      + (f'; {len(stats.skipped_links)} paths to files already read (symlinks), e.g. '
         f'{stats.skipped_links[0]}' if stats.skipped_links else ''),
      f'  fingerprint: {stats.fingerprint}',
      'train on it: python train.py --config=configs/default.py --workdir=runs/'
      f'{result.name} --config.data.name={result.name}'
      + (f' --config.data.data_dir={data_dir_flag}' if data_dir_flag else ''),
      'a subword vocabulary for it (docs/data.md): python -m stmoe_jax.data.train_tokenizer '
      f'--dataset={result.name}'
      + (f' --data_dir={data_dir_flag}' if data_dir_flag else '')
      + f' --vocab_size=8192 --out=runs/{result.name}_bpe8k',
  ]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.ERROR)  # TFDS logs each step; the summary says it all.
  try:
    spec = local_corpus.CorpusSpec(
        name=_NAME.value, files=tuple(_FILES.value), format=_FORMAT.value,
        text_field=_TEXT_FIELD.value, validation_share=_VALIDATION_SHARE.value,
        decode_errors=_DECODE_ERRORS.value)
    result = local_corpus.build(
        spec, _DATA_DIR.value, version=_VERSION.value or None,
        progress=lambda files: tqdm.tqdm(files, desc='Reading files', unit=' files'))
  except (local_corpus.CorpusError, OSError) as e:  # OSError: e.g. a full disk.
    if os.environ.get(errors.TRACEBACK_ENV):
      raise
    sys.exit(f'error: {errors.one_line(e)}')
  print(summary(result, _DATA_DIR.value))


if __name__ == '__main__':
  app.run(main)
