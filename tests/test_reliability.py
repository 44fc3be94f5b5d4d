"""Failure behaviour, for real: SIGKILL/SIGTERM of train.py, damaged checkpoints, NaN guards,
bad data and incompatible checkpoints. (The Checkpointer alone, half-written and damaged steps
and a full disk: tests/test_checkpointing.py.)

Every train.py run uses configs/tiny.py with a 12-step schedule and per-step logging, so each
run's losses can be compared bit for bit (JSON floats round-trip exactly) with one
uninterrupted reference run.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from stmoe_jax.train import guards
from stmoe_jax.train import train_lib
from stmoe_jax.train import entry_points
from stmoe_jax.data import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common_flags(data_dir):
  return ['--config=configs/tiny.py', f'--config.data.data_dir={data_dir}',
          '--config.num_train_steps=12', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=2', '--config.eval_every_steps=12',
          '--config.keep_checkpoints=3']


def start(script, *flags, workdir):
  """Starts `script` with output to files in `workdir`'s parent (no pipe can fill up)."""
  log = os.path.join(os.path.dirname(workdir), f'{os.path.basename(workdir)}-{time.time_ns()}')
  out, err = open(log + '.out', 'w'), open(log + '.err', 'w')
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *flags,
                           f'--workdir={workdir}'], cwd=ROOT, stdout=out, stderr=err, text=True)
  proc.logs, proc.workdir = (log + '.out', log + '.err'), workdir
  return proc


def finish(proc, timeout=300):
  """Waits for `proc`: (returncode, stdout, stderr)."""
  proc.wait(timeout=timeout)
  with open(proc.logs[0]) as out, open(proc.logs[1]) as err:
    return proc.returncode, out.read(), err.read()


def run(script, *flags, workdir):
  return finish(start(script, *flags, workdir=workdir))


def records(workdir, kind='train'):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f.read().splitlines():
      try:
        out.append(json.loads(line))
      except ValueError:  # The line the trainer is writing right now.
        pass
  # wall_time differs between runs by nature; everything else must match exactly.
  return [{k: v for k, v in r.items() if k != 'wall_time'} for r in out if r['kind'] == kind]


def wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while not any(r['step'] >= step for r in records(workdir)):
    assert proc.poll() is None, finish(proc)
    assert time.time() < deadline, f'no step {step} within {timeout} s'
    time.sleep(0.01)


def losses(recs):
  return {r['step']: r['loss'] for r in recs if 'loss' in r}


def resumed_step(stdout):
  line = [l for l in stdout.splitlines() if l.startswith('Resumed from ')]
  assert len(line) == 1, stdout
  return int(line[0].rsplit('/', 1)[1])


@pytest.fixture(scope='module')
def background(stdlib_data_dir, tmp_path_factory):
  """Starts the runs that need no interaction, so they overlap the interrupted sequence: the
  uninterrupted reference and the two NaN-guard runs. The others start once the reference has
  logged its first step, when the programs they share with it (all of the interrupted runs',
  the NaN runs' initialisation) are in the session's XLA cache, not compiled again alongside."""
  base = tmp_path_factory.mktemp('background')
  flags = common_flags(stdlib_data_dir)
  procs = {'reference': start('train.py', *flags, workdir=str(base / 'reference'))}
  wait_for_step(procs['reference'].workdir, 1, procs['reference'])
  procs.update(
      nan_stop=start('train.py', *flags, '--config.on_nonfinite=stop',
                     '--config.debug.nan_at_step=6', workdir=str(base / 'nan_stop')),
      nan_skip=start('train.py', *flags, '--config.on_nonfinite=skip',
                     '--config.debug.nan_at_step=3', '--config.debug.nan_term=z_loss',
                     '--config.stop_at_step=5', workdir=str(base / 'nan_skip')))
  yield procs
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()


@pytest.fixture(scope='module')
def reference(background):
  """One uninterrupted 12-step run: {step: loss} and its workdir."""
  proc = background['reference']
  rc, _, err = finish(proc)
  assert rc == 0, err[-3000:]
  return losses(records(proc.workdir)), proc.workdir


