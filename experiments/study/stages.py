"""The study's stages in order, each choice made from the previous stages' finished runs.

  1. learning rate per family (plus rates beyond the grid's edge at the full size),
  2. routing options on stmoe64 (full size only),
  3. every arm's main runs and their branches,
  4. a third seed for dense and for the best MoE arm,
  5. each arm's throughput, then the summary, tables and plots (report.py).

Finished runs are skipped (runs.Runner), so rerunning `run_study` resumes it.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from experiments.study import analysis
from experiments.study import plan
from experiments.study import report
from experiments.study import runs


def load_runs(batch: list[plan.Run], root: str, size: str) -> list[dict]:
  """`runs.load_run` of each run of `batch`, in order."""
  return [runs.load_run(r, root, size) for r in batch]


def edge_extensions(loaded: list[dict], size: str) -> list[plan.Run]:
  """One more rate, a factor of 2 beyond the grid, for each family whose best is at its edge."""
  extra = []
  for arm in plan.SWEEP_ARMS.values():
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


def _extra_seed(size: str) -> int:
  return max(plan.SEEDS[size]) + 1


def train_main_runs(runner: runs.Runner, root: str, size: str, tuned: dict) -> dict[str, dict]:
  """Stage 3: every arm's main runs and branches at its seeds, and dense's extra seed (which
  does not wait for the best MoE); returns {run name: loaded run}."""
  arms, seeds = plan.MAIN_ARMS[size], list(plan.SEEDS[size])
  extra_seed = _extra_seed(size)
  # The slowest arms start first.
  groups = [plan.main_group(arm, seed, size, tuned)
            for arm in sorted(arms, key=plan.RELATIVE_COST.get, reverse=True)
            for seed in seeds + ([extra_seed] if arm == 'dense' else [])]
  runner.run_all(groups)
  return {x['run'].name: x for x in load_runs([r for g in groups for r in g], root, size)}


def best_moe_arm(by_name: dict[str, dict], size: str) -> str:
  """The MoE arm with the lowest final validation loss of its main runs, mean over seeds."""
  seeds = list(plan.SEEDS[size])
  moe_arms = [a for a in plan.MAIN_ARMS[size] if a != 'dense']
  return min(moe_arms, key=lambda a: np.mean(
      [analysis.final_eval(by_name[f'{a}_s{s}']['records'])['loss'] for s in seeds]))


def train_extra_seed(runner: runs.Runner, root: str, size: str, tuned: dict, arm: str
                     ) -> dict[str, dict]:
  """Stage 4: `arm`'s main run and branches at the extra seed; returns {run name: loaded run}."""
  extra = [plan.main_group(arm, _extra_seed(size), size, tuned)]
  runner.run_all(extra)
  return {x['run'].name: x for x in load_runs([r for g in extra for r in g], root, size)}


def run_study(root: str, size: str, data_dir: str, cores: list[str],
              best_extra_seed: bool) -> None:
  """Trains (or resumes) every stage of the study of `size` ('full' or 'quick') in `root`, one
  run per core of `cores` at a time, then measures throughput and writes the results (see
  experiments/moe_vs_dense.py); prints the tables."""
  study_start = time.time()
  os.makedirs(root, exist_ok=True)
  runner = runs.Runner(size, root, data_dir, cores)

  sweep_loaded = tune_learning_rates(runner, root, size)
  routing_loaded, tuned = tune_routing(runner, root, size, choose_lr(sweep_loaded))
  by_name = train_main_runs(runner, root, size, tuned)
  best_arm = best_moe_arm(by_name, size)
  if best_extra_seed:
    by_name.update(train_extra_seed(runner, root, size, tuned, best_arm))

  arms, seeds, extra_seed = plan.MAIN_ARMS[size], list(plan.SEEDS[size]), _extra_seed(size)
  seeds_of = {a: seeds + ([extra_seed] if a == 'dense' or (a == best_arm and best_extra_seed)
                          else [])
              for a in arms}
  throughput = runs.measure_throughput(list(arms), size, root, runner.first_core)
  summary = [analysis.arm_summary(by_name, arm, seeds_of[arm], seeds_of['dense'], size,
                                  throughput)
             for arm in arms]
  summary[0]['best_moe_arm'] = best_arm
  main_loaded = [x for x in by_name.values() if x['run'].stage == 'main']
  table, paths = report.write_results(
      root, summary, tuned, sweep_loaded + routing_loaded + list(by_name.values()),
      sweep_loaded, routing_loaded, main_loaded, size)
  print(table)
  print(f'wrote {root}/results.csv, results.md, summary.json, tuned.json, ' +
        ', '.join(map(os.path.basename, paths)))
  print(f'study took {(time.time() - study_start) / 60:.1f} minutes')
