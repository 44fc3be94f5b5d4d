import numpy as np

from stmoe_jax.data import tokenizer


def test_constants():
  assert (tokenizer.PAD_ID, tokenizer.BOS_ID, tokenizer.EOS_ID) == (256, 257, 258)
  assert tokenizer.VOCAB_SIZE == 259


def test_round_trip_ascii():
  text = 'def f(x):\n    return x + 1\n'
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert tokenizer.decode(ids) == text


def test_round_trip_non_ascii():
  text = 'naïve café — 日本語 🐍'
  ids = tokenizer.encode(text)
  assert ids.shape == (len(text.encode('utf-8')),)
  assert ids.min() >= 0 and ids.max() < 256
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids.tolist()) == text


def test_decode_drops_specials():
  ids = np.concatenate([[tokenizer.BOS_ID], tokenizer.encode('hé'),
                        [tokenizer.EOS_ID, tokenizer.PAD_ID, tokenizer.PAD_ID]])
  assert tokenizer.decode(ids) == 'hé'
  assert tokenizer.decode(ids.reshape(1, -1)) == 'hé'


def test_decode_invalid_utf8_is_replaced():
  ids = tokenizer.encode('é')[:1]  # half of a two-byte character
  assert tokenizer.decode(ids) == '\ufffd'


def test_empty():
  assert tokenizer.encode('').shape == (0,)
  assert tokenizer.decode([]) == ''
