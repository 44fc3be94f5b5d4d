"""Files a run writes that must never tear: append-only .jsonl records and whole JSON files.

A crash, a SIGKILL or a full disk leaves either a whole line or none: `append_line` cuts a
failed write back off before raising, `repair_torn_line` (called by a writer before its first
append) cuts off a last line that a killed process left without its newline, with one warning,
`write_file_atomically` replaces a whole file or leaves the old one, and `read_jsonl` skips a
line that does not parse, with one warning, instead of refusing the whole file.

No JAX here: the sweep and plot summaries read records without it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def append_line(path: str, line: str) -> None:
  """Appends `line` and a newline to `path`: all of it or nothing. A failed write (a full disk)
  is cut back off the file, so no torn line stays, and the OSError is raised."""
  data = (line.rstrip('\n') + '\n').encode()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    try:
      view = memoryview(data)
      while view:  # A short write (the disk filling up) is followed by the raising one.
        view = view[os.write(fd, view):]
    except OSError as e:
      try:
        os.ftruncate(fd, size)
      except OSError:
        pass  # `repair_torn_line` cuts it off on the next run.
      if e.filename is None:
        e.filename = path
      raise
  finally:
    os.close(fd)


def repair_torn_line(path: str, warn: Callable[[str], None] | None = None) -> bool:
  """Cuts off a last line of `path` that lacks its newline (a process killed while writing it)
  and says so through `warn` (default: stderr); True if it did."""
  try:
    with open(path, 'rb+') as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      if not size:
        return False
      f.seek(size - 1)
      if f.read(1) == b'\n':
        return False
      # Read back from the end to the previous newline (lines are small).
      start = max(size - 65536, 0)
      while True:
        f.seek(start)
        cut = f.read(size - start).rfind(b'\n')
        if cut >= 0 or start == 0:
          keep = start + cut + 1 if cut >= 0 else 0
          break
        start = max(start - 65536, 0)
      f.seek(keep)
      tail = f.read()
      try:  # Whole but for its newline: kept.
        whole = isinstance(json.loads(tail), dict)
      except ValueError:
        whole = False
      if whole:
        f.write(b'\n')
      else:
        f.truncate(keep)
  except FileNotFoundError:
    return False
  (warn or _stderr)(f'warning: {path}: ' + (
      'ended without a newline: added it' if whole else
      f'cut off a torn last line ({size - keep} bytes) left by an interrupted run'))
  return True


def read_jsonl(path: str, keys: tuple[str, ...] = (),
               warn: Callable[[str], None] | None = None) -> list[dict]:
  """The records (JSON objects holding `keys`) of a .jsonl file; other lines (a torn one) are
  skipped and named in one warning through `warn` (default: stderr)."""
  records, bad = [], []
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw)
      except ValueError:
        record = None
      if isinstance(record, dict) and all(k in record for k in keys):
        records.append(record)
      else:
        bad.append(number)
  if bad:
    where = (f'line {bad[0]}, which is' if len(bad) == 1 else
             f'{len(bad)} lines ({bad[0]}, ...), which are')
    (warn or _stderr)(f'warning: {path}: skipped {where} not a whole JSON record (torn by an '
                      'interrupted run?)')
  return records


def write_file_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: a crash or a full disk
  leaves the old file (or none), never part of the new one."""
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise
