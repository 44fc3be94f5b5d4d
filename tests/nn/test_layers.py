"""Parameters with logical axes, the one state split, RMSNorm, rotary positions, dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmoe_jax.nn import layers


def test_param_carries_one_logical_name_per_dim():
  p = layers.param(nnx.Rngs(0), jax.nn.initializers.ones, (2, 3), ('embed', 'mlp'))
  assert p.get_metadata()['out_sharding'] == ('embed', 'mlp') and p.dtype == jnp.float32
  with pytest.raises(ValueError, match='do not match'):
    layers.param(nnx.Rngs(0), jax.nn.initializers.ones, (2, 3), ('embed',))


class _Module(nnx.Module):
  def __init__(self, extra=None):
    self.w = layers.param(nnx.Rngs(0), jax.nn.initializers.ones, (2,), ('embed',))
    self.bias = layers.Buffer(jnp.zeros(2))
    self.extra = extra


def test_state_filters_split_params_from_buffers_and_miss_nothing():
  _, params, buffers = nnx.split(_Module(), *layers.STATE_FILTERS)
  assert set(nnx.to_pure_dict(params)) == {'w'} and set(nnx.to_pure_dict(buffers)) == {'bias'}
  with pytest.raises(ValueError, match='Non-exhaustive'):  # A Variable of no known kind.
    nnx.split(_Module(extra=nnx.BatchStat(jnp.zeros(1))), *layers.STATE_FILTERS)


def test_dense_is_a_contraction_of_the_leading_weight_dims():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 6))
  np.testing.assert_allclose(layers.dense(x, w, contract=2),
                             jnp.einsum('abcd,cde->abe', x, w), rtol=1e-5)
  with pytest.raises(ValueError, match='cannot contract'):
    layers.dense(x, w)


def test_rms_norm_gives_unit_root_mean_square():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8)) * 5
  y = layers.RMSNorm(8, rngs=nnx.Rngs(0))(x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y * y, axis=-1)), 1.0, rtol=1e-4)


def test_rotary_scores_depend_on_relative_position_only():
  q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1, 1, 8))
  score = lambda i, j: jnp.sum(layers.apply_rotary(q, jnp.array([[i]]), 100.0) *
                               layers.apply_rotary(k, jnp.array([[j]]), 100.0))
  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-4)
  assert not np.isclose(score(5, 2), score(5, 3))
