import hashlib
import os
import platform
import sysconfig

import pytest
import tensorflow_datasets as tfds

from stmoe_jax.data import func_name_corpus
from stmoe_jax.data import input_pipeline
from stmoe_jax.data import stdlib_corpus


def _independent_stdlib_paths():
  """Lists stdlib .py files without using the module under test."""
  root = sysconfig.get_paths()['stdlib']
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames
                   if d not in ('site-packages', 'dist-packages', '__pycache__')]
    out += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, '/')
            for f in filenames if f.endswith('.py')]
  return root, out


def _is_validation(rel_path):
  return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % 100 < 2


@pytest.fixture(scope='module')
def splits(stdlib_data_dir):
  return {s: input_pipeline.get_data_source('stdlib_py', s, stdlib_data_dir)
          for s in ('train', 'validation')}


@pytest.fixture(scope='module')
def paths(splits):
  return {s: [ex['path'].decode() for ex in src] for s, src in splits.items()}


def test_splits_are_disjoint_and_match_hash(paths):
  train, val = set(paths['train']), set(paths['validation'])
  assert len(train) == len(paths['train']) and len(val) == len(paths['validation'])
  assert not train & val
  _, all_paths = _independent_stdlib_paths()
  assert train | val == set(all_paths)
  assert val == {p for p in all_paths if _is_validation(p)}
  assert 0.01 <= len(val) / len(all_paths) <= 0.04


def test_no_excluded_files(paths):
  for p in paths['train'] + paths['validation']:
    assert p.endswith('.py')
    assert not {'site-packages', 'dist-packages', '__pycache__'} & set(p.split('/'))


def test_examples_equal_file_contents(splits):
  root, _ = _independent_stdlib_paths()
  for src in splits.values():
    for ex in src:
      with open(os.path.join(root, ex['path'].decode()), 'rb') as f:
        expected = f.read().decode('utf-8', errors='replace')
      assert ex['text'].decode('utf-8') == expected, ex['path']


def test_config_records_python_version(stdlib_data_dir):
  builder = stdlib_corpus.StdlibPy(data_dir=stdlib_data_dir)
  version = platform.python_version()
  assert builder.builder_config.name == 'py' + version.replace('.', '_')
  assert builder.builder_config.python_version == version
  assert version in builder.builder_config.description
  assert builder.is_prepared()
  assert builder.info.file_format.value == 'array_record'
  # The version is part of the on-disk layout, so corpora never mix.
  assert os.path.isdir(os.path.join(stdlib_data_dir, 'stdlib_py',
                                    builder.builder_config.name))


def test_split_for_path_matches_independent_hash(paths):
  for p in paths['train'] + paths['validation']:
    assert (stdlib_corpus.split_for_path(p) == 'validation') == _is_validation(p)


def test_only_the_concrete_builders_register_with_tfds():
  """The shared base is no dataset: TFDS finds the two builders by name, not the base, and each
  builder's code_path is its own module (where TFDS looks for its checksums)."""
  assert tfds.builder_cls('stdlib_py') is stdlib_corpus.StdlibPy
  assert tfds.builder_cls('stdlib_func_name') is func_name_corpus.StdlibFuncName
  with pytest.raises(tfds.core.registered.DatasetNotFoundError):
    tfds.builder_cls(stdlib_corpus.StdlibBuilder.name)
  assert os.fspath(stdlib_corpus.StdlibPy.code_path) == stdlib_corpus.__file__
  assert os.fspath(func_name_corpus.StdlibFuncName.code_path) == func_name_corpus.__file__
