"""Tokenizers: raw utf-8 bytes (the default), a SentencePiece model or a Hugging Face
`tokenizer.json`, behind one `Tokenizer` interface, selected by `data.tokenizer`.

Every tokenizer has the byte tokenizer's id layout: its own n ids first, then PAD = n,
BOS = n + 1 and EOS = n + 2 (span-corruption sentinels follow from n + 3), so `vocab_size` is
n + 3 and the byte tokenizer is the case n = 256. The vocabulary's own special tokens (a
SentencePiece <unk>, <s>, </s>) stay ordinary ids that the pipelines never insert. One
exception: a Hugging Face model's tokenizer directory whose `tokenizer_config.json` names a
`bos_token` and an `eos_token` of the vocabulary (what `python -m stmoe_jax.convert --from_hf`
copies) keeps the ids the model was trained with: BOS and EOS are those tokens, PAD its
`pad_token`, else its `unk_token`, else its first other special token (an id no text encodes
to), and `vocab_size` is n.

A byte vocabulary needs no training data or vocabulary file, so every corpus (stdlib source,
lm1b, ...) is tokenized identically and checkpoints stay comparable across datasets; bits per
byte (`token_bytes`) compares runs across vocabularies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Iterable

import numpy as np

from stmoe_jax.config import options
from stmoe_jax.config.options import Option, Satisfies

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259

BYTES = 'bytes'
HF_FILE = 'tokenizer.json'
HF_SPECIALS_FILE = 'tokenizer_config.json'  # A model's bos_token, eos_token, pad_token, ...


def _spec_ok(value: str) -> bool:
  return value == BYTES or (value.endswith('.model') and os.path.isfile(value)) or (
      os.path.isfile(os.path.join(value, HF_FILE)))


options.declare(Option(
    'data.tokenizer', str, BYTES,
    "'bytes' (utf-8 bytes), a SentencePiece .model file, or a directory holding a Hugging "
    "Face tokenizer.json (`python -m stmoe_jax.data.train_tokenizer` writes one).",
    Satisfies(_spec_ok, "'bytes', an existing SentencePiece .model file or a directory "
              'holding tokenizer.json')), owner='data.tokenizer')


@options.add_check
def _check_vocab(config) -> None:
  spec = config.data.tokenizer
  if spec != BYTES and (config.model.architecture == 'encoder_decoder' or
                        config.data.objective != 'causal_lm'):
    # Span-corruption sentinels and the seq2seq rows are laid out after the 259 byte ids.
    raise options.invalid('data.tokenizer', spec, "'bytes' with model.architecture="
                          f"{config.model.architecture!r} and data.objective="
                          f"{config.data.objective!r} (subword vocabularies: decoder-only, "
                          "causal_lm)")
  tok = load(spec) if _spec_ok(spec) else load()
  if config.model.vocab_size < tok.vocab_size:
    what = ('bytes' if spec == BYTES else
            f'the {tok.num_tokens} tokens of data.tokenizer={spec!r}')
    if tok.vocab_size > tok.num_tokens:
      what += ' + pad/bos/eos'
    raise options.invalid('model.vocab_size', config.model.vocab_size,
                          f'at least {tok.vocab_size} ({what}; smaller would clip token ids)')


class Tokenizer:
  """A vocabulary of `n` ids plus PAD = n, BOS = n + 1, EOS = n + 2.

  Attributes:
    spec: the `data.tokenizer` value it was loaded from.
    num_tokens: n, the vocabulary's own ids.
    content_hash: 'bytes', or 'sha256:<16 hex>' of the vocabulary file (with its own special
      ids, where it keeps them): what a checkpoint records and resuming, evaluating and
      sampling compare.
  """
  spec: str
  num_tokens: int
  content_hash: str

  @property
  def pad_id(self) -> int:
    return self.num_tokens

  @property
  def bos_id(self) -> int:
    return self.num_tokens + 1

  @property
  def eos_id(self) -> int:
    return self.num_tokens + 2

  @property
  def vocab_size(self) -> int:
    """The ids a model must embed: the vocabulary's and pad/bos/eos."""
    return self.num_tokens + 3

  @property
  def special_ids(self) -> tuple[int, int, int]:
    return self.pad_id, self.bos_id, self.eos_id

  def encode(self, text: str | bytes) -> np.ndarray:
    """int32[n] ids of `text` (str, or utf-8 bytes), without special tokens."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """The text of `ids` (any shape, flattened); PAD/BOS/EOS and ids past them are dropped."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = (arr >= 0) & (arr < self.num_tokens) & ~np.isin(arr, self.special_ids)
    return self._decode(arr[keep].tolist())

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  @functools.cached_property
  def token_bytes(self) -> np.ndarray:
    """int32[vocab_size]: the utf-8 bytes each id stands for (0 for pad/bos/eos), so that the
    bytes of a stream of targets are a sum (bits per byte, `evaluation`)."""
    table = np.zeros(self.vocab_size, np.int32)
    table[:self.num_tokens] = self._token_bytes()
    table[list(self.special_ids)] = 0
    return table

  def _token_bytes(self) -> np.ndarray:
    raise NotImplementedError


