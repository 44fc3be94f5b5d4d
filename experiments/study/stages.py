"""The study's stages in order, each choice made from the previous stages' finished runs.

  1. learning rate per family (plus rates beyond the grid's edge at the full size),
  2. routing options on stmoe64 (full size only),
  3. every arm's main runs and their branches, at the same seeds,
  4. the summary (speedups seed for seed, throughput from the runs' own logs), tables and
     plots (report.py).

Finished runs are skipped (runs.Runner), so rerunning `run_study` resumes it.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import time

import numpy as np

from configs import moe_vs_dense
from experiments.study import analysis
from experiments.study import horizon
from experiments.study import plan
from experiments.study import report
from experiments.study import runs


def load_runs(batch: list[plan.Run], root: str, size: str) -> list[dict]:
  """`runs.load_run` of each run of `batch`, in order."""
  return [runs.load_run(r, root, size) for r in batch]


def edge_extensions(loaded: list[dict], size: str) -> list[plan.Run]:
  """One more rate, a factor of 2 beyond the grid, for each family whose best is at its edge."""
  extra = []
  for arm in (plan.SWEEP_ARMS[fam] for fam in plan.sweep_families(size)):
    batch = sorted((x for x in loaded if x['run'].arm == arm), key=lambda x: x['run'].lr)
    best = min(range(len(batch)), key=lambda i: analysis.final_eval(batch[i]['records'])['loss'])
    if best == 0:
      extra.append(plan.sweep_run(arm, batch[0]['run'].lr / 2, size))
    elif best == len(batch) - 1:
      extra.append(plan.sweep_run(arm, batch[-1]['run'].lr * 2, size))
  return extra


def choose_lr(loaded: list[dict]) -> dict[str, float]:
  """Each family's peak learning rate with the lowest final validation loss."""
  best = {}
  for fam, arm in plan.SWEEP_ARMS.items():
    if not any(x['run'].arm == arm for x in loaded):
      continue  # Not in this size's arms.
    batch = [x for x in loaded if x['run'].arm == arm]
    best[fam] = min(batch, key=lambda x: analysis.final_eval(x['records'])['loss'])['run'].lr
  return best


def tune_learning_rates(runner: runs.Runner, root: str, size: str) -> list[dict]:
  """Stage 1: trains the sweep (and, at the full size, up to two rounds of rates beyond the
  grid's edge); returns the loaded sweep runs."""
  sweeps = plan.sweep_runs(size)
  runner.run_all([[r] for r in sweeps])
  sweep_loaded = load_runs(sweeps, root, size)
  for _ in range(2 if size == 'full' else 0):  # A best rate at the grid's edge may not be best.
    extensions = edge_extensions(sweep_loaded, size)
    runner.run_all([[r] for r in extensions])
    sweep_loaded += load_runs(extensions, root, size)
  return sweep_loaded


def tune_routing(runner: runs.Runner, root: str, size: str, lr: dict[str, float]
                 ) -> tuple[list[dict], dict]:
  """Stage 2: trains the routing options at the tuned MoE rate; returns (the loaded routing
  runs, tuned = {'lr', 'routing' (the best option's name), 'routing_overrides'}), which it
  also writes to root/tuned.json."""
  tuned = {'lr': lr, 'routing': 'group4096', 'routing_overrides': {}}
  routing = plan.routing_runs(size, tuned['lr']['stmoe'])
  runner.run_all([[r] for r in routing])
  routing_loaded = load_runs(routing, root, size)
  if routing_loaded:
    best = min(routing_loaded, key=lambda x: analysis.final_eval(x['records'])['loss'])
    tuned['routing'] = best['run'].name.split('_', 1)[1]
    tuned['routing_overrides'] = dict(best['run'].overrides)
  with open(os.path.join(root, 'tuned.json'), 'w') as f:
    json.dump(tuned, f, indent=1)
  return routing_loaded, tuned


def train_main_runs(runner: runs.Runner, root: str, size: str, tuned: dict) -> dict[str, dict]:
  """Stage 3: every arm's main runs and branches at the size's seeds; returns {run name:
  loaded run}."""
  # The slowest arms start first.
  groups = [plan.main_group(arm, seed, size, tuned)
            for arm in sorted(plan.MAIN_ARMS[size], key=plan.RELATIVE_COST.get, reverse=True)
            for seed in plan.SEEDS[size]]
  runner.run_all(groups)
  return {x['run'].name: x for x in load_runs([r for g in groups for r in g], root, size)}


def best_moe_arm(by_name: dict[str, dict], size: str) -> str:
  """The MoE arm with the lowest final validation loss of its main runs, mean over seeds."""
  seeds = list(plan.SEEDS[size])
  moe_arms = [a for a in plan.MAIN_ARMS[size] if a != 'dense']
  return min(moe_arms, key=lambda a: np.mean(
      [analysis.final_eval(by_name[f'{a}_s{s}']['records'])['loss'] for s in seeds]))


def run_study(root: str, size: str, data_dir: str, cores: list[str]) -> None:
  """Trains (or resumes) every stage of the study of `size` ('full' or 'quick') in `root`, one
  run per core of `cores` at a time, then writes the results (see experiments/moe_vs_dense.py);
  prints the tables."""
  study_start = time.time()
  os.makedirs(root, exist_ok=True)
  runner = runs.Runner(size, root, data_dir, cores)

  sweep_loaded = tune_learning_rates(runner, root, size)
  routing_loaded, tuned = tune_routing(runner, root, size, choose_lr(sweep_loaded))
  by_name = train_main_runs(runner, root, size, tuned)
  best_arm = best_moe_arm(by_name, size)

  arms, seeds = plan.MAIN_ARMS[size], list(plan.SEEDS[size])
  summary = [analysis.arm_summary(by_name, arm, seeds, seeds, size) for arm in arms]
  summary[0]['best_moe_arm'] = best_arm
  main_loaded = [x for x in by_name.values() if x['run'].stage == 'main']
  table, paths = report.write_results(
      root, summary, tuned, sweep_loaded + routing_loaded + list(by_name.values()),
      sweep_loaded, routing_loaded, main_loaded, size)
  print(table)
  print(f'wrote {root}/results.csv, results.md, summary.json, tuned.json, ' +
        ', '.join(map(os.path.basename, paths)))
  print(f'study took {(time.time() - study_start) / 60:.1f} minutes')


