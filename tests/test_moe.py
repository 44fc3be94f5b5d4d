"""The MoE layer against a per-token loop over experts in numpy, and token dropping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmoe_jax.config import MoeConfig, ModelConfig
from stmoe_jax.moe import MoeLayer
from stmoe_jax.transformer import Block


def tiny_cfg(**moe_overrides):
  fields = dict(num_experts=4, top_k=2, expert_d_ff=16, group_size=8, min_capacity=1)
  moe = MoeConfig(**{**fields, **moe_overrides})
  return ModelConfig(d_model=8, num_layers=2, num_heads=2, head_dim=4, d_ff=16, moe=moe)


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


@pytest.mark.parametrize('k,activation,renormalize', [(1, 'gelu', True), (2, 'geglu', True),
                                                      (2, 'gelu', False), (3, 'geglu', True)])
def test_moe_layer_matches_per_token_loop(k, activation, renormalize):
  cfg = dataclasses.replace(tiny_cfg(top_k=k, renormalize_gates=renormalize,
                                     eval_capacity_factor=8.0), activation=activation)
  layer = MoeLayer(cfg, rngs=nnx.Rngs(k))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, cfg.d_model))
  y, stats = layer(x, train=False)
  assert float(stats['dropped_fraction']) == 0.0
  np.testing.assert_allclose(y, numpy_moe(layer, x, k, renormalize), rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(np.sum(stats['expert_load']), 1.0, rtol=1e-6)


def test_dropped_token_output_is_exactly_zero():
  # Identical tokens all pick the same two experts; capacity 1 keeps only the first token.
  cfg = tiny_cfg(top_k=2, train_capacity_factor=0.01)
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
  out, _ = block(x, positions, train=True)
  after_attention = x + block.attn(block.attn_norm(x), positions)
  np.testing.assert_array_equal(np.asarray(out[0, 1:]), np.asarray(after_attention[0, 1:]))
  assert not np.array_equal(np.asarray(out[0, 0]), np.asarray(after_attention[0, 0]))


def test_group_size_must_divide_tokens():
  layer = MoeLayer(tiny_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='group_size=8'):
    layer(jnp.zeros((1, 6, 8)), train=False)
