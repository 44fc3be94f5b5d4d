"""experiments/moe_vs_dense.py: the speedup arithmetic by hand, and the --quick study end to end."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'moe_vs_dense_study', os.path.join(ROOT, 'experiments', 'moe_vs_dense.py'))
study = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = study  # dataclasses look their module up there.
_spec.loader.exec_module(study)


def test_steps_to_reach_interpolates_the_first_crossing():
  steps, losses = [50, 100, 150, 200], [3.0, 2.5, 2.0, 2.2]
  assert study.steps_to_reach(steps, losses, 2.25) == 125.0  # Halfway from 2.5 to 2.0.
  assert study.steps_to_reach(steps, losses, 2.0) == 150.0
  assert study.steps_to_reach(steps, losses, 3.5) == 50.0  # Already below at the first point.
  assert study.steps_to_reach(steps, losses, 1.9) is None  # Never reached.


def test_speedup_against_the_reference_final_loss():
  dense = {'step': np.array([100., 200., 300., 400.]), 'loss': np.array([3.0, 2.6, 2.4, 2.3])}
  moe = {'step': dense['step'], 'loss': np.array([2.8, 2.4, 2.2, 2.1])}
  # MoE reaches 2.3 halfway between 200 (2.4) and 300 (2.2): 250 steps vs dense's 400.
  assert study.speedup(dense, moe) == pytest.approx((250.0, 1.6))
  slow = {'step': dense['step'], 'loss': np.array([3.1, 2.9, 2.7, 2.5])}
  assert study.speedup(dense, slow) == (None, None)
  mean = study.mean_curve([moe, {'step': dense['step'], 'loss': moe['loss'] + 0.2}])
  np.testing.assert_allclose(mean['loss'], moe['loss'] + 0.1)
  with pytest.raises(ValueError, match='different steps'):
    study.mean_curve([moe, {'step': dense['step'] + 1, 'loss': moe['loss']}])


@pytest.fixture(scope='module')
def quick_study(stdlib_data_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp('moe_vs_dense'))
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'moe_vs_dense.py'),
                           '--quick', f'--root={root}', f'--data_dir={stdlib_data_dir}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, result.stdout


def test_quick_study_writes_every_result(quick_study):
  root, stdout = quick_study
  for name in ('results.csv', 'results.md', 'moe_vs_dense.png', 'ablations.png'):
    assert os.path.getsize(os.path.join(root, name)) > 0, name
  with open(os.path.join(root, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  # Every run, evaluated at steps 10 and 20 of the quick size.
  assert [(r['run'], int(r['step'])) for r in rows] == [
      (run.name, step) for run in study.RUNS for step in (10, 20)]
  with open(os.path.join(root, 'results.md')) as f:
    assert f.read() in stdout


def headline_table(stdout):
  """{arm: cells} of the first table the study prints (the headline)."""
  lines = stdout[stdout.index('| arm |'):].split('\n\n')[0].splitlines()[2:]
  return {cells[0]: cells for cells in ([c.strip() for c in l.split('|')[1:-1]] for l in lines)}


def test_quick_study_speedups_match_the_logged_validation_losses(quick_study):
  """The table's step speedups, recomputed from metrics.jsonl with a plain loop."""
  root, stdout = quick_study
  table = headline_table(stdout)

  def eval_losses(*names):  # Mean over seeds, per step.
    per_run = []
    for name in names:
      with open(os.path.join(root, name, 'metrics.jsonl')) as f:
        per_run.append({r['step']: r['loss'] for r in map(json.loads, f) if r['kind'] == 'eval'})
    return {step: np.mean([run[step] for run in per_run]) for step in per_run[0]}

  def first_crossing(losses, target):
    previous = None
    for step, loss in losses.items():
      if loss <= target:  # Linear between the two evaluations around the crossing.
        if previous is None:
          return step
        s0, l0 = previous
        return s0 + (l0 - target) / (l0 - loss) * (step - s0)
      previous = step, loss
    return None

  dense = eval_losses('dense', 'dense_seed1')
  target = dense[20]
  dense_steps = first_crossing(dense, target)
  for arm, runs in (('switch16', ['switch16']), ('stmoe8', ['stmoe8']),
                    ('stmoe16', ['stmoe16', 'stmoe16_seed1'])):
    needed = first_crossing(eval_losses(*runs), target)
    cells = table[arm]
    if needed is None:
      assert cells[6] == 'not reached' and cells[7] == '<1x', cells
    else:
      assert cells[6] == f'{needed:.0f}' and cells[7] == f'{dense_steps / needed:.2f}x', cells
  assert table['dense'][7] == '1.00x' and table['dense'][8] == '-'


def test_quick_study_equal_active_parameters_and_capacity_sweep(quick_study):
  root, stdout = quick_study
  rows = headline_table(stdout)
  # Active parameters: every arm's tokens pass 64 hidden units per MoE layer, so MoE arms differ
  # from dense only by the router (d_model 32 x E, one MoE layer).
  count = lambda text: int(text.replace(',', ''))
  for arm, experts in (('switch16', 16), ('stmoe8', 8), ('stmoe16', 16)):
    assert count(rows[arm][3]) == count(rows['dense'][3]) + 32 * experts
    assert count(rows[arm][2]) > count(rows[arm][3])
  assert count(rows['dense'][2]) == count(rows['dense'][3])
  with open(os.path.join(root, 'stmoe16', 'eval_20.json')) as f:
    sweep = json.load(f)['capacity_sweep']
  assert [m['eval_capacity_factor'] for m in sweep] == list(study.EVAL_CAPACITY_FACTORS)
  dropped = [m['dropped_fraction'] for m in sweep]
  assert dropped[-1] == 0.0  # Dropless.
  assert all(a >= b for a, b in zip(dropped, dropped[1:]))  # More capacity, fewer drops.
  assert dropped[0] > 0
