r"""Does sparsity pay here? MoE vs dense at equal active FLOPs, with the ST-MoE ablations.

  python experiments/moe_vs_dense.py --root=runs/moe_vs_dense          # about 1 hour, 2 CPU cores
  python experiments/moe_vs_dense.py --root=/tmp/mvd --quick           # smoke test, about 1 minute

Trains `RUNS` (the arms of configs/moe_vs_dense.py, plus seeds and ablations) one after another
in this process (runs with the same seed see the same batches in the same order; the seed
also sets the initialisation), then evaluates the final stmoe16
checkpoint at several eval capacity factors. A run whose final evaluation is logged is skipped,
so rerunning resumes the study. Writes to --root:
  results.csv      one row per run and evaluation: step, wall seconds since the run started,
                   validation loss and bits/byte, and the run's train telemetry at that step;
  results.md       the headline table (step speedup over dense), the ablations, the eval
                   capacity sweep;
  moe_vs_dense.png validation loss vs step and vs wall time of the headline arms;
  ablations.png    router z-loss on/off, train capacity factor, eval capacity factor.

The step speedup of an arm is (steps dense needs to reach its final validation loss) / (steps the
arm needs to reach that loss), reading the first crossing on each validation curve (linear
between evaluations). Arms with two seeds use their mean curve.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=g-import-not-at-top

from configs import moe_vs_dense  # pylint: disable=g-import-not-at-top
from stmoe_jax import sweep  # pylint: disable=g-import-not-at-top  (imports no JAX)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a study arm with a seed and config overrides (dotted field: value)."""
  name: str
  arm: str
  seed: int = 0
  overrides: tuple[tuple[str, object], ...] = ()
  note: str = ''


RUNS = (
    Run('dense', 'dense'),
    Run('dense_seed1', 'dense', seed=1),
    Run('switch16', 'switch16'),
    Run('stmoe8', 'stmoe8'),
    Run('stmoe16', 'stmoe16'),
    Run('stmoe16_seed1', 'stmoe16', seed=1),
    Run('stmoe16_no_z_loss', 'stmoe16', overrides=(('moe.z_loss_coef', 0.0),),
        note='router z-loss off'),
    Run('stmoe16_train_cf1.0', 'stmoe16', overrides=(('moe.train_capacity_factor', 1.0),),
        note='train capacity factor 1.0'),
    Run('stmoe16_train_cf2.0', 'stmoe16', overrides=(('moe.train_capacity_factor', 2.0),),
        note='train capacity factor 2.0'),
)
HEADLINE_ARMS = ('dense', 'switch16', 'stmoe8', 'stmoe16')
EVAL_CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0, 'dropless')
SWEEP_RUN = 'stmoe16'  # The checkpoint the eval capacity sweep reads.


def run_config(run: Run, size: str, data_dir: str = ''):
  """The ConfigDict of `run` at `size` ('full' or 'quick'), reading TFDS data from `data_dir`
  ('' = the TFDS default)."""
  config = moe_vs_dense.get_config(f'arm={run.arm},size={size}')
  config.seed = run.seed
  config.data.data_dir = data_dir
  for field, value in run.overrides:
    *parents, leaf = field.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


# ---------------------------------------------------------------------------------------------
# Analysis: plain numpy over the metrics.jsonl records, so tests can check it against hand values.


def steps_to_reach(steps, losses, target: float) -> float | None:
  """The first step at which the curve (linear between points) reaches `target`, or None.

  Args:
    steps: [N] increasing evaluation steps.
    losses: [N] validation losses at those steps.
    target: the loss to reach.
  """
  steps, losses = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
  below = np.nonzero(losses <= target)[0]
  if not len(below):
    return None
  i = int(below[0])
  if i == 0:
    return float(steps[0])
  # The segment from point i-1 (above the target) to point i (at or below it).
  fraction = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
  return float(steps[i - 1] + fraction * (steps[i] - steps[i - 1]))


