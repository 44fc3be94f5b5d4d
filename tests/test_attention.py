"""The KV cache's slots (full length and ring buffer) and dense attention's call signature."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmoe_jax.attention import CausalSelfAttention, KVCache


def test_a_full_length_cache_holds_position_t_in_slot_t(tiny_model_cfg):
  cache = KVCache.zeros(1, 6, tiny_model_cfg(), num_heads=1)
  np.testing.assert_array_equal(cache.slot_positions(), [-1] * 6)
  new = jnp.arange(4, dtype=jnp.float32).reshape(1, 4, 1, 1) * jnp.ones((1, 4, 1, 8))
  cache = cache.append(new, new)
  np.testing.assert_array_equal(cache.slot_positions(), [0, 1, 2, 3, -1, -1])
  np.testing.assert_array_equal(cache.k[0, :4, 0, 0], [0, 1, 2, 3])
  assert int(cache.end) == 4


def test_a_short_cache_is_a_ring_buffer_of_the_newest_positions(tiny_model_cfg):
  cache = KVCache.zeros(1, 3, tiny_model_cfg(), num_heads=1)
  values = lambda start, n: (jnp.arange(start, start + n, dtype=jnp.float32)
                             .reshape(1, n, 1, 1) * jnp.ones((1, n, 1, 8)))
  cache = cache.append(values(0, 5), values(0, 5))  # More positions than slots: the last 3 stay.
  np.testing.assert_array_equal(cache.slot_positions(), [3, 4, 2])
  np.testing.assert_array_equal(cache.k[0, :, 0, 0], [3, 4, 2])
  cache = cache.append(values(5, 1), values(5, 1))
  np.testing.assert_array_equal(cache.slot_positions(), [3, 4, 5])


def test_dense_attention_has_the_common_call_signature_and_is_causal(tiny_model_cfg):
  graphdef, state = nnx.split(CausalSelfAttention(tiny_model_cfg(), rngs=nnx.Rngs(0)))
  run = jax.jit(lambda x: nnx.merge(graphdef, state)(x, jnp.arange(6)[None],
                                                     mask_BL=jnp.ones((1, 6))))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 16))
  y, stats = run(x)
  assert y.shape == (1, 6, 16) and stats == {}  # Plain dense attention computes no stats.
  y_changed, _ = run(x.at[:, 4].add(1.0))
  np.testing.assert_array_equal(y[:, :4], y_changed[:, :4])
