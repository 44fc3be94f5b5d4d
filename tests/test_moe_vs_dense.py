"""experiments/moe_vs_dense.py and its library experiments/study/: the schedule-fair speedup
arithmetic by hand, and the --quick study end to end (its summary recomputed from the runs'
metrics.jsonl with plain loops)."""

import csv
import json
import math
import os
import shutil
import statistics
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


def test_speedups_refuse_unmatched_seeds():
  with pytest.raises(ValueError, match=r'stmoe8 ran seeds \[0, 1\] and dense \[0, 1, 2\]'):
    analysis.arm_summary({}, 'stmoe8', [0, 1], [0, 1, 2], 'full')


def test_committed_summary_is_the_reanalysis_of_the_committed_runs(tmp_path):
  """docs/results/summary.json is what `--reanalyze` computes from results.csv and tuned.json,
  with each horizon arm's speedups from horizon.json."""
  from experiments.study import stages  # pylint: disable=g-import-not-at-top
  results = os.path.join(ROOT, 'docs', 'results')
  for name in ('results.csv', 'tuned.json', 'horizon.json'):
    shutil.copy(os.path.join(results, name), tmp_path / name)
  stages.reanalyze(str(tmp_path))
  with open(tmp_path / 'summary.json') as f, open(os.path.join(results, 'summary.json')) as g:
    ours = json.load(f)
    assert ours == json.load(g)
  with open(tmp_path / 'horizon.json') as f:
    result = json.load(f)
  with_horizon = {e['arm']: e['horizon'] for e in ours if 'horizon' in e}
  assert set(with_horizon) == set(result['arms']) - {'dense'}
  for arm, entry in with_horizon.items():
    assert entry['seeds'] == result['seeds'] and entry['steps'] == result['steps']
    assert entry['per_seed_step_speedup'] == result['arms'][arm]['per_seed_step_speedup']