def eval_curve(records: list[dict], start_time: float) -> dict[str, np.ndarray]:
  """Validation curve of one run: step, wall seconds since `start_time`, loss, bits/byte."""
  evals = [r for r in records if r['kind'] == 'eval']
  return {'step': np.array([r['step'] for r in evals], np.float64),
          'wall_s': np.array([r['wall_time'] - start_time for r in evals]),
          'loss': np.array([r['loss'] for r in evals]),
          'bits_per_byte': np.array([r['bits_per_byte'] for r in evals])}


def mean_curve(curves: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Elementwise mean of curves evaluated at the same steps (seeds of one arm)."""
  for curve in curves[1:]:
    if not np.array_equal(curve['step'], curves[0]['step']):
      raise ValueError(f"seeds evaluated at different steps: {curves[0]['step']} vs "
                       f"{curve['step']}")
  return {key: np.mean([c[key] for c in curves], axis=0) for key in curves[0]}


def speedup(reference: dict[str, np.ndarray], curve: dict[str, np.ndarray],
            axis: str = 'step') -> tuple[float | None, float | None]:
  """(amount of `axis` the curve needs to reach the reference's final loss, speedup).

  The speedup is what the reference needs to reach its own final loss divided by what `curve`
  needs; None when `curve` never gets there.
  """
  target = reference['loss'][-1]
  needed_ref = steps_to_reach(reference[axis], reference['loss'], target)
  needed = steps_to_reach(curve[axis], curve['loss'], target)
  return needed, (None if needed is None else needed_ref / needed)


# ---------------------------------------------------------------------------------------------
# Running.


def train_run(run: Run, size: str, root: str, data_dir: str = '') -> None:
  """Trains `run` in `root/<name>` unless it finished before; records its start time."""
  from stmoe_jax import train_lib  # pylint: disable=g-import-not-at-top

  config = run_config(run, size, data_dir)
  workdir = os.path.join(root, run.name)
  if sweep.is_finished(workdir):
    print(f'{run.name}: finished before, skipped', flush=True)
    return
  os.makedirs(workdir, exist_ok=True)
  timing = os.path.join(workdir, 'study_start.json')
  if not os.path.exists(timing):  # A resumed run keeps its first start (its wall axis has a gap).
    with open(timing, 'w') as f:
      json.dump({'start_time': time.time()}, f)
  print(f'{run.name}: training ({run.arm}, seed {run.seed}, {dict(run.overrides)})', flush=True)
  train_lib.train_and_evaluate(config, workdir)


def capacity_sweep(root: str, size: str) -> list[dict]:
  """Eval capacity sweep of the final SWEEP_RUN checkpoint (cached in eval_<step>.json)."""
  from stmoe_jax import entry_points  # pylint: disable=g-import-not-at-top

  config = run_config(next(r for r in RUNS if r.name == SWEEP_RUN), size)
  workdir = os.path.join(root, SWEEP_RUN)
  path = os.path.join(workdir, f'eval_{config.num_train_steps}.json')
  if os.path.exists(path):
    with open(path) as f:
      metrics = json.load(f)
    if [r['eval_capacity_factor'] for r in metrics.get('capacity_sweep', [])] == list(
        EVAL_CAPACITY_FACTORS):
      return metrics['capacity_sweep']
  metrics = entry_points.evaluate_workdir(workdir, config.num_train_steps, config.eval_batches,
                                      EVAL_CAPACITY_FACTORS)
  return metrics['capacity_sweep']


# ---------------------------------------------------------------------------------------------
# Reporting.


def run_summary(run: Run, root: str, size: str) -> dict:
  """Curve and scalar telemetry of one finished run."""
  workdir = os.path.join(root, run.name)
  records = sweep.read_records(workdir)
  with open(os.path.join(workdir, 'study_start.json')) as f:
    start = json.load(f)['start_time']
  train = [r for r in records if r['kind'] == 'train']
  speeds = [r['tokens_per_sec'] for r in train if 'tokens_per_sec' in r]
  return {
      'run': run, 'records': records, 'curve': eval_curve(records, start),
      'tokens_per_sec': float(np.mean(speeds)) if speeds else float('nan'),
      'max_router_logit': max((r.get('max_router_logit', 0.0) for r in train), default=0.0),
      'loss_spikes': max((r.get('loss_spikes', 0) for r in train), default=0),
      'final_train': train[-1] if train else {},
      'config': run_config(run, size),
  }


def parameter_counts(config) -> tuple[int, int]:
  """(total parameters, parameters a token's forward pass uses), embeddings included."""
  import jax  # pylint: disable=g-import-not-at-top
  from stmoe_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from stmoe_jax import model_factory  # pylint: disable=g-import-not-at-top

  model_cfg = config_lib.model_config(config)
  _, params, _ = model_factory.get_model(model_cfg).abstract()
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  moe = model_cfg.moe
  if not moe.enabled:
    return total, total
  num_moe_layers = sum(map(moe.is_moe_layer, range(model_cfg.num_layers)))
  matrices = 2 if model_cfg.activation == 'gelu' else 3  # GEGLU: two input matrices.
  per_expert = (matrices * model_cfg.d_model * moe.expert_d_ff +
                moe.expert_d_ff * (model_cfg.activation == 'geglu_mult_bias'))
  inactive = num_moe_layers * (moe.num_experts - moe.top_k) * per_expert
  return total, total - inactive


def write_csv(summaries: list[dict], path: str) -> None:
  columns = ['run', 'arm', 'seed', 'note', 'step', 'wall_s', 'val_loss', 'val_bits_per_byte',
             'train_loss', 'max_router_logit', 'dropped_fraction', 'max_expert_load',
             'tokens_per_sec']
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for s in summaries:
      run, curve = s['run'], s['curve']
      train_at = {r['step']: r for r in s['records'] if r['kind'] == 'train'}
      for i, step in enumerate(curve['step']):
        t = train_at.get(int(step), {})
        writer.writerow({
            'run': run.name, 'arm': run.arm, 'seed': run.seed, 'note': run.note,
            'step': int(step), 'wall_s': round(float(curve['wall_s'][i]), 1),
            'val_loss': f"{curve['loss'][i]:.5f}",
            'val_bits_per_byte': f"{curve['bits_per_byte'][i]:.5f}",
            **{k: (f'{t[k]:.5g}' if k in t else '') for k in (
                'max_router_logit', 'dropped_fraction', 'max_expert_load', 'tokens_per_sec')},
            'train_loss': f"{t['cross_entropy']:.5f}" if 'cross_entropy' in t else ''})


def _fmt(value, spec: str, none: str = 'not reached') -> str:
  return none if value is None else format(value, spec)


def headline_rows(summaries: list[dict]) -> list[dict]:
  """One row per headline arm: seeds, final loss, steps/time to dense's final loss, speedups."""
  by_arm = {arm: [s for s in summaries if s['run'].arm == arm and not s['run'].overrides]
            for arm in HEADLINE_ARMS}
  dense = mean_curve([s['curve'] for s in by_arm['dense']])
  rows = []
  for arm, runs in by_arm.items():
    curve = mean_curve([s['curve'] for s in runs])
    steps, step_speedup = speedup(dense, curve, 'step')
    wall, time_speedup = speedup(dense, curve, 'wall_s')
    per_seed = []
    if len(runs) > 1 and arm != 'dense':  # Seed s of this arm against seed s of dense.
      for s in runs:
        ref = next((d for d in by_arm['dense'] if d['run'].seed == s['run'].seed), None)
        if ref is not None:
          per_seed.append(speedup(ref['curve'], s['curve'], 'step')[1])
    total, active = parameter_counts(runs[0]['config'])
    finals = [s['curve']['loss'][-1] for s in runs]
    rows.append({
        'arm': arm, 'seeds': ','.join(str(s['run'].seed) for s in runs),
        'params': total, 'active_params': active,
        'final_val_loss': float(np.mean(finals)),
        'final_val_loss_spread': float(np.max(finals) - np.min(finals)),
        'final_bits_per_byte': float(curve['bits_per_byte'][-1]),
        'steps_to_dense_final': steps, 'step_speedup': step_speedup,
        'per_seed_step_speedup': per_seed,
        'wall_s_to_dense_final': wall, 'time_speedup': time_speedup,
        'tokens_per_sec': float(np.mean([s['tokens_per_sec'] for s in runs])),
    })
  return rows


def markdown(rows: list[dict], summaries: list[dict], sweep: list[dict], size: str) -> str:
  """The three results tables as markdown."""
  steps = int(summaries[0]['curve']['step'][-1])
  lines = [f'Headline ({size} size, {steps} steps; dense target = mean dense final validation '
           f'loss {rows[0]["final_val_loss"]:.4f} nats/byte):', '',
           '| arm | seeds | params | active params | final val loss | bits/byte | steps to dense '
           'final | step speedup | per-seed | wall s to dense final | time speedup | tokens/s |',
           '|' + '---|' * 12]
  for r in rows:
    spread = f" ± {r['final_val_loss_spread'] / 2:.4f}" if ',' in r['seeds'] else ''
    per_seed = ', '.join(_fmt(x, '.2f', '<1') for x in r['per_seed_step_speedup']) or '-'
    lines.append(
        f"| {r['arm']} | {r['seeds']} | {r['params']:,} | {r['active_params']:,}"
        f" | {r['final_val_loss']:.4f}{spread} | {r['final_bits_per_byte']:.3f}"
        f" | {_fmt(r['steps_to_dense_final'], '.0f')} | {_fmt(r['step_speedup'], '.2f', '<1')}x"
        f" | {per_seed} | {_fmt(r['wall_s_to_dense_final'], '.0f')}"
        f" | {_fmt(r['time_speedup'], '.2f', '<1')}x | {r['tokens_per_sec']:,.0f} |")
  base = next(s for s in summaries if s['run'].name == SWEEP_RUN)
  ablations = [base] + [s for s in summaries if s['run'].overrides]
  lines += ['', 'Ablations (stmoe16, seed 0; "router z" is the z-loss term, mean logsumexp^2 of '
            'the router logits summed over MoE layers, and "dropped" the share of token-choices '
            'over capacity, both over the last 50 steps; "max router logit" is the largest '
            '|logit| of any step; "spikes" counts steps whose loss exceeded 2x the median of '
            'the 32 before):', '',
            '| run | change | final val loss | bits/byte | router z | max router logit | '
            'loss spikes | dropped | tokens/s |', '|' + '---|' * 9]
  for s in ablations:
    t = s['final_train']
    lines.append(
        f"| {s['run'].name} | {s['run'].note or 'none (z-loss 1e-3, train CF 1.25)'}"
        f" | {s['curve']['loss'][-1]:.4f} | {s['curve']['bits_per_byte'][-1]:.3f}"
        f" | {t.get('z_loss', float('nan')):.2f} | {s['max_router_logit']:.2f}"
        f" | {s['loss_spikes']}"
        f" | {t.get('dropped_fraction', float('nan')):.4f} | {s['tokens_per_sec']:,.0f} |")
  lines += ['', f'Eval capacity factor sweep ({SWEEP_RUN} final checkpoint, trained at 1.25):',
            '', '| eval capacity factor | val loss | bits/byte | dropped fraction |',
            '|---|---|---|---|']
  for m in sweep:
    lines.append(f"| {m['eval_capacity_factor']} | {m['loss']:.4f} | {m['bits_per_byte']:.4f}"
                 f" | {m['dropped_fraction']:.4f} |")
  return '\n'.join(lines) + '\n'


def plot(summaries: list[dict], sweep: list[dict], root: str) -> list[str]:
  """Writes moe_vs_dense.png and ablations.png; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  colors = dict(zip(HEADLINE_ARMS, ('k', 'C0', 'C1', 'C3')))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for s in summaries:
    run, curve = s['run'], s['curve']
    if run.overrides:
      continue
    style = '-o' if run.seed == 0 else '--'
    label = run.arm + (f' (seed {run.seed})' if run.seed else '')
    axes[0].plot(curve['step'], curve['loss'], style, color=colors[run.arm], markersize=3,
                 label=label)
    axes[1].plot(curve['wall_s'] / 60, curve['loss'], style, color=colors[run.arm],
                 markersize=3, label=label)
  target = np.mean([s['curve']['loss'][-1] for s in summaries
                    if s['run'].arm == 'dense' and not s['run'].overrides])
  for ax in axes:
    ax.axhline(target, color='gray', lw=0.8, ls=':')
    ax.grid(alpha=0.3)
  axes[0].set_xlabel('train step')
  axes[1].set_xlabel('wall time (minutes, incl. compilation and evals)')
  axes[0].set_ylabel('validation loss (nats/byte)')
  axes[1].legend(fontsize=8)
  lo = min(float(np.min(s['curve']['loss'])) for s in summaries)
  axes[0].set_ylim(lo - 0.05, lo + 1.0)  # The early steps would squash the end of the curves.
  fig.suptitle('MoE vs dense at equal active FLOPs (dotted: dense final loss)')
  fig.tight_layout()
  paths = [os.path.join(root, 'moe_vs_dense.png')]
  fig.savefig(paths[0], dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  by_name = {s['run'].name: s for s in summaries}
  for name, label in ((SWEEP_RUN, 'z-loss 1e-3'), ('stmoe16_no_z_loss', 'no z-loss')):
    train = [r for r in by_name[name]['records'] if r['kind'] == 'train']
    axes[0].plot([r['step'] for r in train], [r.get('z_loss', np.nan) for r in train],
                 '-o', markersize=3, label=label)
  axes[0].set(xlabel='train step', ylabel='router z: mean logsumexp^2, summed over layers',
              title='Router z-loss', yscale='log')
  for name, label in (('stmoe16_train_cf1.0', 'train CF 1.0'), (SWEEP_RUN, 'train CF 1.25'),
                      ('stmoe16_train_cf2.0', 'train CF 2.0')):
    curve = by_name[name]['curve']
    axes[1].plot(curve['wall_s'] / 60, curve['loss'], '-o', markersize=3, label=label)
  axes[1].set(xlabel='wall time (minutes)', ylabel='validation loss', title='Train capacity')
  axes[1].set_ylim(lo - 0.05, lo + 1.0)
  factors = [str(m['eval_capacity_factor']) for m in sweep]
  axes[2].bar(factors, [m['bits_per_byte'] for m in sweep], color='C3')
  low = min(m['bits_per_byte'] for m in sweep)
  axes[2].set_ylim(low - 0.05, max(m['bits_per_byte'] for m in sweep) + 0.02)
  axes[2].set(xlabel='eval capacity factor', ylabel='validation bits/byte',
              title=f'Eval capacity ({SWEEP_RUN}, trained at 1.25)')
  for ax in axes[:2]:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(root, 'ablations.png'))
  fig.savefig(paths[1], dpi=110)
  plt.close(fig)
  return paths


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', default='runs/moe_vs_dense', help='Directory for runs, results.')
  parser.add_argument('--quick', action='store_true', help='Tiny model, 20 steps: smoke test.')
  parser.add_argument('--data_dir', default='', help="TFDS data dir ('' = the TFDS default).")
  args = parser.parse_args(argv)
  size = 'quick' if args.quick else 'full'
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  study_start = time.time()
  for run in RUNS:
    train_run(run, size, args.root, args.data_dir)
  sweep = capacity_sweep(args.root, size)
  summaries = [run_summary(run, args.root, size) for run in RUNS]
  rows = headline_rows(summaries)
  write_csv(summaries, os.path.join(args.root, 'results.csv'))
  table = markdown(rows, summaries, sweep, size)
  with open(os.path.join(args.root, 'results.md'), 'w') as f:
    f.write(table)
  paths = plot(summaries, sweep, args.root)
  print(table)
  print(f'wrote {args.root}/results.csv, results.md, ' + ', '.join(map(os.path.basename, paths)))
  print(f'study took {(time.time() - study_start) / 60:.1f} minutes')


if __name__ == '__main__':
  main()
