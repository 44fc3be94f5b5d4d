"""Fault injection (issue 16): silent corruption, two runs on one workdir, a full disk, bad
workdirs, splits and config files, damaged checkpoints under sample.py, resumes with changed
fields.

One tiny run is trained in-process once (module fixture); each case works on its own copy.
Library functions are called in-process; a subprocess is used only where the point is what the
entry point prints.
"""

import errno
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorstore as ts

from configs import tiny
from stmoe_jax.train import checkpointing
from stmoe_jax.train import entry_points
from stmoe_jax import errors
from stmoe_jax.train import evaluation
from stmoe_jax.train import guards
from stmoe_jax.train import train_lib
from stmoe_jax.train import workdir as workdir_lib
from stmoe_jax.config import ConfigError
from stmoe_jax.data import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Restoring a truncated array in-process (test_damaged_checkpoint_messages) leaves Orbax's failed
# shard reads as coroutines that raise again when collected, in whichever test runs then; the
# entry points silence them (errors.quiet_orbax_errors); a test's in-process reads do not.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def tiny_config(data_dir, **overrides):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.update(num_train_steps=8, checkpoint_every_steps=2, keep_checkpoints=3,
                eval_every_steps=8, eval_batches=1, log_every_steps=1)
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


def run(script, *flags, env=None):
  result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
  return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope='module')