def test_horizon_branches_start_from_kept_checkpoints():
  """Each branch of a 4N run starts where its own decay starts, on a checkpoint the 4N run
  writes and keeps, and the complete lengths are N/4 .. 4N."""
  from configs import moe_vs_dense  # pylint: disable=g-import-not-at-top
  from experiments.study import horizon  # pylint: disable=g-import-not-at-top
  tuned = {'lr': {'dense': 1e-3, 'stmoe': 6e-3, 'fine': 3e-3},
           'routing_overrides': {'moe.aux_loss_coef': 0.1}}
  for size in ('full', 'quick'):
    n = plan.NUM_STEPS[size]
    assert horizon.lengths(size) == [n // 4, n // 2, n, 2 * n, 4 * n]
    config = moe_vs_dense.get_config(f'arm=dense,size={size}')
    for arm in horizon.ARMS[size]:
      main, *branches = horizon.group(arm, 0, size, tuned)
      assert main.steps == 4 * n and dict(main.overrides)['keep_checkpoints'] >= (
          main.steps // config.checkpoint_every_steps)
      assert ('moe.aux_loss_coef', 0.1) in main.overrides or arm == 'dense'
      assert sorted(b.steps for b in branches) == horizon.lengths(size)[:-1]
      for b in branches:
        assert b.branch_of == main.name and b.seed == 0 and b.lr == main.lr
        start = round(b.steps * (1 - plan.DECAY_FRACTION))
        assert start % config.checkpoint_every_steps == 0, (size, b.name, start)


def test_horizon_speedups_by_hand():
  """horizon.summary on made-up losses: at each horizon, dense's steps over the MoE's steps to
  dense's loss there (linear in log steps), seed for seed; bounds at both ends."""
  from experiments.study import horizon  # pylint: disable=g-import-not-at-top
  steps = horizon.lengths('full')  # 400 .. 6400
  dense = [2.0, 1.8, 1.6, 1.5, 1.4]
  moe = [1.9, 1.7, 1.5, 1.45, 1.42]
  def run(loss, speed):
    return {'records': [{'kind': 'train', 'step': 1, 'tokens_per_sec': speed},
                        {'kind': 'eval', 'step': 1, 'loss': loss}]}
  by_name = {}
  for arm, losses, speed in (('dense', dense, 100.0), ('fine64', moe, 50.0),
                             ('stmoe8', [x + 0.7 for x in dense], 80.0)):
    for i, (n, loss) in enumerate(zip(steps, losses)):
      name = f'horizon/{arm}_s0' + ('' if i == 4 else f'_n{n}')
      by_name[name] = run(loss, speed)
  result = horizon.summary(by_name, [0], 'full')
  fine = result['arms']['fine64']
  # 400: the MoE's 400-step run (1.9) already beats dense's 2.0: 1x is a lower bound.
  # 800: dense 1.8 is halfway (in log steps) between the MoE's 400 (1.9) and 800 (1.7).
  # 1600: 1.6 likewise between 800 and 1600. 3200: 1.5 is the MoE's 1600 run: 2x.
  # 6400: 1.4 is never reached (the MoE ends at 1.42): at most 6400 / 6400.
  expected = [1.0, 800 / math.sqrt(400 * 800), 1600 / math.sqrt(800 * 1600), 2.0, 1.0]
  assert fine['step_speedup'] == pytest.approx(expected, abs=1e-3)
  assert fine['per_seed_bound'] == [['lower', '', '', '', 'upper']]
  assert fine['time_speedup'] == pytest.approx([x * 0.5 for x in expected], abs=1e-3)
  # Growth per doubling of tokens: a line through the three interpolated horizons (800, 1600,
  # 3200: one doubling apart), slope (last - first) / 2; 2x from the 4N mean (1.0) at that rate.
  slope = (2.0 - math.sqrt(2)) / 2
  assert fine['step_speedup_per_doubling'] == pytest.approx(slope, abs=1e-3)
  assert fine['doublings_to_2x'] == pytest.approx(1.0 / slope, abs=0.05)
  # Its best (2.1) never reaches dense's shortest run (2.0): only upper bounds.
  assert result['arms']['stmoe8']['per_seed_bound'] == [['upper'] * 5]
  assert result['arms']['stmoe8']['step_speedup_per_doubling'] is None
  assert result['tokens'] == [n * 64 * 64 for n in steps]
  assert '2.00x' in horizon.markdown(result)


@pytest.fixture(scope='module')
def quick_study(stdlib_data_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp('moe_vs_dense'))
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'moe_vs_dense.py'),
                           '--quick', f'--root={root}', f'--data_dir={stdlib_data_dir}',
                           '--cores=0,1' if (os.cpu_count() or 1) >= 2 else '--cores='],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return root, result.stdout


