"""The train loss adds each auxiliary loss at its coefficient; telemetry and eval sums."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stmoe_jax.moe import layer_stats
from stmoe_jax.nn import layers
from stmoe_jax.models import losses
from stmoe_jax.data import tokenizer
from stmoe_jax.models.transformer import Transformer


def batch(B=2, L=8):
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, L + 1), 0, tokenizer.PAD_ID)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'weights': jnp.ones((B, L), jnp.float32).at[0, :3].set(0.0)}


def test_loss_is_cross_entropy_plus_weighted_router_and_attention_losses(tiny_model_cfg):
  cfg = tiny_model_cfg(moe=dict(group_size=16, aux_loss_coef=0.5, z_loss_coef=0.25),
                       attention=dict(layer_kinds='dense,head_routed', head_top_k=1,
                                      head_aux_loss_coef=0.125, head_z_loss_coef=2.0,
                                      logit_z_loss_coef=4.0))
  graphdef, params, buffers = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)),
                                        *layers.STATE_FILTERS)
  b, rng = batch(), jax.random.PRNGKey(1)

  @jax.jit  # One compile for the loss and the reference forward pass.
  def run(params, buffers):
    return (losses.compute_loss(params, buffers, graphdef, b, rng, cfg),
            nnx.merge(graphdef, params, buffers)(b['inputs'], train=True, rng=rng))

  (loss, (metrics, new_buffers)), (logits, stats) = run(params, buffers)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, b['targets'])
  np.testing.assert_allclose(metrics['cross_entropy'],
                             jnp.sum(ce * b['weights']) / jnp.sum(b['weights']), rtol=1e-5)
  want = (metrics['cross_entropy'] + 0.5 * metrics['balance_loss'] + 0.25 * metrics['z_loss'] +
          0.125 * metrics['attn_balance_loss'] + 2.0 * metrics['attn_z_loss'] +
          4.0 * metrics['attn_logit_z_loss'])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(metrics['balance_loss'], jnp.sum(stats['balance_loss']), rtol=1e-6)
  assert metrics['expert_load'].shape == (1, 4) and metrics['attn_logit_z_loss'] > 0
  assert jax.tree.structure(new_buffers) == jax.tree.structure(nnx.to_pure_dict(buffers))


def test_moe_metrics_summarise_the_layers():
  stats = {name: jnp.ones((2, *(3 for _ in shape))) for name, shape in layer_stats.MOE.items()}
  stats['dropped_fraction'] = jnp.array([0.1, 0.3])
  stats['max_load_ratio'] = jnp.array([1.5, 2.5])
  metrics = losses.moe_metrics(stats)
  np.testing.assert_allclose(metrics['dropped_fraction'], 0.2)
  assert metrics['max_expert_load'] == 2.5 and metrics['expert_load'].shape == (2, 3)
  empty = {name: jnp.zeros((0, *(3 for _ in shape))) for name, shape in layer_stats.MOE.items()}
  assert losses.moe_metrics(empty) == {}  # No MoE layers: no routing telemetry.


def test_eval_step_sums(tiny_model_cfg):
  cfg = tiny_model_cfg(moe=dict(group_size=16))
  graphdef, params, buffers = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)),
                                        *layers.STATE_FILTERS)
  b = batch()
  b['inputs'] = b['inputs'].at[1, 6:].set(tokenizer.PAD_ID)  # Padding: not routed.
  b['targets'] = b['targets'].at[1, 5].set(tokenizer.EOS_ID)  # Costs bits, is not a byte.
  out, (logits, _) = jax.jit(lambda p, bf: (
      losses.eval_step(p, bf, b, graphdef=graphdef),
      nnx.merge(graphdef, p, bf)(b['inputs'], mask_BL=b['inputs'] != tokenizer.PAD_ID)))(
          params, buffers)
  assert out['num_tokens'] == 13 and out['num_routed'] == 14
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, b['targets'])
  np.testing.assert_allclose(out['ce_sum'], jnp.sum(ce * b['weights']), rtol=1e-5)
  assert out['expert_load'].shape == (1, 4)  # The per-layer stats ride along.
