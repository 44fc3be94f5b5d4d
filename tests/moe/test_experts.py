"""Batched experts against a loop of numpy FFNs; grouped (dropless) rows against the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmoe_jax.moe.experts import Experts, Mlp


def numpy_ffn(x, w_up, w_gate, bias, w_down):
  gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  h = gelu(x @ w_gate) * (x @ w_up) * bias
  return h @ w_down


@pytest.fixture(scope='module')
def experts():
  layer = Experts(3, 4, 8, 'geglu_mult_bias', 1.0, jnp.float32, rngs=nnx.Rngs(0))
  layer.mult_bias[...] = jax.random.uniform(jax.random.PRNGKey(1), (3, 8)) + 0.5
  return layer


def test_experts_apply_expert_e_to_row_e(experts):
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 4))
  w = {n: np.asarray(getattr(experts, n)[...], np.float64)
       for n in ('w_up', 'w_gate', 'mult_bias', 'w_down')}
  want = np.stack([numpy_ffn(np.asarray(x[e], np.float64), w['w_up'][e], w['w_gate'][e],
                             w['mult_bias'][e], w['w_down'][e]) for e in range(3)])
  np.testing.assert_allclose(experts(x), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('impl', ['ragged_dot', 'blocked', 'megablox'])
def test_grouped_rows_equal_the_batched_experts(experts, impl):
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 4))
  sizes = jnp.array([2, 0, 5], jnp.int32)  # Rows of expert 0, none of 1, 5 of expert 2.
  rows = jnp.concatenate([x[0, :2], x[2], jnp.zeros((1, 4))])  # One row past the groups.
  graphdef, state = nnx.split(experts)
  y, batched = jax.jit(lambda rows, x: (nnx.merge(graphdef, state).grouped(rows, sizes, impl=impl),
                                        nnx.merge(graphdef, state)(x)))(rows, x)
  np.testing.assert_allclose(y[:2], batched[0, :2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y[2:7], batched[2], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[7:], 0.0)


def test_mlp_is_one_expert():
  mlp = Mlp(4, 8, 'gelu', 1.0, jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  h = np.asarray(x, np.float64) @ np.asarray(mlp.w_up[...], np.float64)
  gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  np.testing.assert_allclose(mlp(x), gelu @ np.asarray(mlp.w_down[...], np.float64),
                             rtol=1e-4, atol=1e-6)
