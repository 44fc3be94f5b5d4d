import collections
import itertools
import json
import socket
import time

import grain
import numpy as np
import pytest

from stmoe_jax.data import input_pipeline
from stmoe_jax.data import tokenizer

BOS, EOS, PAD = tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.PAD_ID


def _train(data_dir, split='validation', seq_len=32, batch_size=4, seed=0,
           **kw):
  return input_pipeline.make_train_iterator(
      name='stdlib_py', split=split, data_dir=data_dir, feature_key='text',
      seq_len=seq_len, batch_size=batch_size, seed=seed, **kw)


def _eval(data_dir, seq_len=64, batch_size=8, **kw):
  return input_pipeline.make_eval_iterator(
      name='stdlib_py', split='validation', data_dir=data_dir,
      feature_key='text', seq_len=seq_len, batch_size=batch_size, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def _doc_tokens(text: bytes) -> np.ndarray:
  return np.concatenate(
      [[BOS], np.frombuffer(text, np.uint8), [EOS]]).astype(np.int32)


def _reference_windows(source, seed, seq_len, n_windows, p=0, count=1):
  """Plain-numpy concat-then-split over the shard in grain's shuffled order."""
  shard = list(range(p, len(source), count))
  # Only the document order comes from grain (the documented contract:
  # MapDataset.shuffle(seed) reshuffled per epoch by repeat()).
  order = grain.MapDataset.range(len(shard)).shuffle(seed=seed).repeat()
  stream, total, used = [], 0, []
  for i in itertools.count():
    if total >= n_windows * (seq_len + 1):
      break
    doc = shard[order[i]]
    used.append(doc)
    stream.append(_doc_tokens(source[doc]['text']))
    total += stream[-1].size
  stream = np.concatenate(stream)[:n_windows * (seq_len + 1)]
  return stream.reshape(n_windows, seq_len + 1), used


@pytest.fixture(scope='module')
def val_source(stdlib_data_dir):
  return input_pipeline.get_data_source('stdlib_py', 'validation',
                                        stdlib_data_dir)


def test_batch_shapes_and_dtypes(stdlib_data_dir):
  batch = next(_train(stdlib_data_dir, split='train', seq_len=256,
                      batch_size=32))
  assert batch['inputs'].shape == (32, 256) and batch['inputs'].dtype == np.int32
  assert batch['targets'].shape == (32, 256) and batch['targets'].dtype == np.int32
  assert batch['weights'].shape == (32, 256)
  assert batch['weights'].dtype == np.float32
  assert (batch['weights'] == 1).all()
  assert batch['inputs'].min() >= 0 and batch['inputs'].max() < tokenizer.VOCAB_SIZE
  assert not (batch['inputs'] == PAD).any()
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])


