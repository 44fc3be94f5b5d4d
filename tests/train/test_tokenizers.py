"""A subword vocabulary end to end: a BPE trained on a small corpus of our own, a tiny run through
train_and_evaluate, bits per byte against the corpus's bytes, and the tokenizer mismatch refused
on resume, init_from and eval."""

import json
import math
import os

import pytest

from configs import tiny
from stmoe_jax.config import ConfigError
from stmoe_jax.data import local_corpus
from stmoe_jax.data import sources
from stmoe_jax.data import train_tokenizer
from stmoe_jax.train import entry_points
from stmoe_jax.train import train_lib

TEXTS = [f'def scale_{i}(values, factor={i % 7}):\n    """Scales café prices by {i}."""\n'
         f'    return [v * factor + {i * i} for v in values if v > {i % 5}]\n' for i in range(100)]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir, eval metrics, tokenizer) of a 4-step run on a 100-document corpus."""
  root = tmp_path_factory.mktemp('tok')
  path = root / 'notes.jsonl'
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS), encoding='utf-8')
  data_dir = str(root / 'tfds')
  local_corpus.build(local_corpus.CorpusSpec(name='notes', files=(str(path),), format='jsonl',
                                             validation_share=0.1), data_dir)
  tok = train_tokenizer.train(TEXTS, 320, str(root / 'bpe'))
  config = tiny.get_config()
  config.data.update(name='notes', data_dir=data_dir, tokenizer=tok.spec)
  config.model.vocab_size = tok.vocab_size
  config.update(num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4, eval_batches=0)
  workdir = str(root / 'workdir')
  return config, workdir, train_lib.train_and_evaluate(config, workdir), tok, root


def test_bits_per_byte_is_nats_per_token_over_the_texts_bytes(run):
  config, workdir, metrics, tok, _ = run
  texts = [r['text'].decode('utf-8') for r in
           sources.get_data_source('notes', 'validation', config.data.data_dir)]
  assert texts
  # Every validation token and each document's EOS is a target; the tokens' bytes are the
  # documents' bytes, counted here from the text, not from the tokenizer's table.
  assert metrics['num_tokens'] == sum(len(tok.encode(t)) + 1 for t in texts)
  num_bytes = sum(len(t.encode('utf-8')) for t in texts)
  want = metrics['loss'] * metrics['num_tokens'] / math.log(2) / num_bytes
  assert metrics['bits_per_byte'] == pytest.approx(want, rel=1e-6)
  assert 1.0 < metrics['bits_per_byte'] < 20.0
  with open(entry_points.tokenizer_path(workdir), encoding='utf-8') as f:
    assert json.load(f)['content_hash'] == tok.content_hash


def test_another_tokenizer_is_refused_naming_both_hashes(run):
  config, workdir, _, tok, root = run
  other = train_tokenizer.train(TEXTS, 300, str(root / 'bpe_other'))
  config = config.copy_and_resolve_references()
  config.update(num_train_steps=8)
  config.data.tokenizer = other.spec
  both = rf'{tok.content_hash}, but data.tokenizer=.* is {other.content_hash}'
  with pytest.raises(ConfigError, match=rf'^resuming: {workdir} was trained with tokenizer {both}'):
    train_lib.train_and_evaluate(config, workdir)
  config.init_from = workdir
  with pytest.raises(ConfigError, match=rf"^init_from='{workdir}': .*{both}"):
    train_lib.train_and_evaluate(config, str(root / 'finetune'))
  assert not os.path.exists(root / 'finetune')
  # The vocabulary directory rewritten after training: eval and sample refuse it too.
  train_tokenizer.train(TEXTS, 300, tok.spec)
  entry_points.tokenizer_lib.load.cache_clear()
  with pytest.raises(ConfigError, match=rf'^restoring {workdir}: .* {tok.content_hash}, but '):
    entry_points.evaluate_workdir(workdir)
