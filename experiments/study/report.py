"""The study's result files: results.csv (every evaluation of every run), results.md (the
tables) and the plots loss_curves.png and experts.png."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from configs import moe_vs_dense
from experiments.study import analysis
from experiments.study import horizon
from experiments.study import plan


def write_csv(loaded: list[dict], path: str) -> None:
  """results.csv: one row per evaluation of every loaded run (its stage, arm, seed, rate and
  length; the step's validation loss, and the train loss, dropped fraction and tokens/s logged
  at that step, if any)."""
  columns = ['run', 'stage', 'arm', 'seed', 'lr', 'complete_steps', 'step', 'wall_s',
             'val_loss', 'val_bits_per_byte', 'train_loss', 'dropped_fraction', 'tokens_per_sec']
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for item in loaded:
      run, records = item['run'], item['records']
      start = min((r['wall_time'] for r in records), default=0.0)
      train_at = {r['step']: r for r in records if r['kind'] == 'train'}
      for r in records:
        if r['kind'] != 'eval':
          continue
        t = train_at.get(r['step'], {})
        writer.writerow({
            'run': run.name, 'stage': run.stage, 'arm': run.arm, 'seed': run.seed,
            'lr': run.lr, 'complete_steps': run.steps, 'step': r['step'],
            'wall_s': round(r['wall_time'] - start, 1), 'val_loss': f"{r['loss']:.5f}",
            'val_bits_per_byte': f"{r['bits_per_byte']:.5f}",
            'train_loss': f"{t['cross_entropy']:.5f}" if 'cross_entropy' in t else '',
            'dropped_fraction': f"{t['dropped_fraction']:.5g}" if 'dropped_fraction' in t else '',
            'tokens_per_sec': f"{t['tokens_per_sec']:.0f}" if 'tokens_per_sec' in t else ''})


def _speedup_text(entry: dict, key: str) -> str:
  bound = '>= ' if entry.get('step_speedup_is_lower_bound') else ''
  return f'{bound}{entry[key]:.2f}x'


def markdown(summary: list[dict], tuned: dict, sweep_loaded: list[dict],
             routing_loaded: list[dict], size: str) -> str:
  """The results tables as markdown."""
  steps = plan.NUM_STEPS[size]
  dense = next(e for e in summary if e['arm'] == 'dense')
  lines = [f'Headline ({size} size, complete runs of {steps // 4}, {steps // 2} and {steps} '
           f'steps; dense target = mean final validation loss of dense at {steps} steps, '
           f"{dense['final_val_loss_mean']:.4f} nats/byte):", '',
           '| arm | seeds | lr | params | active params | final val loss (mean ± half spread) '
           '| bits/byte | step speedup | per seed | time speedup | per seed | tokens/s (runs) '
           '| dropped |', '|' + '---|' * 12]
  for e in summary:
    lines.append(
        f"| {e['arm']} | {','.join(map(str, e['seeds']))} | {e['lr']:g} | {e['params']:,} "
        f"| {e['active_params']:,} | {e['final_val_loss_mean']:.4f} ± "
        f"{e['final_val_loss_spread'] / 2:.4f} | {e['final_bits_per_byte_mean']:.3f} "
        f"| {_speedup_text(e, 'step_speedup')} "
        f"| {', '.join(f'{x:.2f}' for x in e['per_seed_step_speedup']) or '-'} "
        f"| {_speedup_text(e, 'time_speedup')} "
        f"| {', '.join(f'{x:.2f}' for x in e.get('per_seed_time_speedup', [])) or '-'} "
        f"| {e['tokens_per_sec']:,.0f} | {e['dropped_fraction']:.4f} |")
  lines += ['', 'Complete runs (mean final validation loss over seeds):', '',
            '| arm | ' + ' | '.join(f'{n} steps' for n in summary[0]['complete_run_steps']) + ' |',
            '|' + '---|' * (1 + len(summary[0]['complete_run_steps']))]
  for e in summary:
    lines.append(f"| {e['arm']} | " + ' | '.join(f'{x:.4f}' for x in
                                                e['complete_run_val_loss_mean']) + ' |')
  rates = sorted({x['run'].lr for x in sweep_loaded})
  lines += ['', f'Learning-rate sweep (seed 0, complete {plan.SWEEP_STEPS[size]}-step schedules; '
            'final validation loss; a rate beyond the grid was tried where the best was at its '
            'edge):', '',
            '| family (arm) | ' + ' | '.join(f'lr {lr:g}' for lr in rates) + ' | chosen |',
            '|' + '---|' * (2 + len(rates))]
  for fam in plan.sweep_families(size):
    arm = plan.SWEEP_ARMS[fam]
    losses = {x['run'].lr: analysis.final_eval(x['records'])['loss'] for x in sweep_loaded
              if x['run'].arm == arm}
    lines.append(f'| {fam} ({arm}) | ' + ' | '.join(
        f'{losses[lr]:.4f}' if lr in losses else '-' for lr in rates) +
                 f" | {tuned['lr'][fam]:g} |")
  if routing_loaded:
    lines += ['', f"Routing (stmoe64, seed 0, lr {tuned['lr']['stmoe']:g}, complete "
              f'{plan.SWEEP_STEPS[size]}-step schedules):', '',
              '| option | overrides | final val loss | dropped (first 80 steps) | '
              'dropped (end) | tokens/s |', '|---|---|---|---|---|---|']
    for item in routing_loaded:
      run = item['run']
      lines.append(f"| {run.name.split('_', 1)[1]} | {dict(run.overrides) or '-'} "
                   f"| {analysis.final_eval(item['records'])['loss']:.4f} "
                   f"| {item['first_dropped_fraction']:.4f} | {item['dropped_fraction']:.4f} "
                   f"| {analysis.run_tokens_per_sec(item['records']):,.0f} |")
    lines.append(f"\nChosen: {tuned['routing']} ({tuned['routing_overrides'] or 'no overrides'}).")
  return '\n'.join(lines) + '\n'


def plot(summary: list[dict], main_loaded: list[dict], root: str, size: str) -> list[str]:
  """loss_curves.png (by step and by training time, seed bands) and experts.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  colors = dict(zip(moe_vs_dense.ARMS, ('k', 'C0', 'C1', 'C2', 'C3', 'C4')))
  speed = {e['arm']: e['tokens_per_sec'] for e in summary}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for e in summary:
    arm = e['arm']
    curves = [[(r['step'], r['loss']) for r in x['records'] if r['kind'] == 'eval']
              for x in main_loaded if x['run'].arm == arm]
    steps = np.array([s for s, _ in curves[0]], np.float64)
    losses = np.array([[l for _, l in c] for c in curves])
    config = moe_vs_dense.get_config(f'arm={arm},size={size}')
    tokens_per_step = config.batch_size * config.data.seq_len
    minutes = steps * tokens_per_step / speed[arm] / 60
    for ax, x in zip(axes, (steps, minutes)):
      ax.plot(x, losses.mean(0), '-', color=colors[arm], label=f"{arm} ({len(curves)} seeds)")
      ax.fill_between(x, losses.min(0), losses.max(0), color=colors[arm], alpha=0.2)
      complete_x = np.array(e['complete_run_steps'], np.float64)
      if ax is axes[1]:
        complete_x = complete_x * tokens_per_step / speed[arm] / 60
      ax.plot(complete_x, e['complete_run_val_loss_mean'], 'o', color=colors[arm], markersize=5)
  for ax in axes:
    ax.axhline(summary[0]['final_val_loss_mean'], color='gray', lw=0.8, ls=':')
    ax.grid(alpha=0.3)
  axes[0].set_xlabel('train step')
  axes[1].set_xlabel('training time at the measured tokens/s, one core per run (minutes)')
  axes[0].set_ylabel('validation loss (nats/byte)')
  axes[1].legend(fontsize=8)
  lo = min(min(e['complete_run_val_loss_mean']) for e in summary)
  axes[0].set_ylim(lo - 0.05, lo + 0.8)
  fig.suptitle('MoE vs dense at equal active FLOPs: lines = main runs (band: seeds), '
               'dots = complete schedules; dotted = dense final')
  fig.tight_layout()
  paths = [os.path.join(root, 'loss_curves.png')]
  fig.savefig(paths[0], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5.5, 4))
  dense = summary[0]
  scaling = [e for e in summary if e['arm'] in plan.EXPERT_SCALING_ARMS]
  if scaling:
    experts = [moe_vs_dense.ARMS[e['arm']][1] for e in scaling]
    gains = [dense['final_val_loss_mean'] - e['final_val_loss_mean'] for e in scaling]
    errors = [(dense['final_val_loss_spread'] + e['final_val_loss_spread']) / 2 for e in scaling]
    ax.errorbar(experts, gains, yerr=errors, fmt='-o', capsize=4, color='C3')
    ax.set_xscale('log', base=2)
    ax.set_xticks(experts, [str(x) for x in experts])
  ax.axhline(0, color='gray', lw=0.8)
  ax.set(xlabel='experts (top-2, width 128)', ylabel='final val loss gain over dense (nats)',
         title='Gain at equal active FLOPs vs experts\n(bars: half the summed seed spreads)')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(root, 'experts.png'))
  fig.savefig(paths[1], dpi=110)
  plt.close(fig)
  return paths



def write_summary(directory: str, summary: list[dict]) -> None:
  """Writes directory/summary.json, with the horizon's speedups where it holds horizon.json."""
  horizon_path = os.path.join(directory, 'horizon.json')
  if os.path.exists(horizon_path):
    with open(horizon_path) as f:
      summary = horizon.with_horizon(summary, json.load(f))
  with open(os.path.join(directory, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)


def write_results(root: str, summary: list[dict], tuned: dict, loaded: list[dict],
                  sweep_loaded: list[dict], routing_loaded: list[dict],
                  main_loaded: list[dict], size: str) -> tuple[str, list[str]]:
  """Writes results.csv (every run in `loaded`), summary.json, results.md and the plots to
  `root`; returns (the markdown tables, the plots' paths)."""
  write_csv(loaded, os.path.join(root, 'results.csv'))
  write_summary(root, summary)
  table = markdown(summary, tuned, sweep_loaded, routing_loaded, size)
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write(table)
  return table, plot(summary, main_loaded, root, size)
