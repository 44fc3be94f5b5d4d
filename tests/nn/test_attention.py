"""The KV cache's slots (full length and ring buffer), dense attention's call signature, and
query-chunked attention (`causal_attention`, and `key_masked_attention` of the encoder's
self-attention and cross-attention) against the unchunked call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stmoe_jax.nn.attention import CausalSelfAttention, KVCache


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


def _largest_intermediate(jaxpr) -> int:
  """Elements of the largest value any equation of `jaxpr` (or of a jaxpr inside it: scan
  bodies, checkpoints, pjit) produces."""
  largest = 0
  for eqn in jaxpr.eqns:
    for out in eqn.outvars:
      largest = max(largest, int(np.prod(out.aval.shape)) if hasattr(out.aval, 'shape') else 0)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          largest = max(largest, _largest_intermediate(inner))
  return largest


def _naive_causal_attention(q, k, v):
  """numpy float64: softmax(q k^T / sqrt(K) masked to s <= t) v, per batch row and head."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1])
  L = q.shape[1]
  logits = np.where(np.tril(np.ones((L, L), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhts,bshk->bthk', probs, v)


def test_query_chunked_attention_equals_the_unchunked_and_never_holds_l_by_l_logits():
  from stmoe_jax.nn.attention import causal_attention
  B, L, H, K, Q = 2, 64, 2, 8, 16
  q, k, v = jax.random.normal(jax.random.PRNGKey(1), (3, B, L, H, K))
  chunked = causal_attention(q, k, v, query_chunk=Q)
  whole = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(chunked, _naive_causal_attention(q, k, v), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)
  # Gradients of a loss that weights every output differently, against the unchunked call's.
  w = jax.random.normal(jax.random.PRNGKey(2), (B, L, H, K))
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * w)
  grads = jax.grad(loss(lambda *a: causal_attention(*a, query_chunk=Q)), argnums=(0, 1, 2))
  ref = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True)),
                 argnums=(0, 1, 2))
  for got, want in zip(grads(q, k, v), ref(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Forward and backward: no [B, H, L, L] value anywhere, only one chunk's [B, H, Q, L].
  assert _largest_intermediate(jax.make_jaxpr(ref)(q, k, v).jaxpr) == B * H * L * L
  assert _largest_intermediate(jax.make_jaxpr(grads)(q, k, v).jaxpr) == B * H * Q * L
  # Up to one chunk's length (or a chunk that does not divide L) it is the plain call.
  short = causal_attention(q[:, :Q], k[:, :Q], v[:, :Q], query_chunk=Q)
  np.testing.assert_array_equal(short, jax.nn.dot_product_attention(
      q[:, :Q], k[:, :Q], v[:, :Q], is_causal=True))


def test_a_scanned_rematerialized_model_with_chunked_attention_has_unchunked_loss_and_grads(
    tiny_model_cfg):
  import dataclasses
  from stmoe_jax.nn import layers
  from stmoe_jax.models import losses
  from stmoe_jax.models.transformer import Transformer
  cfg = dataclasses.replace(tiny_model_cfg(), remat='full', scan_layers=True)
  with_chunk = lambda chunk: dataclasses.replace(
      cfg, attention=dataclasses.replace(cfg.attention, query_chunk=chunk))
  B, L = 2, 16
  graphdef, params, buffers = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), *layers.STATE_FILTERS)
  params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
  tokens = np.random.default_rng(0).integers(0, 256, (B, L + 1), dtype=np.int32)
  batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
           'weights': jnp.ones((B, L), jnp.float32)}

  def loss_and_grads(query_chunk):
    graphdef = nnx.split(Transformer(with_chunk(query_chunk), rngs=nnx.Rngs(0)),
                         *layers.STATE_FILTERS)[0]
    fn = lambda p: losses.compute_loss(p, buffers, graphdef, batch, jax.random.PRNGKey(1), cfg)[0]
    return jax.jit(jax.value_and_grad(fn))(params)

  (loss, grads), (ref_loss, ref_grads) = loss_and_grads(4), loss_and_grads(0)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7),
               grads, ref_grads)


