"""The `stdlib_func_name` task builder on a tiny tree of .py files, against an ast walk and
bodies written out by hand; its split is stdlib_py's file hash."""

import ast
import hashlib
import os

import pytest

from stmoe_jax.data import func_name_corpus
from stmoe_jax.data import input_pipeline
from stmoe_jax.data import stdlib_corpus

MODULE = '''\
import os


def plain(a, b=1):
    """Adds."""
    return a + b

async def fetch(x):  # comment on the def line
    await x
    # a comment inside
    return x

class K:
    def __init__(self):
        self.v = 1

    @property
    def value(self): return self.v

    def outer(self):
        def inner(y):
            return y * 2
        return inner(3)
'''
# What the builder must produce for MODULE, written by hand.
EXPECTED_BODIES = {
    'plain': '"""Adds."""\nreturn a + b\n',
    'fetch': 'await x\n# a comment inside\nreturn x\n',
    'value': 'return self.v\n',
    'outer': 'def inner(y):\n    return y * 2\nreturn inner(3)\n',
    'inner': 'return y * 2\n',
}


def _split(rel_path):
  return 'validation' if int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % 100 < 2 else 'train'


def _names_by_ast(source):
  """Reference: every (line, name) of a def / async def, dunders left out."""
  return sorted((n.lineno, n.name) for n in ast.walk(ast.parse(source))
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                and not (n.name.startswith('__') and n.name.endswith('__')))


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """{relative path: source}: MODULE twice (one file in each split), a package file, a file
  that does not parse."""
  root = tmp_path_factory.mktemp('stdlib')
  names = [f'm{i}.py' for i in range(1000)]
  val = next(n for n in names if _split(n) == 'validation')
  files = {val: MODULE, 'm_train.py': MODULE,
           'pkg/util.py': 'def helper():\n\treturn [i for i in range(3)]\n',
           'broken.py': 'def bad(:\n    pass\n'}
  assert _split('m_train.py') == 'train'
  for rel, text in files.items():
    os.makedirs(os.path.dirname(root / rel), exist_ok=True)
    (root / rel).write_text(text)
  return str(root), files


@pytest.fixture(scope='module')
def splits(tree, tmp_path_factory):
  root, _ = tree
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = stdlib_corpus.StdlibPyConfig(name='tiny', stdlib_root=root,
                                        python_version=stdlib_corpus.python_version())
  builder = func_name_corpus.StdlibFuncName(data_dir=data_dir, config=config)
  builder.download_and_prepare(file_format='array_record')
  return {s: [{k: v.decode() for k, v in ex.items()} for ex in builder.as_data_source(split=s)]
          for s in ('train', 'validation')}


def test_examples_match_an_ast_walk_and_the_file_hash_split(tree, splits):
  _, files = tree
  for split, examples in splits.items():
    got = sorted((ex['path'], ex['name']) for ex in examples)
    want = sorted((rel, name) for rel, text in files.items() if rel != 'broken.py'
                  and _split(rel) == split for _, name in _names_by_ast(text))
    assert got == want, split
  assert all(ex['path'] != 'broken.py' for exs in splits.values() for ex in exs)


def test_bodies_are_the_dedented_statements(splits):
  for split in splits.values():
    for ex in split:
      if ex['path'] == 'pkg/util.py':
        assert ex['body'] == 'return [i for i in range(3)]\n'
      else:
        assert ex['body'] == EXPECTED_BODIES[ex['name']], ex['name']
        assert f'def {ex["name"]}' not in ex['body']  # The header never leaks the name.


def test_task_registry_points_at_the_builder():
  from stmoe_jax.data.tasks import TASKS  # pylint: disable=g-import-not-at-top
  assert TASKS['func_name'] == func_name_corpus.NAME
  assert input_pipeline.EMBEDDED[func_name_corpus.NAME] is func_name_corpus.StdlibFuncName
