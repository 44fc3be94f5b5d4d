r"""Trains a byte-level BPE or unigram vocabulary (Hugging Face `tokenizers`) on your files, a
prepared dataset's train split (a corpus of `python -m stmoe_jax.data.build`) or, by default,
the embedded stdlib corpus's, and writes a directory `data.tokenizer` accepts:

  python -m stmoe_jax.data.train_tokenizer --vocab_size=4096 --out=/tmp/bpe4k
  python -m stmoe_jax.data.train_tokenizer --files='src/**/*.py,notes/*.md' \
      --vocab_size=8000 --kind=unigram --out=/tmp/uni8k
  python -m stmoe_jax.data.train_tokenizer --dataset=mycorpus --vocab_size=8192 --out=/tmp/my8k
  python train.py --config=configs/default.py --config.data.tokenizer=/tmp/bpe4k \
      --config.model.vocab_size=4099 --workdir=/tmp/run

Byte-level: every utf-8 byte is in the initial alphabet, so any text encodes without an unknown
token and each token stands for an exact byte string (bits per byte stays exact). No special
tokens are added: pad/bos/eos are appended after the vocabulary (`tokenizer`).
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

from absl import app
from absl import flags

from stmoe_jax.data import sources
from stmoe_jax.data import tokenizer

KINDS = ('bpe', 'unigram')


def expand(patterns: str) -> list[str]:
  """The files matching comma-separated globs (`**` recurses), sorted; ValueError naming a
  pattern that matches no file."""
  files = []
  for pattern in filter(None, (p.strip() for p in patterns.split(','))):
    found = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(f))
    if not found:
      raise ValueError(f'--files pattern {pattern!r} matches no file')
    files += found
  return files


def _read(files: Sequence[str]) -> Iterator[str]:
  for path in files:
    with open(path, 'rb') as f:
      yield f.read().decode('utf-8', errors='replace')


def dataset_texts(name: str = 'stdlib_py', data_dir: str | None = None,
                  feature_key: str = 'text') -> Iterator[str]:
  """The train split's documents of a TFDS dataset (`sources.get_data_source`; the embedded
  stdlib corpus by default, what the default run trains on)."""
  source = sources.get_data_source(name, 'train', data_dir)
  for i in range(len(source)):
    text = source[i][feature_key]
    yield text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text


def train(texts: Iterable[str], vocab_size: int, out: str, kind: str = 'bpe'
          ) -> tokenizer.Tokenizer:
  """Trains a byte-level `kind` vocabulary of at most `vocab_size` tokens on `texts`, writes
  `out/tokenizer.json` and returns it loaded."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  if kind not in KINDS:
    raise ValueError(f'--kind={kind!r} is invalid: expected one of {", ".join(KINDS)}')
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet):
    raise ValueError(f'--vocab_size={vocab_size} is invalid: expected at least '
                     f'{len(alphabet)} (the byte alphabet)')
  if kind == 'bpe':
    tok = tokenizers.Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                  show_progress=False)
  else:
    tok = tokenizers.Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                      show_progress=False)
  # No prefix space: a token's bytes are exactly the text's (`Tokenizer.token_bytes`).
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainer=trainer)
  os.makedirs(out, exist_ok=True)
  tok.save(os.path.join(out, tokenizer.HF_FILE))
  return tokenizer.HuggingFaceTokenizer(out)


def define_flags() -> None:
  """The command's flags; defined only when it runs (`data.build` has --files and --data_dir
  too, and absl refuses a flag defined twice in one process)."""
  flags.DEFINE_string('files', '', 'Comma-separated globs of text files; empty: the train '
                      'split of --dataset.')
  flags.DEFINE_string('dataset', 'stdlib_py', 'TFDS dataset to train on without --files (the '
                      'embedded stdlib corpus, or one of `python -m stmoe_jax.data.build`).')
  flags.DEFINE_string('data_dir', '', "TFDS data dir of --dataset ('' = default).")
  flags.DEFINE_integer('vocab_size', 4096, 'Tokens of the vocabulary (pad/bos/eos come on '
                       'top).')
  flags.DEFINE_string('out', None, 'Directory to write tokenizer.json to.', required=True)
  flags.DEFINE_enum('kind', 'bpe', KINDS, 'Byte-level BPE or unigram.')


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  try:
    texts = (_read(expand(f.files)) if f.files
             else dataset_texts(f.dataset, f.data_dir or None))
    tok = train(texts, f.vocab_size, f.out, f.kind)
  except (ValueError, OSError) as e:  # DataError is a ValueError; a missing dataset an OSError.
    sys.exit(f'error: {e}')
  print(f'wrote {os.path.join(f.out, tokenizer.HF_FILE)} ({tok.num_tokens} tokens, '
        f'{tok.content_hash}); train with --config.data.tokenizer={f.out} '
        f'--config.model.vocab_size={tok.vocab_size}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
