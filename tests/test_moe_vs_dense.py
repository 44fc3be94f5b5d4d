"""experiments/moe_vs_dense.py and its library experiments/study/: the schedule-fair speedup
arithmetic by hand, and the --quick study end to end (its summary recomputed from the runs'
metrics.jsonl with plain loops)."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from experiments.study import analysis
from experiments.study import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interpolation_is_linear_in_log_steps():
  steps, losses = [400, 800, 1600], [2.0, 1.8, 1.7]
  # 1.9 is halfway from 400 to 800 in log steps: sqrt(400 * 800).
  assert analysis.interpolate_log_steps(steps, losses, 1.9) == pytest.approx(math.sqrt(400 * 800))
  assert analysis.interpolate_log_steps(steps, losses, 1.8) == pytest.approx(800)
  assert analysis.interpolate_log_steps(steps, losses, 2.5) == 400  # The shortest run gets there.
  assert analysis.interpolate_log_steps(steps, losses, 1.6) is None


def test_step_speedup_from_complete_runs():
  lengths = [400, 800, 1600]
  dense = [2.0, 1.8, 1.7]
  # The MoE's 800-step run reaches dense's 1600-step loss exactly: 2x.
  assert analysis.steps_to_match(lengths, dense, lengths, [1.9, 1.7, 1.6]) == (
      pytest.approx(2.0), False)
  # Its 400-step run already does: 4x is only a lower bound.
  assert analysis.steps_to_match(lengths, dense, lengths, [1.65, 1.6, 1.5]) == (
      pytest.approx(4.0), True)
  # It never gets there; its final 1.9 is dense's at sqrt(400 * 800) steps: speedup < 1.
  speedup, bound = analysis.steps_to_match(lengths, dense, lengths, [2.1, 2.0, 1.9])
  assert speedup == pytest.approx(math.sqrt(400 * 800) / 1600) and not bound


@pytest.fixture(scope='module')
def quick_study(stdlib_data_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp('moe_vs_dense'))
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'moe_vs_dense.py'),
                           '--quick', f'--root={root}', f'--data_dir={stdlib_data_dir}',
                           '--cores=0,1' if (os.cpu_count() or 1) >= 2 else '--cores='],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return root, result.stdout


def final_loss(root, name, steps):
  with open(os.path.join(root, name, 'metrics.jsonl')) as f:
    evals = [r for r in map(json.loads, f) if r['kind'] == 'eval']
  assert evals[-1]['step'] == steps, (name, evals[-1])
  return evals[-1]['loss']


def test_quick_study_writes_every_result(quick_study):
  root, stdout = quick_study
  for name in ('results.csv', 'results.md', 'summary.json', 'tuned.json', 'throughput.json',
               'loss_curves.png', 'experts.png'):
    assert os.path.getsize(os.path.join(root, name)) > 0, name
  with open(os.path.join(root, 'results.md')) as f:
    assert f.read() in stdout
  with open(os.path.join(root, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  runs = {r['run'] for r in rows}
  # Sweep: 4 families x 2 rates; main: 2 arms x seed 0, then seed 1 for dense and the best MoE;
  # each main run with its two branches.
  assert len([r for r in runs if r.startswith('sweep/')]) == 8
  for arm in ('dense', 'stmoe16'):
    for seed in (0, 1):
      assert {f'{arm}_s{seed}', f'{arm}_s{seed}_n5', f'{arm}_s{seed}_n10'} <= runs
  # A branch evaluates only at its own end; a main run every 10 steps.
  assert [int(r['step']) for r in rows if r['run'] == 'dense_s0_n5'] == [5]
  assert [int(r['step']) for r in rows if r['run'] == 'dense_s0'] == [10, 20]


def test_quick_study_summary_matches_the_logged_losses(quick_study):
  """summary.json's speedups, recomputed from each run's metrics.jsonl by hand."""
  root, _ = quick_study
  with open(os.path.join(root, 'summary.json')) as f:
    summary = {e['arm']: e for e in json.load(f)}
  with open(os.path.join(root, 'tuned.json')) as f:
    tuned = json.load(f)
  # The chosen rate of each family is its sweep's best.
  for family, arm in plan.SWEEP_ARMS.items():
    losses = {lr: final_loss(root, f'sweep/{arm}_lr{lr:g}', 20) for lr in plan.SWEEP_LRS['quick']}
    assert tuned['lr'][family] == min(losses, key=losses.get)
  lengths = [5, 10, 20]

  def complete(arm, seed):
    return [final_loss(root, name, n) for name, n in
            ((f'{arm}_s{seed}_n5', 5), (f'{arm}_s{seed}_n10', 10), (f'{arm}_s{seed}', 20))]

  dense = [sum(x) / 2 for x in zip(complete('dense', 0), complete('dense', 1))]
  moe = [sum(x) / 2 for x in zip(complete('stmoe16', 0), complete('stmoe16', 1))]
  target = dense[-1]
  # A plain loop over the complete runs, linear in log steps.
  expected = None
  for i, loss in enumerate(moe):
    if loss <= target:
      if i == 0:
        expected = 20 / 5
      else:
        t = (moe[i - 1] - target) / (moe[i - 1] - loss)
        expected = 20 / math.exp(math.log(lengths[i - 1]) +
                                 t * (math.log(lengths[i]) - math.log(lengths[i - 1])))
      break
  if expected is None:  # Dense's steps to the MoE's final loss, over 20.
    for i, loss in enumerate(dense):
      if loss <= moe[-1]:
        if i == 0:
          expected = 5 / 20
        else:
          t = (dense[i - 1] - moe[-1]) / (dense[i - 1] - loss)
          expected = math.exp(math.log(lengths[i - 1]) +
                              t * (math.log(lengths[i]) - math.log(lengths[i - 1]))) / 20
        break
  entry = summary['stmoe16']
  assert entry['step_speedup'] == pytest.approx(expected, abs=1e-3)
  assert entry['final_val_loss_mean'] == pytest.approx(moe[-1], abs=1e-5)
  assert entry['time_speedup'] == pytest.approx(
      entry['step_speedup'] * entry['tokens_per_sec'] / summary['dense']['tokens_per_sec'],
      rel=1e-2)
  assert summary['dense']['step_speedup'] == pytest.approx(1.0)
  assert len(entry['per_seed_step_speedup']) == 2
  # Equal active parameters: the MoE differs from dense only by its router (d_model 32 x 16).
  assert entry['active_params'] == summary['dense']['active_params'] + 32 * 16
  assert entry['params'] > entry['active_params']
