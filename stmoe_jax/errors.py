"""One `error:` line per expected failure at the entry points (train.py, eval.py, sample.py).

Failures the library can name (bad config, data, workdir, checkpoints, a full disk) end the
process with exit status 1 and one line on stderr; a traceback would only bury that line. Set
the environment variable `STMOE_JAX_TRACEBACK=1` to get the traceback as well. Anything not
listed is a bug and keeps its traceback. Orbax logs the failures of its background save
threads (a full disk) with tracebacks before the save reports them to us; `quiet_orbax_errors`
drops those log records, as the one line says the same.

`ConfigError`, the bad-config failure, lives here (a leaf module every layer may import) and is
re-exported by `stmoe_jax.config`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import traceback
from typing import Iterator

TRACEBACK_ENV = 'STMOE_JAX_TRACEBACK'


class ConfigError(ValueError):
  """A config field has a value the library cannot use; the message names the field."""


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


def innermost(error: BaseException) -> BaseException:
  """The first failure of `error`'s chain (`raise ... from`, or raised while handling)."""
  seen = {id(error)}
  while True:
    inner = error.__cause__ or error.__context__
    if inner is None or id(inner) in seen:
      return error
    seen.add(id(inner))
    error = inner


def config_file_error(config_arg: str, error: BaseException) -> str:
  """One line for a --config file that failed to load in any way (missing, a syntax error, an
  import or an exception in `get_config`, no `get_config`): its first failure, typed."""
  path = config_arg.split(':')[0]
  if not os.path.isfile(path):
    return f'--config={config_arg}: {path} ' + (
        'is not a file' if os.path.exists(path) else 'does not exist')
  first = innermost(error)
  if isinstance(first, (OSError, SyntaxError)):
    why = one_line(first)
  else:
    why = f'{type(first).__name__}: {one_line(first)}'
  return f'--config={config_arg} failed to load: {why}'


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
  """Drops ERROR records logged from Orbax's code, or about a failure inside it: asyncio's
  'Task exception was never retrieved' for the other write tasks of a failed save, logged when
  they are collected (at exit), names Orbax only in its message and traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    orbax = f'{os.sep}orbax{os.sep}'
    if orbax in record.pathname:
      return False
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      text = str(record.msg)
    if record.exc_info and record.exc_info[2] is not None:
      text += ''.join(traceback.format_tb(record.exc_info[2]))
    return orbax not in text


def _is_closed_loop_callback(exc_type, exc, tb) -> bool:
  """A TensorStore write finishing after its save failed: its callback reaches the save's
  asyncio loop, already closed, and the error is printed through sys.excepthook."""
  return (exc_type is RuntimeError and str(exc) == 'Event loop is closed' and tb is not None and
          any(frame.name == 'call_soon_threadsafe' for frame in traceback.extract_tb(tb)))


def quiet_orbax_errors() -> None:
  """Drops Orbax's ERROR log records, and the tracebacks of the write tasks a failed save
  leaves behind (unless STMOE_JAX_TRACEBACK is set): a failed save is raised to the caller as
  well, and reported there in one line."""
  if os.environ.get(TRACEBACK_ENV):
    return
  for name in ('absl', 'asyncio'):
    logging.getLogger(name).addFilter(_DropOrbaxErrors())
  previous = sys.excepthook

  def excepthook(exc_type, exc, tb):
    if not _is_closed_loop_callback(exc_type, exc, tb):
      previous(exc_type, exc, tb)

  sys.excepthook = excepthook
