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


# Subword vocabularies: a byte-level BPE trained here, a SentencePiece model, the config checks.

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from stmoe_jax.config import ConfigError, defaults, validate  # pylint: disable=g-import-not-at-top,wrong-import-position
from stmoe_jax.data import train_tokenizer  # pylint: disable=g-import-not-at-top,wrong-import-position

CORPUS = [f'def scale_{i}(values, factor={i}):\n    """Scales café prices by {i}."""\n'
          f'    return [v * factor + {i * i} for v in values]\n' for i in range(60)]
HELD_OUT = 'def shift(values):\n    """naïve — 日本語 🐍"""\n    return [v - 1 for v in values]\n'


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('bpe'))
  return train_tokenizer.train(CORPUS, 300, out, 'bpe')


def test_bpe_layout_round_trip_and_bytes(bpe):
  assert bpe.num_tokens == 300 and bpe.vocab_size == 303
  assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (300, 301, 302)
  for text in (CORPUS[7], HELD_OUT, ''):
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and (ids < bpe.num_tokens).all()
    assert bpe.decode(ids) == text
    # Each token stands for an exact byte string: the bytes of the text, counted by hand.
    assert bpe.token_bytes[ids].sum() == len(text.encode('utf-8'))
  ids = bpe.encode(CORPUS[7])
  assert ids.size < len(CORPUS[7]) / 2  # Merges learned: far fewer tokens than bytes.
  assert bpe.decode([bpe.bos_id, *ids, bpe.eos_id, bpe.pad_id, 400]) == CORPUS[7]
  assert bpe.token_bytes[[bpe.pad_id, bpe.bos_id, bpe.eos_id]].tolist() == [0, 0, 0]
  assert tokenizer.load(bpe.spec).content_hash == bpe.content_hash
  assert bpe.content_hash.startswith('sha256:') and tokenizer.load().content_hash == 'bytes'


def test_unigram_and_sentencepiece_round_trip(tmp_path):
  uni = train_tokenizer.train(CORPUS, 300, str(tmp_path / 'uni'), 'unigram')
  ids = uni.encode(HELD_OUT)
  assert uni.decode(ids) == HELD_OUT and uni.token_bytes[ids].sum() == len(HELD_OUT.encode())
  import sentencepiece  # pylint: disable=g-import-not-at-top
  (tmp_path / 'corpus.txt').write_text(''.join(CORPUS), encoding='utf-8')
  sentencepiece.SentencePieceTrainer.train(
      input=str(tmp_path / 'corpus.txt'), model_prefix=str(tmp_path / 'sp'), vocab_size=400,
      model_type='bpe', byte_fallback=True, add_dummy_prefix=False, minloglevel=2,
      normalization_rule_name='identity', remove_extra_whitespaces=False)
  sp = tokenizer.load(str(tmp_path / 'sp.model'))
  assert sp.vocab_size == 403 and sp.pad_id == 400
  ids = sp.encode(HELD_OUT)  # 日本語 and 🐍 are not in its pieces: byte fallback.
  assert sp.decode(ids) == HELD_OUT
  assert sp.token_bytes[ids].sum() == len(HELD_OUT.encode('utf-8'))


def test_metaspace_tokenizer_json_counts_pieces_and_skips_specials(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme='never')
  tok.decoder = decoders.Metaspace(prepend_scheme='never')
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=['<s>'],
                                                      show_progress=False))
  tok.save(str(tmp_path / 'tokenizer.json'))
  ms = tokenizer.load(str(tmp_path))
  assert ms.token_bytes[tok.token_to_id('<s>')] == 0
  ids = ms.encode('return [v * factor]')
  assert ms.decode(ids) == 'return [v * factor]'
  assert ms.token_bytes[ids].sum() == len('return [v * factor]')