@pytest.fixture(scope='module')
def interrupted(stdlib_data_dir, tmp_path_factory, background):
  """The same run SIGKILLed after step 5, restarted, SIGTERMed after step 9, restarted."""
  workdir = str(tmp_path_factory.mktemp('interrupted') / 'run')
  flags = [*common_flags(stdlib_data_dir), '--config.debug.step_sleep_s=0.2']
  first = start('train.py', *flags, workdir=workdir)
  wait_for_step(workdir, 5, first)
  os.kill(first.pid, signal.SIGKILL)
  killed = finish(first)
  ends = [len(records(workdir))]
  second = start('train.py', *flags, workdir=workdir)
  wait_for_step(workdir, 9, second)
  os.kill(second.pid, signal.SIGTERM)
  terminated = finish(second)
  ends.append(len(records(workdir)))
  third = run('train.py', *common_flags(stdlib_data_dir), workdir=workdir)
  recs = records(workdir)
  segments = [recs[:ends[0]], recs[ends[0]:ends[1]], recs[ends[1]:]]  # One per process.
  return workdir, killed, terminated, third, segments


def test_sigkill_and_sigterm_resume_exactly(interrupted, reference):
  """Deliver 1 and 2: determinism, exact resume after SIGKILL, checkpoint-and-exit on SIGTERM."""
  ref_losses, ref_dir = reference
  workdir, killed, terminated, third, (first, second, last) = interrupted
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert killed[0] == -signal.SIGKILL
  assert terminated[0] == 0, terminated[2][-3000:]
  assert third[0] == 0, third[2][-3000:]
  # Same config and seed: the killed process's steps are bit-identical to the reference's.
  assert first[-1]['step'] >= 5
  assert losses(first) == {s: ref_losses[s] for s in losses(first)}
  # The restart resumed from a checkpoint (every 2 steps) at or before the kill; the newest one
  # may still have been in flight (asynchronous save) when the kill came, then the one before.
  killed_at = first[-1]['step']
  resumed = resumed_step(terminated[1])
  assert 2 <= resumed <= killed_at and resumed % 2 == 0
  assert second[0]['step'] == resumed + 1
  # ...and SIGTERM saved the step it was on and exited 0; the third process resumed there.
  sigterm_step = second[-1]['step']
  assert sigterm_step >= 9
  assert f'SIGTERM: saved checkpoint {ckpt_dir}/{sigterm_step} and stopped' in terminated[2]
  assert resumed_step(third[1]) == sigterm_step
  assert last[0]['step'] == sigterm_step + 1 and last[-1]['step'] == 12
  # Model, optimizer, RNG and data position restored: every loss equals the uninterrupted run's.
  for segment in (second, last):
    assert losses(segment) == {s: ref_losses[s] for s in losses(segment)}
  assert records(workdir, 'eval') == records(ref_dir, 'eval')


