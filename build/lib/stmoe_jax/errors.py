"""One `error:` line per expected failure at the entry points (train.py, eval.py, sample.py).

Failures the library can name (bad config, data, workdir, checkpoints, a full disk) end the
process with exit status 1 and one line on stderr; a traceback would only bury that line. Set
the environment variable `STMOE_JAX_TRACEBACK=1` to get the traceback as well. Anything not
listed is a bug and keeps its traceback. Orbax and TensorStore report the failures of their
background reads and writes (a damaged step, a full disk) with tracebacks, through the logs and
the interpreter's hooks, long after the restore or save reported them to us;
`quiet_orbax_errors` drops all of those, as the one line says the same.

`ConfigError`, the bad-config failure, lives here (a leaf module every layer may import) and is
re-exported by `stmoe_jax.config`.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import sys
import threading
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
  """Turns the `expected` exceptions into `error: <one line>` and exit status 1, and Ctrl-C
  (KeyboardInterrupt: in train.py only a second one) into one line and exit status 130, at
  once: background threads (an Orbax save) are not waited for."""
  try:
    yield
  except expected as e:
    if os.environ.get(TRACEBACK_ENV):
      raise
    sys.exit(f'error: {one_line(e)}')
  except KeyboardInterrupt:
    if os.environ.get(TRACEBACK_ENV):
      raise
    print('interrupted (Ctrl-C): stopped at once', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # pylint: disable=protected-access


_BACKGROUND = (f'{os.sep}orbax{os.sep}', f'{os.sep}tensorstore{os.sep}', 'TensorStore',
               'OCDBT')


def _from_checkpoint_io(text: str) -> bool:
  return any(mark in text for mark in _BACKGROUND)


class _DropOrbaxErrors(logging.Filter):
  """Drops ERROR records logged from Orbax's code, or about a failure inside it: asyncio's
  'Task/Future exception was never retrieved' for the other reads or writes of a failed restore
  or save, logged when they are collected, names Orbax or TensorStore only in its message and
  traceback. (Nothing else here runs an asyncio loop.)"""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if _from_checkpoint_io(record.pathname):
      return False
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      text = str(record.msg)
    if record.name == 'asyncio' and ('exception was never retrieved' in text or
                                     'Event loop is closed' in text):
      return False
    if record.exc_info and record.exc_info[2] is not None:
      text += ''.join(traceback.format_tb(record.exc_info[2]))
    return not _from_checkpoint_io(text)


def _is_background_io_error(exc_type, exc, tb, obj=None) -> bool:
  """A failure of Orbax/TensorStore's background work after its restore or save already
  failed (and was reported): a TensorStore read or write finishing after the operation's
  asyncio loop closed ('Event loop is closed', from TensorStore's threads), or one of the
  operation's other coroutines collected with its error."""
  if exc_type is RuntimeError and str(exc) == 'Event loop is closed':
    return True
  code = getattr(obj, 'cr_code', None)
  if code is not None and _from_checkpoint_io(code.co_filename):
    return True
  return tb is not None and any(_from_checkpoint_io(frame.filename)
                                for frame in traceback.extract_tb(tb))


def quiet_orbax_errors() -> None:
  """Drops, for the rest of the process, what Orbax and TensorStore print about their
  background work after a restore or save failed (unless STMOE_JAX_TRACEBACK is set): ERROR log
  records, and exceptions reaching sys.excepthook, threading.excepthook or sys.unraisablehook
  from their threads and collected coroutines. The failure itself is raised to the caller and
  reported there in one line."""
  if os.environ.get(TRACEBACK_ENV):
    return
  for name in ('absl', 'asyncio'):
    logging.getLogger(name).addFilter(_DropOrbaxErrors())
  previous_excepthook = sys.excepthook

  def excepthook(exc_type, exc, tb):  # The main thread's own errors are never dropped.
    if not (exc_type is RuntimeError and str(exc) == 'Event loop is closed'):
      previous_excepthook(exc_type, exc, tb)

  previous_thread_hook = threading.excepthook

  def thread_hook(args):
    if not _is_background_io_error(args.exc_type, args.exc_value, args.exc_traceback):
      previous_thread_hook(args)

  previous_unraisable = sys.unraisablehook

  def unraisable_hook(unraisable):
    if not _is_background_io_error(unraisable.exc_type, unraisable.exc_value,
                                   unraisable.exc_traceback, unraisable.object):
      previous_unraisable(unraisable)

  sys.excepthook, threading.excepthook, sys.unraisablehook = (excepthook, thread_hook,
                                                              unraisable_hook)


def drain_background_errors() -> None:
  """Collects the coroutines a failed Orbax restore or save left behind now, so that what
  they report passes the hooks of `quiet_orbax_errors` here, not at some later moment."""
  gc.collect()