def records(root, name):
  with open(os.path.join(root, name, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def final_loss(root, name, steps):
  evals = [r for r in records(root, name) if r['kind'] == 'eval']
  assert evals[-1]['step'] == steps, (name, evals[-1])
  return evals[-1]['loss']


def test_quick_study_writes_every_result(quick_study):
  root, stdout = quick_study
  for name in ('results.csv', 'results.md', 'summary.json', 'tuned.json', 'loss_curves.png',
               'experts.png'):
    assert os.path.getsize(os.path.join(root, name)) > 0, name
  with open(os.path.join(root, 'results.md')) as f:
    assert f.read() in stdout
  with open(os.path.join(root, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  runs = {r['run'] for r in rows}
  # Sweep: the quick arms' 2 families x 2 rates; main: 2 arms x the same 2 seeds, each main run
  # with its two branches.
  assert len([r for r in runs if r.startswith('sweep/')]) == 4
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
  for family in ('dense', 'stmoe'):
    arm = plan.SWEEP_ARMS[family]
    losses = {lr: final_loss(root, f'sweep/{arm}_lr{lr:g}', 20) for lr in plan.SWEEP_LRS['quick']}
    assert tuned['lr'][family] == min(losses, key=losses.get)
  lengths = [5, 10, 20]

  def complete(arm, seed):
    return [final_loss(root, name, n) for name, n in
            ((f'{arm}_s{seed}_n5', 5), (f'{arm}_s{seed}_n10', 10), (f'{arm}_s{seed}', 20))]

  def speedup(dense, moe):  # A plain loop over the complete runs, linear in log steps.
    target = dense[-1]
    for i, loss in enumerate(moe):
      if loss <= target:
        if i == 0:
          return 20 / 5
        t = (moe[i - 1] - target) / (moe[i - 1] - loss)
        return 20 / math.exp(math.log(lengths[i - 1]) +
                             t * (math.log(lengths[i]) - math.log(lengths[i - 1])))
    for i, loss in enumerate(dense):  # Dense's steps to the MoE's final loss, over 20.
      if loss <= moe[-1]:
        if i == 0:
          return 5 / 20
        t = (dense[i - 1] - moe[-1]) / (dense[i - 1] - loss)
        return math.exp(math.log(lengths[i - 1]) +
                        t * (math.log(lengths[i]) - math.log(lengths[i - 1]))) / 20
    return 5 / 20

  per_seed = [speedup(complete('dense', s), complete('stmoe16', s)) for s in (0, 1)]
  moe_final = [complete('stmoe16', s)[-1] for s in (0, 1)]
  entry = summary['stmoe16']
  assert entry['per_seed_step_speedup'] == pytest.approx(per_seed, abs=1e-3)
  assert entry['step_speedup'] == pytest.approx(sum(per_seed) / 2, abs=1e-3)
  assert entry['final_val_loss_mean'] == pytest.approx(sum(moe_final) / 2, abs=1e-5)
  assert summary['dense']['step_speedup'] == pytest.approx(1.0)
  assert entry['seeds'] == summary['dense']['seeds'] == [0, 1]
  # Time speedup: seed for seed, step speedup x the runs' own median tokens/s over dense's.
  speeds = {(arm, seed): statistics.median(
      r['tokens_per_sec'] for r in records(root, f'{arm}_s{seed}')
      if r['kind'] == 'train' and 'tokens_per_sec' in r)
            for arm in ('dense', 'stmoe16') for seed in (0, 1)}
  per_seed_time = [entry['per_seed_step_speedup'][s] * speeds['stmoe16', s] / speeds['dense', s]
                   for s in (0, 1)]
  assert entry['per_seed_time_speedup'] == pytest.approx(per_seed_time, abs=2e-3)
  assert entry['time_speedup'] == pytest.approx(sum(per_seed_time) / 2, abs=2e-3)
  # Equal active parameters: the MoE differs from dense only by its router (d_model 32 x 16).
  assert entry['active_params'] == summary['dense']['active_params'] + 32 * 16
  assert entry['params'] > entry['active_params']


def test_complete_seeds_adds_the_missing_seed_and_reanalyzes(quick_study, tmp_path):
  """A records directory missing stmoe16's seed 1 gets it back from the runs (trained already,
  so nothing trains), and the reanalysis then equals the study's own summary."""
  from experiments.study import stages  # pylint: disable=g-import-not-at-top
  root, _ = quick_study
  with open(os.path.join(root, 'results.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  kept = [r for r in rows if not (r['arm'] == 'stmoe16' and r['seed'] == '1' and
                                  r['stage'] in ('main', 'branch'))]
  assert len(kept) < len(rows)
  with open(tmp_path / 'results.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(kept)
  shutil.copy(os.path.join(root, 'tuned.json'), tmp_path / 'tuned.json')
  stages.reanalyze(str(tmp_path), 'quick')  # Only the seeds every arm ran: 0.
  with open(tmp_path / 'summary.json') as f:
    assert [e['seeds'] for e in json.load(f)] == [[0], [0]]
  stages.complete_seeds(str(tmp_path), root, 'quick', '', [])
  with open(tmp_path / 'summary.json') as f, open(os.path.join(root, 'summary.json')) as g:
    ours, theirs = json.load(f), json.load(g)
  for a, b in zip(ours, theirs):
    assert a['seeds'] == b['seeds'] == [0, 1]
    for key in ('per_seed_step_speedup', 'final_val_loss_mean', 'step_speedup'):
      # results.csv keeps losses to 5 decimals.
      assert a[key] == pytest.approx(b[key], abs=2e-5), (a['arm'], key)