def test_damaged_latest_checkpoint_falls_back(reference, interrupted, stdlib_data_dir, tmp_path):
  """Deliver 3: a truncated newest checkpoint is reported by path, set aside, and training
  resumes exactly from the one before; with every checkpoint damaged the run refuses to start."""
  ref_losses, _ = reference
  workdir = str(tmp_path / 'run')
  shutil.copytree(interrupted[0], workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert steps[-1] == 12 and len(steps) == 3
  all_damaged = str(tmp_path / 'all_damaged')
  shutil.copytree(workdir, all_damaged)
  for root in [os.path.join(ckpt_dir, '12')] + [
      os.path.join(all_damaged, 'checkpoints', str(s)) for s in steps]:
    for parent, _, files in os.walk(root):
      for name in files:
        open(os.path.join(parent, name), 'w').close()  # Truncate to 0 bytes.

  rc, out, err = run('train.py', *common_flags(stdlib_data_dir), workdir=workdir)
  assert rc == 0, err[-3000:]
  assert f'warning: checkpoint {ckpt_dir}/12 is unreadable' in err
  assert resumed_step(out) == steps[-2]
  assert os.path.isdir(os.path.join(ckpt_dir, '12.corrupt'))  # Kept for inspection.
  redone = records(workdir)[-(12 - steps[-2]):]
  assert [r['step'] for r in redone] == list(range(steps[-2] + 1, 13))
  assert losses(redone) == {s: ref_losses[s] for s in losses(redone)}

  before = records(all_damaged)
  rc, out, err = run('train.py', *common_flags(stdlib_data_dir), workdir=all_damaged)
  assert rc == 1
  last = err.strip().splitlines()[-1]
  assert last.startswith(f'error: no readable checkpoint in {all_damaged}/checkpoints: '
                         f'checkpoint {all_damaged}/checkpoints/12 is unreadable'), err[-3000:]
  assert records(all_damaged) == before  # Did not silently start over.
  assert sorted(os.listdir(os.path.join(all_damaged, 'checkpoints'))) == sorted(map(str, steps))


def test_eval_refuses_a_checkpoint_from_another_config(interrupted, tmp_path):
  """Deliver 5 (eval.py): config.json no longer matching the checkpoint names the array."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(interrupted[0], workdir)
  config_path = os.path.join(workdir, 'config.json')
  with open(config_path) as f:
    config = json.load(f)
  config['model']['d_model'] = 48
  with open(config_path, 'w') as f:
    json.dump(config, f)
  rc, _, err = run('eval.py', workdir=workdir)
  assert rc == 1
  # The first array whose shape involves d_model, e.g. params/blocks/0/attn/w_k [32, 2, 16].
  assert re.fullmatch(rf'error: checkpoint {workdir}/checkpoints/12 stores params/\S+ as '
                      r'float32\[(?P<a>.*)32(?P<b>.*)\] but this config needs '
                      r'float32\[(?P=a)48(?P=b)\]',
                      err.strip().splitlines()[-1]), err[-2000:]


def test_nan_stop_saves_last_good_state_and_exits(reference, background):
  """Deliver 4, stop mode: exit 1 naming step and terms; the checkpoint holds step 5's state."""
  ref_losses, _ = reference
  workdir = background['nan_stop'].workdir
  rc, _, err = finish(background['nan_stop'])
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert rc == 1
  assert err.strip().splitlines()[-1] == (
      'error: non-finite cross_entropy, grad_norm at step 6 (config.on_nonfinite=stop); the '
      f'last good state is checkpoint {ckpt_dir}/5')
  recs = records(workdir)
  assert losses(recs) == {s: ref_losses[s] for s in range(1, 6)}
  # Checkpoint 5 (off the save interval: written by the guard) is step 5's state, not halted,
  # and its data position is 5 batches in.
  config = entry_points.load_config(workdir)
  trainer = train_lib.Trainer(config, workdir)
  state, data_state = trainer.checkpointer.restore(5, trainer.abstract_state)
  assert (int(state.step), int(state.halted_at)) == (5, 0)
  np.testing.assert_allclose(float(optax.global_norm(state.params)), recs[4]['param_norm'],
                             rtol=1e-5)
  fresh = trainer.train_iterator()
  for _ in range(5):
    next(fresh)
  assert data_state == fresh.get_state()
  trainer.checkpointer.close()


def test_nan_skip_drops_the_update_and_goes_on(reference, background):
  """Deliver 4, skip mode: the bad step is logged and counted, training continues."""
  ref_losses, _ = reference
  workdir = background['nan_skip'].workdir
  rc, _, err = finish(background['nan_skip'])
  assert rc == 0, err[-3000:]
  assert ('warning: non-finite z_loss, grad_norm at step 3: update skipped (1 skipped so far)'
          in err)
  recs = {r['step']: r for r in records(workdir)}
  assert sorted(recs) == [1, 2, 3, 4, 5]
  assert losses(recs.values()) == {**{s: ref_losses[s] for s in (1, 2)},
                                   **losses([recs[4], recs[5]])}
  assert 'loss' not in recs[3] and recs[3]['skipped_steps'] == 1
  assert [recs[s]['skipped_steps'] for s in (1, 2, 4, 5)] == [0, 0, 1, 1]
  assert all(np.isfinite(recs[s]['loss']) for s in (4, 5))
  assert recs[4]['loss'] != ref_losses[4]  # Step 3's update really was dropped.


@pytest.fixture(scope='module')
def tiny_trainer(stdlib_data_dir, tmp_path_factory):
  config = tiny.get_config()
  config.data.data_dir = stdlib_data_dir
  config.on_nonfinite, config.debug.nan_at_step, config.debug.nan_term = 'skip', 2, 'balance_loss'
  return train_lib.Trainer(config, str(tmp_path_factory.mktemp('guards')))


def test_train_step_guards_leave_the_state_untouched(tiny_trainer):
  """Deliver 4 on device: a skipped step keeps params and optimizer state bit for bit; in stop
  mode the state stays frozen at the last good step even through later healthy batches."""
  t = tiny_trainer
  data = t.train_iterator()
  batches = [t.global_batch(next(data)) for _ in range(3)]
  s1, _ = t.train_step(t.init(), batches[0])
  s1_host = jax.device_get(s1)
  s2, m2 = t.train_step(s1, batches[1])
  m2 = jax.device_get(m2)
  assert m2['nonfinite'] == 1 and guards.nonfinite_terms(m2) == ['balance_loss', 'grad_norm']
  s2_host = jax.device_get(s2)
  jax.tree.map(np.testing.assert_array_equal, (s2_host.params, s2_host.opt_state),
               (s1_host.params, s1_host.opt_state))
  assert (int(s2_host.step), int(s2_host.skipped_steps)) == (2, 1)
  s3, m3 = t.train_step(s2, batches[2])
  assert jax.device_get(m3)['nonfinite'] == 0 and int(s3.skipped_steps) == 1
  assert float(optax.global_norm(jax.tree.map(lambda a, b: a - b, jax.device_get(s3.params),
                                              s2_host.params))) > 0

  stop_step = jax.jit(lambda state, batch: train_lib.train_step(
      state, batch, loss_fn=t.placement.model.loss_fn, graphdef=t.graphdef, tx=t.tx,
      schedule=t.schedule,
      on_nonfinite='stop', nan_at_step=2, nan_term='grad_norm'))
  s1, _ = stop_step(t.init(), batches[0])
  s1_host = jax.device_get(s1)
  s2, m2 = stop_step(s1, batches[1])
  m2 = jax.device_get(m2)
  assert guards.nonfinite_terms(m2) == ['grad_norm'] and np.isfinite(m2['loss'])
  s3, _ = stop_step(s2, batches[2])  # Another batch: still no change while halted.
  for state in (s2, s3):
    state = jax.device_get(state)
    assert (int(state.step), int(state.halted_at)) == (1, 2)
    jax.tree.map(np.testing.assert_array_equal, state.params, s1_host.params)


class FakeSource:
  """A random-access data source whose record `bad` raises, as a damaged file would."""

  def __init__(self, records, bad=None):
    self.records, self.bad = records, bad

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    if index == self.bad:
      raise OSError('array_record: corrupted chunk')
    return self.records[index]


@pytest.mark.parametrize('source,message', [
    (FakeSource([]), 'fake[train] has no records: nothing to train or evaluate on'),
    (FakeSource([{'text': b'ok'}] * 3 + [{'text': 7}] + [{'text': b'ok'}] * 4),
     "fake[train] record 3: feature 'text' is a int, not text (bytes or str)"),
    (FakeSource([{'text': b'ok'}] * 5 + [{'body': b'x'}] + [{'text': b'ok'}] * 2),
     "fake[train] record 5 has no feature 'text' (it has ['body'])"),
    (FakeSource([{'text': b'ok'}] * 8, bad=6),
     'fake[train] record 6 cannot be read: OSError: array_record: corrupted chunk'),
])
def test_bad_data_names_the_record(monkeypatch, source, message):
  """Deliver 5 (data): empty data, undecodable and malformed records raise DataError by name,
  in training and in evaluation."""
  monkeypatch.setattr(input_pipeline, 'get_data_source', lambda *args: source)
  kwargs = dict(name='fake', split='train', data_dir=None, feature_key='text', seq_len=4,
                batch_size=2)
  with pytest.raises(input_pipeline.DataError, match=f'^{message}'.replace('[', r'\[')
                     .replace(']', r'\]').replace('(', r'\(').replace(')', r'\)')):
    train = input_pipeline.make_train_iterator(**kwargs, seed=0)
    for _ in range(20):
      next(train)
  with pytest.raises(input_pipeline.DataError):
    list(input_pipeline.make_eval_iterator(**kwargs))