@functools.lru_cache(maxsize=None)
def _parameter_counts(arm: str, size: str) -> tuple[int, int]:
  return runs.parameter_counts(moe_vs_dense.get_config(f'arm={arm},size={size}'))


def _loaded_from_rows(run_name: str, rows: list[dict], size: str) -> dict:
  """A run as `runs.load_run` gives it, rebuilt from its results.csv rows: its evaluations, and
  the train records logged at those steps (tokens/s, dropped fraction)."""
  first = rows[0]
  lr = float(first['lr'])
  run = plan.Run(run_name, first['arm'], int(first['seed']), lr, int(first['complete_steps']),
                 first['stage'], branch_of=run_name.rsplit('_n', 1)[0] if first['stage'] ==
                 'branch' else '')
  records = []
  for r in rows:
    records.append({'kind': 'eval', 'step': int(r['step']), 'loss': float(r['val_loss']),
                    'bits_per_byte': float(r['val_bits_per_byte'])})
    train = {k: float(r[k]) for k in ('tokens_per_sec', 'dropped_fraction') if r[k]}
    if train:
      records.append({'kind': 'train', 'step': int(r['step']), **train})
  return runs.loaded_run(run, records, *_parameter_counts(run.arm, size))


def read_tuned(directory: str) -> dict:
  """directory/tuned.json: the tuned rates and routing of a finished study (stages 1-2)."""
  with open(os.path.join(directory, 'tuned.json')) as f:
    return json.load(f)


def complete_seeds(directory: str, root: str, size: str, data_dir: str, cores: list[str]) -> str:
  """Trains, in `root`, the main runs (with their branches) of every arm and seed of
  plan.SEEDS that directory/results.csv lacks, at directory/tuned.json's choices; appends their
  evaluations to results.csv and reanalyzes (`reanalyze`); returns the markdown tables.

  The recorded runs stay as they are: a finished study gains seeds without rerunning them.
  """
  path = os.path.join(directory, 'results.csv')
  with open(path, newline='') as f:
    have = {(r['arm'], int(r['seed'])) for r in csv.DictReader(f) if r['stage'] == 'main'}
  tuned = read_tuned(directory)
  groups = [plan.main_group(arm, seed, size, tuned)
            for arm in sorted(plan.MAIN_ARMS[size], key=plan.RELATIVE_COST.get, reverse=True)
            for seed in plan.SEEDS[size] if (arm, seed) not in have]
  runs.Runner(size, root, data_dir, cores).run_all(groups)
  if groups:
    new = os.path.join(root, 'new_results.csv')
    report.write_csv(load_runs([r for g in groups for r in g], root, size), new)
    with open(new) as f:
      rows = f.readlines()[1:]  # Without the header, which results.csv has.
    with open(path, 'a') as f:
      f.writelines(rows)
  return reanalyze(directory, size)


def reanalyze(directory: str, size: str = 'full') -> str:
  """Rewrites directory/summary.json and results.md from its results.csv and tuned.json with
  the current analysis, over the seeds every arm ran; returns the markdown tables."""
  with open(os.path.join(directory, 'results.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  tuned = read_tuned(directory)
  by_run: dict[str, list[dict]] = {}
  for r in rows:
    by_run.setdefault(r['run'], []).append(r)
  loaded = {name: _loaded_from_rows(name, rs, size) for name, rs in by_run.items()}
  arms = plan.MAIN_ARMS[size]
  seeds_of = {a: {x['run'].seed for x in loaded.values()
                  if x['run'].stage == 'main' and x['run'].arm == a} for a in arms}
  seeds = sorted(set.intersection(*seeds_of.values()))
  summary = [analysis.arm_summary(loaded, arm, seeds, seeds, size) for arm in arms]
  summary[0]['best_moe_arm'] = min(
      (e for e in summary if e['arm'] != 'dense'), key=lambda e: e['final_val_loss_mean'])['arm']
  report.write_summary(directory, summary)
  by_stage = lambda stage: [x for x in loaded.values() if x['run'].stage == stage]
  table = report.markdown(summary, tuned, by_stage('sweep'), by_stage('routing'), size)
  with open(os.path.join(directory, 'results.md'), 'w') as f:
    f.write(table)
  return table


def run_horizon(directory: str, root: str, size: str, data_dir: str, cores: list[str],
                seeds: list[int], command: str) -> str:
  """Trains, in `root`, the horizon runs (horizon.py) of its arms at `seeds` with
  directory/tuned.json's choices; writes directory/horizon.json and horizon.png; returns the
  speedup table. Finished runs are skipped, so rerunning resumes it."""
  tuned = read_tuned(directory)
  groups = [horizon.group(arm, seed, size, tuned) for seed in seeds
            for arm in sorted(horizon.ARMS[size], key=plan.RELATIVE_COST.get, reverse=True)]
  runs.Runner(size, root, data_dir, cores).run_all(groups)
  by_name = {x['run'].name: x for x in load_runs([r for g in groups for r in g], root, size)}
  return horizon.write(horizon.summary(by_name, seeds, size), directory, command)
