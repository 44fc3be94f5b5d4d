"""The encoder-decoder's objective (span corruption, or a task's 'seq2seq' rows): the training
loss (cross-entropy on the decoder targets plus both stacks' router losses, with per-stack
routing telemetry) and the evaluation step's sums, in the shapes `losses` gives the decoder-only
model.

Einsum letters: B batch, T encoder length, L decoder length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stmoe_jax.moe import layer_stats
from stmoe_jax.nn import layers
from stmoe_jax.models import losses
from stmoe_jax.config import ModelConfig
from stmoe_jax.data import tokenizer

STACKS = ('encoder', 'decoder')


def _forward(model, batch, *, train: bool, rng=None):
  """(logits [B, L, V], stats, encoder mask [B, T], decoder mask [B, L]): padding is neither
  attended to (encoder) nor routed (both stacks)."""
  encoder_mask_BT = batch['encoder_inputs'] != tokenizer.PAD_ID
  decoder_mask_BL = batch['decoder_inputs'] != tokenizer.PAD_ID
  logits_BLV, stats = model(batch['encoder_inputs'], batch['decoder_inputs'], train=train,
                            rng=rng, encoder_mask_BT=encoder_mask_BT,
                            decoder_mask_BL=decoder_mask_BL)
  return logits_BLV, stats, encoder_mask_BT, decoder_mask_BL


def _stack_stats(stats: dict, stack: str) -> dict:
  """One stack's `layer_stats.MOE` stats under their plain names."""
  return {name: stats[layer_stats.key(name, stack)] for name in layer_stats.MOE}


def compute_loss(params, buffers, graphdef, batch, rng, cfg: ModelConfig):
  """Cross-entropy over the weighted targets + aux_loss_coef * balance + z_loss_coef * z (+ the
  `losses.shazeer_losses` and seq_aux_loss_coef * the sequence-wise balance loss when on), the
  router losses summed over the MoE layers of both stacks.

  Returns (loss, (metrics, new_buffers)) as `losses.compute_loss`; the routing telemetry of
  `losses.moe_metrics` comes per stack ('expert_load/encoder' [M_enc, E],
  'max_expert_load/decoder', ...), plus `dropped_fraction` (mean over all MoE layers),
  `max_expert_load` and `max_router_logit` (worst layer of either stack).
  """
  model = nnx.merge(graphdef, params, buffers)
  logits_BLV, stats, _, _ = _forward(model, batch, train=True, rng=rng)
  weights_BL, targets_BL = batch['weights'], batch['targets']
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  num_tokens = jnp.maximum(jnp.sum(weights_BL), 1.0)
  ce = jnp.sum(ce_BL * weights_BL) / num_tokens
  per_stack = {stack: _stack_stats(stats, stack) for stack in STACKS}
  balance = sum(jnp.sum(s['balance_loss']) for s in per_stack.values())
  z = sum(jnp.sum(s['z_loss']) for s in per_stack.values())
  loss = ce + cfg.moe.aux_loss_coef * balance + cfg.moe.z_loss_coef * z
  importance, load, seq_balance = (sum(jnp.sum(s[name]) for s in per_stack.values())
                                   for name in ('importance_loss', 'load_loss', 'seq_balance_loss'))
  loss += losses.shazeer_losses(cfg.moe, importance, load)
  if cfg.moe.seq_aux_loss_coef:  # DeepSeek-V3's sequence-wise balance loss, both stacks'.
    loss += cfg.moe.seq_aux_loss_coef * seq_balance
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  correct = target_logit_BL >= jnp.max(logits_BLV, axis=-1)
  metrics = {'loss': loss, 'cross_entropy': ce, 'balance_loss': balance, 'z_loss': z,
             'importance_loss': importance, 'load_loss': load, 'seq_balance_loss': seq_balance,
             'accuracy': jnp.sum(correct * weights_BL) / num_tokens}
  for stack, s in per_stack.items():
    metrics.update({layer_stats.key(k, stack): v for k, v in losses.moe_metrics(s).items()})
  dropped = jnp.concatenate([s['dropped_fraction'] for s in per_stack.values()])
  if dropped.size:
    metrics['dropped_fraction'] = jnp.mean(dropped)
    for name, of in (('max_expert_load', 'max_load_ratio'),
                     ('max_router_logit', 'max_router_logit')):
      metrics[name] = jnp.max(jnp.concatenate([s[of] for s in per_stack.values()]))
  return loss, (metrics, nnx.to_pure_dict(nnx.state(model, layers.Buffer)))


def eval_step(params, buffers, batch, *, graphdef) -> dict:
  """Sums over one batch (eval capacity factor) as `losses.eval_step`: ce_sum, num_tokens,
  num_correct, num_exact and
  num_examples (`losses.exact_match_sums`: exact match of 'seq2seq' task rows), and per stack
  `layer_stats.key('num_routed', stack)` and its `layer_stats.MOE` stats [M, ...] over real
  tokens, which `evaluation.evaluate` reduces per stack."""
  model = nnx.merge(graphdef, params, buffers)
  logits_BLV, stats, encoder_mask_BT, decoder_mask_BL = _forward(model, batch, train=False)
  targets_BL, weights_BL = batch['targets'], batch['weights']
  return {
      **losses.token_sums(logits_BLV, targets_BL, weights_BL),
      layer_stats.key('num_routed', 'encoder'): jnp.sum(encoder_mask_BT),
      layer_stats.key('num_routed', 'decoder'): jnp.sum(decoder_mask_BL),
      **{k: v for k, v in stats.items()
         if k.partition('/')[0] in layer_stats.MOE},
  }