def trained(stdlib_data_dir, tmp_path_factory):
  """A tiny 8-step run with checkpoints 4, 6, 8 (in-process)."""
  workdir = str(tmp_path_factory.mktemp('faults') / 'run')
  train_lib.train_and_evaluate(tiny_config(stdlib_data_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '6', '8']
  return workdir


@pytest.fixture
def copy(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  return workdir


def flip_bit(step_dir, array, bit, index=5):
  """Flips one bit of element `index` of `array` ('params.embed') inside a saved step, through
  TensorStore, so the array still decodes: the corruption a bad disk or RAM gives silently."""
  spec = {'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'base': f'file://{step_dir}/state/',
                                        'path': array}}
  stored = ts.open(spec).result()
  values = stored.read().result()
  before = float(values.flat[index])
  values.reshape(-1).view(np.uint32)[index] ^= np.uint32(1 << bit)
  stored.write(values).result()
  return before, float(values.flat[index])


def flip_bytes_in_largest_file(step_dir):
  """The issue's recipe: 8 bytes inverted in the middle of the step's largest array file."""
  data = os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd')
  path = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
  raw = bytearray(open(path, 'rb').read())
  middle = len(raw) // 2
  raw[middle:middle + 8] = bytes(b ^ 0xFF for b in raw[middle:middle + 8])
  open(path, 'wb').write(bytes(raw))


@pytest.mark.parametrize('damage,named', [
    ('params', 'array params/embed does not match its checksum'),  # bit 30: NaN
    ('opt_state', 'array opt_state/1/0/mu/lm_head does not match its checksum'),  # still finite
    ('params_without_checksums', 'array params/embed holds NaN or inf'),  # a step saved before
    ('raw_bytes', ''),
])
def test_silent_corruption_falls_back(copy, damage, named):
  """A bit flip that still decodes, in a parameter or in the optimizer state, is caught by the
  checksum (or, in a step without checksums, by the finiteness check): the step is reported by
  path and array, set aside as .corrupt, and the step before is restored."""
  step8 = os.path.join(copy, 'checkpoints', '8')
  if damage == 'raw_bytes':
    flip_bytes_in_largest_file(step8)
  elif damage == 'opt_state':
    before, after = flip_bit(step8, 'opt_state.1.0.mu.lm_head', bit=3)
    assert np.isfinite(after) and after != before
  else:
    assert np.isnan(flip_bit(step8, 'params.embed', bit=30)[1])
    if damage == 'params_without_checksums':
      shutil.rmtree(os.path.join(step8, 'checksums'))
  trainer = train_lib.Trainer(entry_points.load_config(copy), copy)
  warnings = []
  step, state, _ = trainer.checkpointer.restore_latest(trainer.abstract_state,
                                                       set_aside_damaged=True,
                                                       warn=warnings.append)
  trainer.checkpointer.close()
  assert step == 6 and int(state.step) == 6
  assert len(warnings) == 1 and warnings[0].startswith(f'warning: checkpoint {step8} is ')
  assert named in warnings[0] and warnings[0].endswith('; falling back to an older checkpoint')
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['4', '6', '8.corrupt']


def test_train_and_eval_after_a_bit_flip(copy, stdlib_data_dir, capsys):
  """The issue's case 1: eval.py falls back past the flipped step with one warning (and refuses
  it when asked for it by name); training resumes from the step before with finite losses."""
  step8 = os.path.join(copy, 'checkpoints', '8')
  flip_bit(step8, 'params.embed', bit=30)
  capsys.readouterr()
  assert entry_points.evaluate_workdir(copy, max_batches=1)['step'] == 6  # eval.py's logic.
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [
      f'warning: checkpoint {step8} is damaged: array params/embed does not match its checksum '
      f'(crc32 {err.split("(crc32 ")[1].split(")")[0]}); falling back to an older checkpoint']
  rc, out, err = run('eval.py', f'--workdir={copy}', '--step=8')
  assert rc == 1 and err.strip().splitlines() == [
      f'error: checkpoint {step8} is damaged: array params/embed does not match its checksum '
      f'(crc32 {err.split("(crc32 ")[1].split(")")[0]})']
  capsys.readouterr()
  train_lib.train_and_evaluate(tiny_config(stdlib_data_dir), copy)  # As train.py would.
  out, err = capsys.readouterr()
  assert f'Resumed from {os.path.join(copy, "checkpoints")}/6' in out
  assert f'warning: checkpoint {step8} is damaged: array params/embed' in err
  with open(os.path.join(copy, 'metrics.jsonl')) as f:
    resumed = [r for r in map(json.loads, f) if r['kind'] == 'train'][8:]
  assert [r['step'] for r in resumed] == [7, 8]
  assert all(np.isfinite(r['loss']) and np.isfinite(r['param_norm']) for r in resumed)
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['4', '6', '8', '8.corrupt']


def test_a_non_finite_state_is_never_saved(tmp_path):
  """'Last good' means finite: a state with a NaN is refused by name and nothing is written."""
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpointing.Checkpointer(directory)
  good = {'w': np.ones((2, 3), np.float32), 'opt': {'mu': np.zeros(3, np.float32)}}
  ckpt.save(1, good, {'pos': 1}, force=True)
  ckpt.wait()
  bad = {'w': good['w'], 'opt': {'mu': np.array([0, np.inf, 0], np.float32)}}
  with pytest.raises(checkpointing.NonFiniteStateError,
                     match=rf'^not saving checkpoint step 2: array opt/mu holds NaN or inf; the '
                           rf'last good state is checkpoint {directory}/1$'):
    ckpt.save(2, bad, {'pos': 2}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [1]
  ckpt.close()


def test_nan_parameters_after_a_finite_step_are_not_saved(copy, stdlib_data_dir):
  """The issue's case 1 in a step saved without checksums (as before them): a negative Adam
  second moment is finite, so it restores; the next update turns the parameters into NaN while
  that step's loss is finite, and the step after stops. The NaN state is not checkpointed as
  'last good': the error names the array and the step restored from."""
  ckpt_dir = os.path.join(copy, 'checkpoints')
  for step in ('6', '8'):
    shutil.rmtree(os.path.join(ckpt_dir, step))
  step4 = os.path.join(ckpt_dir, '4')
  shutil.rmtree(os.path.join(step4, 'checksums'))
  spec = {'driver': 'zarr', 'kvstore': {'driver': 'ocdbt', 'base': f'file://{step4}/state/',
                                        'path': 'opt_state.1.0.nu.lm_head'}}
  stored = ts.open(spec).result()
  stored.write(np.full(stored.shape, -1.0, np.float32)).result()
  with pytest.raises(guards.NonFiniteError, match=(
      r'^non-finite cross_entropy, grad_norm at step 6 \(config.on_nonfinite=stop\); not saving '
      rf'checkpoint step 5: array params/lm_head holds NaN or inf; the last good state is '
      rf'checkpoint {step4}$')):
    train_lib.train_and_evaluate(tiny_config(stdlib_data_dir), copy)
  assert sorted(os.listdir(ckpt_dir)) == ['4']


def test_eval_result_must_be_finite():
  """eval.py prints the metrics, then exits 1 naming the non-finite ones."""
  assert evaluation.nonfinite_results({'loss': np.nan, 'bits_per_byte': np.inf,
                                       'accuracy': 0.5}) == ['loss', 'bits_per_byte']
  assert evaluation.nonfinite_results({'loss': 1.0, 'bits_per_byte': 2.0, 'accuracy': 0}) == []


def test_workdir_lock(tmp_path):
  """A live holder refuses a second run by host and PID; a lock left by a dead process, or by
  another host whose heartbeat stopped, is taken over with a warning."""
  workdir = str(tmp_path)
  lines = []
  with workdir_lib.WorkdirLock(workdir, warn=lines.append) as held:
    holder = json.load(open(held.path))
    assert (holder['host'], holder['pid']) == (socket.gethostname(), os.getpid())
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf'is in use by another train.py run: host {socket.gethostname()} '
                             rf'PID {os.getpid()} \(started .*\) holds {held.path}'):
      workdir_lib.WorkdirLock(workdir).__enter__()
  assert not os.path.exists(held.path) and lines == []  # Released on exit.

  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  lock = os.path.join(workdir, workdir_lib.LOCK_NAME)
  for host, pid, age_s, taken in [(socket.gethostname(), dead.pid, 0, True),
                                  ('elsewhere', 1, 5, False), ('elsewhere', 1, 3600, True)]:
    with open(lock, 'w') as f:
      json.dump({'host': host, 'pid': pid, 'started': 'then'}, f)
    os.utime(lock, (time.time() - age_s,) * 2)
    lines.clear()
    if taken:
      with workdir_lib.WorkdirLock(workdir, warn=lines.append):
        assert json.load(open(lock))['pid'] == os.getpid()
      assert lines == [f'warning: taking over {lock} from a run that is no longer alive: '
                       f'host {host} PID {pid} (started then)']
    else:
      with pytest.raises(workdir_lib.WorkdirError, match=r'heartbeat is \d+ s old'):
        workdir_lib.WorkdirLock(workdir).__enter__()


def test_second_train_on_a_held_workdir_is_refused(copy, stdlib_data_dir):
  """train.py against a workdir whose lock a live process holds: one line, nothing touched."""
  before = {name: open(os.path.join(copy, name)).read()
            for name in ('metrics.jsonl', 'config.json')}
  with workdir_lib.WorkdirLock(copy):
    rc, _, err = run('train.py', '--config=configs/tiny.py', f'--workdir={copy}',
                     f'--config.data.data_dir={stdlib_data_dir}', '--config.opt.lr=0.1')
  assert rc == 1
  assert err.strip().splitlines() == [
      f'error: workdir {copy} is in use by another train.py run: host {socket.gethostname()} '
      f'PID {os.getpid()} ({err.split("(")[1].split(")")[0]}) holds {copy}/train.lock; wait for '
      'it or stop it']
  assert before == {name: open(os.path.join(copy, name)).read() for name in before}


def test_disk_full_errors_are_one_line(tmp_path, monkeypatch):
  """TensorStore reports a full disk as a RESOURCE_EXHAUSTED ValueError, not an OSError."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpointing.Checkpointer(directory)
  ckpt.save(1, {'w': np.ones(3, np.float32)}, {}, force=True)
  ckpt.wait()

  async def full(self, item, path):
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "{path}": No space left on device')

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, '_save_fn', full)
  ckpt.save(2, {'w': np.ones(3, np.float32)}, {}, force=True)
  with pytest.raises(checkpointing.CheckpointError, match=(
      rf'^saving checkpoint step 2 to {directory} failed \(disk full\); the steps saved before '
      r'it are intact: \[1\]$')):
    ckpt.wait()
  assert errors.one_line(OSError(errno.ENOSPC, 'No space left', '/w/metrics.jsonl')) == (
      'writing /w/metrics.jsonl failed (disk full)')


def test_disk_full_for_real(tmp_path, stdlib_data_dir):
  """train.py into a 900 KiB tmpfs (needs root, else skipped): one line, no traceback (the
  failed save's background errors drained), no torn record."""
  mount = tmp_path / 'full'
  mount.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=900k', 'tmpfs', str(mount)],
                    capture_output=True).returncode:
    pytest.skip('mounting a tmpfs is not permitted here')
  try:
    rc, _, err = run('train.py', '--config=configs/tiny.py', f'--workdir={mount}/w',
                     f'--config.data.data_dir={stdlib_data_dir}', '--config.num_train_steps=40',
                     '--config.checkpoint_every_steps=4', '--config.eval_every_steps=40')
    lines = [l for l in err.splitlines() if '%|' not in l and l.strip()]  # tqdm's bar aside.
    assert rc == 1 and len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    # Which write meets the full disk first depends on timing: usually the save of step 4.
    assert lines[0].startswith('error: ') and '(disk full)' in lines[0], err[-3000:]
    with open(f'{mount}/w/metrics.jsonl') as f:
      assert all(json.loads(line) for line in f)
  finally:
    subprocess.run(['umount', str(mount)], check=True)


def test_workdir_is_checked_before_training(tmp_path, stdlib_data_dir, monkeypatch):
  """A workdir that is a file or not writable, and splits that do not exist, fail before the
  first step, naming what is wrong."""
  afile = tmp_path / 'afile'
  afile.write_text('')
  with pytest.raises(workdir_lib.WorkdirError, match=f'^workdir {afile} is not a directory'):
    train_lib.train_and_evaluate(tiny_config(stdlib_data_dir), str(afile))

  def read_only(workdir):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), workdir)

  monkeypatch.setattr(workdir_lib, '_probe_write', read_only)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=f'^workdir {tmp_path} is not writable \\(Read-only file system\\)$'):
    train_lib.train_and_evaluate(tiny_config(stdlib_data_dir), str(tmp_path))
  monkeypatch.undo()

  for split, field in (('tran', 'data.train_split'), ('test', 'data.eval_split')):
    workdir = tmp_path / split
    with pytest.raises(input_pipeline.DataError,
                       match=rf"^stdlib_py\[{split}\] cannot be read: Unknown split '{split}'"):
      train_lib.train_and_evaluate(tiny_config(stdlib_data_dir, **{field: split}), str(workdir))
    assert os.listdir(workdir) == []  # No step trained, no checkpoint, no lock left.