class ByteTokenizer(Tokenizer):
  """ids 0..255 are the raw utf-8 bytes."""
  spec, num_tokens, content_hash = BYTES, 256, BYTES

  def encode(self, text):
    return encode(text)

  def _decode(self, ids):
    return decode(ids)

  def _token_bytes(self):
    return np.ones(256, np.int32)


def _file_hash(path: str) -> str:
  with open(path, 'rb') as f:
    return 'sha256:' + hashlib.sha256(f.read()).hexdigest()[:16]


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file (T5's 32k vocabulary, Llama's, one of your own)."""

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self.spec, self.content_hash = path, _file_hash(path)
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.num_tokens = self._sp.get_piece_size()

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._sp.encode(text), np.int32)

  def _decode(self, ids):
    return self._sp.decode(ids)

  def _token_bytes(self):
    # '▁' stands for a space. A document's first piece carries the dummy-prefix space that
    # decoding drops: with add_dummy_prefix, one byte per document more than the text has.
    sp = self._sp
    return np.array([1 if sp.is_byte(i) else 0 if sp.is_control(i) or sp.is_unknown(i)
                     else len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
                     for i in range(self.num_tokens)], np.int32)


@functools.cache
def _byte_level_chars() -> dict[str, int]:
  """GPT-2's byte-level alphabet (`pre_tokenizers.ByteLevel`): printable char -> its byte."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


class HuggingFaceTokenizer(Tokenizer):
  """A directory holding a Hugging Face `tokenizer.json` (the `tokenizers` library), and
  maybe a model's `tokenizer_config.json` naming its own special tokens (module docstring)."""

  def __init__(self, directory: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    path = os.path.join(directory, HF_FILE)
    self.spec, self.content_hash = directory, _file_hash(path)
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.num_tokens = self._tok.get_vocab_size(with_added_tokens=True)
    with open(path, encoding='utf-8') as f:
      decoder = json.load(f).get('decoder') or {}
    self._byte_level = decoder.get('type') == 'ByteLevel'
    self._own = _own_special_ids(directory, self._tok)
    if self._own:  # Another id layout: another vocabulary, as far as checkpoints go.
      self.content_hash = 'sha256:' + hashlib.sha256(
          f'{self.content_hash} {self._own}'.encode()).hexdigest()[:16]

  @property
  def pad_id(self) -> int:
    return self._own[0] if self._own else self.num_tokens

  @property
  def bos_id(self) -> int:
    return self._own[1] if self._own else self.num_tokens + 1

  @property
  def eos_id(self) -> int:
    return self._own[2] if self._own else self.num_tokens + 2

  @property
  def vocab_size(self) -> int:
    return self.num_tokens if self._own else self.num_tokens + 3

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def _decode(self, ids):
    return self._tok.decode(ids, skip_special_tokens=False)

  def _token_bytes(self):
    chars = _byte_level_chars()
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def count(i: int) -> int:
      piece = self._tok.id_to_token(i) or ''
      if i in special:
        return 0
      if self._byte_level:  # Each token is its bytes spelled in the byte-level alphabet.
        return sum(1 if c in chars else len(c.encode('utf-8')) for c in piece)
      if re.fullmatch(r'<0x[0-9A-Fa-f]{2}>', piece):  # Byte fallback (Llama, Mistral).
        return 1
      return len(piece.replace('\u2581', ' ').encode('utf-8'))  # Metaspace: '▁' is a space.

    return np.array([count(i) for i in range(self.num_tokens)], np.int32)


def _own_special_ids(directory: str, tok) -> tuple[int, int, int] | None:
  """(PAD, BOS, EOS) among the vocabulary's own ids, as `directory`'s tokenizer_config.json
  names them (module docstring); None without one naming both a BOS and an EOS token."""
  path = os.path.join(directory, HF_SPECIALS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    names = json.load(f)

  def token_id(field: str) -> int | None:
    value = names.get(field)
    value = value.get('content') if isinstance(value, dict) else value  # An AddedToken.
    return tok.token_to_id(value) if isinstance(value, str) else None

  bos, eos = token_id('bos_token'), token_id('eos_token')
  if bos is None or eos is None:
    return None
  specials = sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
  candidates = [token_id('pad_token'), token_id('unk_token'), *specials]
  pad = next((i for i in candidates if i is not None and i not in (bos, eos)), None)
  if pad is None:
    raise options.invalid('data.tokenizer', directory, f'a vocabulary with a token for padding '
                          f'besides BOS and EOS ({HF_SPECIALS_FILE} names no pad_token or '
                          'unk_token and it has no other special token)')
  return pad, bos, eos


@functools.cache
def load(spec: str = BYTES) -> Tokenizer:
  """The tokenizer of a `data.tokenizer` value; ConfigError in one line if it names none."""
  if spec == BYTES:
    return ByteTokenizer()
  if not _spec_ok(spec):
    raise options.invalid('data.tokenizer', spec, "'bytes', an existing SentencePiece .model "
                          'file or a directory holding tokenizer.json')
  if spec.endswith('.model') and os.path.isfile(spec):
    return SentencePieceTokenizer(spec)
  return HuggingFaceTokenizer(spec)


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