def test_config_checks(bpe):
  config = defaults()
  config.data.tokenizer = bpe.spec
  with pytest.raises(ConfigError, match=r"^config.model.vocab_size=259 is invalid: expected at "
                     r"least 303 \(the 300 tokens of data.tokenizer="):
    validate(config)
  config.model.vocab_size = 303
  validate(config)
  config.data.objective = 'span_corruption'
  with pytest.raises(ConfigError, match=r"^config.data.tokenizer=.* is invalid: expected "
                     "'bytes' with model.architecture='decoder_only' and "
                     "data.objective='span_corruption'"):
    tokenizer._check_vocab(config)  # pylint: disable=protected-access
  config = defaults()
  config.data.tokenizer = '/nonexistent/vocab'
  with pytest.raises(ConfigError, match=r"^config.data.tokenizer='/nonexistent/vocab' is "
                     'invalid'):
    validate(config)


def test_train_tokenizer_files(tmp_path):
  for i, text in enumerate(CORPUS[:3]):
    (tmp_path / f'm{i}.py').write_text(text, encoding='utf-8')
  assert train_tokenizer.expand(f'{tmp_path}/m*.py') == [str(tmp_path / f'm{i}.py')
                                                         for i in range(3)]
  with pytest.raises(ValueError, match='matches no file'):
    train_tokenizer.expand(f'{tmp_path}/*.txt')
  with pytest.raises(ValueError, match='--vocab_size=100 is invalid'):
    train_tokenizer.train(CORPUS, 100, str(tmp_path / 'x'))
  tok = train_tokenizer.train(train_tokenizer._read(  # pylint: disable=protected-access
      train_tokenizer.expand(f'{tmp_path}/m*.py')), 280, str(tmp_path / 'out'))
  with open(tmp_path / 'out' / 'tokenizer.json', encoding='utf-8') as f:
    assert json.load(f)['model']['type'] == 'BPE'
  assert tok.decode(tok.encode(CORPUS[1])) == CORPUS[1]


def test_a_model_tokenizer_keeps_its_own_special_ids(tmp_path):
  """A tokenizer_config.json naming BOS and EOS tokens: those ids, PAD its pad_token, else its
  unk_token, else another special token; no ids appended; another content hash."""
  from hf_reference import write_model_tokenizer  # pylint: disable=g-import-not-at-top
  mistral = {'bos_token': '<s>', 'eos_token': {'content': '</s>', 'special': True},
             'unk_token': '<unk>', 'pad_token': None}
  raw = write_model_tokenizer(str(tmp_path / 'm'), CORPUS, 300, mistral)
  tok = tokenizer.load(str(tmp_path / 'm'))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.num_tokens == tok.vocab_size == raw.get_vocab_size() == 300
  ids = tok.encode(HELD_OUT)
  assert not np.isin(ids, [0, 1, 2]).any()
  assert tok.decode([1, *ids, 2, 0, 0]) == HELD_OUT
  assert tok.token_bytes[[0, 1, 2]].tolist() == [0, 0, 0]
  assert tok.token_bytes[ids].sum() == len(HELD_OUT.encode('utf-8'))
  (tmp_path / 'plain').mkdir()
  (tmp_path / 'plain' / 'tokenizer.json').write_bytes((tmp_path / 'm' / 'tokenizer.json').read_bytes())
  plain = tokenizer.load(str(tmp_path / 'plain'))  # Without the config: ids appended.
  assert (plain.pad_id, plain.vocab_size) == (300, 303)
  assert plain.content_hash != tok.content_hash
  # Llama 3: no pad or unk token; padding takes the first other special token.
  llama3 = {'bos_token': '<|begin_of_text|>', 'eos_token': '<|end_of_text|>'}
  write_model_tokenizer(str(tmp_path / 'l'), CORPUS, 300, llama3,
                        specials=('<|begin_of_text|>', '<|end_of_text|>', '<|reserved_0|>'))
  tok = tokenizer.load(str(tmp_path / 'l'))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (2, 0, 1)
  write_model_tokenizer(str(tmp_path / 'b'), CORPUS, 300, llama3,
                        specials=('<|begin_of_text|>', '<|end_of_text|>'))
  with pytest.raises(ConfigError, match=r"^config.data.tokenizer='.*' is invalid: expected a "
                                        'vocabulary with a token for padding'):
    tokenizer.load(str(tmp_path / 'b'))