def test_config_file_syntax_error_is_one_line(tmp_path):
  path = tmp_path / 'bad_config.py'
  path.write_text('def get_config(:\n')
  rc, _, err = run('train.py', f'--config={path}', f'--workdir={tmp_path}/w')
  assert rc == 1
  assert err.strip().splitlines() == [f'error: --config={path} failed to load: {path}:1: '
                                      'SyntaxError: invalid syntax: def get_config(:']
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('config_file,arg,message', [
    ('configs/stmoe.py', ':size=huge',
     "ValueError: config argument size='huge' is invalid: expected one of ('tiny', 'small', "
     "'base', '1b')"),
    ('bad_value.py', '', "TypeError: Could not override field 'batch_size' (reference). four is "
     "of original type <class 'str'> and cannot be casted to type <class 'int'>"),
])
def test_config_file_errors_are_one_line(tmp_path, monkeypatch, config_file, arg, message):
  """A preset that does not exist or a bad value set inside a config file: the error's last
  line, not ml_collections' traceback flattened into the line (parsed as train.py parses)."""
  from absl import flags
  from ml_collections import config_flags
  monkeypatch.chdir(ROOT)
  if config_file == 'bad_value.py':
    config_file = tmp_path / config_file
    config_file.write_text('from configs import tiny\ndef get_config():\n'
                           "  c = tiny.get_config()\n  c.batch_size = 'four'\n  return c\n")
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True)
  with pytest.raises(flags.Error) as error:
    flag_values(['train.py', f'--config={config_file}{arg}'])
  assert errors.one_line(error.value) == (
      f'flag --config={config_file}{arg}: Error whilst parsing config file: {message}')


