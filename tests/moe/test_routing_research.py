"""Routing since ST-MoE (issue #30) against numpy references: the Gemma 4 router, the routing
metrics papers report, bias re-centring, quantile balancing and the global-batch balance loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from stmoe_jax.moe import routing
from stmoe_jax.moe.layer import MoeLayer


def numpy_gelu(x):  # tanh approximation, as jax.nn.gelu(approximate=True).
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def numpy_gemma4_moe(layer, x_BLD, k):
  """Per-token loop of gemma/gm/nn/gemma4/_moe.py: router on rms_norm(x) / sqrt(D) * scale,
  softmax, top-k, gates renormalised over the k, each expert's output times its scale."""
  f64 = lambda a: np.asarray(a, np.float64)
  w_router, router_scale, expert_scale = (f64(layer.router[...]), f64(layer.router_scale[...]),
                                          f64(layer.expert_scale[...]))
  w_up, w_down = f64(layer.experts.w_up[...]), f64(layer.experts.w_down[...])
  x = f64(x_BLD).reshape(-1, x_BLD.shape[-1])
  y = np.zeros_like(x)
  D = x.shape[-1]
  for t, x_t in enumerate(x):
    r = x_t / np.sqrt(np.mean(x_t**2) + 1e-6) / np.sqrt(D) * router_scale
    logits = r @ w_router
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs)[:k]
    for e in chosen:
      y[t] += probs[e] / probs[chosen].sum() * expert_scale[e] * (
          numpy_gelu(x_t @ w_up[e]) @ w_down[e])
  return y.reshape(x_BLD.shape)


@pytest.mark.parametrize('dispatch', ['einsum', 'scatter', 'dropless'])
def test_gemma4_router_matches_a_per_token_loop(dispatch):
  cfg = tiny_model_config(d_model=8, head_dim=4, activation='gelu', moe={
      'group_size': 8, 'top_k': 2, 'dispatch': dispatch, 'eval_capacity_factor': 8.0,
      'router_input_norm': True, 'expert_output_scale': True})
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  # Away from their init of ones, so that a scale applied in the wrong place shows.
  layer.router_scale[...] = jax.random.uniform(keys[0], (8,), minval=0.5, maxval=2.0)
  layer.expert_scale[...] = jax.random.uniform(keys[1], (4,), minval=0.5, maxval=2.0)
  x = 3.0 * jax.random.normal(keys[2], (2, 8, 8))
  y, stats = layer(x, train=False)
  assert float(stats['dropped_fraction']) == 0.0
  np.testing.assert_allclose(y, numpy_gemma4_moe(layer, x, 2), rtol=2e-4, atol=1e-5)
  # The router input is scale-free: the same routing for 10x the input.
  np.testing.assert_allclose(layer.route(to_groups_(10 * x), train=False, rng=None,
                                         mask_GS=None).probs,
                             layer.route(to_groups_(x), train=False, rng=None,
                                         mask_GS=None).probs, rtol=1e-5)


def to_groups_(x_BLD):
  return x_BLD.reshape(-1, 8, x_BLD.shape[-1])
