"""Model-level invariants: causality and FLOP matching of the dense baseline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from stmoe_jax.config import MoeConfig, ModelConfig, model_config
from stmoe_jax.transformer import Transformer


def small_cfg(**moe):
  return ModelConfig(vocab_size=259, d_model=16, num_layers=2, num_heads=2, head_dim=8, d_ff=32,
                     moe=MoeConfig(**{**dict(num_experts=4, top_k=2, expert_d_ff=16,
                                             group_size=32, min_capacity=1), **moe}))


@pytest.mark.parametrize('train', [True, False])
def test_changing_a_later_token_never_changes_earlier_logits(train):
  # Capacity factor 0.5 forces drops, so the test also covers token-order capacity: a later
  # token must never take an earlier token's expert slot.
  cfg = small_cfg(train_capacity_factor=0.5, eval_capacity_factor=0.5)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 259)
  logits, stats = model(tokens, train=train)
  assert float(jnp.max(stats['dropped_fraction'])) > 0
  # Both sequences share one routing group, so this also covers the other sequence.
  for b, t in [(0, 3), (0, 9), (1, 2), (1, 15)]:
    changed = tokens.at[b, t].set((tokens[b, t] + 1) % 259)
    logits_changed, _ = model(changed, train=train)
    np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(logits_changed[:, :t]))
    assert not np.allclose(np.asarray(logits[b, t:]), np.asarray(logits_changed[b, t:]))


def test_dense_baseline_has_the_active_ffn_width_of_the_moe_model():
  config = default.get_config()
  moe_cfg = model_config(config)
  config.moe.enabled = False
  dense_cfg = model_config(config)
  moe_model = nnx.eval_shape(lambda: Transformer(moe_cfg, rngs=nnx.Rngs(0)))
  dense_model = nnx.eval_shape(lambda: Transformer(dense_cfg, rngs=nnx.Rngs(0)))
  for i in range(moe_cfg.num_layers):
    if moe_cfg.ffn_kind(i) == 'moe':
      assert dense_cfg.ffn_kind(i) == 'dense_matched'
      experts, dense = moe_model.blocks[i].ffn.experts, dense_model.blocks[i].ffn
      e, d, f = experts.w_up.shape
      # A token runs k experts of width f; the dense layer runs one of width k * f.
      assert dense.w_up.shape == (d, moe_cfg.moe.top_k * f)
      assert dense.w_down.shape == (moe_cfg.moe.top_k * f, d)
    else:
      assert dense_model.blocks[i].ffn.w_up.shape == moe_model.blocks[i].ffn.w_up.shape


def test_moe_layers_follow_every():
  cfg = dataclasses.replace(small_cfg(every=2), num_layers=4)
  assert [cfg.ffn_kind(i) for i in range(4)] == ['dense', 'moe', 'dense', 'moe']
  cfg = dataclasses.replace(small_cfg(every=4), num_layers=4)
  assert cfg.num_moe_layers == 1 and cfg.ffn_kind(3) == 'moe'


def test_parameters_carry_logical_axis_names():
  model = nnx.eval_shape(lambda: Transformer(small_cfg(), rngs=nnx.Rngs(0)))
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = variable.get_metadata().get('out_sharding')
    assert axes is not None and len(axes) == len(variable.shape), path
  experts = model.blocks[1].ffn.experts
  assert experts.w_up.get_metadata()['out_sharding'] == ('expert', 'embed', 'mlp')
