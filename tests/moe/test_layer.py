"""The MoE layer against a per-token loop over experts in numpy, and token dropping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from stmoe_jax.nn import layers
from stmoe_jax.moe.layer import MoeLayer, from_groups, to_groups
from stmoe_jax.models.transformer import Block


def tiny_cfg(**moe_overrides):
  return tiny_model_config(d_model=8, head_dim=4, d_ff=16,
                           moe={'group_size': 8, **moe_overrides})


def numpy_gelu(x):  # tanh approximation, as jax.nn.gelu(approximate=True).
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def numpy_moe(layer: MoeLayer, x_BLD, k, renormalize):
  """Per-token loop: y = sum over chosen experts of gate * expert(x); nothing dropped."""
  w_router = np.asarray(layer.router[...], np.float64)
  w_up, w_down = np.asarray(layer.experts.w_up[...]), np.asarray(layer.experts.w_down[...])
  w_gate = None if layer.experts.w_gate is None else np.asarray(layer.experts.w_gate[...])
  x = np.asarray(x_BLD, np.float64).reshape(-1, x_BLD.shape[-1])
  y = np.zeros_like(x)
  for t, x_t in enumerate(x):
    logits = x_t @ w_router
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs)[:k]
    gates = probs[chosen] / (probs[chosen].sum() if renormalize and k > 1 else 1.0)
    for e, g in zip(chosen, gates):
      h = x_t @ w_up[e]
      h = numpy_gelu(x_t @ w_gate[e]) * h if w_gate is not None else numpy_gelu(h)
      y[t] += g * (h @ w_down[e])
  return y.reshape(x_BLD.shape)


# Float64 numpy reference; tests/test_dispatch.py adds gradients and the dropless path.
@pytest.mark.parametrize('dispatch', ['einsum', 'scatter'])
@pytest.mark.parametrize('k,activation,renormalize', [(1, 'gelu', True), (2, 'gelu', False),
                                                      (3, 'geglu', True)])
def test_moe_layer_matches_per_token_loop(k, activation, renormalize, dispatch):
  cfg = dataclasses.replace(tiny_cfg(top_k=k, renormalize_gates=renormalize, dispatch=dispatch,
                                     eval_capacity_factor=8.0), activation=activation)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(k))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, cfg.d_model))
  y, stats = layer(x, train=False)
  assert float(stats['dropped_fraction']) == 0.0
  np.testing.assert_allclose(y, numpy_moe(layer, x, k, renormalize), rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(np.sum(stats['expert_load']), 1.0, rtol=1e-6)


@pytest.mark.parametrize('dispatch', ['einsum', 'scatter'])
def test_dropped_token_output_is_exactly_zero(dispatch):
  # Identical tokens all pick the same two experts; capacity 1 keeps only the first token.
  cfg = tiny_cfg(top_k=2, train_capacity_factor=0.01, dispatch=dispatch)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  assert layer.capacity(train=True) == 1
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(2), (cfg.d_model,)), (1, 8, 8))
  y, stats = layer(x, train=True)
  assert np.abs(np.asarray(y[0, 0])).sum() > 0
  np.testing.assert_array_equal(np.asarray(y[0, 1:]), 0.0)
  np.testing.assert_allclose(stats['dropped_fraction'], 7 / 8)


def test_block_returns_residual_for_dropped_token():
  cfg = tiny_cfg(top_k=1, train_capacity_factor=0.01)
  block = Block(cfg, layer=1, rngs=nnx.Rngs(0))  # layer 1 is MoE with moe.every=2.
  assert block.is_moe
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(3), (cfg.d_model,)), (1, 8, 8))
  positions = jnp.arange(8)[None]
  out = block(x, positions, train=True)[0]  # (output, {'moe': stats, 'attention': stats})
  after_attention = x + block.attn(block.attn_norm(x), positions)[0]
  np.testing.assert_array_equal(np.asarray(out[0, 1:]), np.asarray(after_attention[0, 1:]))
  assert not np.array_equal(np.asarray(out[0, 0]), np.asarray(after_attention[0, 0]))


def test_group_size_must_fit_the_batch():
  layer = MoeLayer(tiny_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='group_size=8'):
    layer(jnp.zeros((1, 6, 8)), train=False)


@pytest.mark.parametrize('group_size', [2, 4, 8, 12])
def test_groups_are_position_major_and_invertible(group_size):
  x = jnp.arange(6 * 4 * 2, dtype=jnp.float32).reshape(6, 4, 2)  # B=6, L=4, D=2
  groups = to_groups(x, group_size)
  np.testing.assert_array_equal(from_groups(groups, x.shape), x)
  if group_size > 4:  # Whole sequences per group: position 0 of each, then position 1, ...
    expected = np.asarray(x[:group_size // 4]).transpose(1, 0, 2).reshape(group_size, 2)
    np.testing.assert_array_equal(groups[0], expected)


def test_router_stays_float32_under_bfloat16_compute():
  cfg32 = tiny_cfg(eval_capacity_factor=8.0)
  cfg16 = dataclasses.replace(cfg32, dtype='bfloat16')
  layer32, layer16 = MoeLayer(cfg32, rngs=nnx.Rngs(0)), MoeLayer(cfg16, rngs=nnx.Rngs(0))
  # bfloat16 activations, as the layer sees them inside a bfloat16 model.
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, cfg32.d_model)).astype(jnp.bfloat16)
  y32, stats32 = layer32(x, train=False)
  y16, stats16 = layer16(x, train=False)
  assert y16.dtype == jnp.bfloat16
  # Routing is computed in float32 in both: identical choices and identical z-loss bits.
  assert float(stats16['z_loss']) == float(stats32['z_loss'])
  np.testing.assert_array_equal(stats16['expert_load'], stats32['expert_load'])
  y16, y32 = np.asarray(y16, np.float32), np.asarray(y32, np.float32)
  np.testing.assert_allclose(y16, y32, rtol=0.05, atol=0.02)  # Experts ran in bfloat16...
  assert not np.array_equal(y16, y32)  # ...so their outputs differ in the last bits.


def test_padding_takes_no_capacity_and_is_not_counted():
  # Identical tokens, top-1, capacity 1: the first real token gets the only slot.
  cfg = tiny_cfg(top_k=1, train_capacity_factor=0.01)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(6), (cfg.d_model,)), (1, 8, 8))
  mask = jnp.asarray([[False, False, True, True, True, True, True, True]])
  y, stats = layer(x, train=True, mask_BL=mask)
  y = np.asarray(y[0])
  np.testing.assert_array_equal(y[:2], 0.0)  # Padding is never dispatched.
  assert np.abs(y[2]).sum() > 0  # The first real token got the slot padding did not take.
  np.testing.assert_array_equal(y[3:], 0.0)
  np.testing.assert_allclose(stats['dropped_fraction'], 5 / 6)  # 6 real tokens, 1 kept.
  np.testing.assert_allclose(np.max(stats['expert_load']), 1.0)


def test_causal_layer_refuses_noncausal_routers():
  with pytest.raises(ValueError, match="moe.router='expert_choice'.*causal"):
    MoeLayer(tiny_cfg(router='expert_choice'), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='batch_prioritized_routing=True.*causal'):
    MoeLayer(tiny_cfg(batch_prioritized_routing=True), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('dispatch', ['einsum', 'scatter'])
def test_expert_choice_layer_matches_a_loop_over_experts(dispatch):
  # Non-causal use: each expert takes its top-C tokens by probability, weighted by it.
  cfg = tiny_cfg(router='expert_choice', top_k=1, eval_capacity_factor=1.0, dispatch=dispatch)
  layer = MoeLayer(cfg, causal=False, rngs=nnx.Rngs(3))
  C = layer.capacity(train=False)
  assert C == 2  # 8 tokens, 4 experts, factor 1: every expert takes 2 tokens per group.
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, cfg.d_model))
  y, stats = layer(x, train=False)
  w_router = np.asarray(layer.router[...], np.float64)
  w_up, w_gate, w_down = (np.asarray(w[...]) for w in
                          (layer.experts.w_up, layer.experts.w_gate, layer.experts.w_down))
  expected = np.zeros((2, 8, cfg.d_model))
  for g in range(2):  # Groups are the two sequences (group_size 8 = seq_len).
    xg = np.asarray(x[g], np.float64)
    probs = np.exp(xg @ w_router)
    probs /= probs.sum(-1, keepdims=True)
    for e in range(4):
      for t in np.argsort(-probs[:, e], kind='stable')[:C]:
        h = numpy_gelu(xg[t] @ w_gate[e]) * (xg[t] @ w_up[e])
        expected[g, t] += probs[t, e] * (h @ w_down[e])
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(stats['expert_load'], 0.25, rtol=1e-6)


def test_bias_balancer_drives_a_skewed_router_toward_balance():
  cfg = tiny_cfg(top_k=1, group_size=64, bias_balancer_rate=2e-3)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  # Skew: every router column leans towards expert 0.
  layer.router[...] = layer.router[...] + jnp.asarray([0.5, 0.0, 0.0, 0.0])[None]
  x = jax.random.normal(jax.random.PRNGKey(5), (8, 8, cfg.d_model)) + 0.5
  graphdef, params, buffers = nnx.split(layer, *layers.STATE_FILTERS)

  @jax.jit
  def step(buffers):
    model = nnx.merge(graphdef, params, buffers)
    _, stats = model(x, train=True)  # Updates the bias from this batch's load.
    return nnx.split(model, *layers.STATE_FILTERS)[2], stats['max_load_ratio']

  ratios = []
  for _ in range(300):
    buffers, ratio = step(buffers)
    ratios.append(float(ratio))
  assert ratios[0] > 2.5  # Most tokens start on expert 0.
  assert max(ratios[-20:]) < 1.25, ratios[-20:]
  bias = np.asarray(nnx.to_pure_dict(buffers)['router_bias'])
  assert bias[0] < 0 and np.all(bias[1:] > bias[0])  # The over-loaded expert was pushed down.


def test_shared_experts_add_a_dense_ffn_for_every_token():
  cfg = tiny_cfg(num_shared_experts=2, shared_expert_d_ff=8, eval_capacity_factor=8.0)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(1))
  assert layer.shared.w_up[...].shape == (cfg.d_model, 16)  # 2 shared experts of width 8.
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, cfg.d_model))
  y, _ = layer(x, train=False)
  w_up, w_gate, w_down = (np.asarray(w[...], np.float64) for w in
                          (layer.shared.w_up, layer.shared.w_gate, layer.shared.w_down))
  xf = np.asarray(x, np.float64)
  shared = (numpy_gelu(xf @ w_gate) * (xf @ w_up)) @ w_down
  np.testing.assert_allclose(y, numpy_moe(layer, x, 2, True) + shared, rtol=2e-4, atol=1e-5)


def test_expert_dropout_is_unbiased_and_off_at_eval():
  cfg = tiny_cfg(expert_dropout=0.5, eval_capacity_factor=8.0, train_capacity_factor=8.0)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 8, cfg.d_model))
  y_eval, _ = layer(x, train=False)
  np.testing.assert_allclose(y_eval, numpy_moe(layer, x, 2, True), rtol=2e-4, atol=1e-5)
  graphdef, state = nnx.split(layer)
  sample = jax.jit(jax.vmap(lambda r: nnx.merge(graphdef, state)(x, train=True, rng=r)[0]))
  y_train = sample(jax.random.split(jax.random.PRNGKey(3), 2000))
  assert not np.allclose(y_train[0], y_eval)
  # Inverted dropout before a linear layer: the mean over masks is the no-dropout output.
  np.testing.assert_allclose(np.mean(y_train, axis=0), y_eval, atol=0.1 * np.abs(y_eval).max())


@pytest.mark.parametrize('where', ['before', 'after'])
def test_extra_dense_ffn_sits_before_or_after_the_moe(where):
  cfg = tiny_cfg(extra_dense_ffn=where, eval_capacity_factor=8.0)
  block = Block(cfg, layer=1, rngs=nnx.Rngs(0))
  assert block.is_moe
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 8, cfg.d_model))
  positions = jnp.arange(8)[None]
  out, _ = block(x, positions, train=False)
  h = x + block.attn(block.attn_norm(x), positions)[0]
  dense = lambda h: h + block.extra_ffn(block.extra_norm(h))
  moe = lambda h: h + block.ffn(block.ffn_norm(h), train=False)[0]
  expected = moe(dense(h)) if where == 'before' else dense(moe(h))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  assert not Block(cfg, layer=0, rngs=nnx.Rngs(0)).extra_dense != 'none'  # Dense layers: none.


def test_multiplicative_bias_scales_the_gated_hidden_units():
  cfg = dataclasses.replace(tiny_cfg(eval_capacity_factor=8.0), activation='geglu_mult_bias')
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, cfg.d_model))
  y1, _ = layer(x, train=False)
  layer.experts.mult_bias[...] = 2.0 * layer.experts.mult_bias[...]
  y2, _ = layer(x, train=False)
  np.testing.assert_allclose(y2, 2.0 * y1, rtol=1e-5, atol=1e-7)  # W_down is linear.
