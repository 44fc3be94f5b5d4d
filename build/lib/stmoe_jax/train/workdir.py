"""A train.py workdir: checked writable and locked by one run at a time.

`prepare(workdir)` creates it and proves it writable before anything compiles, so a read-only
file system or a path that is a regular file fails in one line instead of after training.

`WorkdirLock` keeps two runs off one workdir (they would save over each other's checkpoints
and interleave metrics). The lock is `workdir/train.lock`, a JSON record of the holder's host,
PID and start time, held with `flock` while the run lives. A second run is refused with a line
naming the holder. A lock left behind by a dead run is taken over with a warning: on the same
host when the `flock` is gone (the kernel drops it with the process, however it died); from
another host (a rescheduled job on a shared file system, where `flock` may not reach) when the
holder's heartbeat -- the file's mtime, touched every `HEARTBEAT_S` -- is older than
`STALE_AFTER_S`. Multi-host runs lock from process 0; the verdict is broadcast to all.

The workdir's config files (config.json and its history) are `entry_points.record_config`'s.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_NAME = 'train.lock'
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class WorkdirError(RuntimeError):
  """The workdir cannot be used (not writable, not a directory, locked by a live run)."""


def _probe_write(workdir: str) -> None:
  """Creates and removes a small file in `workdir`; OSError if that is not possible."""
  probe = os.path.join(workdir, f'.write_test.{socket.gethostname()}.{os.getpid()}')
  with open(probe, 'w') as f:
    f.write('ok')
  os.remove(probe)


def prepare(workdir: str) -> None:
  """Creates `workdir` if needed and checks it is a writable directory (WorkdirError if not)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'workdir {workdir} is not a directory (it is a file): choose another '
                       '--workdir')
  try:
    os.makedirs(workdir, exist_ok=True)
    _probe_write(workdir)
  except OSError as e:
    why = 'disk full' if e.errno == errno.ENOSPC else (e.strerror or str(e))
    raise WorkdirError(f'workdir {workdir} is not writable ({why})') from None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by someone else.
    return True
  return True


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')} PID {holder.get('pid', '?')} "
          f"(started {holder.get('started', '?')})")


class WorkdirLock:
  """Context manager: holds `workdir/train.lock` for one run (see the module docstring).

  Raises WorkdirError on entry when a live run holds the lock; `warn` gets the line about a
  stale lock taken over.
  """

  def __init__(self, workdir: str, warn: Callable[[str], None] = print):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.warn = warn
    self._fd: int | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def __enter__(self) -> 'WorkdirLock':
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except WorkdirError as e:
        error = e
    if jax.process_count() > 1:  # Every process learns process 0's verdict.
      ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not int(ok) and error is None:
        error = WorkdirError(f'process 0 could not lock {self.path}; see its error')
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _open_locked(self) -> tuple[int, bool]:
    """(fd of the lock file, whether flock holds it); WorkdirError if a live process does."""
    for _ in range(5):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flocked = True
      except BlockingIOError:
        holder = self._read(fd)
        os.close(fd)
        raise WorkdirError(
            f'workdir {os.path.dirname(self.path)} is in use by another train.py run: '
            f'{_describe(holder)} holds {self.path}; wait for it or stop it') from None
      except OSError:  # No flock on this file system: the holder record decides alone.
        flocked = False
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        return fd, flocked
      os.close(fd)  # The holder removed the file between our open and flock: try again.
    raise WorkdirError(f'could not lock {self.path}: it keeps being replaced')

  def _acquire(self) -> None:
    fd, flocked = self._open_locked()
    try:
      holder = self._read(fd)
      if holder:
        self._check_stale(holder, flocked, time.time() - os.fstat(fd).st_mtime)
        self.warn(f'warning: taking over {self.path} from a run that is no longer alive: '
                  f'{_describe(holder)}')
      me = {'host': socket.gethostname(), 'pid': os.getpid(),
            'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'processes': jax.process_count()}
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps(me).encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    self._heartbeat = threading.Thread(target=self._beat, daemon=True)
    self._heartbeat.start()

  def _check_stale(self, holder: dict, flocked: bool, age_s: float) -> None:
    """Returns if the run that wrote `holder` is dead; WorkdirError naming it if it may live."""
    if holder.get('host') == socket.gethostname():
      pid = holder.get('pid')
      if flocked or not isinstance(pid, int) or pid == os.getpid() or not _pid_alive(pid):
        return  # Its flock died with it (or its PID is gone).
      why = 'that process is alive'
    elif age_s > STALE_AFTER_S:
      return
    else:
      why = f'its heartbeat is {age_s:.0f} s old (stale after {STALE_AFTER_S:.0f} s)'
    raise WorkdirError(f'workdir {os.path.dirname(self.path)} is in use by another train.py '
                       f'run: {_describe(holder)} holds {self.path} and {why}; wait for it, or '
                       'delete that file if the run is surely dead')

  @staticmethod
  def _read(fd: int) -> dict:
    try:
      raw = os.pread(fd, 4096, 0)
      holder = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
      holder = {'host': '?', 'pid': '?'}  # Unreadable: treated as a stale holder.
    return holder if isinstance(holder, dict) else {}

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    """Removes the lock file (if still ours) and drops the flock; idempotent."""
    self._stop.set()
    if self._fd is None:
      return
    try:
      if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
        os.remove(self.path)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None
