"""T5 span corruption against a loop reference written here: noise statistics, exact
reassembly, and the grain pipelines over stdlib_py (same token stream as the LM pipeline)."""

import numpy as np
import pytest

from stmoe_jax.data import input_pipeline
from stmoe_jax.data import span_corruption
from stmoe_jax.data import tokenizer

BOS, EOS, PAD, S0 = tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.PAD_ID, tokenizer.VOCAB_SIZE


def reference_corrupt(tokens, mask):
  """T5's span corruption as a plain loop: each noise span -> one sentinel in the input, and
  sentinel + span in the target, then EOS."""
  inputs, targets, span = [], [], -1
  for i, (token, noisy) in enumerate(zip(tokens, mask)):
    if noisy and (i == 0 or not mask[i - 1]):
      span += 1
      inputs.append(S0 + span)
      targets.append(S0 + span)
    (targets if noisy else inputs).append(int(token))
  return inputs, targets + [EOS]


def reassemble(inputs, targets):
  """The original window from an encoder input (PAD-padded) and its unpadded target."""
  assert targets[-1] == EOS
  spans, current = {}, None
  for token in targets[:-1]:  # The final EOS closes the last span; it is not text.
    if token >= S0:
      current = spans.setdefault(int(token), [])
    else:
      current.append(int(token))
  out = []
  for token in inputs:
    if token == PAD:
      break
    out += spans.pop(int(token)) if token >= S0 else [int(token)]
  assert not spans  # Every span was used exactly once.
  return out


def runs(mask):
  """Lengths of the True runs of a bool vector."""
  lengths, n = [], 0
  for m in list(mask) + [False]:
    if m:
      n += 1
    elif n:
      lengths.append(n)
      n = 0
  return lengths


def test_noise_mask_statistics_match_t5():
  rng = np.random.default_rng(0)
  span_lengths, fractions, first_noisy = [], [], 0
  for _ in range(300):
    mask = span_corruption.noise_mask(100, 0.15, 3.0, rng)
    assert mask.shape == (100,)
    fractions.append(mask.mean())
    spans = runs(mask)
    assert len(spans) == 5  # round(15 / 3) spans of exactly 15 noise tokens in all.
    span_lengths += spans
    first_noisy += mask[0]
  assert np.mean(fractions) == pytest.approx(0.15, abs=1e-9)
  assert np.mean(span_lengths) == pytest.approx(3.0, abs=1e-9)
  # Random span lengths (not all 3), and the window starts with non-noise as in T5.
  assert np.std(span_lengths) > 1.0 and first_noisy == 0
  # Lengths whose densities do not divide evenly: the fraction is the rounded count.
  mask = span_corruption.noise_mask(35, 0.15, 3.0, np.random.default_rng(1))
  assert mask.sum() == 5 and len(runs(mask)) == 2


def test_corrupt_matches_reference_and_reassembles_exactly():
  rng = np.random.default_rng(1)
  for length in (2, 3, 10, 35, 71, 200):
    tokens = rng.integers(0, 259, length)
    tokens[tokens == PAD] = BOS  # Text never holds PAD; BOS/EOS of packed documents it may.
    mask = span_corruption.noise_mask(length, 0.15, 3.0, rng)
    inputs, targets = span_corruption.corrupt(tokens, mask)
    ref_inputs, ref_targets = reference_corrupt(tokens, mask)
    assert inputs.tolist() == ref_inputs and targets.tolist() == ref_targets
    assert reassemble(inputs, targets) == tokens.tolist()


def test_lengths_fit_the_encoder_exactly_as_t5():
  for seq_len in (16, 32, 64, 512):
    shape = span_corruption.lengths(seq_len, 0.15, 3.0)
    noise, spans = span_corruption.noise_counts(shape.raw_len, 0.15, 3.0)
    assert shape.raw_len - noise + spans <= seq_len  # Fits...
    noise1, spans1 = span_corruption.noise_counts(shape.raw_len + 1, 0.15, 3.0)
    assert shape.raw_len + 1 - noise1 + spans1 > seq_len  # ...and is the longest that does.
    assert shape.targets_len == noise + spans + 1 and shape.num_sentinels == spans
    assert shape.decoder_len >= shape.targets_len > shape.decoder_len // 2
  assert span_corruption.lengths(512, 0.15, 3.0) == span_corruption.Lengths(
      raw_len=569, encoder_len=512, targets_len=114, decoder_len=128, num_sentinels=28)


