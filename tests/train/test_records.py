"""Issue 26, unit level: records that cannot tear, readers that skip a torn line, symlinked
files read once, dataset names and pins refused, background I/O errors dropped, Ctrl-C as a
preemption. No training here (tests/test_faults.py has the workdir cases)."""

import errno
import json
import os
import re
import signal
import sys
import types

import pytest

from stmoe_jax import errors
from stmoe_jax.train import guards
from stmoe_jax.analysis import plot
from stmoe_jax.train import records
from stmoe_jax.analysis import sweep
from stmoe_jax.data import local_corpus
from stmoe_jax.data import sources

LINES = [{'step': s, 'kind': 'train', 'loss': 1.0 / s} for s in (1, 2, 3)]


def write_lines(path, lines, tail=''):
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(l) + '\n' for l in lines) + tail)


def test_append_line_is_whole_or_nothing(tmp_path, monkeypatch):
  """A disk that fills half way through a line: the half is cut back off, the error names
  the file, and the next append starts on a line of its own."""
  path = str(tmp_path / 'metrics.jsonl')
  write_lines(path, LINES[:1])
  real_write = os.write

  def full(fd, data):  # The kernel takes 5 bytes, then the disk is full.
    if len(data) > 5:
      return real_write(fd, bytes(data[:5]))
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'write', full)
  with pytest.raises(OSError) as error:
    records.append_line(path, json.dumps(LINES[1]))
  monkeypatch.undo()
  assert error.value.errno == errno.ENOSPC and error.value.filename == path
  assert errors.one_line(error.value) == f'writing {path} failed (disk full)'
  with open(path) as f:
    assert f.read() == json.dumps(LINES[0]) + '\n'
  records.append_line(path, json.dumps(LINES[2]))
  assert records.read_jsonl(path) == [LINES[0], LINES[2]]


@pytest.mark.parametrize('tail,kept,message', [
    ('{"step": 4, "kind": "tr', LINES, 'cut off a torn last line (23 bytes)'),
    (json.dumps(LINES[0]), LINES + LINES[:1], 'ended without a newline: added it'),
    ('', LINES, None),
])
def test_a_torn_last_line_is_repaired_once(tmp_path, tail, kept, message):
  path = str(tmp_path / 'metrics.jsonl')
  write_lines(path, LINES, tail)
  warnings = []
  assert records.repair_torn_line(path, warnings.append) == (message is not None)
  assert warnings == ([f'warning: {path}: {message}' + (' left by an interrupted run'
                                                        if 'torn' in message else '')]
                      if message else [])
  records.append_line(path, json.dumps({'step': 9, 'kind': 'eval'}))
  assert records.read_jsonl(path, warn=warnings.append) == kept + [{'step': 9, 'kind': 'eval'}]
  assert len(warnings) == (message is not None)  # Nothing left for a reader to skip.
  assert not records.repair_torn_line(path, warnings.append)