def test_damaged_checkpoint_messages(copy):
  """A truncated array and a missing _METADATA are named in one readable line."""
  ckpt_dir = os.path.join(copy, 'checkpoints')
  data = os.path.join(ckpt_dir, '8', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    path = os.path.join(data, name)
    os.truncate(path, os.path.getsize(path) // 2)
  os.remove(os.path.join(ckpt_dir, '6', 'state', '_METADATA'))
  trainer = train_lib.Trainer(entry_points.load_config(copy), copy)
  warnings = []
  step, _, _ = checkpointing.read_checkpoint(ckpt_dir, trainer.abstract_state,
                                             warn=warnings.append)
  assert step == 4 and len(warnings) == 2
  assert warnings[0].startswith(f'warning: checkpoint {ckpt_dir}/8 is unreadable: ValueError: ')
  assert 'pybind' not in warnings[0] and 'TensorStore(' not in warnings[0], warnings[0]
  assert '\n' not in warnings[0] and 'tensorstore_spec' not in warnings[0], warnings[0]
  assert warnings[1] == (f'warning: checkpoint {ckpt_dir}/6 is unreadable: state/_METADATA (the '
                         'list of its arrays) is missing or empty; falling back to an older '
                         'checkpoint')
  gc.collect()  # Orbax's abandoned reads of step 8 (see pytestmark) go now, not in a later file.


def test_sample_falls_back_and_creates_nothing(copy, tmp_path, capsys):
  """sample.py: past a damaged newest step as eval.py; one line without checkpoints, and no
  checkpoints/ directory created; the bad sampling argument named alone."""
  flip_bit(os.path.join(copy, 'checkpoints', '8'), 'opt_state.1.0.mu.lm_head', bit=3)
  before = sorted(os.listdir(os.path.join(copy, 'checkpoints')))
  capsys.readouterr()
  _, state = entry_points.load_checkpoint(copy)  # What sample.py restores, without the sampler.
  err = capsys.readouterr().err
  assert int(state.step) == 6 and sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == before
  assert err.strip().splitlines() == [
      f'warning: checkpoint {copy}/checkpoints/8 is damaged: array opt_state/1/0/mu/lm_head does '
      f'not match its checksum (crc32 {err.split("(crc32 ")[1].split(")")[0]}); falling back to an '
      'older checkpoint']

  empty = tmp_path / 'empty'
  empty.mkdir()
  shutil.copy(os.path.join(copy, 'config.json'), empty)
  rc, _, err = run('sample.py', f'--workdir={empty}')
  assert rc == 1 and err.strip().splitlines() == [
      f'error: no checkpoint in {empty}/checkpoints: train first with train.py']
  assert sorted(os.listdir(empty)) == ['config.json']
  with pytest.raises(ValueError, match=r'^top_p=0 is invalid: expected in \(0, 1\] \(1 = off\)$'):
    entry_points.sample_workdir(str(empty), '', 4, top_p=0)


def test_resume_with_changed_fields_is_recorded(copy, stdlib_data_dir, capsys):
  """Fields that may change are listed in one line, old -> new; config.json is the new config,
  config.0.json keeps the one steps 1-8 ran with, config.8.json the one from step 9 on."""
  with open(os.path.join(copy, 'config.json')) as f:
    first = json.load(f)
  # One more step: a resume at its final step does nothing and records nothing.
  config = tiny_config(stdlib_data_dir, **{'opt.lr': 0.02, 'moe.top_k': 1, 'batch_size': 8,
                                           'moe.eval_capacity_factor': 1.0,
                                           'num_train_steps': 9})
  capsys.readouterr()
  train_lib.train_and_evaluate(config, copy)
  err = capsys.readouterr().err
  changed = [l for l in err.splitlines() if l.startswith('warning: resuming')]
  assert changed == ['warning: resuming at step 8 with a changed config (steps up to it ran with '
                     'config.0.json): moe.top_k: 2 -> 1, moe.eval_capacity_factor: 2.0 -> 1.0, '
                     'opt.lr: 0.01 -> 0.02, batch_size: 4 -> 8, num_train_steps: 8 -> 9']
  configs = {name: json.load(open(os.path.join(copy, name)))
             for name in ('config.json', 'config.0.json', 'config.8.json')}
  assert configs['config.0.json'] == first
  assert configs['config.8.json'] == configs['config.json'] == json.loads(config.to_json())


def test_resume_at_or_past_the_final_step_says_so(copy, stdlib_data_dir, capsys):
  """A workdir at step 8 resumed with num_train_steps=4: one line, nothing trained, saved or
  recorded."""
  before = {name: os.path.getmtime(os.path.join(copy, name)) for name in os.listdir(copy)}
  capsys.readouterr()
  assert train_lib.train_and_evaluate(tiny_config(stdlib_data_dir, num_train_steps=4), copy) == {}
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'nothing to do: {copy} is at step 8, at or past num_train_steps=4; raise '
                 '--config.num_train_steps to train further']
  assert {name: os.path.getmtime(os.path.join(copy, name)) for name in os.listdir(copy)} == before


@pytest.mark.parametrize('item,text', [
    ('checksums/metadata', '{"arrays": 5}'), ('checksums/metadata', '[1, 2]'),
    ('checksums/metadata', '{"arrays": {"step": 5}}'), ('data/metadata', '"a string"'),
])
def test_damaged_json_items_fall_back(copy, item, text):
  """Any JSON item of the newest step holding the wrong shape: that step is damaged."""
  with open(os.path.join(copy, 'checkpoints', '8', item), 'w') as f:
    f.write(text)
  placement = entry_points.workdir_placement(copy)
  warnings = []
  step, _, _ = checkpointing.read_checkpoint(os.path.join(copy, 'checkpoints'),
                                             placement.abstract_state, warn=warnings.append)
  assert step == 6 and len(warnings) == 1 and warnings[0].startswith(
      f'warning: checkpoint {copy}/checkpoints/8 ')


def test_step_metadata_of_the_wrong_shape(copy, capsys):
  """Orbax refuses a directory holding a step whose _CHECKPOINT_METADATA is not an object: a
  reader names it in one line, a trainer sets the step aside and goes on."""
  ckpt_dir = os.path.join(copy, 'checkpoints')
  with open(os.path.join(ckpt_dir, '8', '_CHECKPOINT_METADATA'), 'w') as f:
    f.write('[]')
  with pytest.raises(checkpointing.CheckpointError, match=(
      f'^checkpoint {ckpt_dir}/8 is unreadable: _CHECKPOINT_METADATA holds a JSON list, not an '
      'object; train.py sets it aside')):
    checkpointing.Checkpointer(ckpt_dir, read_only=True)
  capsys.readouterr()
  ckpt = checkpointing.Checkpointer(ckpt_dir)
  assert ckpt.all_steps() == [4, 6] and os.path.isdir(f'{ckpt_dir}/8.corrupt')
  assert capsys.readouterr().err.strip().splitlines() == [
      f'warning: checkpoint {ckpt_dir}/8 is unreadable: _CHECKPOINT_METADATA holds a JSON list, '
      f'not an object; set aside as {ckpt_dir}/8.corrupt']
  ckpt.close()


@pytest.mark.parametrize('text,why', [
    ('{garbled', 'JSONDecodeError: Expecting property name enclosed in double quotes'),
    ('[1, 2]', 'it holds a JSON list, not an object'),
    (b'{"seed": "\xff"}', 'UnicodeDecodeError'),
])
def test_a_garbled_config_json_is_named(copy, text, why):
  with open(os.path.join(copy, 'config.json'), 'wb') as f:
    f.write(text if isinstance(text, bytes) else text.encode())
  with pytest.raises(ConfigError) as error:
    entry_points.load_config(copy)
  message = str(error.value)
  assert message.startswith(f'{copy}/config.json is not a readable saved config (') and why in message
  assert message.endswith('restore it, e.g. from config.0.json (the newest of its history)')


def test_ctrl_c_saves_the_step_in_flight(copy, stdlib_data_dir, capsys):
  """SIGINT in the middle of a resumed run: the step in flight is saved and the run returns,
  like SIGTERM, with one line."""
  config = tiny_config(stdlib_data_dir, num_train_steps=400, checkpoint_every_steps=1000,
                       log_every_steps=1, eval_every_steps=1000)
  config.debug.step_sleep_s = 0.05
  metrics = os.path.join(copy, 'metrics.jsonl')
  lines = sum(1 for _ in open(metrics))

  def interrupt():  # Once the loop has logged two steps (past the compile).
    deadline = time.time() + 120
    while time.time() < deadline and sum(1 for _ in open(metrics)) < lines + 2:
      time.sleep(0.1)
    # Only into the loop's handler: a Ctrl-C anywhere else would stop pytest itself.
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
      os.kill(os.getpid(), signal.SIGINT)

  capsys.readouterr()
  thread = threading.Thread(target=interrupt, daemon=True)
  thread.start()
  train_lib.train_and_evaluate(config, copy)
  thread.join()
  steps = sorted(int(n) for n in os.listdir(os.path.join(copy, 'checkpoints')))
  assert 10 <= steps[-1] < 400 and steps[:-1] == [6, 8]
  saved = [l for l in capsys.readouterr().err.splitlines() if 'saved checkpoint' in l]
  assert saved == [f'SIGINT: saved checkpoint {copy}/checkpoints/{steps[-1]} and stopped; rerun '
                   'the same command to continue.']
  with open(metrics) as f:  # Every step up to the saved one logged, each once.
    logged = [json.loads(l)['step'] for l in f][lines:]
  assert logged == list(range(9, steps[-1] + 1))


def truncate_newest_step(workdir):
  data = os.path.join(workdir, 'checkpoints', '8', 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    os.truncate(os.path.join(data, name), os.path.getsize(os.path.join(data, name)) // 2)


def garble_config_json(workdir):
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write('{garbled')


def step_metadata_a_list(workdir):
  with open(os.path.join(workdir, 'checkpoints', '8', '_CHECKPOINT_METADATA'), 'w') as f:
    f.write('[]')


def tear_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'r+') as f:
    f.truncate(os.path.getsize(os.path.join(workdir, 'metrics.jsonl')) - 20)


# (name, damage, argv with {w} the workdir and {d} the data dir, exit status, the one line).
# A resume past a truncated newest step used to print thousands of asyncio lines in about half
# the runs: it runs twice.
TRAIN_TRUNCATED_STEP = (
    truncate_newest_step,
    ['train.py', '--config=configs/tiny.py', '--workdir={w}', '--config.data.data_dir={d}',
     '--config.checkpoint_every_steps=2', '--config.eval_every_steps=8',
     '--config.eval_batches=1', '--config.log_every_steps=1', '--config.keep_checkpoints=3'], 0,
    'warning: checkpoint {w}/checkpoints/8 is unreadable: ValueError: ')
BROKEN_INPUTS = [
    ('train_truncated_step', *TRAIN_TRUNCATED_STEP),
    ('train_truncated_step_again', *TRAIN_TRUNCATED_STEP),
    ('eval_truncated_step', truncate_newest_step,
     ['eval.py', '--workdir={w}', '--max_batches=1'], 0,
     'warning: checkpoint {w}/checkpoints/8 is unreadable: ValueError: '),
    ('train_garbled_config_json', garble_config_json,
     ['train.py', '--config=configs/tiny.py', '--workdir={w}', '--config.data.data_dir={d}'], 1,
     'error: {w}/config.json is not a readable saved config (JSONDecodeError: '),
    ('sample_step_metadata', step_metadata_a_list, ['sample.py', '--workdir={w}'], 1,
     'error: checkpoint {w}/checkpoints/8 is unreadable: _CHECKPOINT_METADATA holds a JSON list'),
    ('train_missing_config_file', None,
     ['train.py', '--config=configs/nope.py', '--workdir={w}', '--config.seed=3'], 1,
     'error: --config=configs/nope.py: configs/nope.py does not exist'),
    ('sweep_config_raises', None,
     ['sweep.py', '--config={w}/raises.py', '--sweep=seed=1,2', '--root={w}/sweep'], 1,
     'error: --config={w}/raises.py failed to load: ZeroDivisionError: division by zero'),
    ('plot_torn_metrics', tear_metrics,
     ['-m', 'stmoe_jax.analysis.plot', '--workdir={w}', '--out={w}/plots'], 0,
     'warning: {w}/metrics.jsonl: skipped line '),
    ('build_data_dir_a_file', None,
     ['-m', 'stmoe_jax.data.build', '--name=corpus', '--files={w}/*.json',
      '--data_dir={w}/config.json'], 1,
     'error: data_dir: {w}/config.json is a file, not a directory'),
]


@pytest.mark.parametrize('name,damage,argv,status,line', BROKEN_INPUTS,
                         ids=[case[0] for case in BROKEN_INPUTS])
def test_entry_points_print_one_line(copy, stdlib_data_dir, name, damage, argv, status, line):
  """Each entry point on a broken input: at most two lines on stderr besides the progress bar,
  no traceback, the line that matters among them, nothing lost."""
  if damage:
    damage(copy)
  with open(os.path.join(copy, 'raises.py'), 'w') as f:
    f.write('def get_config():\n  return 1 / 0\n')
  fill = lambda text: text.replace('{w}', copy).replace('{d}', stdlib_data_dir)
  result = subprocess.run([sys.executable, *[fill(a) for a in argv]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != errors.TRACEBACK_ENV})
  err = result.stderr.replace('\r', '\n')
  lines = [l for l in err.splitlines() if l.strip() and '%|' not in l and 'it/s]' not in l]
  assert 'Traceback' not in err and len(lines) <= 2, err[-3000:]
  assert result.returncode == status and any(l.startswith(fill(line)) or fill(line) in l
                                             for l in lines), err[-3000:]
  if name.startswith('train_truncated_step'):  # It fell back to step 6, trained 7 and 8 again.
    assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['4', '6', '8', '8.corrupt']