def _train(data_dir, objective, seq_len=32, **kw):
  return input_pipeline.make_train_iterator(
      name='stdlib_py', split='validation', data_dir=data_dir, feature_key='text',
      seq_len=seq_len, batch_size=4, seed=3, objective=objective, **kw)


def _check_batch(batch, shape):
  """Layout of one span-corruption batch; returns its rows' reassembled windows."""
  B = batch['targets'].shape[0]
  assert batch['encoder_inputs'].shape == (B, shape.encoder_len)
  assert batch['targets'].shape == batch['decoder_inputs'].shape == (B, shape.decoder_len)
  real = batch['weights'] > 0
  np.testing.assert_array_equal(real, batch['targets'] != PAD)
  np.testing.assert_array_equal(batch['decoder_inputs'][:, 0], np.where(real[:, 0], BOS, PAD))
  np.testing.assert_array_equal(batch['decoder_inputs'][:, 1:][real[:, 1:]],
                                batch['targets'][:, :-1][real[:, 1:]])
  return [reassemble(i, t[t != PAD]) for i, t in zip(batch['encoder_inputs'], batch['targets'])
          if (t != PAD).any()]


def test_train_batches_are_the_lm_token_stream_corrupted(stdlib_data_dir):
  shape = span_corruption.lengths(32, 0.15, 3.0)
  span_it = _train(stdlib_data_dir, 'span_corruption')
  windows = [w for _ in range(3) for w in _check_batch(next(span_it), shape)]
  assert all(len(w) == shape.raw_len for w in windows)
  # The causal-LM pipeline with the same seed packs the same shuffled stream into other windows.
  lm_it = _train(stdlib_data_dir, 'causal_lm')
  lm_stream = []
  while len(lm_stream) < 3 * 4 * shape.raw_len:
    batch = next(lm_it)
    for inputs, targets in zip(batch['inputs'], batch['targets']):
      lm_stream += inputs.tolist() + targets[-1:].tolist()
  assert sum(windows, []) == lm_stream[:len(windows) * shape.raw_len]
  # The noise is random per window, and restoring the iterator state restores it.
  state = span_it.get_state()
  after = next(span_it)
  span_it.set_state(state)
  again = next(span_it)
  for key in span_corruption.BATCH_KEYS:
    np.testing.assert_array_equal(after[key], again[key])


def test_eval_batches_cover_the_documents_once_with_fixed_noise(stdlib_data_dir):
  shape = span_corruption.lengths(32, 0.15, 3.0)
  kw = dict(name='stdlib_py', split='validation', data_dir=stdlib_data_dir, feature_key='text',
            seq_len=32, batch_size=4, objective='span_corruption', max_batches=3)
  batches = list(input_pipeline.make_eval_iterator(**kw))
  assert len(batches) == 3
  windows = [w for b in batches for w in _check_batch(b, shape)]
  source = input_pipeline.get_data_source('stdlib_py', 'validation', stdlib_data_dir)
  stream = [BOS, *tokenizer.encode(source[0]['text']).tolist(), EOS]
  assert len(stream) > 12 * shape.raw_len  # The first document fills all 12 windows.
  assert sum(windows, []) == stream[:12 * shape.raw_len]
  for a, b in zip(batches, input_pipeline.make_eval_iterator(**kw)):
    np.testing.assert_array_equal(a['encoder_inputs'], b['encoder_inputs'])


def test_eval_pads_the_last_window_and_batch():
  docs = [np.array([BOS, *range(10, 60), EOS], np.int32)]  # 52 tokens: windows of 35 and 17.
  batches = list(span_corruption.eval_batches(iter(docs), seq_len=32, batch_size=4,
                                              noise_density=0.15, mean_noise_span_length=3.0))
  assert len(batches) == 1
  shape = span_corruption.lengths(32, 0.15, 3.0)
  windows = _check_batch(batches[0], shape)
  assert sum(windows, []) == docs[0].tolist() and len(windows) == 2
  assert not batches[0]['weights'][2:].any()
