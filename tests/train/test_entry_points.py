"""train.py and eval.py as a user runs them (subprocesses on the tiny config), and
stmoe_jax.train.entry_points' config.json: round trip, older files load with defaults, removed fields
refused."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default, tiny
from stmoe_jax.train import entry_points
from stmoe_jax.train import evaluation
from stmoe_jax.analysis import specialization
from stmoe_jax.models import flops
from stmoe_jax.config import ConfigError, model_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
  """A tiny 8-step run stopped after step 4 and resumed by a second process, and the same run
  uninterrupted."""
  workdir, reference = (str(tmp_path_factory.mktemp(name)) for name in ('run', 'reference'))
  common = ['--config=configs/tiny.py', f'--config.data.data_dir={stdlib_data_dir}',
            '--config.checkpoint_every_steps=2']
  first = run('train.py', *common, f'--workdir={workdir}', '--config.stop_at_step=4')
  second = run('train.py', *common, f'--workdir={workdir}')
  run('train.py', *common, f'--workdir={reference}')
  return workdir, reference, first, second


def test_second_process_resumes_from_saved_step(trained):
  workdir, reference, first, second = trained
  assert 'Resumed' not in first.stdout
  assert f"Resumed from {os.path.join(workdir, 'checkpoints')}/4" in second.stdout
  steps = [r['step'] for r in metrics(workdir, 'train')]
  assert steps == [2, 4, 6, 8]  # The second run starts at 5, not at 1.
  # Model, optimizer, RNG and data position all restored: the same losses as without the stop.
  assert ([r['loss'] for r in metrics(workdir, 'train')] ==
          [r['loss'] for r in metrics(reference, 'train')])
  # Saved at 2, 4, 6, 8; keep_checkpoints=2 leaves the newest two.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['6', '8']


def test_resume_with_a_different_model_is_refused(trained, stdlib_data_dir):
  workdir = trained[0]
  result = run('train.py', '--config=configs/tiny.py', f'--workdir={workdir}',
               f'--config.data.data_dir={stdlib_data_dir}', '--config.model.d_model=48',
               '--config.num_train_steps=10', check=False)
  assert result.returncode == 1
  assert result.stderr.strip().startswith('error: config.model.d_model=48 differs from 32')
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['d_model'] == 32  # The saved config still fits the checkpoints.


def test_eval_prints_json_with_routing_stats(trained):
  workdir = trained[0]
  result = run('eval.py', f'--workdir={workdir}', '--max_batches=4',
               '--eval_capacity_factors=0.5,2.0,dropless')
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['step'] == 8
  assert 0 < report['bits_per_byte'] < 9 and 0 <= report['accuracy'] <= 1
  assert report['loss'] > 0 and report['num_tokens'] > 0
  assert [layer['layer'] for layer in report['moe_layers']] == [1]  # tiny: layers 0 dense, 1 MoE.
  for layer in report['moe_layers']:
    assert len(layer['expert_load']) == 4
    assert abs(sum(layer['expert_load']) - 1) < 1e-4
    assert 0 <= layer['dropped_fraction'] < 1
    assert len(layer['dropped_fraction_per_slot']) == 2 and len(layer['router_bias']) == 4
    assert 1 <= layer['max_load_ratio'] <= 4 and 0 < layer['router_entropy'] <= math.log(4)
    assert layer['router_z'] >= 0
    assert 0 <= layer['tokens_left_behind'] <= layer['dropped_fraction'] * 2
    assert 0.25 <= layer['router_confidence'] <= 1  # Top-1 of 4 experts.
    assert layer['null_choice_fraction'] == 0.0  # No null experts.
    # Experts reached per token: 0, 1 or 2 of the top-2, 0 being the tokens left behind.
    hist = layer['experts_per_token_hist']
    assert len(hist) == 3 and sum(hist) == pytest.approx(1, abs=1e-5)
    assert hist[0] == pytest.approx(layer['tokens_left_behind'], abs=1e-6)
    assert layer['experts_per_token'] == pytest.approx(hist[1] + 2 * hist[2], abs=1e-5)
  # Forward FLOPs per token: the layer's measured experts in place of the nominal top-2.
  cfg = model_config(tiny.get_config())
  nominal = flops.forward_flops_per_token(cfg, 32)
  assert report['forward_flops_per_token'] == nominal
  assert report['spent_forward_flops_per_token'] == flops.forward_flops_per_token(
      cfg, 32, {('', 1): report['moe_layers'][0]['experts_per_token']})
  # The capacity sweep: tiny's eval capacity factor is 2.0, so that entry repeats the report.
  sweep = {str(entry['eval_capacity_factor']): entry for entry in report['capacity_sweep']}
  assert sweep['2.0']['loss'] == report['loss']
  assert sweep['dropless']['dropped_fraction'] == 0.0
  assert sweep['0.5']['dropped_fraction'] > sweep['2.0']['dropped_fraction']
  assert sweep['0.5']['dropped_fraction_per_slot'][0][1] > 0  # Second choices drop first.
  # Drops spend fewer experts: fewer FLOPs.
  assert sweep['0.5']['experts_per_token'][0] < sweep['dropless']['experts_per_token'][0]
  assert (sweep['0.5']['spent_forward_flops_per_token'] <
          sweep['dropless']['spent_forward_flops_per_token'] <= nominal)
  # Training logged the same per-layer telemetry: [M=1, E=4] loads summing to 1.
  train = metrics(workdir, 'train')[-1]
  assert len(train['expert_load']) == 1 and abs(sum(train['expert_load'][0]) - 1) < 1e-4
  assert len(train['router_entropy']) == 1 and len(train['dropped_fraction_per_slot'][0]) == 2
  assert len(train['tokens_left_behind']) == 1 and 0.25 <= train['router_confidence'][0] <= 1
  assert len(train['experts_per_token']) == 1 and 0 < train['experts_per_token'][0] <= 2
  with open(os.path.join(workdir, 'eval_8.json')) as f:
    assert json.load(f) == report
  # bits/byte and loss describe the same cross-entropy: bpb = loss / ln 2 * tokens / bytes, and
  # tokens >= bytes (end-of-text tokens are not bytes; these 4 batches may hold none).
  assert report['bits_per_byte'] >= report['loss'] / math.log(2) * (1 - 1e-12)


@pytest.mark.parametrize('flags,message', [
    (['--config.moe.top_k=8'], 'config.moe.num_experts=4'),
    (['--config.moe.train_capacity_factor=0'], 'config.moe.train_capacity_factor=0'),
    (['--config.model.d_model=-1'], 'config.model.d_model=-1'),
    (['--config.moe.num_expertz=8'], 'num_expertz'),
    (['--config.data.name=no_such_dataset'], "'no_such_dataset' is neither registered"),
    (['--config.data.feature_key=body'], "config.data.feature_key='body' is not a feature"),
])
def test_bad_config_fails_with_one_line(flags, message, tmp_path, stdlib_data_dir):
  result = run('train.py', '--config=configs/tiny.py', f'--workdir={tmp_path}',
               f'--config.data.data_dir={stdlib_data_dir}', *flags, check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_eval_refuses_a_bad_capacity_factor(tmp_path):
  result = run('eval.py', f'--workdir={tmp_path}', '--eval_capacity_factors=1.0,abc', check=False)
  assert result.returncode == 1
  assert result.stderr.strip() == ("error: --eval_capacity_factors entry 'abc' is invalid: "
                                   "expected a finite number > 0 or 'dropless'")


def test_eval_without_checkpoint_names_the_path(tmp_path):
  missing = run('eval.py', f'--workdir={tmp_path / "nope"}', check=False)
  assert missing.returncode == 1
  assert missing.stderr.strip() == f"error: workdir '{tmp_path / 'nope'}' does not exist"

  # A workdir with a config but no checkpoint yet.
  (tmp_path / 'config.json').write_text(tiny.get_config().to_json())
  empty = run('eval.py', f'--workdir={tmp_path}', check=False)
  assert empty.returncode == 1
  assert empty.stderr.strip() == f"error: no checkpoint in {tmp_path / 'checkpoints'}: train first with train.py"


def write_config(workdir, config: dict) -> None:
  with open(workdir / 'config.json', 'w') as f:
    json.dump(config, f)


def test_config_json_round_trip(tmp_path, capsys):
  config = tiny.get_config()
  entry_points.record_config(config, str(tmp_path))  # A fresh run's: config.json, config.0.json.
  assert sorted(os.listdir(tmp_path)) == ['config.0.json', 'config.json']
  assert entry_points.load_config(str(tmp_path)).to_dict() == json.loads(config.to_json())
  assert capsys.readouterr().err == ''  # Nothing missing: no warning.


def test_a_config_json_that_predates_fields_loads_with_their_defaults(tmp_path, capsys):
  saved = json.loads(tiny.get_config().to_json())
  del saved['attention']  # A run from before sparse attention existed...
  del saved['moe']['expert_dropout']  # ...and before expert dropout.
  del saved['debug']['step_sleep_s']
  write_config(tmp_path, saved)
  config = entry_points.load_config(str(tmp_path))
  defaults = default.get_config()
  assert config.attention.to_dict() == defaults.attention.to_dict()
  assert config.moe.expert_dropout == defaults.moe.expert_dropout
  assert config.moe.num_experts == tiny.get_config().moe.num_experts  # Saved fields kept.
  model_config(config)  # Valid as a whole.
  err = capsys.readouterr().err.strip().splitlines()
  prefix = f'warning: {tmp_path}/config.json predates fields '
  assert len(err) == 1 and err[0].startswith(prefix), err
  named = err[0][len(prefix):].partition(':')[0].split(', ')
  assert sorted(named) == ['attention', 'debug.step_sleep_s', 'moe.expert_dropout'], err


def test_a_field_that_no_longer_exists_is_still_refused(tmp_path):
  saved = json.loads(tiny.get_config().to_json())
  saved['moe']['jitter_noise'] = 0.1  # Not a field stmoe_jax knows.
  write_config(tmp_path, saved)
  with pytest.raises(ConfigError, match='config.moe.jitter_noise is not a field'):
    validate(entry_points.load_config(str(tmp_path)))


def test_a_missing_config_json_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/config.json not found'):
    entry_points.load_config(str(tmp_path))


def test_specialization_report_of_the_trained_run(trained, tmp_path):
  """`python -m stmoe_jax.analysis.specialization` (in process) on the trained run: its per-expert
  loads are eval's (tiny's eval capacity holds every choice, so kept = assigned)."""
  workdir = trained[0]
  specialization.main([f'--workdir={workdir}', '--num_batches=2', f'--out={tmp_path}'])
  with open(tmp_path / 'specialization.json') as f:
    report = json.load(f)
  assert report['step'] == 8 and [l['layer'] for l in report['layers']] == [1]
  layer = report['layers'][0]
  counts = np.array(layer['counts'])
  assert counts.shape == (4, 9) and counts.sum() == layer['num_choices'] == 2 * 2 * 4 * 32
  placement, _, state = entry_points.restore_workdir(workdir)
  evaluated = evaluation.evaluate_split(placement, state, evaluation.make_eval_step(placement), 2)
  np.testing.assert_allclose(counts.sum(1) / counts.sum(),
                             evaluated['moe_layers'][0]['expert_load'], atol=2e-6)
  assert 0 <= layer['random_router_score'] < layer['score'] < 1
  # Experts per token from the captured kept choices, over the routed tokens: eval's stat.
  assert layer['experts_per_token'] == pytest.approx(
      evaluated['moe_layers'][0]['experts_per_token'], abs=1e-5)
  mix, by_class = np.array(layer['class_mix']), np.array(layer['experts_per_token_by_class'])
  assert np.all((by_class > 0) == (mix > 0)) and np.all(by_class <= 2)
  markdown = (tmp_path / 'specialization.md').read_text()
  assert markdown.count('\n| 3 | ') == 1 and '| identifier |' in markdown
  assert (tmp_path / 'specialization.png').stat().st_size > 10_000
