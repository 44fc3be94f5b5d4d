"""Validation metrics at the eval capacity factor, and the `eval.py` entry point's logic.

bits/byte = total cross-entropy over all target tokens (in bits) / number of byte targets; the
EOS target ending each document costs bits but is not a byte, so it counts against the model
(BOS targets carry weight 0 in evaluation batches: predicting BOS after EOS is trivial).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stmoe_jax import checkpointing
from stmoe_jax.config import ModelConfig
from stmoe_jax.data import tokenizer


def eval_step(params, buffers, batch, *, graphdef) -> dict:
  """Sums over one batch (eval capacity factor): ce_sum, num_tokens, num_correct, num_bytes,
  num_routed (non-padding inputs) and the per-MoE-layer routing stats [M, ...] of
  `Transformer.__call__`, which cover non-padding inputs only."""
  model = nnx.merge(graphdef, params, buffers)
  targets_BL, weights_BL = batch['targets'], batch['weights']
  real_BL = batch['inputs'] != tokenizer.PAD_ID
  logits_BLV, moe_stats = model(batch['inputs'], train=False, mask_BL=real_BL)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  return {
      'ce_sum': jnp.sum(ce_BL * weights_BL),
      'num_tokens': jnp.sum(weights_BL),
      'num_correct': jnp.sum((jnp.argmax(logits_BLV, -1) == targets_BL) * weights_BL),
      'num_bytes': jnp.sum(weights_BL * (targets_BL < tokenizer.PAD_ID)),
      'num_routed': jnp.sum(real_BL),
      **moe_stats,
  }


def evaluate(run_step: Callable[[dict], dict], batches: Iterable[dict],
             cfg: ModelConfig) -> dict:
  """Runs `run_step` (a jitted `eval_step` with params bound) over `batches` and reduces.

  Returns a dict: loss (nats/token), bits_per_byte, accuracy, num_tokens, balance_loss and
  z_loss (summed over MoE layers, as in the train loss), dropped_fraction (mean over layers),
  and `moe_layers`: one entry per MoE layer with its transformer `layer` index and its routing
  telemetry averaged over all real tokens: `expert_load` (E fractions summing to 1),
  `max_load_ratio`, `dropped_fraction` (share of assigned choices dropped at the eval capacity
  factor), `dropped_fraction_per_slot` (1st, 2nd, ... choice), `router_z` (mean
  logsumexp^2), `router_entropy` (nats) and `router_bias` (the aux-loss-free balancer's bias).
  """
  totals, routing = None, None
  for batch in batches:
    out = jax.device_get(run_step(batch))
    sums = {k: float(out[k]) for k in
            ('ce_sum', 'num_tokens', 'num_correct', 'num_bytes', 'num_routed')}
    # Routing stats are per-batch means over real tokens: weight them by that count.
    stats = {k: np.asarray(out[k], np.float64) * sums['num_routed'] for k in _LAYER_STATS}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    routing = stats if routing is None else {k: routing[k] + stats[k] for k in stats}
  if totals is None or not totals['num_tokens']:
    raise ValueError('the evaluation split produced no tokens')
  routing = {k: v / totals['num_routed'] for k, v in routing.items()}
  moe_layers = [i for i in range(cfg.num_layers) if cfg.ffn_kind(i) == 'moe']
  return {
      'loss': totals['ce_sum'] / totals['num_tokens'],
      'bits_per_byte': totals['ce_sum'] / math.log(2) / max(totals['num_bytes'], 1.0),
      'accuracy': totals['num_correct'] / totals['num_tokens'],
      'num_tokens': int(totals['num_tokens']),
      'balance_loss': float(np.sum(routing['balance_loss'])),
      'z_loss': float(np.sum(routing['z_loss'])),
      'dropped_fraction': float(np.mean(routing['dropped_fraction'])) if moe_layers else 0.0,
      'moe_layers': [_layer_report(layer, {k: v[m] for k, v in routing.items()})
                     for m, layer in enumerate(moe_layers)],
  }


# Per-MoE-layer stats of `Transformer.__call__` that evaluation averages over real tokens.
_LAYER_STATS = ('balance_loss', 'z_loss', 'expert_load', 'dropped_fraction',
                'dropped_fraction_per_slot', 'router_entropy', 'router_bias')


def _layer_report(layer: int, stats: dict) -> dict:
  load = stats['expert_load']
  as_list = lambda x: np.round(x, 6).tolist()
  return {
      'layer': layer, 'expert_load': as_list(load),
      # From the averaged load: the mean of per-batch ratios would overstate imbalance.
      'max_load_ratio': float(np.max(load) * len(load)),
      'dropped_fraction': float(stats['dropped_fraction']),
      'dropped_fraction_per_slot': as_list(stats['dropped_fraction_per_slot']),
      'router_z': float(stats['z_loss']), 'router_entropy': float(stats['router_entropy']),
      'router_bias': as_list(stats['router_bias']),
  }


def nonfinite_results(metrics: dict) -> list[str]:
  """Names of the headline metrics (loss, bits_per_byte, accuracy) that are NaN or inf."""
  return [k for k in ('loss', 'bits_per_byte', 'accuracy') if not math.isfinite(metrics[k])]


def parse_capacity_factors(text: str) -> list[float | str]:
  """'1.0,1.25,dropless' -> [1.0, 1.25, 'dropless']; ValueError naming a bad entry."""
  factors = []
  for item in text.split(','):
    item = item.strip()
    if item == 'dropless':
      factors.append(item)
      continue
    try:
      value = float(item)
    except ValueError:
      value = float('nan')
    if not value > 0:
      raise ValueError(f'--eval_capacity_factors entry {item!r} is invalid: expected a number '
                       "> 0 or 'dropless'")
    factors.append(value)
  return factors


def with_eval_capacity(cfg: ModelConfig, factor: float | str) -> ModelConfig:
  """`cfg` evaluated at capacity factor `factor`, or with dropless dispatch for 'dropless'."""
  if factor == 'dropless':
    moe = dataclasses.replace(cfg.moe, dispatch='dropless')
  else:
    moe = dataclasses.replace(cfg.moe, eval_capacity_factor=float(factor))
  return dataclasses.replace(cfg, moe=moe)


def evaluate_workdir(workdir: str, step: int | None = None, max_batches: int | None = None,
                     capacity_factors: Sequence[float | str] = (),
                     mesh: dict[str, int] | None = None) -> dict:
  """Restores `step` (default: the latest) from a train.py workdir and evaluates it.

  The config comes from `workdir/config.json`. With `capacity_factors` (numbers or
  'dropless') the checkpoint is also evaluated at each of them and `capacity_sweep` lists, per
  factor, loss, bits_per_byte and dropped fractions (overall and per choice slot): ST-MoE treats
  the eval capacity factor as a free lever. Writes `workdir/eval_<step>.json` (process 0) and
  returns the metrics with `step` added. `mesh` (axis sizes) replaces the saved `config.mesh`:
  checkpoints restore onto any mesh the model fits. Raises FileNotFoundError naming the path
  when the workdir, its config or the checkpoint is missing.
  """
  from stmoe_jax import train_lib  # Imported here: train_lib imports this module.

  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir!r} does not exist')
  config = train_lib.load_config(workdir)
  if mesh is not None:
    config.mesh = dict(mesh)
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  trainer = train_lib.Trainer(config, workdir)
  # With `step` None, the newest readable step; a damaged newer one is reported on stderr.
  step, state, _ = checkpointing.read_checkpoint(ckpt_dir, trainer.abstract_state, step)
  metrics = {'step': step, **trainer.evaluate(state, max_batches)}
  if capacity_factors:
    metrics['capacity_sweep'] = []
    for factor in capacity_factors:
      m = trainer.evaluate(state, max_batches, with_eval_capacity(trainer.model_cfg, factor))
      metrics['capacity_sweep'].append({
          'eval_capacity_factor': factor, 'loss': m['loss'],
          'bits_per_byte': m['bits_per_byte'], 'dropped_fraction': m['dropped_fraction'],
          'dropped_fraction_per_slot': [l['dropped_fraction_per_slot'] for l in m['moe_layers']]})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{step}.json'), 'w') as f:
      json.dump(metrics, f, indent=2)
  return metrics
