"""Task batches (prefix-LM rows, eval and train iterators) against references written here."""

import numpy as np

from stmoe_jax.data import tasks
from stmoe_jax.data import tokenizer

BOS, EOS, PAD = tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.PAD_ID


def _reference_row(prompt: str, answer: str, seq_len: int):
  """Token list `BOS prompt SEP answer EOS` built from strings, the prompt cut from the end
  until the sequence fits L + 1, then padded; weights where the target is an answer token."""
  prompt_ids, answer_ids = list(prompt.encode()), list(answer.encode()) + [EOS]
  while 2 + len(prompt_ids) + len(answer_ids) > seq_len + 1 and prompt_ids:
    prompt_ids.pop()
  seq = ([BOS] + prompt_ids + [EOS] + answer_ids)[:seq_len + 1]
  is_answer = [False] * (2 + len(prompt_ids)) + [True] * len(answer_ids)
  seq += [PAD] * (seq_len + 1 - len(seq))
  is_answer += [False] * (seq_len + 1 - len(is_answer))
  return seq[:-1], seq[1:], [float(a) for a in is_answer[1:seq_len + 1]]


def _row(prompt, answer, seq_len):
  return tasks.prefix_lm_example(tokenizer.encode(prompt), tokenizer.encode(answer), seq_len)


def test_prefix_lm_rows_match_the_reference():
  for prompt, answer, seq_len in [('return a + b', 'add', 32),  # Fits with padding.
                                  ('x = 1\ny = 2\nreturn x + y', 'three', 16),  # Prompt cut.
                                  ('abc', 'a_very_long_function_name', 8),  # Answer cut too.
                                  ('', 'f', 4)]:
    got = _row(prompt, answer, seq_len)
    inputs, targets, weights = _reference_row(prompt, answer, seq_len)
    np.testing.assert_array_equal(got['inputs'], inputs)
    np.testing.assert_array_equal(got['targets'], targets)
    np.testing.assert_array_equal(got['weights'], weights)
    assert got['inputs'].dtype == np.int32 and got['weights'].dtype == np.float32


def _source(n):
  return [{'body': f'return {i}\n'.encode(), 'name': f'f{i}'.encode(), 'path': b'x.py'}
          for i in range(n)]


def test_eval_batches_hold_every_example_once_then_padding():
  source = _source(7)
  for index, count in [(0, 1), (0, 2), (1, 2)]:
    batches = list(tasks.TaskEvalIterable(source, 'func_name', 'prefix_lm', seq_len=16,
                                          batch_size=3, process_index=index,
                                          process_count=count, max_batches=None))
    assert len(batches) == (3 if count == 1 else 2)  # Both processes: ceil(4 / 3) batches.
    rows = [{k: b[k][r] for k in b} for b in batches for r in range(3)]
    mine = source[index::count]
    for r, row in enumerate(rows):
      if r < len(mine):
        want = _row(mine[r]['body'].decode(), mine[r]['name'].decode(), 16)
        for k in want:
          np.testing.assert_array_equal(row[k], want[k])
      else:  # Padding rows: nothing scored, nothing routed.
        assert (row['inputs'] == PAD).all() and (row['weights'] == 0).all()


def test_train_iterator_shuffles_whole_examples_and_restores_its_position():
  source = _source(5)
  make = lambda: tasks.task_train_iterator(source, 'func_name', 'prefix_lm', seq_len=16,
                                           batch_size=2, seed=3)
  it = make()
  epoch = [next(it) for _ in range(5)]  # 10 rows: two epochs of 5.
  answers = [tokenizer.decode(row[w > 0][:-1]) for b in epoch
             for row, w in zip(b['targets'], b['weights'])]
  assert sorted(answers[:5]) == sorted(answers[5:]) == [f'f{i}' for i in range(5)]
  assert answers[:5] != [f'f{i}' for i in range(5)] or answers[5:] != answers[:5]
  state = it.get_state()
  expected = next(it)
  resumed = make()
  resumed.set_state(state)
  for k, v in next(resumed).items():
    np.testing.assert_array_equal(v, expected[k])


def _reference_seq2seq_row(prompt: str, answer: str, seq_len: int, decoder_len: int):
  """Lists built from strings: encoder = prompt bytes + EOS cut to T then padded; decoder reads
  BOS + answer, predicts answer + EOS (both cut to L), weights on those targets."""
  encoder = (list(prompt.encode()) + [EOS])[:seq_len]
  encoder += [PAD] * (seq_len - len(encoder))
  targets = (list(answer.encode()) + [EOS])[:decoder_len]
  decoder = ([BOS] + list(answer.encode()))[:len(targets)]
  pad = decoder_len - len(targets)
  return encoder, decoder + [PAD] * pad, targets + [PAD] * pad, [1.0] * len(targets) + [0.0] * pad


def test_seq2seq_rows_match_the_reference():
  for prompt, answer, seq_len, decoder_len in [
      ('return a + b', 'add', 32, 8),  # Both fit with padding.
      ('x = 1\ny = 2\nreturn x + y', 'three', 8, 8),  # Prompt (and its EOS) cut.
      ('abc', 'a_very_long_name', 16, 8),  # Answer cut: no EOS target.
      ('abcdef', 'f', 7, 4)]:  # Prompt + EOS exactly fill the encoder.
    got = tasks.seq2seq_example(tokenizer.encode(prompt), tokenizer.encode(answer), seq_len,
                                decoder_len)
    want = _reference_seq2seq_row(prompt, answer, seq_len, decoder_len)
    for key, ref in zip(('encoder_inputs', 'decoder_inputs', 'targets', 'weights'), want):
      np.testing.assert_array_equal(got[key], ref, err_msg=f'{prompt!r} {key}')
    assert got['encoder_inputs'].dtype == np.int32 and got['weights'].dtype == np.float32


def test_seq2seq_batches_use_the_span_corruption_decoder_length():
  """The eval iterable's rows are `seq2seq_example` at span corruption's decoder length for
  data.seq_len (8 at seq_len 32, `span_corruption.lengths`), padding rows all PAD / weight 0."""
  source = _source(3)
  batches = list(tasks.TaskEvalIterable(
      source, 'func_name', 'seq2seq', seq_len=32, batch_size=2, process_index=0,
      process_count=1, max_batches=None, decoder_len=tasks.seq2seq_decoder_len(32)))
  assert tasks.seq2seq_decoder_len(32, 0.15, 3.0) == 8 and len(batches) == 2
  assert batches[0]['decoder_inputs'].shape == (2, 8)
  assert batches[0]['encoder_inputs'].shape == (2, 32)
  want = tasks.seq2seq_example(tokenizer.encode('return 2\n'), tokenizer.encode('f2'), 32, 8)
  for k, v in want.items():
    np.testing.assert_array_equal(batches[1][k][0], v)
  assert (batches[1]['encoder_inputs'][1] == PAD).all()
  assert (batches[1]['weights'][1] == 0).all()
