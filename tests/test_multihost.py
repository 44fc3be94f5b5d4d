"""Multi-process training and cross-mesh checkpoints, as a user runs them (subprocesses).

- Two train.py processes on 127.0.0.1 (gloo CPU collectives, 4 fake devices each, experts over
  all 8 devices), stopped after step 2 and resumed by a second pair, log the same per-step
  losses as one process with 8 devices fed the same global batches
  (tests/multihost_reference.py), within rtol 1e-5.
- A checkpoint written with expert=4 restores onto one device and onto data=2,expert=2
  (eval.py --mesh) with the training run's eval loss, within rtol 1e-5.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

import multihost_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_with_devices(num_devices: int) -> dict:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}"
  return {**os.environ, 'XLA_FLAGS': flags.strip(),
          'JAX_PLATFORMS': 'cpu'}


def start(args, env):
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  if proc.returncode:
    raise AssertionError(f'{proc.args} failed ({proc.returncode}):\n{err[-4000:]}')
  return out


def records(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(workdir, data_dir, *extra):
  env = {**env_with_devices(4), 'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
  address = f'127.0.0.1:{free_port()}'
  procs = [start(['train.py', *multihost_reference.flags(data_dir), f'--workdir={workdir}',
                  f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}',
                  *extra], env) for i in range(2)]
  for proc in procs:
    finish(proc)


def test_two_processes_match_one_process(stdlib_data_dir, tmp_path):
  """Steps 1-2 by one pair of processes, step 3 by a second pair resuming from the step-2
  checkpoint: each process must get back its own data position."""
  workdir = str(tmp_path / 'run')
  reference = start([os.path.join('tests', 'multihost_reference.py'), stdlib_data_dir, '3'],
                    env_with_devices(8))
  run_two_processes(workdir, stdlib_data_dir, '--config.stop_at_step=2')
  run_two_processes(workdir, stdlib_data_dir)
  expected = json.loads(finish(reference).strip().splitlines()[-1])
  train = records(workdir, 'train')
  assert [r['step'] for r in train] == [1, 2, 3]  # Process 0 alone writes: each line once.
  assert [r['loss'] for r in train] == pytest.approx(expected, rel=1e-5)
  assert len(records(workdir, 'eval')) == 1
  with open(os.path.join(workdir, 'checkpoints', '2', 'data', 'metadata')) as f:
    positions = json.load(f)['per_process']
  assert [p['config']['process_index'] for p in positions] == [0, 1]


def test_checkpoint_restores_across_meshes(stdlib_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  env = env_with_devices(4)
  flags = ['--config=configs/tiny.py', f'--config.data.data_dir={stdlib_data_dir}',
           '--config.mesh.data=1', '--config.mesh.expert=4', '--config.moe.group_size=32',
           '--config.num_train_steps=2', '--config.eval_every_steps=2',
           '--config.eval_batches=2', '--config.checkpoint_every_steps=2']
  finish(start(['train.py', *flags, f'--workdir={workdir}'], env))
  trained = records(workdir, 'eval')[-1]
  for mesh in ('data=1', 'data=2,expert=2'):
    out = finish(start(['eval.py', f'--workdir={workdir}', '--max_batches=2', f'--mesh={mesh}'],
                       env))
    restored = json.loads(out.strip().splitlines()[-1])
    assert restored['step'] == 2
    assert restored['loss'] == pytest.approx(trained['loss'], rel=1e-5), mesh
    assert restored['bits_per_byte'] == pytest.approx(trained['bits_per_byte'], rel=1e-5), mesh
