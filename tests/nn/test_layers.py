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


def rotary_reference(x, position, max_wavelength, pairs):
  """RoFormer eq. 13-15 one pair at a time: pair i = features pairs(i), angle
  position / max_wavelength^(2i/K)."""
  out = np.array(x, np.float64)
  K = x.shape[-1]
  for i in range(K // 2):
    a, b = pairs(i, K)
    angle = position / max_wavelength ** (2 * i / K)
    out[..., a] = x[..., a] * np.cos(angle) - x[..., b] * np.sin(angle)
    out[..., b] = x[..., b] * np.cos(angle) + x[..., a] * np.sin(angle)
  return out


@pytest.mark.parametrize('layout,pairs', [
    ('half_split', lambda i, K: (i, i + K // 2)),  # HF rotate_half (Llama, Mixtral, Qwen).
    ('interleaved', lambda i, K: (2 * i, 2 * i + 1))])  # GPT-J, Meta's Llama code.
def test_rotary_layouts_rotate_their_pairs(layout, pairs):
  x = np.random.default_rng(0).standard_normal((1, 3, 2, 8))
  positions = np.array([[0, 5, 17]])
  got = layers.apply_rotary(jnp.asarray(x, jnp.float32), jnp.asarray(positions), 1e4, layout)
  for t in range(3):
    np.testing.assert_allclose(got[0, t], rotary_reference(x[0, t], positions[0, t], 1e4, pairs),
                               rtol=1e-5, atol=1e-5)
