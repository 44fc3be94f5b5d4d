"""What every finding shares: its definition, the per-run metrics and the record it writes."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from experiments.study import analysis
from experiments.study import plan

STEPS = plan.SWEEP_STEPS  # The study's short complete schedule: 400 steps (quick: 20).
SEEDS = {'full': (0, 1), 'quick': (0,)}
SPIKE_NATS = 0.5  # A train loss this far above its running minimum after warmup = unstable.


@dataclasses.dataclass(frozen=True)
class Finding:
  """A published finding and how this project tests it.

  `runs(size, tuned, root)` lists groups of plan.Run (a group trains in order on one core);
  `summarize(loaded, size)` maps {run name: runs.load_run dict} to
  {'rows': [...], 'verdict': one of VERDICTS, 'why': one line}.
  `paper` is the citation; `claim` the paper's finding in one line; `paper_rows` the paper's
  own numbers where it prints them (label -> text), shown beside ours.
  """
  name: str
  title: str
  paper: str
  claim: str
  paper_rows: dict[str, str]
  runs: Callable[[str, dict, str], list[list[plan.Run]]]
  summarize: Callable[[dict[str, dict], str], dict]


VERDICTS = ('reproduced', 'partly reproduced', 'not reproduced', 'opposite')


def run(name: str, arm: str, seed: int, lr: float, size: str, **overrides) -> plan.Run:
  """A finding's run: `arm` of configs/moe_vs_dense.py at `lr`, the short complete schedule,
  config overrides given as keyword arguments with '.' written '__'."""
  items = tuple((k.replace('__', '.'), v) for k, v in overrides.items())
  return plan.Run(f'findings/{name}_s{seed}', arm, seed, lr, STEPS[size], 'finding', items)


def tuned_moe(tuned: dict, arm: str) -> dict:
  """The study's tuned routing overrides for an MoE arm, as keyword arguments of `run`."""
  del arm  # Every MoE arm shares the tuned routing.
  return {k.replace('.', '__'): v for k, v in tuned['routing_overrides'].items()}


def eval_layers(records: list[dict]) -> list[dict]:
  return analysis.final_eval(records).get('moe_layers', [])


def usage_entropy(records: list[dict]) -> float:
  """Entropy of the final evaluation's expert load over log(E): 1 = every expert used
  equally, 0 = one expert takes everything; mean over MoE layers."""
  out = []
  for layer in eval_layers(records):
    load = np.asarray(layer['expert_load'], np.float64)
    p = load / load.sum()
    out.append(float(-(p[p > 0] * np.log(p[p > 0])).sum() / math.log(len(p))))
  return float(np.mean(out)) if out else float('nan')


def max_spike(records: list[dict], warmup: int) -> float:
  """Largest rise of the logged train loss above its running minimum after warmup (nats);
  inf when a loss is not finite."""
  losses = [r['cross_entropy'] for r in records
            if r['kind'] == 'train' and 'cross_entropy' in r and r['step'] > warmup]
  if not all(math.isfinite(x) for x in losses):
    return float('inf')
  best, spike = float('inf'), 0.0
  for x in losses:
    spike = max(spike, x - best)
    best = min(best, x)
  return spike


def metrics(loaded: dict, warmup: int = 100) -> dict:
  """One run's numbers: final validation loss and bits/byte, the runs' tokens/s, the last
  train dropped fraction, usage entropy, max load ratio and loss spike."""
  final = analysis.final_eval(loaded['records'])
  layers = eval_layers(loaded['records'])
  return {
      'final_val_loss': round(float(final['loss']), 5),
      'final_bits_per_byte': round(float(final['bits_per_byte']), 5),
      'tokens_per_sec': round(analysis.run_tokens_per_sec(loaded['records']), 1),
      'train_dropped_fraction': loaded['dropped_fraction'],
      'usage_entropy': round(usage_entropy(loaded['records']), 4) if layers else None,
      'max_load_ratio': (round(float(np.mean([l['max_load_ratio'] for l in layers])), 3)
                         if layers else None),
      'max_loss_spike': round(max_spike(loaded['records'], warmup), 4),
  }


def variant_row(label: str, names: list[str], loaded: dict[str, dict], **extra) -> dict:
  """A table row: one variant over its seeds (per-seed final losses, their mean, and the mean
  of the other metrics)."""
  per = [metrics(loaded[n]) for n in names]
  mean = lambda k: (round(float(np.mean([m[k] for m in per])), 5)
                    if all(m[k] is not None for m in per) else None)
  return {'variant': label, 'runs': names, **extra,
          'final_val_loss': [m['final_val_loss'] for m in per],
          'final_val_loss_mean': mean('final_val_loss'),
          'final_bits_per_byte_mean': mean('final_bits_per_byte'),
          'tokens_per_sec': mean('tokens_per_sec'),
          'train_dropped_fraction': mean('train_dropped_fraction'),
          'usage_entropy': mean('usage_entropy'), 'max_load_ratio': mean('max_load_ratio'),
          'max_loss_spike': [m['max_loss_spike'] for m in per]}


def lower_on_every_seed(a: dict, b: dict) -> bool:
  """Whether row `a`'s final loss is below row `b`'s on each seed (same seeds, same order)."""
  return all(x < y for x, y in zip(a['final_val_loss'], b['final_val_loss']))
