"""Validation metrics at the eval capacity factor, and the `eval.py` entry point's logic.

bits/byte = total cross-entropy over all target tokens (in bits) / number of byte targets; the
EOS target ending each document costs bits but is not a byte, so it counts against the model
(BOS targets carry weight 0 in evaluation batches: predicting BOS after EOS is trivial).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stmoe_jax.config import ModelConfig
from stmoe_jax.data import tokenizer


def eval_step(params, batch, *, graphdef) -> dict:
  """Sums over one batch (eval capacity factor): ce_sum, num_tokens, num_correct, num_bytes,
  num_routed (non-padding inputs) and the per-MoE-layer routing stats [M] / [M, E] of
  `Transformer.__call__`, which cover non-padding inputs only."""
  model = nnx.merge(graphdef, params)
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
  z_loss (summed over MoE layers, as in the train loss), and `moe_layers`: one entry per MoE
  layer with its transformer `layer` index, `expert_load` (E fractions summing to 1) and
  `dropped_fraction` (share of token-choices dropped at the eval capacity factor), each
  averaged over all real tokens.
  """
  totals, routing = None, None
  for batch in batches:
    out = jax.device_get(run_step(batch))
    sums = {k: float(out[k]) for k in
            ('ce_sum', 'num_tokens', 'num_correct', 'num_bytes', 'num_routed')}
    # Routing stats are per-batch means over real tokens: weight them by that count.
    stats = {k: np.asarray(out[k], np.float64) * sums['num_routed'] for k in
             ('balance_loss', 'z_loss', 'dropped_fraction', 'expert_load')}
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
      'moe_layers': [
          {'layer': layer, 'expert_load': routing['expert_load'][m].round(6).tolist(),
           'dropped_fraction': float(routing['dropped_fraction'][m])}
          for m, layer in enumerate(moe_layers)],
  }


def evaluate_workdir(workdir: str, step: int | None = None,
                     max_batches: int | None = None) -> dict:
  """Restores `step` (default: the latest) from a train.py workdir and evaluates it.

  The config comes from `workdir/config.json`. Writes `workdir/eval_<step>.json` (process 0)
  and returns the metrics with `step` added. Raises FileNotFoundError naming the path when the
  workdir, its config or the checkpoint is missing.
  """
  from stmoe_jax import train_lib  # Imported here: train_lib imports this module.

  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir!r} does not exist')
  config = train_lib.load_config(workdir)
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):  # Check before creating anything.
    raise FileNotFoundError(f'no checkpoint in {ckpt_dir}: train first with train.py')
  trainer = train_lib.Trainer(config, workdir)
  steps = trainer.checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {ckpt_dir}: train first with train.py')
  if step is None:  # The newest readable step; a damaged newer one is reported on stderr.
    step, state, _ = trainer.checkpointer.restore_latest(trainer.abstract_state)
  elif step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} in {ckpt_dir}; have {sorted(steps)}')
  else:
    state, _ = trainer.checkpointer.restore(step, trainer.abstract_state)
  metrics = {'step': step, **trainer.evaluate(state.params, max_batches)}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{step}.json'), 'w') as f:
      json.dump(metrics, f, indent=2)
  trainer.checkpointer.close()
  return metrics
