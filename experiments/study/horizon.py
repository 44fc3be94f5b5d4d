"""The longer horizon: complete runs from N/4 to 4N for dense and the best MoE arms.

One main run of 4N steps per arm and seed keeps every checkpoint; the complete schedules of 2N,
N, N/2 and N/4 branch off it where their decay starts (runs.start_branch), so an arm and seed
gets five complete runs for one long run and four short decays. The stable phase is shared, so
the N branch is the study's main run of N again (same seed, batches and schedule).

At each horizon H the step speedup is dense's H over the steps the arm needs to reach dense's
final loss at H, interpolated linearly in log(steps) over the arm's five complete runs
(analysis.interpolate_log_steps), seed for seed against dense on the same seed. Time speedup =
step speedup x the arm's tokens/s over dense's, both their 4N runs' own (median over the run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from configs import moe_vs_dense
from experiments.study import analysis
from experiments.study import plan

MULTIPLE = 4  # The longest complete run is 4N.
FRACTIONS = (16, 8, 4, 2)  # Branches of the 4N run: N/4, N/2, N, 2N.
# Dense and the two best MoE arms per step in the study (docs/results/summary.json).
ARMS = {'full': ('dense', 'fine64', 'stmoe8'), 'quick': ('dense', 'stmoe16')}
# Every checkpoint of the 4N run is kept: the branches start from the early ones.
KEEP_ALL = ('keep_checkpoints', 10_000)


def lengths(size: str) -> list[int]:
  """The complete runs' lengths, shortest first: N/4, N/2, N, 2N, 4N."""
  steps = plan.NUM_STEPS[size] * MULTIPLE
  return [steps // f for f in FRACTIONS] + [steps]


def run_name(arm: str, seed: int, steps: int, size: str) -> str:
  """The horizon run of `arm` and `seed` whose complete schedule is `steps` long."""
  main = f'horizon/{arm}_s{seed}'
  return main if steps == lengths(size)[-1] else f'{main}_n{steps}'


def group(arm: str, seed: int, size: str, tuned: dict) -> list[plan.Run]:
  """The 4N run of `arm` and `seed` and the complete shorter schedules that branch off it."""
  routing = () if plan.family(arm) == 'dense' else tuple(tuned['routing_overrides'].items())
  *short, steps = lengths(size)
  main = plan.Run(run_name(arm, seed, steps, size), arm, seed, tuned['lr'][plan.family(arm)],
                  steps, 'horizon', routing + (KEEP_ALL,))
  return [main] + [dataclasses.replace(main, name=run_name(arm, seed, n, size), steps=n,
                                       branch_of=main.name, stage='horizon_branch')
                   for n in short]


def complete_losses(by_name: dict[str, dict], arm: str, seed: int, size: str) -> list[float]:
  """Final validation losses of `arm`'s complete runs at `seed`, in `lengths` order."""
  return [analysis.final_eval(by_name[run_name(arm, seed, n, size)]['records'])['loss']
          for n in lengths(size)]


def speedup_at(horizon: int, dense_loss: float, steps: list[int], losses: list[float]
               ) -> tuple[float, str]:
  """(step speedup at `horizon`, bound) for an arm whose complete runs of `steps` reached
  `losses`, against dense's `dense_loss` after `horizon` steps.

  bound: '' when interpolated; 'lower' when the arm's shortest run already reaches dense's loss
  (the speedup is at least this); 'upper' when even its longest does not (at most this).
  """
  needed = analysis.interpolate_log_steps(steps, losses, dense_loss)
  if needed is None:
    return horizon / steps[-1], 'upper'
  return horizon / needed, 'lower' if losses[0] <= dense_loss else ''


def per_doubling(tokens: list[int], speedups: list[float], bounds: list[str]) -> float | None:
  """Least-squares slope of the step speedup against log2(tokens): the gain per doubling of
  training tokens, over the horizons where the speedup is interpolated (not a bound); None with
  fewer than two."""
  points = [(math.log2(t), x) for t, x, b in zip(tokens, speedups, bounds) if not b]
  if len(points) < 2:
    return None
  xs, ys = np.array(points).T
  return float(np.polyfit(xs, ys, 1)[0])


def summary(by_name: dict[str, dict], seeds: list[int], size: str) -> dict:
  """horizon.json: per MoE arm and horizon, step and time speedups seed for seed (mean, min,
  max, each seed's), and every arm's final losses."""
  steps = lengths(size)
  config = moe_vs_dense.get_config(f'arm=dense,size={size}')
  tokens_per_step = config.batch_size * config.data.seq_len
  speed = {arm: [analysis.run_tokens_per_sec(by_name[run_name(arm, s, steps[-1], size)]['records'])
                 for s in seeds] for arm in ARMS[size]}
  losses = {arm: [complete_losses(by_name, arm, s, size) for s in seeds] for arm in ARMS[size]}
  rounded = lambda xs: [round(float(x), 3) for x in xs]
  result = {'steps': steps, 'tokens': [s * tokens_per_step for s in steps], 'seeds': list(seeds),
            'arms': {}}
  for arm in ARMS[size]:
    entry = {'val_loss_per_seed': [[round(x, 5) for x in row] for row in losses[arm]],
             'val_loss_mean': [round(float(x), 5) for x in np.mean(losses[arm], axis=0)],
             'bits_per_byte_mean': [round(float(x) / math.log(2), 4)
                                    for x in np.mean(losses[arm], axis=0)],
             'tokens_per_sec_per_seed': [round(x, 1) for x in speed[arm]]}
    if arm != 'dense':
      matched = [[speedup_at(h, dense[j], steps, mine) for j, h in enumerate(steps)]
                 for dense, mine in zip(losses['dense'], losses[arm])]
      step_x = np.array([[x for x, _ in row] for row in matched])  # [seeds, horizons]
      time_x = step_x * (np.array(speed[arm]) / np.array(speed['dense']))[:, None]
      entry.update({
          'step_speedup': rounded(step_x.mean(0)), 'step_speedup_min': rounded(step_x.min(0)),
          'step_speedup_max': rounded(step_x.max(0)),
          'per_seed_step_speedup': [rounded(row) for row in step_x],
          'per_seed_bound': [[b for _, b in row] for row in matched],
          'per_seed_time_speedup': [rounded(row) for row in time_x],
          'time_speedup': rounded(time_x.mean(0)), 'time_speedup_min': rounded(time_x.min(0)),
          'time_speedup_max': rounded(time_x.max(0))})
      # How fast the gain grows with tokens, and how many more doublings of the longest run the
      # mean would need to reach 2x at that rate (None where it does not grow).
      tokens = result['tokens']
      slopes = [per_doubling(tokens, list(row), [b for _, b in m])
                for row, m in zip(step_x, matched)]
      slope = None if None in slopes else float(np.mean(slopes))
      final = float(step_x.mean(0)[-1])  # The mean step speedup at the longest horizon.
      entry.update({
          'step_speedup_per_doubling_per_seed': [None if x is None else round(x, 3)
                                                 for x in slopes],
          'step_speedup_per_doubling': None if slope is None else round(slope, 3),
          'doublings_to_2x': (round((2 - final) / slope, 1)
                              if slope and slope > 0 and final < 2 else None)})
    result['arms'][arm] = entry
  return result


def markdown(result: dict) -> str:
  """The step (and time) speedup table of horizon.json: one row per MoE arm, a column per
  horizon."""
  head = ['arm'] + [f'{s:,} steps ({t / 1e6:.1f}M tokens)'
                    for s, t in zip(result['steps'], result['tokens'])]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for arm, entry in result['arms'].items():
    if arm == 'dense':
      continue
    cells = [f"{x:.2f}x ({lo:.2f}-{hi:.2f}) / {t:.2f}x" for x, lo, hi, t in zip(
        entry['step_speedup'], entry['step_speedup_min'], entry['step_speedup_max'],
        entry['time_speedup'])]
    lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(result: dict, path: str) -> None:
  """Step speedup over dense against training tokens, a line per MoE arm, its seeds' band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  tokens = np.array(result['tokens']) / 1e6
  for arm, entry in result['arms'].items():
    if arm == 'dense':
      continue
    ax.plot(tokens, entry['step_speedup'], marker='o', label=arm)
    ax.fill_between(tokens, entry['step_speedup_min'], entry['step_speedup_max'], alpha=0.2)
  ax.axhline(1.0, color='gray', lw=0.8)
  ax.set_xscale('log')
  ax.set_xticks(tokens, [f'{t:.1f}' for t in tokens])
  ax.minorticks_off()
  ax.set_xlabel('training tokens (millions)')
  ax.set_ylabel('step speedup over dense')
  seeds = result['seeds']
  ax.set_title(f"Complete WSD runs, seed{'s' if len(seeds) > 1 else ''} "
               f"{', '.join(map(str, seeds))} (band: min-max over seeds)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def with_horizon(summary: list[dict], result: dict) -> list[dict]:
  """summary.json's entries, each MoE arm that `result` (horizon.json) ran given its `horizon`
  entry: the horizons, seeds, and step and time speedups seed for seed, so that the study's
  headline file holds every speedup."""
  keys = ('per_seed_step_speedup', 'per_seed_bound', 'step_speedup', 'per_seed_time_speedup',
          'time_speedup', 'step_speedup_per_doubling')
  out = []
  for entry in summary:
    arm = result['arms'].get(entry['arm'])
    if arm is not None and entry['arm'] != 'dense':
      entry = {**entry, 'horizon': {'steps': result['steps'], 'tokens': result['tokens'],
                                    'seeds': result['seeds'], **{k: arm.get(k) for k in keys}}}
    out.append(entry)
  return out


def _attach_to_summary(directory: str, result: dict) -> None:
  """Rewrites directory/summary.json, where there is one, `with_horizon` of `result`."""
  path = os.path.join(directory, 'summary.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    summary = json.load(f)
  with open(path, 'w') as f:
    json.dump(with_horizon(summary, result), f, indent=1)


def write(result: dict, directory: str, command: str) -> str:
  """Writes directory/horizon.json and horizon.png; returns the markdown table."""
  with open(os.path.join(directory, 'horizon.json'), 'w') as f:
    json.dump({'command': command, **result}, f, indent=1)
  plot(result, os.path.join(directory, 'horizon.png'))
  _attach_to_summary(directory, result)
  return markdown(result)
