"""A corpus from files the tests write: documents, hash splits, versions, bad input, train.py."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from stmoe_jax.data import input_pipeline
from stmoe_jax.data import local_corpus
from stmoe_jax.data.local_corpus import CorpusError
from stmoe_jax.data.local_corpus import CorpusSpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARE = 0.5  # A dozen documents: both splits non-empty.
TEXTS = [f'document {i}: ' + 'spam and eggs ' * i + '\n' for i in range(12)]


def _is_validation(text):
  """The split rule, written independently of the module under test."""
  digest = hashlib.sha256(text.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64 < SHARE


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data if isinstance(data, bytes) else data.encode('utf-8'))


@pytest.fixture
def corpus(tmp_path):
  """tmp/corpus/{a,b/c}/doc*.txt holding TEXTS, an empty file and a Latin-1 file."""
  root = tmp_path / 'corpus'
  for i, text in enumerate(TEXTS):
    _write(str(root / ('a' if i % 2 else 'b/c') / f'doc{i}.txt'), text)
  _write(str(root / 'a' / 'empty.txt'), ' \n')
  _write(str(root / 'a' / 'latin1.txt'), 'caf\xe9 au lait'.encode('latin-1'))
  return root


def _spec(root, **kwargs):
  return CorpusSpec(name='mycorpus', files=(f'{root}/**/*.txt',), validation_share=SHARE,
                    **kwargs)


def _read(name, data_dir):
  return {split: {ex['text'].decode('utf-8'): ex['path'].decode('utf-8')
                  for ex in input_pipeline.get_data_source(name, split, data_dir)}
          for split in ('train', 'validation')}


def test_documents_splits_and_counts(corpus, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  result = local_corpus.build(_spec(corpus), data_dir)
  assert (result.version, result.reused) == ('1.0.0', False)
  docs = _read('mycorpus', data_dir)
  assert set(docs['train']) | set(docs['validation']) == set(TEXTS)
  assert set(docs['validation']) == {t for t in TEXTS if _is_validation(t)}
  assert docs['train'] and docs['validation']
  for text, path in {**docs['train'], **docs['validation']}.items():
    with open(path) as f:
      assert f.read() == text
  stats = result.stats
  assert stats.documents == {s: len(docs[s]) for s in docs}
  assert stats.bytes == {s: sum(len(t.encode()) for t in docs[s]) for s in docs}
  assert stats.skipped_empty == [str(corpus / 'a' / 'empty.txt')]
  assert stats.skipped_not_utf8 == [str(corpus / 'a' / 'latin1.txt')]
  with open(os.path.join(result.path, 'metadata.json')) as f:
    metadata = json.load(f)
  assert metadata['files'] == [f'{corpus}/**/*.txt']
  assert metadata['fingerprint'] == stats.fingerprint
  assert (metadata['skipped_empty'], metadata['skipped_not_utf8']) == (1, 1)


def test_replace_decodes_not_utf8(corpus, tmp_path):
  result = local_corpus.build(_spec(corpus, decode_errors='replace'), str(tmp_path / 'tfds'))
  assert result.stats.skipped_not_utf8 == []
  assert result.stats.replaced_not_utf8 == [str(corpus / 'a' / 'latin1.txt')]
  texts = _read('mycorpus', str(tmp_path / 'tfds'))
  assert 'caf\ufffd au lait' in {**texts['train'], **texts['validation']}


def test_changed_corpus_is_a_new_version_with_stable_splits(corpus, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  local_corpus.build(_spec(corpus), data_dir)
  first = _read('mycorpus', data_dir)
  again = local_corpus.build(_spec(corpus), data_dir)
  assert (again.version, again.reused) == ('1.0.0', True)
  # A new document and a moved one: the others keep their split, the new version is the
  # one readers by name get, and the old one stays readable by version.
  _write(str(corpus / 'a' / 'new.txt'), 'a new document\n')
  os.rename(corpus / 'a' / 'doc1.txt', corpus / 'b' / 'doc1.txt')
  changed = local_corpus.build(_spec(corpus), data_dir)
  assert (changed.version, changed.reused) == ('1.0.1', False)
  assert changed.stats.fingerprint != again.stats.fingerprint
  second = _read('mycorpus', data_dir)
  for split in first:
    assert set(first[split]) <= set(second[split])
  assert 'a new document\n' in {**second['train'], **second['validation']}
  assert _read('mycorpus:1.0.0', data_dir) == first
  # An explicit version that already holds other content is refused.
  with pytest.raises(CorpusError, match=r'1\.0\.0 holds other content'):
    local_corpus.build(_spec(corpus), data_dir, version='1.0.0')


def test_jsonl_documents(tmp_path):
  path = str(tmp_path / 'docs.jsonl')
  lines = [json.dumps({'body': t, 'id': i}) for i, t in enumerate(TEXTS)]
  lines[3] = json.dumps({'body': '   '})  # empty document: skipped, counted
  _write(path, '\n'.join(lines) + '\n\n')  # blank lines hold no document
  spec = CorpusSpec(name='chats', files=(path,), format='jsonl', text_field='body',
                    validation_share=SHARE)
  result = local_corpus.build(spec, str(tmp_path / 'tfds'))
  docs = _read('chats', str(tmp_path / 'tfds'))
  expected = {t: f'{path}:{i + 1}' for i, t in enumerate(TEXTS) if i != 3}
  assert {**docs['train'], **docs['validation']} == expected
  assert result.stats.skipped_empty == [f'{path}:4']


def _bad_jsonl(tmp_path, line):
  path = str(tmp_path / 'bad.jsonl')
  _write(path, json.dumps({'text': 'fine'}) + '\n' + line + '\n')
  return CorpusSpec(name='chats', files=(path,), format='jsonl'), path


@pytest.mark.parametrize('make_spec, message', [
    (lambda tmp, root: _spec(tmp / 'nowhere'), r"pattern '.*nowhere/\*\*/\*\.txt' matches no"),
    (lambda tmp, root: CorpusSpec(name='mycorpus', files=(str(root),)),
     r"corpus' matches no files \(only directories: try '.*corpus/\*\*/\*\.txt'\)"),
    (lambda tmp, root: _bad_jsonl(tmp, '{"text": oops}')[0], r'bad\.jsonl:2: not JSON'),
    (lambda tmp, root: _bad_jsonl(tmp, '{"body": "x"}')[0],
     r"bad\.jsonl:2: no field 'text' \(it has \['body'\]\)"),
    (lambda tmp, root: _bad_jsonl(tmp, '{"text": 7}')[0], r"bad\.jsonl:2: field 'text' is a int"),
    (lambda tmp, root: CorpusSpec(name='mnist', files=(f'{root}/**/*.txt',)),
     r"'mnist' is a registered TFDS dataset"),
    (lambda tmp, root: CorpusSpec(name='stdlib_py', files=(f'{root}/**/*.txt',)),
     r"'stdlib_py' is a registered TFDS dataset"),
    (lambda tmp, root: CorpusSpec(name='My-Corpus', files=('x',)), 'not a dataset name'),
])
def test_bad_input_is_one_line_and_writes_nothing(make_spec, message, corpus, tmp_path):
  data_dir = tmp_path / 'tfds'
  with pytest.raises(CorpusError, match=message) as error:
    local_corpus.build(make_spec(tmp_path, corpus), str(data_dir))
  assert '\n' not in str(error.value)
  assert not data_dir.exists() or not any(data_dir.iterdir())


def test_name_holding_another_corpus_is_refused(corpus, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  local_corpus.build(_spec(corpus), data_dir)
  other = CorpusSpec(name='mycorpus', files=(f'{corpus}/a/*.txt',), validation_share=SHARE)
  with pytest.raises(CorpusError, match="'mycorpus' already holds another corpus"):
    local_corpus.build(other, data_dir)
  # A directory of that name this builder did not write is someone else's dataset.
  os.makedirs(os.path.join(data_dir, 'theirs', '2.0.0'))
  _write(os.path.join(data_dir, 'theirs', '2.0.0', 'features.json'), '{}')
  with pytest.raises(CorpusError, match='did not write'):
    local_corpus.build(CorpusSpec(name='theirs', files=(f'{corpus}/**/*.txt',)), data_dir)
  assert sorted(os.listdir(os.path.join(data_dir, 'mycorpus'))) == ['1.0.0']


def test_empty_split_and_file_changed_midway_leave_no_dataset(corpus, tmp_path, monkeypatch):
  data_dir = tmp_path / 'tfds'
  only_empty = CorpusSpec(name='mycorpus', files=(f'{corpus}/a/empty.txt',))
  with pytest.raises(CorpusError, match='split would be empty'):
    local_corpus.build(only_empty, str(data_dir))
  scan = local_corpus.scan

  def scan_then_edit(*args, **kwargs):
    stats = scan(*args, **kwargs)
    _write(str(corpus / 'a' / 'doc1.txt'), 'edited after the scan\n')
    return stats

  monkeypatch.setattr(local_corpus, 'scan', scan_then_edit)
  with pytest.raises(CorpusError, match=r'doc1\.txt changed while the corpus was being built'):
    local_corpus.build(_spec(corpus), str(data_dir))
  assert not (data_dir / 'mycorpus').exists() or not any((data_dir / 'mycorpus').iterdir())


def test_small_corpus_gets_one_validation_document(tmp_path):
  # A hundred documents none of which hashes below the 2% share: the smallest hash goes.
  hashes = lambda t: int.from_bytes(hashlib.sha256(t.encode('utf-8')).digest()[:8], 'big')
  texts = [t for t in (f'note {i}: tea and toast\n' for i in range(200))
           if hashes(t) >= 0.02 * 2**64][:100]
  path = tmp_path / 'notes.jsonl'
  _write(str(path), ''.join(json.dumps({'text': t}) + '\n' for t in texts))
  data_dir = str(tmp_path / 'tfds')
  spec = CorpusSpec(name='notes', files=(str(path),), format='jsonl')
  result = local_corpus.build(spec, data_dir)
  assert result.stats.documents == {'train': 99, 'validation': 1}
  assert result.stats.moved_to_validation == 1
  got = _read('notes', data_dir)
  assert list(got['validation']) == [min(texts, key=hashes)]
  assert sorted(got['train']) == sorted(set(texts) - set(got['validation']))
  from stmoe_jax.data import build  # pylint: disable=g-import-not-at-top
  assert ('validation 1: none hashed below validation_share, so the 1 with the smallest hash '
          'went there)') in build.summary(result, data_dir)


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def test_build_command_then_train_py_on_it(corpus, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  bad = _run('-m', 'stmoe_jax.data.build', '--name=mycorpus', f'--files={tmp_path}/no/*.txt',
             f'--data_dir={data_dir}')
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == (
      f"error: files pattern '{tmp_path}/no/*.txt' matches no files")
  built = _run('-m', 'stmoe_jax.data.build', '--name=mycorpus', f'--files={corpus}/**/*.txt',
               f'--validation_share={SHARE}', f'--data_dir={data_dir}')
  assert built.returncode == 0, built.stderr[-2000:]
  assert 'mycorpus:1.0.0 prepared' in built.stdout
  assert 'skipped: 1 empty, 1 not UTF-8' in built.stdout
  workdir = str(tmp_path / 'run')
  trained = _run('train.py', '--config=configs/tiny.py', f'--workdir={workdir}',
                 '--config.data.name=mycorpus', f'--config.data.data_dir={data_dir}',
                 # stop_at_step, not num_train_steps: tiny.py's programs (learning-rate
                 # schedule included) as the other tests compile them, from the XLA cache.
                 '--config.stop_at_step=4')
  assert trained.returncode == 0, trained.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if r['kind'] == 'eval']
  assert [r['step'] for r in evals] == [4]
  assert 0 < evals[0]['bits_per_byte'] < 9 and evals[0]['num_tokens'] > 0
