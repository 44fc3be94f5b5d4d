"""The language model's objectives: the training loss (cross-entropy plus the router and
attention auxiliary losses, with the routing telemetry that goes into the train metrics) and
the evaluation step's sums.

Einsum letters: B batch, L length, V vocabulary, M MoE layers, E experts, K choices per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stmoe_jax.nn import layers
from stmoe_jax.config import ModelConfig
from stmoe_jax.data import tokenizer


def compute_loss(params, buffers, graphdef, batch, rng, cfg: ModelConfig):
  """Cross-entropy + aux_loss_coef * balance + z_loss_coef * z (+ seq_aux_loss_coef * the
  sequence-wise balance loss, importance_loss_coef * importance and load_loss_coef * load, the
  `cv_balance` losses, when on), averaged over target tokens.

  Balance and z-losses are summed over MoE layers (each layer is regularised on its own, as in
  Switch/ST-MoE). Returns (loss, (metrics, new_buffers)): float32 scalar metrics plus per-layer
  telemetry arrays (`moe_metrics`), and the buffers as the forward pass left them.
  """
  model = nnx.merge(graphdef, params, buffers)
  weights_BL = batch['weights']
  real_BL = batch['inputs'] != cfg.pad_id  # Padding never takes expert capacity.
  logits_BLV, moe_stats = model(batch['inputs'], train=True, rng=rng, mask_BL=real_BL)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch['targets'])
  num_tokens = jnp.maximum(jnp.sum(weights_BL), 1.0)
  ce = jnp.sum(ce_BL * weights_BL) / num_tokens
  balance = jnp.sum(moe_stats['balance_loss'])
  z = jnp.sum(moe_stats['z_loss'])
  moe, attention = cfg.moe, cfg.attention
  seq_balance = jnp.sum(moe_stats['seq_balance_loss'])
  loss = ce + moe.aux_loss_coef * balance + moe.z_loss_coef * z
  if moe.seq_aux_loss_coef:  # Off by default: the loss stays the same sum as before.
    loss += moe.seq_aux_loss_coef * seq_balance
  importance, load = jnp.sum(moe_stats['importance_loss']), jnp.sum(moe_stats['load_loss'])
  loss += shazeer_losses(moe, importance, load)
  # Attention losses: head-routed layers' balance and z-losses summed over those layers, the
  # attention-logit z-loss summed over all layers.
  attn_balance = jnp.sum(moe_stats['attn_balance_loss'])
  attn_z = jnp.sum(moe_stats['attn_z_loss'])
  attn_logit_z = jnp.sum(moe_stats['attn_logit_z_loss'])
  loss += (attention.head_aux_loss_coef * attn_balance + attention.head_z_loss_coef * attn_z +
           attention.logit_z_loss_coef * attn_logit_z)
  # The target's logit is the largest: the same as argmax == target but for exact ties, and a
  # max plus a gather instead of an index-tracking argmax reduction (3% of a small CPU step).
  target_logit_BL = jnp.take_along_axis(logits_BLV, batch['targets'][..., None], axis=-1)[..., 0]
  correct = target_logit_BL >= jnp.max(logits_BLV, axis=-1)
  metrics = {
      'loss': loss, 'cross_entropy': ce, 'balance_loss': balance, 'z_loss': z,
      'seq_balance_loss': seq_balance, 'importance_loss': importance, 'load_loss': load,
      'accuracy': jnp.sum(correct * weights_BL) / num_tokens,
      **moe_metrics(moe_stats),
      'attn_balance_loss': attn_balance, 'attn_z_loss': attn_z,
      'attn_logit_z_loss': attn_logit_z,
      'max_head_load': (jnp.max(moe_stats['attn_head_load']) * moe_stats['attn_head_load'].shape[-1]
                        if moe_stats['attn_head_load'].size else jnp.zeros(())),
  }
  return loss, (metrics, nnx.to_pure_dict(nnx.state(model, layers.Buffer)))


def shazeer_losses(moe, importance: jax.Array, load: jax.Array) -> jax.Array | float:
  """importance_loss_coef * importance + load_loss_coef * load (Shazeer et al. 2017, the CV^2
  losses of `cv_balance`, each summed over MoE layers), with `moe` a `config.MoeConfig`; a
  term whose coefficient is 0 is left out, so that the loss stays the sum it was without them."""
  total = 0.0
  if moe.importance_loss_coef:
    total += moe.importance_loss_coef * importance
  if moe.load_loss_coef:
    total += moe.load_loss_coef * load
  return total


def eval_step(params, buffers, batch, *, graphdef, pad_id: int = tokenizer.PAD_ID) -> dict:
  """Sums over one batch (eval capacity factor): ce_sum, num_tokens, num_correct,
  num_routed (non-padding inputs), num_examples (rows with a weighted target) and num_exact
  (those whose every weighted target is the argmax), and the per-MoE-layer routing stats of
  `Transformer.__call__`, which cover non-padding inputs only; `evaluation.evaluate` reduces
  them over batches."""
  model = nnx.merge(graphdef, params, buffers)
  targets_BL, weights_BL = batch['targets'], batch['weights']
  real_BL = batch['inputs'] != pad_id
  logits_BLV, moe_stats = model(batch['inputs'], train=False, mask_BL=real_BL)
  return {**token_sums(logits_BLV, targets_BL, weights_BL), 'num_routed': jnp.sum(real_BL),
          **moe_stats}


def token_sums(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
               ) -> dict[str, jax.Array]:
  """The eval step's sums over the weighted targets of one batch, from logits [B, L, V],
  targets [B, L] and weights [B, L]: `ce_sum` (nats), `num_tokens`, `num_correct` (argmax),
  and `exact_match_sums`'s two counts. Every model family's eval step returns these, for
  `evaluation.evaluate` to reduce (with `num_bytes`, which it adds from the tokenizer)."""
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  correct_BL = jnp.argmax(logits_BLV, -1) == targets_BL
  return {
      'ce_sum': jnp.sum(ce_BL * weights_BL),
      'num_tokens': jnp.sum(weights_BL),
      'num_correct': jnp.sum(correct_BL * weights_BL),
      **exact_match_sums(correct_BL, weights_BL),
  }


def exact_match_sums(correct_BL: jax.Array, weights_BL: jax.Array) -> dict[str, jax.Array]:
  """{'num_exact', 'num_examples'} of one batch from correct_BL = (argmax == target) [B, L] and
  the loss weights [B, L]: rows with a weighted target, and those whose every weighted target is
  correct. A task row (one example, `data.tasks`) is then exactly right: the teacher-forced
  argmax equals the answer and its EOS, so greedy decoding emits it (any model family)."""
  scored_B = jnp.any(weights_BL > 0, axis=-1)
  exact_B = scored_B & jnp.all(correct_BL | (weights_BL == 0), axis=-1)
  return {'num_exact': jnp.sum(exact_B), 'num_examples': jnp.sum(scored_B)}


def moe_metrics(moe_stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Routing telemetry for logs: scalars over all MoE layers plus per-layer arrays.

  Scalars: `dropped_fraction` (mean over layers) and `max_expert_load` (worst layer's max/mean
  load ratio: 1 is perfect balance, E total collapse) and `max_router_logit` (largest |router
  logit| of any layer). Per layer (leading axis M): `expert_load` [M, E],
  `layer_dropped_fraction` [M], `dropped_fraction_per_slot` [M, K], `router_z` [M]
  (mean logsumexp^2), `router_entropy` [M], `max_load_ratio` [M], `router_bias` [M, E],
  `tokens_left_behind` [M] (share of tokens every choice of which was dropped) and
  `router_confidence` [M] (mean top-1 router probability), `null_choice_fraction` [M] (share
  of choices sent to null experts: the expert FLOPs saved), `experts_per_token` [M] (mean
  kept choices per token: what the expert FLOPs spent scale with).
  """
  if not moe_stats['expert_load'].shape[0]:
    return {}
  return {
      'dropped_fraction': jnp.mean(moe_stats['dropped_fraction']),
      'max_expert_load': jnp.max(moe_stats['max_load_ratio']),
      'max_router_logit': jnp.max(moe_stats['max_router_logit']),
      'expert_load': moe_stats['expert_load'],
      'layer_dropped_fraction': moe_stats['dropped_fraction'],
      'dropped_fraction_per_slot': moe_stats['dropped_fraction_per_slot'],
      'router_z': moe_stats['z_loss'],
      'router_entropy': moe_stats['router_entropy'],
      'max_load_ratio': moe_stats['max_load_ratio'],
      'router_bias': moe_stats['router_bias'],
      'tokens_left_behind': moe_stats['tokens_left_behind'],
      'router_confidence': moe_stats['router_confidence'],
      'null_choice_fraction': moe_stats['null_choice_fraction'],
      'experts_per_token': moe_stats['experts_per_token'],
  }
