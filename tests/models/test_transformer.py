"""Model-level invariants: causality and FLOP matching of the dense baseline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from configs import default, tiny
from stmoe_jax.nn import attention
from stmoe_jax.config import model_config
from stmoe_jax.models.transformer import Transformer


def small_cfg(**moe):
  return tiny_model_config(moe=moe)


@pytest.mark.parametrize('train,moe', [
    (True, {}), (False, {}),
    (True, dict(second_expert_threshold=0.2, router_jitter=0.1, num_shared_experts=1)),
    (True, dict(dispatch='dropless', bias_balancer_rate=0.01, extra_dense_ffn='before')),
])
def test_changing_a_later_token_never_changes_earlier_logits(train, moe):
  # Capacity factor 0.5 forces drops, so the test also covers token-order capacity: a later
  # token must never take an earlier token's expert slot.
  cfg = small_cfg(train_capacity_factor=0.5, eval_capacity_factor=0.5, **moe)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 259)
  rng = jax.random.PRNGKey(1)  # The same noise for every call: only the token changes.
  graphdef, state = nnx.split(model)
  state = nnx.to_pure_dict(state)  # merge() of a pure dict copies: the balancer mutates biases.
  run = lambda t: nnx.merge(graphdef, state)(t, train=train, rng=rng)
  logits, stats = run(tokens)
  assert moe.get('dispatch') == 'dropless' or float(jnp.max(stats['dropped_fraction'])) > 0
  # Both sequences share one routing group, so this also covers the other sequence.
  for b, t in [(0, 3), (0, 9), (1, 2), (1, 15)]:
    changed = tokens.at[b, t].set((tokens[b, t] + 1) % 259)
    logits_changed, _ = run(changed)
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


# (field, value, what must differ): each routing field flipped through the ConfigDict path.
FIELD_FLIPS = [
    ('moe.second_expert_threshold', 0.9, 'logits'),  # Init gates are ~0.5: some drop.
    ('moe.router_jitter', 0.5, 'logits'),
    ('moe.renormalize_gates', False, 'logits'),
    ('moe.dispatch', 'dropless', 'logits'),
    ('moe.train_capacity_factor', 0.5, 'logits'),
    ('moe.capacity_scaled_by_k', False, 'logits'),
    ('moe.min_capacity', 32, 'logits'),  # Raises capacity from 16 to the whole group.
    ('moe.expert_dropout', 0.5, 'logits'),
    ('moe.bias_balancer_rate', 0.05, 'buffers'),
    ('moe.num_shared_experts', 1, 'params'),
    ('moe.shared_expert_d_ff', 8, 'params'),
    ('moe.extra_dense_ffn', 'after', 'params'),
    ('model.activation', 'geglu_mult_bias', 'params'),
]


@pytest.mark.parametrize('field,value,what', FIELD_FLIPS)
def test_every_routing_field_reaches_the_model(field, value, what):
  def run(config):
    model = Transformer(model_config(config), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 32), 0, 259)
    logits, _ = model(tokens, train=True, rng=jax.random.PRNGKey(1))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    buffers = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
    return logits, {'/'.join(map(str, p)): v.shape for p, v in params}, buffers

  config = tiny.get_config()
  config.moe.update(group_size=32, min_capacity=2, train_capacity_factor=1.0)
  if field == 'moe.shared_expert_d_ff':
    config.moe.num_shared_experts = 1
  base_logits, base_params, base_buffers = run(config)
  section, key = field.split('.')
  config[section][key] = value
  if field == 'moe.dispatch' and value == 'dropless':  # It has no capacity to set.
    config.moe.update(min_capacity=4, train_capacity_factor=1.25)
  logits, params, buffers = run(config)
  if what == 'logits':
    assert params == base_params
    assert not np.allclose(logits, base_logits)
  elif what == 'buffers':  # Same forward pass, but the balancer moved the biases.
    np.testing.assert_array_equal(logits, base_logits)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).sum(), buffers,
                                        base_buffers))[0] > 0
  else:  # The field adds or reshapes parameters.
    assert params != base_params


def test_layer_kinds_cycle_and_stats_reach_the_model_output():
  att = dict(block_size=8, window=11, stride=5, num_local_blocks=2, num_global_blocks=1)
  cfg = tiny_model_config(num_layers=3, num_heads=4, attention=dict(
      att, layer_kinds='local,head_routed,dense', logit_z_loss_coef=1e-4))
  assert [cfg.attention.layer_kind(i) for i in range(5)] == [
      'local', 'head_routed', 'dense', 'local', 'head_routed']
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  # With the logit z-loss on, dense attention too runs where its log-normalisers are seen.
  assert [type(b.attn).__name__ for b in model.blocks] == [
      'PatternAttention', 'HeadRoutedAttention', 'PatternAttention']
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 259)
  graphdef, state = nnx.split(model)
  _, stats = jax.jit(lambda t: nnx.merge(graphdef, state)(t))(tokens)
  assert stats['attn_logit_z_loss'].shape == (3,) and np.all(stats['attn_logit_z_loss'] > 0)
  assert stats['attn_head_load'].shape == (1, 4) and stats['attn_balance_loss'].shape == (1,)
  # Without the logit z-loss, dense layers stay the plain CausalSelfAttention.
  plain = Transformer(tiny_model_config(num_heads=4, attention=att), rngs=nnx.Rngs(0))
  assert type(plain.blocks[0].attn) is attention.CausalSelfAttention
