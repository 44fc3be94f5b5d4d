"""sweep.py: the product of the axes, dry runs, skipping finished runs, results tables."""

import csv
import json
import os
import subprocess
import sys

import pytest

from stmoe_jax.analysis import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_sweep_py(*flags):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'sweep.py'), *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_dry_run_prints_the_product_in_order(tmp_path):
  result = run_sweep_py('--config=configs/default.py', '--sweep=moe.num_experts=4,8,16',
                        '--sweep=opt.lr=1e-3,3e-3', '--set=num_train_steps=20',
                        f'--root={tmp_path}', '--dry_run')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  expected = [(e, lr) for e in (4, 8, 16) for lr in ('1e-3', '3e-3')]
  assert len(lines) == 6
  for line, (experts, lr) in zip(lines, expected):
    name = f'moe.num_experts={experts}_opt.lr={lr}'
    assert line == (f'python {ROOT}/train.py --config=configs/default.py '
                    f'--workdir={tmp_path}/{name} --config.num_train_steps=20 '
                    f'--config.moe.num_experts={experts} --config.opt.lr={lr}')
  assert os.listdir(tmp_path) == []  # Nothing ran.


@pytest.mark.parametrize('flags,message', [
    (['--sweep=moe.num_expertz=4,8'], "field 'moe.num_expertz' is not a config field"),
    (['--sweep=moe.num_experts'], "'moe.num_experts' is invalid: expected field=value,value..."),
    (['--sweep=opt.lr=1e-3,'], "'opt.lr=1e-3,' is invalid"),
    (['--set=seeed=1'], "field 'seeed' is not a config field"),
])
def test_bad_sweep_fails_before_any_run(flags, message, tmp_path):
  result = run_sweep_py('--config=configs/stmoe.py:size=tiny', f'--root={tmp_path}', *flags)
  assert result.returncode == 1 and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def fake_train(calls, fail=()):
  """A runner that writes what train.py would: config.json and metrics.jsonl."""
  def runner(argv):
    calls.append(argv)
    workdir = next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))
    lr = float(next(a.split('=', 1)[1] for a in argv if a.startswith('--config.opt.lr=')))
    if lr in fail:
      return 1
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({'num_train_steps': 20}, f)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      for record in [{'step': 10, 'kind': 'train', 'loss': 3.0, 'tokens_per_sec': 100.0},
                     {'step': 20, 'kind': 'train', 'loss': 2.0 + lr, 'tokens_per_sec': 300.0},
                     {'step': 20, 'kind': 'eval', 'loss': 1.5 + lr, 'bits_per_byte': 2.5,
                      'accuracy': 0.5}]:
        f.write(json.dumps(record) + '\n')
    return 0
  return runner


def test_sweep_skips_finished_runs_and_writes_results(tmp_path):
  calls = []
  sweeps = ['moe.top_k=1,2', 'opt.lr=0.25,0.5']
  rows = sweep.run_sweep('configs/stmoe.py:size=tiny', sweeps, str(tmp_path),
                         runner=fake_train(calls, fail=(0.5,)))
  assert len(calls) == 4
  assert [r['status'] for r in rows] == ['done', 'failed (1)', 'done', 'failed (1)']
  with open(tmp_path / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [(r['moe.top_k'], r['opt.lr']) for r in table] == [('1', '0.25'), ('1', '0.5'),
                                                            ('2', '0.25'), ('2', '0.5')]
  first = table[0]
  assert first['run'] == 'moe.top_k=1_opt.lr=0.25' and first['status'] == 'done'
  assert float(first['train_loss']) == 2.25 and float(first['eval_loss']) == 1.75
  assert float(first['tokens_per_sec']) == 200.0 and first['step'] == '20'
  markdown = (tmp_path / 'results.md').read_text().splitlines()
  assert markdown[0].startswith('| run | moe.top_k | opt.lr | status | train_loss |')
  assert markdown[2].startswith('| moe.top_k=1_opt.lr=0.25 | 1 | 0.25 | done | 2.25 | 1.75 |')
  # Rerun: the two finished runs are skipped, the failed ones run again.
  calls.clear()
  rows = sweep.run_sweep('configs/stmoe.py:size=tiny', sweeps, str(tmp_path),
                         runner=fake_train(calls))
  assert sorted(c[3] for c in calls) == [f'--workdir={tmp_path}/moe.top_k={k}_opt.lr=0.5'
                                         for k in (1, 2)]
  assert [r['status'] for r in rows] == ['done'] * 4


def test_sweep_runs_train_py(tmp_path, stdlib_data_dir):
  result = run_sweep_py('--config=configs/stmoe.py:size=tiny', '--sweep=moe.top_k=1',
                        f'--set=data.data_dir={stdlib_data_dir}', '--set=num_train_steps=2',
                        '--set=eval_every_steps=2', '--set=eval_batches=1',
                        '--set=eval_sample_tokens=0', f'--root={tmp_path}')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'results.csv') as f:
    (row,) = list(csv.DictReader(f))
  assert row['status'] == 'done' and row['step'] == '2'
  assert 0 < float(row['bits_per_byte']) < 12 and 0 < float(row['eval_loss'])
  with open(tmp_path / 'moe.top_k=1' / 'config.json') as f:
    assert json.load(f)['moe']['top_k'] == 1
