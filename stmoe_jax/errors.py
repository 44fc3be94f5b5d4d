"""One `error:` line per expected failure at the entry points (train.py, eval.py, sample.py).

Failures the library can name (bad config, data, workdir, checkpoints, a full disk) end the
process with exit status 1 and one line on stderr; a traceback would only bury that line. Set
the environment variable `STMOE_JAX_TRACEBACK=1` to get the traceback as well. Anything not
listed is a bug and keeps its traceback. Orbax logs the failures of its background save
threads (a full disk) with tracebacks before the save reports them to us; `quiet_orbax_errors`
drops those log records, as the one line says the same.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from typing import Iterator

TRACEBACK_ENV = 'STMOE_JAX_TRACEBACK'


def one_line(error: BaseException) -> str:
  """The message of `error` on one line: a full disk said so, a config file's syntax error
  by file and line, a traceback flattened into a message (ml_collections' config loading)
  reduced to its last line."""
  if isinstance(error, SyntaxError):
    return (f'{error.filename}:{error.lineno}: {type(error).__name__}: {error.msg}: '
            f'{(error.text or "").strip()}')
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    return f'writing {error.filename or "a file"} failed (disk full)'
  text = str(error)
  if isinstance(error, OSError) and error.filename:
    text = f'{error.filename}: {error.strerror or text}'
  if 'Traceback (most recent call last)' in text:
    head = text.split('Traceback (most recent call last)')[0].strip().rstrip(':')
    lines = [l.strip() for l in text.replace('\\n', '\n').splitlines() if l.strip()]
    text = f'{head}: {lines[-1]}' if head else lines[-1]
  return ' '.join(text.replace('\\n', ' ').split())


@contextlib.contextmanager
def one_line_errors(*expected: type[BaseException]) -> Iterator[None]:
  """Turns the `expected` exceptions into `error: <one line>` and exit status 1."""
  try:
    yield
  except expected as e:
    if os.environ.get(TRACEBACK_ENV):
      raise
    sys.exit(f'error: {one_line(e)}')


class _DropOrbaxErrors(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname)


def quiet_orbax_errors() -> None:
  """Drops Orbax's ERROR log records (unless STMOE_JAX_TRACEBACK is set): a failed save is
  raised to the caller as well, and reported there in one line."""
  if not os.environ.get(TRACEBACK_ENV):
    logging.getLogger('absl').addFilter(_DropOrbaxErrors())
