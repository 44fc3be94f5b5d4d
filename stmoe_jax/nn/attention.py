"""Causal multi-head self-attention with rotary positions, and the KV cache of every kind;
the encoder-decoder's bidirectional self-attention and cross-attention (with its cache). Long
query sequences run query-chunked (`causal_attention`, `key_masked_attention`).

The other kinds build on `CausalSelfAttention` (`sparse_attention`, `head_routing`);
`transformer.make_attention` picks a layer's kind.

Einsum letters: B batch, L length, D model dim, H heads, K head dim.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

import dataclasses
from collections.abc import Callable

from stmoe_jax.config import ModelConfig
from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option, Range, Satisfies
from stmoe_jax.nn import layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionKind(options.Entry):
  """One entry of `ATTENTION_KINDS`: a causal self-attention a decoder layer can run.

  Attributes:
    make: (cfg, *, rngs) -> module, called as `attn(x_BLD, positions_BL, mask_BL=...) ->
      ([B, L, D], stats)` and decoding as `attn.decode(x_BLD, cache)`.
    cache_slots: (cfg, length) -> KV-cache slots of a layer decoding `length` positions.
    cache_heads: cfg -> heads the cache holds (None = `cfg.kv_heads`, the key/value heads).
  """
  make: Callable[..., nnx.Module]
  cache_slots: Callable[[ModelConfig, int], int] = lambda cfg, length: length
  cache_heads: Callable[[ModelConfig], int | None] = lambda cfg: None


def _layer_kinds(config) -> set[str]:
  att = config.attention
  return {att.kind} | {k.strip() for k in att.layer_kinds.split(',') if att.layer_kinds}


ATTENTION_KINDS = options.Registry(
    'attention', 'attention.kind', 'dense', 'Attention of every decoder layer '
    '(nn/attention.py, nn/sparse_attention.py, moe/head_routing.py).', selected=_layer_kinds)
options.declare(Option(
    'attention.layer_kinds', str, '', "Kinds cycled over layers, e.g. 'local,local,local,dense';"
    " '' = all `kind`.", Satisfies(lambda kinds: all(
        k.strip() in ATTENTION_KINDS for k in kinds.split(',')) if kinds else True,
        'comma-separated attention kinds (attention.kind values)')))

QK_NORMS = ('none', 'per_head', 'full')
# Read by every self-attention built on `CausalSelfAttention` (dense, the pattern kinds, the
# encoder's); `head_routed` refuses the ones it cannot honour.
options.declare(
    Option('attention.num_kv_heads', int, 0, 'Key/value heads, shared by groups of query heads '
           '(GQA: Mixtral 8, Qwen3-MoE 4; 1 = multi-query); divides model.num_heads.',
           Range(0, note='0 = model.num_heads')),
    Option('attention.qk_norm', str, 'none', "RMSNorm on queries and keys before rotary: over "
           "each head ('per_head', Qwen3) or all heads at once ('full', OLMoE).",
           OneOf(QK_NORMS)),
    Option('attention.rope_layout', str, 'half_split', "Rotary pairs (x[i], x[i+K/2]) "
           "('half_split', HF rotate_half) or (x[2i], x[2i+1]) ('interleaved', GPT-J).",
           OneOf(layers.ROPE_LAYOUTS)),
    owner='nn.attention')


@options.add_check
def _check_kv_heads(config) -> None:
  kv, heads = config.attention.num_kv_heads, config.model.num_heads
  if kv and heads % kv:
    raise options.invalid('attention.num_kv_heads', kv,
                          f'a divisor of model.num_heads={heads} (0 = model.num_heads)')


@flax.struct.dataclass
class KVCache:
  """Keys and values of the positions decoded so far, for one attention layer.

  Position p lives in slot p % T. A cache of the full length (T >= every position) therefore has
  slot t = position t; a `local` layer's cache has T = window slots and is a ring buffer keeping
  the newest T positions (`slot_positions` says which).

  Attributes:
    k: [B, T, G, K] rotated keys of the G key/value heads (`cfg.kv_heads`; G = 1 for
      head-routed attention's shared keys).
    v: [B, T, G, K] values.
    end: int32 scalar, the number of positions written so far (= the position of the next token).
  """
  k: jax.Array
  v: jax.Array
  end: jax.Array

  @classmethod
  def zeros(cls, batch: int, length: int, cfg: ModelConfig,
            num_heads: int | None = None) -> 'KVCache':
    """An empty cache of `length` slots with `num_heads` key heads (default `cfg.kv_heads`:
    grouped-query attention caches only its key/value heads)."""
    shape = (batch, length, cfg.kv_heads if num_heads is None else num_heads, cfg.head_dim)
    empty = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return cls(k=empty, v=empty, end=jnp.zeros((), jnp.int32))

  def slot_positions(self) -> jax.Array:
    """int32 [T]: the position each slot holds (the newest p < end with p % T == t), -1 if empty."""
    T = self.k.shape[1]
    newest_T = self.end - 1 - jnp.mod(self.end - 1 - jnp.arange(T), T)
    return jnp.where(newest_T >= 0, newest_T, -1).astype(jnp.int32)

  def append(self, k_BLHK: jax.Array, v_BLHK: jax.Array) -> 'KVCache':
    """Writes L new positions end..end+L-1 into their slots; end advances by L.

    Of more new positions than slots only the last T are written (in a ring buffer the earlier
    ones would be overwritten anyway; writing them would make the scatter's indices collide).
    """
    T, L = self.k.shape[1], k_BLHK.shape[1]
    kept = min(L, T)
    slots = jnp.mod(self.end + (L - kept) + jnp.arange(kept), T)
    write = lambda cache, new: cache.at[:, slots].set(new[:, L - kept:].astype(cache.dtype))
    return KVCache(k=write(self.k, k_BLHK), v=write(self.v, v_BLHK), end=self.end + L)


def _chunked(L: int, query_chunk: int) -> bool:
  """Whether L queries run in chunks of `query_chunk`: only when that splits them into several
  equal chunks (0 = off), so short sequences keep the plain call and its exact numbers."""
  return bool(query_chunk) and L > query_chunk and not L % query_chunk


def _map_query_chunks(attend_chunk, q_BLHK: jax.Array, query_chunk: int) -> jax.Array:
  """Attention of q_BLHK [B, L, H, K] as a loop over its L / query_chunk chunks of queries.

  Rabe & Staats 2021 ("Self-attention does not need O(n^2) memory"), query-chunked form:
  `attend_chunk(q_BQHK, start)` -> [B, Q, H, K] attends one chunk of Q = query_chunk queries
  (the first at position `start`) to all keys, which it closes over. Each chunk runs inside a
  `lax.map` and is rematerialized (`jax.checkpoint`): the backward pass recomputes one chunk's
  [B, H, Q, T] logits at a time instead of keeping all [B, H, L, T] from the forward pass. The
  loop keeps that bound on every backend (XLA:CPU's scheduler ignores remat's ordering barriers
  between unrolled layers, not a loop's). The cost is one more query-key matmul in the backward
  pass. Callers check `_chunked` first. Returns [B, L, H, K].
  """
  B, L, H, K = q_BLHK.shape
  N = L // query_chunk
  q_NBQHK = jnp.moveaxis(q_BLHK.reshape(B, N, query_chunk, H, K), 1, 0)
  # prevent_cse=False: inside a loop XLA cannot merge the recomputation into the forward pass.
  out_NBQHK = jax.lax.map(jax.checkpoint(lambda args: attend_chunk(*args), prevent_cse=False),
                          (q_NBQHK, jnp.arange(N) * query_chunk))
  return jnp.moveaxis(out_NBQHK, 0, 1).reshape(B, L, *out_NBQHK.shape[3:])


def causal_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
                     query_chunk: int = 0) -> jax.Array:
  """Causal softmax attention [B, L, H, K] x 3 -> [B, L, H, K], in O(L * query_chunk) memory.

  Chunks of `query_chunk` queries (`_map_query_chunks`), each attending to all L keys under the
  causal mask with `jax.nn.dot_product_attention` (the same float32 logits and softmax as the
  unchunked call, so the same numbers). With `query_chunk` 0, or when L <= query_chunk or the
  chunk does not divide L, it is the plain call. Why chunk at all: for the 1b preset the
  unchunked backward pass kept float32 logits, their exponentials, the probabilities and the
  mask, [B, H, L, L] each, per layer and device (docs/scaling.md);
  `attention.query_chunk` sets the chunk (256 by default).
  """
  L = q_BLHK.shape[1]
  if not _chunked(L, query_chunk):
    return jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, is_causal=True)
  key_positions_L = jnp.arange(L)

  def chunk(q_BQHK, start):
    visible_QL = (start + jnp.arange(query_chunk))[:, None] >= key_positions_L[None, :]
    return jax.nn.dot_product_attention(q_BQHK, k_BLHK, v_BLHK, mask=visible_QL[None, None])

  return _map_query_chunks(chunk, q_BLHK, query_chunk)


def key_masked_attention(q_BLHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array,
                         mask_BT: jax.Array | None, query_chunk: int = 0) -> jax.Array:
  """Softmax attention of L queries over T keys, no causal mask: [B, L, H, K], [B, T, H, K] x 2
  and the key mask [B, T] (nonzero = visible; None = all) -> [B, L, H, K].

  The encoder's self-attention (T = L) and cross-attention's decoder queries over the encoder
  positions. Above `query_chunk` queries it is the same query-chunked loop as
  `causal_attention` (`_map_query_chunks`; one chunk's [B, H, query_chunk, T] logits at a time),
  each chunk the plain `jax.nn.dot_product_attention` call under the same key mask, so the same
  numbers; a row with no visible key gets what that call gives it (every key equally weighted,
  since masked logits are a large negative number, not -inf). With `query_chunk` 0, or when
  L <= query_chunk or the chunk does not divide L, it is the plain call.
  """
  mask_B11T = None if mask_BT is None else mask_BT.astype(bool)[:, None, None, :]
  attend = lambda q: jax.nn.dot_product_attention(q, k_BTHK, v_BTHK, mask=mask_B11T)
  if not _chunked(q_BLHK.shape[1], query_chunk):
    return attend(q_BLHK)
  return _map_query_chunks(lambda q_BQHK, start: attend(q_BQHK), q_BLHK, query_chunk)


def projections(cfg: ModelConfig, rngs: nnx.Rngs) -> tuple[nnx.Param, ...]:
  """Multi-head attention's weights: w_q [D, H, K], w_k and w_v [D, G, K] (G = `cfg.kv_heads`)
  and w_o [H, K, D], Switch-style truncated-normal initialised, with their logical axis names
  (self- and cross-attention)."""
  D, H, G, K = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  init_in = layers.switch_init(cfg.init_scale, in_axis=0, out_axis=(1, 2))
  w_qkv = [layers.param(rngs, init_in, (D, heads, K), ('embed', 'heads', 'kv'))
           for heads in (H, G, G)]
  init_out = layers.switch_init(cfg.init_scale, in_axis=(0, 1), out_axis=2)
  return (*w_qkv, layers.param(rngs, init_out, (H, K, D), ('heads', 'kv', 'embed')))


def repeat_kv(x_BTGK: jax.Array, num_heads: int) -> jax.Array:
  """Key or value heads [B, T, G, K] -> [B, T, H, K], query head h reading head h // (H / G):
  HF `repeat_kv`'s grouping, and `jax.nn.dot_product_attention`'s, which takes G < H as is."""
  G = x_BTGK.shape[2]
  return x_BTGK if G == num_heads else jnp.repeat(x_BTGK, num_heads // G, axis=2)


class QKNorm(nnx.Module):
  """RMSNorm of queries or keys [B, L, H, K] with a learned scale, statistics in float32.

  'per_head' (Qwen3): over each head's K features, scale [K] shared by the heads. 'full'
  (OLMoE): over all H * K features of a position at once, scale [H, K] (HF's [H * K] vector).
  """

  def __init__(self, kind: str, num_heads: int, head_dim: int, eps: float, *, rngs: nnx.Rngs):
    shape, axes = ((head_dim,), ('kv',)) if kind == 'per_head' else ((num_heads, head_dim),
                                                                      ('heads', 'kv'))
    self.scale = layers.param(rngs, jax.nn.initializers.ones, shape, axes)
    self.axes = (-1,) if kind == 'per_head' else (-2, -1)
    self.eps = eps

  def __call__(self, x_BLHK: jax.Array) -> jax.Array:
    x = x_BLHK.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=self.axes, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(x_BLHK.dtype)


def qk_norms(cfg: ModelConfig, rngs: nnx.Rngs) -> tuple[QKNorm | None, QKNorm | None]:
  """The query and key norms `attention.qk_norm` asks for, or (None, None)."""
  kind = cfg.attention.qk_norm
  if kind == 'none':
    return None, None
  return (QKNorm(kind, cfg.num_heads, cfg.head_dim, cfg.norm_eps, rngs=rngs),
          QKNorm(kind, cfg.kv_heads, cfg.head_dim, cfg.norm_eps, rngs=rngs))


class CausalSelfAttention(nnx.Module):
  """Multi-head attention where position t attends to positions <= t: [B, L, D] -> [B, L, D].

  With `attention.num_kv_heads` G < H, groups of H / G query heads share a key/value head
  (grouped-query attention; the KV cache holds G heads); `attention.qk_norm` normalises queries
  and keys before rotary.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.w_q, self.w_k, self.w_v, self.w_o = projections(cfg, rngs)
    self.q_norm, self.k_norm = qk_norms(cfg, rngs)
    self.rope_max_wavelength = cfg.rope_max_wavelength
    self.rope_layout = cfg.attention.rope_layout
    self.dtype = jnp.dtype(cfg.dtype)
    self.query_chunk = cfg.attention.query_chunk

  def qkv(self, x_BLD: jax.Array, positions_BL: jax.Array):
    """Rotated queries [B, L, H, K], rotated keys and the values [B, L, G, K] of x_BLD, in
    `self.dtype` (G = H without grouped-query attention)."""
    x_BLD = x_BLD.astype(self.dtype)
    project = lambda w: layers.dense(x_BLD, w[...].astype(self.dtype))
    q_BLHK, k_BLGK = project(self.w_q), project(self.w_k)
    if self.q_norm is not None:
      q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
    rotate = lambda x: layers.apply_rotary(x, positions_BL, self.rope_max_wavelength,
                                           self.rope_layout)
    return rotate(q_BLHK), rotate(k_BLGK), project(self.w_v)

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, *,
               mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ([B, L, D] output, stats): the call signature of every attention kind. `mask_BL`
    (nonzero for real tokens) only weights stats, and plain dense attention computes none
    ({}; `layer_stats` fills in their empty values)."""
    del mask_BL
    q_BLHK, k_BLHK, v_BLHK = self.qkv(x_BLD, positions_BL)
    # XLA implementation: softmax in float32 internally, runs on CPU, GPU and TPU alike.
    out_BLHK = causal_attention(q_BLHK, k_BLHK, v_BLHK, self.query_chunk)
    return layers.dense(out_BLHK, self.w_o[...].astype(self.dtype), contract=2), {}

  def decode(self, x_BLD: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Attention for L new tokens at positions cache.end.. given the cached earlier ones.

    Writes the new keys/values into `cache` and attends over its filled slots; the caller
    keeps cache.end + L <= T. Returns ([B, L, D] output, updated cache).
    """
    B, L, _ = x_BLD.shape
    positions_BL = jnp.broadcast_to(cache.end + jnp.arange(L), (B, L))
    q_BLHK, k_BLHK, v_BLHK = self.qkv(x_BLD, positions_BL)
    k_BTHK = jax.lax.dynamic_update_slice(cache.k, k_BLHK.astype(cache.k.dtype),
                                          (0, cache.end, 0, 0))
    v_BTHK = jax.lax.dynamic_update_slice(cache.v, v_BLHK.astype(cache.v.dtype),
                                          (0, cache.end, 0, 0))
    # Slot t holds position t: a query sees the slots at or before its own position.
    visible_BLT = jnp.arange(k_BTHK.shape[1]) <= positions_BL[..., None]
    out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BTHK, v_BTHK, mask=visible_BLT[:, None])
    out_BLD = layers.dense(out_BLHK, self.w_o[...].astype(self.dtype), contract=2)
    return out_BLD, KVCache(k=k_BTHK, v=v_BTHK, end=cache.end + L)


class BidirectionalSelfAttention(CausalSelfAttention):
  """Encoder self-attention: every real position attends to every real position (rotary
  positions, no causal mask): [B, T, D] -> [B, T, D]."""

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *,
               mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ([B, T, D] output, {}); `mask_BL` [B, T] (nonzero for real tokens) hides padding
    as keys, so real positions never depend on padding."""
    q_BTHK, k_BTHK, v_BTHK = self.qkv(x_BTD, positions_BT)
    out_BTHK = key_masked_attention(q_BTHK, k_BTHK, v_BTHK, mask_BL, self.query_chunk)
    return layers.dense(out_BTHK, self.w_o[...].astype(self.dtype), contract=2), {}


@flax.struct.dataclass
class CrossCache:
  """One decoder layer's cross-attention keys and values over the encoder output, computed once
  per encoded input (`CrossAttention.kv`) and read by every decoding step.

  Attributes:
    k, v: [B, T, G, K] keys and values of the T encoder positions (G key/value heads).
    mask: bool [B, T], True for real (non-padding) encoder positions.
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array


class CrossAttention(nnx.Module):
  """Decoder-to-encoder attention (T5): queries from the decoder [B, L, D], keys and values from
  the encoder output [B, T, D]; no positions (the encoder's self-attention already placed
  them), padding keys hidden."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.w_q, self.w_k, self.w_v, self.w_o = projections(cfg, rngs)
    self.q_norm, self.k_norm = qk_norms(cfg, rngs)
    self.dtype = jnp.dtype(cfg.dtype)
    self.query_chunk = cfg.attention.query_chunk

  def kv(self, encoded_BTD: jax.Array, mask_BT: jax.Array) -> CrossCache:
    """The keys and values of the encoder output [B, T, D] with its mask [B, T] (nonzero =
    real): this layer's `CrossCache`."""
    encoded_BTD = encoded_BTD.astype(self.dtype)
    project = lambda w: layers.dense(encoded_BTD, w[...].astype(self.dtype))
    k_BTGK = project(self.w_k) if self.k_norm is None else self.k_norm(project(self.w_k))
    return CrossCache(k=k_BTGK, v=project(self.w_v), mask=mask_BT.astype(bool))

  def __call__(self, x_BLD: jax.Array, cache: CrossCache) -> jax.Array:
    """[B, L, D] decoder states -> [B, L, D], attending over the encoder positions of `cache`:
    the whole target in training and evaluation (query-chunked above `attention.query_chunk`
    queries, as is a long decoder prompt), one token per decoding step (the plain call)."""
    q_BLHK = layers.dense(x_BLD.astype(self.dtype), self.w_q[...].astype(self.dtype))
    if self.q_norm is not None:
      q_BLHK = self.q_norm(q_BLHK)
    out_BLHK = key_masked_attention(q_BLHK, cache.k, cache.v, cache.mask, self.query_chunk)
    return layers.dense(out_BLHK, self.w_o[...].astype(self.dtype), contract=2)