def test_readers_skip_a_torn_line_with_one_warning(tmp_path, capsys):
  """A torn line in the middle (appended to by a run from before the repair existed) costs
  that line, not the run: plot and the sweep summary read the rest."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  path = workdir / 'metrics.jsonl'
  with open(path, 'w') as f:
    f.write(json.dumps(LINES[0]) + '\n' + '{"step": 2, "ki' + json.dumps(LINES[2]) + '\n' +
            json.dumps(LINES[1]) + '\n' + '[1, 2]\n' + '{"no_step": 1}\n')
  capsys.readouterr()
  assert plot.read_metrics(str(workdir)) == [LINES[0], LINES[1]]
  assert sweep.final_metrics(str(workdir))['step'] == 2
  err = capsys.readouterr().err.splitlines()
  assert err == [f'warning: {path}: skipped 3 lines (2, ...), which are not a whole JSON '
                 'record (torn by an interrupted run?)'] * 2


def test_write_file_atomically_keeps_the_old_file(tmp_path, monkeypatch):
  path = str(tmp_path / 'config.json')
  records.write_file_atomically(path, '{"old": 1}')

  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(OSError):
    records.write_file_atomically(path, '{"new": 2}')
  monkeypatch.undo()
  assert open(path).read() == '{"old": 1}' and os.listdir(tmp_path) == ['config.json']


def test_symlinked_paths_to_one_file_are_read_once(tmp_path):
  """A '**' glob over a directory holding a link back to an ancestor (a loop): each real file
  once, the other paths counted."""
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.txt').write_text('a')
  (tmp_path / 'sub' / 'b.txt').write_text('b')
  os.symlink(tmp_path, tmp_path / 'sub' / 'back')
  os.symlink(tmp_path / 'a.txt', tmp_path / 'alias.txt')
  skipped = []
  files = local_corpus.list_files([f'{tmp_path}/**/*.txt'], skipped)
  assert files == [str(tmp_path / 'a.txt'), str(tmp_path / 'sub' / 'b.txt')]
  assert str(tmp_path / 'alias.txt') in skipped and str(tmp_path / 'sub/back/a.txt') in skipped
  assert len(skipped) > 10  # Python's glob goes round the loop until the path is too long.


@pytest.mark.parametrize('name,error,message', [
    ('stdlib_py:9.9.9', FileNotFoundError,
     r"^TFDS dataset 'stdlib_py:9.9.9' is not prepared: stdlib_py is built here at version "
     r"1.0.0 only; pin ':1.0.0' or leave the version out$"),
    ('/tmp/corpus', sources.DataError,
     r"^config.data.name='/tmp/corpus' is not a TFDS dataset name \(name\[/config\]\[:version\]"),
    ('../corpus', sources.DataError, r"^config.data.name='../corpus' is not a TFDS dataset name"),
])
def test_dataset_names_and_pins_are_checked(tmp_path, name, error, message):
  with pytest.raises(error, match=message):
    sources.get_data_source(name, 'train', str(tmp_path))
  assert os.listdir(tmp_path) == []  # Refused before anything is prepared.


@pytest.mark.parametrize('split', ['train[5:5]', 'train[:0%]'])
def test_an_empty_split_slice_is_refused(stdlib_data_dir, split):
  with pytest.raises(sources.DataError, match=re.escape(
      f'stdlib_py:1.0.0[{split}] selects no records: nothing to train or evaluate on')):
    sources.get_data_source('stdlib_py:1.0.0', split, stdlib_data_dir)


def test_build_refuses_a_data_dir_that_is_a_file(tmp_path):
  (tmp_path / 'doc.txt').write_text('some text\n')
  afile = tmp_path / 'afile'
  afile.write_text('')
  spec = local_corpus.CorpusSpec(name='corpus', files=(f'{tmp_path}/*.txt',))
  with pytest.raises(local_corpus.CorpusError,
                     match=f'^data_dir: {afile} is a file, not a directory$'):
    local_corpus.build(spec, str(afile))


def test_background_io_errors_are_dropped(monkeypatch, capsys):
  """What Orbax/TensorStore report after a failed restore or save (a closed loop's callback
  from TensorStore's threads, the operation's other coroutines collected with their errors,
  asyncio's never-retrieved records) is dropped; other errors still print."""
  monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
  printed = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: printed.append(('unraisable', u)))
  monkeypatch.setattr(sys, 'excepthook', lambda *a: printed.append(('except', a)))
  import asyncio, logging, threading  # pylint: disable=g-import-not-at-top,multiple-imports
  monkeypatch.setattr(threading, 'excepthook', lambda a: printed.append(('thread', a)))
  asyncio_logger = logging.getLogger('asyncio')
  for name in ('absl', 'asyncio'):  # The filters it adds go when the test ends.
    logger = logging.getLogger(name)
    monkeypatch.setattr(logger, 'filters', list(logger.filters))
  errors.quiet_orbax_errors()

  def unraisable(exc, obj=None):
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                 exc_traceback=exc.__traceback__, object=obj, err_msg=None)

  async def orbax_read():  # A coroutine "from Orbax's code".
    pass
  orbax_read.__code__ = orbax_read.__code__.replace(
      co_filename=f'{os.sep}site-packages{os.sep}orbax{os.sep}serialization.py')
  coroutine = orbax_read()
  sys.unraisablehook(unraisable(RuntimeError('Event loop is closed')))
  sys.unraisablehook(unraisable(Exception('reading array index'), coroutine))
  coroutine.close()
  sys.excepthook(RuntimeError, RuntimeError('Event loop is closed'), None)
  asyncio_logger.error('Task exception was never retrieved\nfuture: <Task ...>')
  assert printed == [] and capsys.readouterr().err == ''
  sys.unraisablehook(unraisable(ValueError('mine')))
  sys.excepthook(ValueError, ValueError('mine'), None)
  assert [kind for kind, _ in printed] == ['unraisable', 'except']


def test_ctrl_c_is_a_preemption_and_twice_exits():
  """A first SIGINT sets the flag (the loop saves and stops, like SIGTERM) and names itself; a
  second raises KeyboardInterrupt at once; the previous handlers come back."""
  before = signal.getsignal(signal.SIGINT)
  with guards.sigterm_flag() as preempted:
    os.kill(os.getpid(), signal.SIGINT)
    assert preempted.is_set() and preempted.name == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before
  with guards.sigterm_flag() as preempted:
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempted.name == 'SIGTERM'
