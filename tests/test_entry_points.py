"""train.py and eval.py as a user runs them: subprocesses on the tiny config."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *flags, check=True):
  result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode:
    raise AssertionError(f'{script} failed ({result.returncode}):\n{result.stderr[-3000:]}')
  return result


def metrics(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


@pytest.fixture(scope='module')
def trained(stdlib_data_dir, tmp_path_factory):
  """A tiny run stopped at step 4, then resumed by a second process to step 8."""
  workdir = str(tmp_path_factory.mktemp('run'))
  common = ['--config=configs/tiny.py', f'--workdir={workdir}',
            f'--config.data.data_dir={stdlib_data_dir}', '--config.checkpoint_every_steps=2']
  first = run('train.py', *common, '--config.num_train_steps=4')
  second = run('train.py', *common, '--config.num_train_steps=8')
  return workdir, first, second


def test_second_process_resumes_from_saved_step(trained):
  workdir, first, second = trained
  assert 'Resumed' not in first.stdout
  assert f"Resumed from {os.path.join(workdir, 'checkpoints')}/4" in second.stdout
  steps = [r['step'] for r in metrics(workdir, 'train')]
  assert steps == [2, 4, 6, 8]  # The second run starts at 5, not at 1.
  # Saved at 2, 4, 6, 8; keep_checkpoints=2 leaves the newest two.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['6', '8']
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_train_steps'] == 8


def test_eval_prints_json_with_routing_stats(trained):
  workdir, _, _ = trained
  result = run('eval.py', f'--workdir={workdir}')
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['step'] == 8
  assert 0 < report['bits_per_byte'] < 9 and 0 <= report['accuracy'] <= 1
  assert report['loss'] > 0 and report['num_tokens'] > 0
  assert [layer['layer'] for layer in report['moe_layers']] == [1]  # tiny: layers 0 dense, 1 MoE.
  for layer in report['moe_layers']:
    assert len(layer['expert_load']) == 4
    assert abs(sum(layer['expert_load']) - 1) < 1e-4
    assert 0 <= layer['dropped_fraction'] < 1
  with open(os.path.join(workdir, 'eval_8.json')) as f:
    assert json.load(f) == report
  # bits/byte and loss describe the same cross-entropy: bpb = loss / ln 2 * tokens / bytes.
  assert report['bits_per_byte'] > report['loss'] / 0.6931471805599453


@pytest.mark.parametrize('flags,message', [
    (['--config.moe.top_k=8'], 'config.moe.num_experts=4'),
    (['--config.moe.train_capacity_factor=0'], 'config.moe.train_capacity_factor=0'),
    (['--config.model.d_model=-1'], 'config.model.d_model=-1'),
    (['--config.moe.num_expertz=8'], 'num_expertz'),
])
def test_bad_config_fails_with_one_line(flags, message, tmp_path):
  result = run('train.py', '--config=configs/tiny.py', f'--workdir={tmp_path}', *flags,
               check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_eval_without_checkpoint_names_the_path(tmp_path):
  missing = run('eval.py', f'--workdir={tmp_path / "nope"}', check=False)
  assert missing.returncode == 1
  assert missing.stderr.strip() == f"error: workdir '{tmp_path / 'nope'}' does not exist"

  from configs import tiny  # A workdir with a config but no checkpoint yet.
  (tmp_path / 'config.json').write_text(tiny.get_config().to_json())
  empty = run('eval.py', f'--workdir={tmp_path}', check=False)
  assert empty.returncode == 1
  assert empty.stderr.strip() == f"error: no checkpoint in {tmp_path / 'checkpoints'}: train first with train.py"