def _naive_key_masked_attention(q, k, v, visible_BT):
  """numpy float64: softmax(q k^T / sqrt(K)) v over the visible keys of each batch row; a row
  with no visible key weights all T keys equally (what jax.nn.dot_product_attention's large
  negative masked logits give)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('blhk,bthk->bhlt', q, k) / np.sqrt(q.shape[-1])
  visible = np.asarray(visible_BT, bool)[:, None, None, :]
  probs = np.exp(np.where(visible, logits - logits.max(-1, keepdims=True), -np.inf))
  total = probs.sum(-1, keepdims=True)
  probs = np.where(total > 0, probs / np.where(total > 0, total, 1.0), 1.0 / k.shape[1])
  return np.einsum('bhlt,bthk->blhk', probs, v)


@pytest.mark.parametrize('T', [64, 40], ids=['bidirectional', 'cross'])
def test_query_chunked_key_masked_attention_equals_the_unchunked_and_never_holds_l_by_t_logits(T):
  from stmoe_jax.nn.attention import key_masked_attention
  B, L, H, K, Q = 3, 64, 2, 8, 16
  q = jax.random.normal(jax.random.PRNGKey(1), (B, L, H, K))
  k, v = jax.random.normal(jax.random.PRNGKey(2), (2, B, T, H, K))
  # Row 0: trailing padding and a hole; row 1: all real; row 2: all padding (no visible key).
  visible_BT = np.ones((B, T), bool)
  visible_BT[0, T - 11:], visible_BT[0, 3], visible_BT[2] = False, False, False
  mask_BT = jnp.asarray(visible_BT, jnp.int32)  # The layers pass nonzero = real, any dtype.
  chunked = jax.jit(key_masked_attention, static_argnums=4)(q, k, v, mask_BT, Q)
  whole = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=jnp.asarray(visible_BT)[:, None,
                                                                                     None])
  np.testing.assert_allclose(chunked, _naive_key_masked_attention(q, k, v, visible_BT),
                             rtol=1e-5, atol=1e-6)
  # float32 rounding only: a chunk's [Q, T] matmul may sum in another order than the whole one.
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
  # The fully padded row is the mean of all T values, as in the unchunked call.
  np.testing.assert_allclose(chunked[2], jnp.broadcast_to(v[2].mean(0), (L, H, K)), rtol=1e-5,
                             atol=1e-6)
  w = jax.random.normal(jax.random.PRNGKey(3), (B, L, H, K))
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * w)
  grads = jax.grad(loss(lambda *a: key_masked_attention(*a, mask_BT, query_chunk=Q)),
                   argnums=(0, 1, 2))
  ref = jax.grad(loss(lambda *a: key_masked_attention(*a, mask_BT, query_chunk=0)),
                 argnums=(0, 1, 2))
  for got, want in zip(jax.jit(grads)(q, k, v), jax.jit(ref)(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Forward and backward: no [B, H, L, T] value anywhere, only one chunk's [B, H, Q, T].
  assert _largest_intermediate(jax.make_jaxpr(ref)(q, k, v).jaxpr) == B * H * L * T
  assert _largest_intermediate(jax.make_jaxpr(grads)(q, k, v).jaxpr) == B * H * Q * T
  # Up to one chunk's length, or a chunk that does not divide L, it is the plain call.
  for n in (Q, L - 8):
    assert (_largest_intermediate(jax.make_jaxpr(key_masked_attention, static_argnums=4)(
        q[:, :n], k, v, mask_BT, Q).jaxpr) == B * H * n * T)


def test_encoder_self_attention_and_cross_attention_use_the_query_chunk(tiny_model_cfg):
  import dataclasses
  from stmoe_jax.nn.attention import BidirectionalSelfAttention, CrossAttention
  B, L, T, H = 2, 16, 12, 2
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, 16))
  encoded = jax.random.normal(jax.random.PRNGKey(1), (B, T, 16))
  mask_BL = jnp.ones((B, L)).at[0, 11:].set(0)
  mask_BT = jnp.ones((B, T)).at[1, 7:].set(0)
  positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))

  def grad_and_jaxpr(layer_cls, query_chunk, call):
    cfg = tiny_model_cfg(attention={'query_chunk': query_chunk})
    layer = layer_cls(cfg, rngs=nnx.Rngs(0))
    fn = jax.grad(lambda x: jnp.sum(call(layer, x) ** 2))
    return jax.jit(fn)(x), _largest_intermediate(jax.make_jaxpr(fn)(x).jaxpr)

  encoder = lambda layer, x: layer(x, positions_BL, mask_BL=mask_BL)[0]
  cross = lambda layer, x: layer(x, layer.kv(encoded, mask_BT))
  for layer_cls, call, keys in ((BidirectionalSelfAttention, encoder, L),
                                (CrossAttention, cross, T)):
    (got, largest), (want, whole_largest) = (grad_and_jaxpr(layer_cls, 4, call),
                                             grad_and_jaxpr(layer_cls, 0, call))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert whole_largest == B * H * L * keys > largest, layer_cls.__name__
