"""TFDS builder `stdlib_func_name`: a downstream task from the embedded standard library.

Each example is one function of the running interpreter's standard library, parsed with `ast`:
its body (the source of its statements, dedented; docstring included) is the prompt, its name
the answer. Body -> name rather than docstring -> signature because every function has a body
and a name (a minority have docstrings), the answer is a short identifier whose exact match is a
meaningful score for a byte model, and predicting it needs reading the code.

Which functions: every `def` and `async def` (methods and nested functions too) of every file
`stdlib_py` lists, except dunder names (`__init__`, `__eq__`, ...): they are a tenth of all
functions and guessable from the signature shape alone, which would inflate exact match. Files
that do not parse (the stdlib ships some deliberately broken test files) are skipped. The name
may occur in its own body (recursion, docstrings); it is not masked.

Split: by file, with `stdlib_py`'s hash (`stdlib_corpus.split_for_path`), so the validation
functions come from exactly the files `stdlib_py` holds out: a model pre-trained on `stdlib_py`
has never seen their bodies.
"""

from __future__ import annotations

import ast
import dataclasses
import textwrap
import warnings
from collections.abc import Iterator

import tensorflow_datasets as tfds

from stmoe_jax.data import stdlib_corpus

NAME = 'stdlib_func_name'
PROMPT, ANSWER = 'body', 'name'  # The features holding a task example's prompt and answer.


@dataclasses.dataclass(frozen=True)
class Function:
  """One example: `key` is '<path>:<line>:<column>' of the `def`, unique in the corpus."""
  key: str
  path: str
  name: str
  body: str


def _is_dunder(name: str) -> bool:
  return len(name) > 4 and name.startswith('__') and name.endswith('__')


def body_source(lines: list[bytes], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """The source of `node`'s statements: from its first statement to the end of the function,
  dedented. `lines` are the file's lines as bytes, since ast columns are byte offsets. A body on
  the `def` line (`def f(): return 1`) keeps only its statements: the name never leaks through
  the header."""
  first = node.body[0]
  start, end = first.lineno - 1, node.end_lineno - 1
  chunk = lines[start:end + 1]
  chunk[-1] = chunk[-1][:node.end_col_offset]  # Drops a trailing comment, keeps the column math.
  # Spaces keep the first statement's column, so dedent strips the same indentation everywhere.
  chunk[0] = b' ' * first.col_offset + chunk[0][first.col_offset:]
  text = b''.join(chunk).decode('utf-8', errors='replace')
  return textwrap.dedent(text).strip('\n') + '\n'


def functions_of(rel_path: str, source: str) -> list[Function]:
  """The task's examples in one file, in `ast.walk` order; [] when the file does not parse."""
  try:
    with warnings.catch_warnings():  # Invalid escapes in old test files warn at parse time.
      warnings.simplefilter('ignore')
      tree = ast.parse(source)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return []
  lines = source.encode('utf-8').splitlines(keepends=True)
  return [Function(key=f'{rel_path}:{node.lineno}:{node.col_offset}', path=rel_path,
                   name=node.name, body=body_source(lines, node))
          for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and not _is_dunder(node.name)]


def iter_functions(root: str, paths: list[str]) -> Iterator[Function]:
  """Every example of the files `paths` (relative to `root`), file by file."""
  for rel in paths:
    yield from functions_of(rel, stdlib_corpus.read_source(root, rel))


class StdlibFuncName(stdlib_corpus.StdlibBuilder):
  """Function body -> function name over the running interpreter's standard library.

  Features: `body` (prompt), `name` (answer), `path` (the file, relative to the stdlib root).
  Builder configs as `stdlib_py`'s: one per interpreter version (`stdlib_corpus.config_name`).
  """

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [stdlib_corpus.current_config()]
  FEATURES = (PROMPT, ANSWER, 'path')
  SUPERVISED_KEYS = (PROMPT, ANSWER)
  HOMEPAGE = 'https://docs.python.org/3/library/ast.html'

  def _generate_examples(self, root, paths):
    for fn in iter_functions(root, paths):
      yield fn.key, {PROMPT: fn.body, ANSWER: fn.name, 'path': fn.path}
