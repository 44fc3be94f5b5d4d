"""The study's numbers, in plain numpy over the runs' records so tests can check them by hand.

Schedule-fair speedups read complete runs only (a decaying schedule's loss halfway through is
not what a run of half the length reaches): an arm's steps to dense's final loss interpolate,
linearly in log(steps), between its complete runs of N/4, N/2 and N steps.
"""

from __future__ import annotations

import math

import numpy as np

from experiments.study import plan


def final_eval(records: list[dict]) -> dict:
  """The last evaluation record of a run."""
  return [r for r in records if r['kind'] == 'eval'][-1]


def run_tokens_per_sec(records: list[dict]) -> float:
  """Median tokens/s over the run's logging windows (each excludes compilation and evals)."""
  speeds = [r['tokens_per_sec'] for r in records if r['kind'] == 'train' and 'tokens_per_sec' in r]
  return float(np.median(speeds)) if speeds else float('nan')


def interpolate_log_steps(steps, losses, target: float) -> float | None:
  """Steps at which the complete-run curve (linear in log steps) first reaches `target`.

  Args:
    steps: [N] increasing lengths of complete runs.
    losses: [N] their final validation losses.
    target: the loss to reach.
  Returns:
    steps[0] when the shortest run already reaches it (so the true value is at most that),
    None when no run does.
  """
  steps, losses = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
  below = np.nonzero(losses <= target)[0]
  if not len(below):
    return None
  i = int(below[0])
  if i == 0:
    return float(steps[0])
  fraction = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
  return float(np.exp(np.log(steps[i - 1]) + fraction * (np.log(steps[i]) - np.log(steps[i - 1]))))


def steps_to_match(dense_steps, dense_losses, steps, losses) -> tuple[float, bool]:
  """(step speedup over dense, whether it is a lower bound) from complete runs.

  Dense's target is its longest run's final loss. If the arm reaches it, speedup = dense's
  steps / the arm's interpolated steps (a lower bound when its shortest run already does).
  Otherwise the roles swap: speedup = dense's interpolated steps to the arm's final loss / the
  arm's steps (< 1), or dense's shortest / the arm's steps as an upper bound when even that
  is better; the flag is then False.
  """
  target_steps, target = dense_steps[-1], dense_losses[-1]
  needed = interpolate_log_steps(steps, losses, target)
  if needed is not None:
    return target_steps / needed, bool(losses[0] <= target)
  dense_needed = interpolate_log_steps(dense_steps, dense_losses, losses[-1])
  return (dense_needed or dense_steps[0]) / steps[-1], False


def complete_runs(runs_by_name: dict[str, dict], arm: str, seed: int, size: str
                  ) -> tuple[list[int], list[float]]:
  """(lengths, final validation losses) of the complete runs of one arm and seed, shortest
  first."""
  steps = plan.NUM_STEPS[size]
  names = [f'{arm}_s{seed}_n{steps // f}' for f in plan.BRANCH_FRACTIONS] + [f'{arm}_s{seed}']
  lengths = [steps // f for f in plan.BRANCH_FRACTIONS] + [steps]
  return lengths, [final_eval(runs_by_name[n]['records'])['loss'] for n in names]


def arm_summary(runs_by_name: dict[str, dict], arm: str, seeds: list[int],
                dense_seeds: list[int], size: str) -> dict:
  """One summary.json entry: quality, speed and speedups of `arm`, each speedup taken seed for
  seed against dense on the same seed (same initialisation, same batches), then averaged.

  Time speedup = step speedup x the arm's tokens/s over dense's, both the runs' own (median over
  each run's logging windows, `run_tokens_per_sec`), seed for seed. Raises ValueError when the
  arm and dense ran different seeds: an unmatched mean compares seeds, not arms.
  """
  if list(seeds) != list(dense_seeds):
    raise ValueError(f'{arm} ran seeds {list(seeds)} and dense {list(dense_seeds)}: speedups '
                     'are taken seed for seed, so every arm must run dense\'s seeds')
  lengths, _ = complete_runs(runs_by_name, arm, seeds[0], size)
  per_seed = np.array([complete_runs(runs_by_name, arm, s, size)[1] for s in seeds])
  dense = np.array([complete_runs(runs_by_name, 'dense', s, size)[1] for s in seeds])
  matched = [steps_to_match(lengths, d, lengths, a) for d, a in zip(dense, per_seed)]
  step_x = np.array([x for x, _ in matched])
  speed = np.array([run_tokens_per_sec(runs_by_name[f'{arm}_s{s}']['records']) for s in seeds])
  dense_speed = np.array([run_tokens_per_sec(runs_by_name[f'dense_s{s}']['records'])
                          for s in seeds])
  time_x = step_x * speed / dense_speed
  main = runs_by_name[f'{arm}_s{seeds[0]}']
  finals = per_seed[:, -1]
  rounded = lambda xs: [round(float(x), 3) for x in xs]
  return {
      'arm': arm, 'family': plan.family(arm), 'seeds': list(seeds), 'lr': main['run'].lr,
      'params': main['params'], 'active_params': main['active_params'],
      # Both from the runs' own logs now; the second name is kept for readers of older records.
      'tokens_per_sec': round(float(np.median(speed)), 1),
      'tokens_per_sec_in_runs': round(float(np.median(speed)), 1),
      'final_val_loss_mean': round(float(finals.mean()), 5),
      'final_val_loss_spread': round(float(finals.max() - finals.min()), 5),
      'final_bits_per_byte_mean': round(float(finals.mean()) / math.log(2), 4),
      'complete_run_steps': lengths,
      'complete_run_val_loss_mean': [round(float(x), 5) for x in per_seed.mean(0)],
      'step_speedup': round(float(step_x.mean()), 3),
      'step_speedup_spread': round(float(step_x.max() - step_x.min()), 3),
      'step_speedup_is_lower_bound': any(bound for _, bound in matched),
      'time_speedup': round(float(time_x.mean()), 3),
      'time_speedup_spread': round(float(time_x.max() - time_x.min()), 3),
      'per_seed_step_speedup': rounded(step_x),
      'per_seed_time_speedup': rounded(time_x),
      'dropped_fraction': main['dropped_fraction'],
  }