@pytest.mark.parametrize('p,count', [(0, 1), (0, 2), (1, 2)])
def test_matches_numpy_reference_across_epochs(stdlib_data_dir, val_source,
                                               p, count):
  seq_len, batch_size = 256, 32
  shard_tokens = sum(len(val_source[i]['text']) + 2
                     for i in range(p, len(val_source), count))
  # Enough batches to cross two epoch boundaries (reshuffle each epoch).
  n_batches = 2 * shard_tokens // (batch_size * (seq_len + 1)) + 3
  it = _train(stdlib_data_dir, seq_len=seq_len, batch_size=batch_size, seed=7,
              process_index=p, process_count=count)
  got = _take(it, n_batches)
  ref, used = _reference_windows(val_source, 7, seq_len,
                                 n_batches * batch_size, p, count)
  ref = ref.reshape(n_batches, batch_size, seq_len + 1)
  for b, r in zip(got, ref):
    np.testing.assert_array_equal(b['inputs'], r[:, :-1])
    np.testing.assert_array_equal(b['targets'], r[:, 1:])
  n_shard = len(range(p, len(val_source), count))
  assert len(used) > 2 * n_shard  # really crossed two epochs
  epochs = [used[i * n_shard:(i + 1) * n_shard] for i in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(
      range(p, len(val_source), count))
  assert epochs[0] != epochs[1]  # reshuffled each epoch


def _complete_docs(batches):
  """Documents recovered from the packed token stream of train batches."""
  rows = [np.concatenate([b['inputs'][:, :1], b['targets']], 1)
          for b in batches]
  stream = np.concatenate(rows).reshape(-1)
  starts = np.flatnonzero(stream == BOS)
  docs = []
  for s, e in zip(starts[:-1], starts[1:]):
    assert stream[e - 1] == EOS  # every document is terminated before BOS
    docs.append(stream[s + 1:e - 1].astype(np.uint8).tobytes())
  return docs


def test_processes_see_disjoint_documents(stdlib_data_dir, val_source):
  texts = [ex['text'] for ex in val_source]
  owners = collections.defaultdict(set)
  for i, t in enumerate(texts):
    owners[t].add(i)
  seen = {}
  for p in (0, 1):
    batches = _take(_train(stdlib_data_dir, seq_len=256, batch_size=16,
                           process_index=p, process_count=2), 40)
    docs = _complete_docs(batches)
    assert docs
    seen[p] = set()
    for d in docs:
      assert d in owners, 'recovered text is not a whole document'
      assert any(i % 2 == p for i in owners[d])
      if len(owners[d]) == 1:  # unique content identifies the document
        seen[p] |= owners[d]
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_seed_determinism(stdlib_data_dir):
  a = _take(_train(stdlib_data_dir, seed=3), 10)
  b = _take(_train(stdlib_data_dir, seed=3), 10)
  c = _take(_train(stdlib_data_dir, seed=4), 10)
  _assert_same(a, b)
  assert any((x['inputs'] != y['inputs']).any() for x, y in zip(a, c))


@pytest.mark.parametrize('seq_len,batch_size', [(256, 32), (1024, 4), (8, 3)])
def test_state_restore_resumes_exactly(stdlib_data_dir, seq_len, batch_size):
  kw = dict(split='train', seq_len=seq_len, batch_size=batch_size, seed=11)
  it = _train(stdlib_data_dir, **kw)
  states, batches = [], []
  for _ in range(30):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  batches += _take(it, 5)
  for n in (0, 1, 2, 7, 19, 29):
    restored = _train(stdlib_data_dir, **kw)
    restored.set_state(states[n])
    _assert_same(_take(restored, 6), batches[n:n + 6])


def test_state_from_other_config_is_rejected(stdlib_data_dir):
  state = _train(stdlib_data_dir, seed=1).get_state()
  with pytest.raises(ValueError):
    _train(stdlib_data_dir, seed=2).set_state(state)


def test_eval_deterministic_finite_and_counts_every_token(stdlib_data_dir,
                                                          val_source):
  ev = _eval(stdlib_data_dir)
  first, second = list(ev), list(ev)
  _assert_same(first, second)
  _assert_same(first, list(_eval(stdlib_data_dir)))
  for b in first:
    assert b['inputs'].shape == b['targets'].shape == (8, 64)
    assert b['weights'].dtype == np.float32
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  # Every byte and every EOS is a target once; BOS targets are not scored.
  expected = sum(len(ex['text']) + 1 for ex in val_source)
  assert sum(b['weights'].sum() for b in first) == expected
  # The windows overlap by one token; undoing that rebuilds the stream.
  rows = np.concatenate([np.concatenate([b['inputs'][:, :1], b['targets']], 1)
                         for b in first])
  stream = np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])
  stream = stream[stream != PAD]
  ref = np.concatenate([_doc_tokens(ex['text']) for ex in val_source])
  np.testing.assert_array_equal(stream, ref)
  assert (first[-1]['targets'] == PAD).any()  # the tail really was padded


def test_eval_multi_process_agrees_on_batch_count(stdlib_data_dir, val_source):
  evs = [_eval(stdlib_data_dir, process_index=p, process_count=2)
         for p in (0, 1)]
  batches = [list(ev) for ev in evs]
  assert len(batches[0]) == len(batches[1]) == len(evs[0]) == len(evs[1])
  total = sum(b['weights'].sum() for bs in batches for b in bs)
  assert total == sum(len(ex['text']) + 1 for ex in val_source)


def test_eval_max_batches(stdlib_data_dir):
  full = list(_eval(stdlib_data_dir))
  limited = list(_eval(stdlib_data_dir, max_batches=3))
  _assert_same(limited, full[:3])


def test_missing_dataset_raises_without_network(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  monkeypatch.setattr(socket, 'create_connection', no_network)
  start = time.time()
  with pytest.raises(FileNotFoundError, match=r'lm1b.*tfds build lm1b'):
    input_pipeline.get_data_source('lm1b', 'train', str(tmp_path))
  with pytest.raises(FileNotFoundError, match='lm1b'):
    input_pipeline.make_train_iterator(
        name='lm1b', split='train', data_dir=str(tmp_path), feature_key='text',
        seq_len=8, batch_size=2, seed=0)
  assert time.time() - start < 10
  assert not list(tmp_path.iterdir())  # nothing was created


def test_state_saved_beside_orbax_checkpoint(stdlib_data_dir, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  it = _train(stdlib_data_dir, split='train', seq_len=64, batch_size=8)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(3, args=ocp.args.Composite(
        data=ocp.args.JsonSave(it.get_state()),  # single-process trainers
        data_grain=grain.checkpoint.CheckpointSave(it)))  # one file/process
    mngr.wait_until_finished()
  expected = _take(it, 4)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    restored = mngr.restore(3, args=ocp.args.Composite(
        data=ocp.args.JsonRestore()))
    from_json = _train(stdlib_data_dir, split='train', seq_len=64, batch_size=8)
    from_json.set_state(restored['data'])
    _assert_same(_take(from_json, 4), expected)
    from_grain = _train(stdlib_data_dir, split='train', seq_len=64,
                        batch_size=8)
    mngr.restore(3, args=ocp.args.Composite(
        data_grain=grain.checkpoint.CheckpointRestore(from_grain)))
    _assert_same(_take(from_grain, 4), expected)
