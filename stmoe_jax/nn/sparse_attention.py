"""Pattern-sparse causal attention computed block by block: `local`, `strided`, `block_sparse`.

Einsum letters: B batch, L length, H heads, K head dim, N query blocks, T tokens per block,
G global and J local key blocks per query block, S keys one query sees, R stride residues,
A positions per residue, Q queries.

The patterns (query at position i, key at position j; every pattern is causal, j <= i):
  dense:        every j <= i;
  local:        i - j < window (a causal sliding window, Longformer);
  strided:      i - j < window, or (i - j) % stride == 0: the Sparse Transformer's strided
                factorisation (Child et al. 2019), both parts in one softmax;
  block_sparse: j's block is one of the `num_local_blocks` blocks ending with i's block, or one
                of the first `num_global_blocks` blocks (BigBird's sliding and global blocks;
                a causal model has no use for BigBird's random blocks' lookahead).

Why work is skipped rather than masked: queries are cut into blocks of T = `block_size` tokens,
and each query block takes only the key blocks its pattern can reach (J local blocks by static
shifted slices, G global blocks by broadcast), so logits are [B, H, N, T, (G + J) * T]: time and
memory O(L * (G + J) * T), never [L, L]. Strided's far part groups positions by their residue
mod `stride`: each residue class is a causal sequence of L / stride tokens, so it costs
L^2 / stride (the Sparse Transformer takes stride ~ sqrt(L)).
A sequence whose length is not a multiple of the block is padded with masked keys.

`pattern_mask` is the single definition of each pattern; `attend_at_positions` applies it to
explicit query and key positions (a decode step: one query at t over cached keys).
Decoding (`PatternAttention.decode`): `local` keeps a ring buffer of `window` keys per layer;
the other kinds a full-length cache.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmoe_jax.config import AttentionConfig, ModelConfig
from stmoe_jax.config import options
from stmoe_jax.config.options import Option, Range
from stmoe_jax.nn import layers
from stmoe_jax.nn.attention import (ATTENTION_KINDS, AttentionKind, CausalSelfAttention, KVCache,
                                    repeat_kv)

PATTERN_KINDS = ('dense', 'local', 'strided', 'block_sparse')
_MASKED = -1e30  # Finite, so a fully masked row (padding) gives zeros, not NaN.


def pattern_mask(kind: str, att: AttentionConfig, q_pos: jax.Array, k_pos: jax.Array
                 ) -> jax.Array:
  """bool [..., Q, S]: whether the query at q_pos [..., Q] may attend the key at k_pos [..., S]."""
  d = q_pos[..., :, None] - k_pos[..., None, :]
  causal = d >= 0
  if kind == 'dense':
    return causal
  local = causal & (d < att.window)
  if kind == 'local':
    return local
  if kind == 'strided':
    return local | (causal & (d % att.stride == 0))
  if kind == 'block_sparse':
    q_block, k_block = q_pos[..., :, None] // att.block_size, k_pos[..., None, :] // att.block_size
    return causal & ((q_block - k_block < att.num_local_blocks) |
                     (k_block < att.num_global_blocks))
  raise ValueError(f'attention kind {kind!r} is not one of {PATTERN_KINDS}')


def _block_layout(kind: str, att: AttentionConfig, num_blocks: int) -> tuple[int, int]:
  """(G, J): leading global key blocks, then J local key blocks ending at the query's block."""
  if kind in ('local', 'strided'):
    return 0, min(-(-(att.window - 1) // att.block_size) + 1, num_blocks)
  if kind == 'block_sparse':
    return (min(att.num_global_blocks, num_blocks),
            min(att.num_local_blocks, num_blocks))
  if kind == 'dense':
    return 0, num_blocks
  raise ValueError(f'attention kind {kind!r} is not one of {PATTERN_KINDS}')


def key_block_table(kind: str, att: AttentionConfig, num_blocks: int) -> np.ndarray:
  """int [N, G + J]: the key blocks query block n sees, each once; -1 where a column is unused.

  Columns 0..G-1 are the global blocks (block_sparse), shown only where not already local;
  columns G..G+J-1 are blocks n-J+1..n: for local/strided the ceil((window - 1) / T) blocks
  holding n's window and n itself, for block_sparse the `num_local_blocks` blocks ending at n,
  for dense all blocks (a reference, no work skipped).
  """
  G, J = _block_layout(kind, att, num_blocks)
  n = np.arange(num_blocks)[:, None]
  local = n - J + 1 + np.arange(J)[None, :]
  glob = np.broadcast_to(np.arange(G)[None, :], (num_blocks, G))
  table = np.concatenate([np.where(glob < n - J + 1, glob, -1), np.where(local >= 0, local, -1)],
                         axis=1)
  return table.astype(np.int32)


def _masked_partial(q_QK, k_SK, v_SK, mask_QS):
  """Unnormalised softmax attention over one key set, for merging with `_merge`.

  Leading dims (written `...`, batch and heads first) are shared; q is already scaled by
  1/sqrt(K). Returns (m [..., Q] running max, l [..., Q] sum of exp(logit - m), acc [..., Q, K]
  float32 sum of exp(logit - m) * v), with masked keys contributing 0.
  """
  logits = jnp.einsum('...qk,...sk->...qs', q_QK, k_SK, preferred_element_type=jnp.float32)
  logits = jnp.where(mask_QS, logits, _MASKED)
  # The max only keeps exp() in range; lse = m + log(l) is exact for any constant m, so no
  # gradient needs to flow through it.
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  p = jnp.where(mask_QS, jnp.exp(logits - m[..., None]), 0.0)
  acc = jnp.einsum('...qs,...sk->...qk', p.astype(v_SK.dtype), v_SK,
                   preferred_element_type=jnp.float32)
  return m, jnp.sum(p, axis=-1), acc


def _merge(parts):
  """Merges `_masked_partial` results over disjoint key sets: (out [..., Q, K], lse [..., Q])."""
  m = parts[0][0]
  for part in parts[1:]:
    m = jnp.maximum(m, part[0])
  l = sum(pl * jnp.exp(pm - m) for pm, pl, _ in parts)
  acc = sum(pa * jnp.exp(pm - m)[..., None] for pm, _, pa in parts)
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  return out, m + jnp.log(jnp.maximum(l, 1e-30))


def _pad_length(x_BHLK, length):
  return jnp.pad(x_BHLK, ((0, 0), (0, 0), (0, length - x_BHLK.shape[2]), (0, 0)))


def _block_partial(q_BHLK, k_BHLK, v_BHLK, kind, att):
  """The pattern over the key blocks it reaches: partial results [B, H, L(, K)]."""
  B, H, L, K = q_BHLK.shape
  T = att.block_size
  N = -(-L // T)
  G, J = _block_layout(kind, att, N)
  blocks = lambda x: _pad_length(x, N * T).reshape(B, H, N, T, K)

  def keys_of_each_block(x_BHLK):  # -> [B, H, N, (G + J) * T, K]
    x_BHNTK = blocks(x_BHLK)
    # Local column j holds block n - J + 1 + j: static shifted slices, so the backward pass is
    # slicing too (a gather's backward would be a scatter-add).
    shifted = jnp.pad(x_BHNTK, ((0, 0), (0, 0), (J - 1, 0), (0, 0), (0, 0)))
    cols = [jnp.broadcast_to(x_BHNTK[:, :, None, :G], (B, H, N, G, T, K))] if G else []
    cols.append(jnp.stack([shifted[:, :, j:j + N] for j in range(J)], axis=3))
    return jnp.concatenate(cols, axis=3).reshape(B, H, N, (G + J) * T, K)

  # Positions from iota, not numpy constants: XLA computes the [N, T, S] mask on the fly.
  table = jnp.asarray(key_block_table(kind, att, N))
  q_pos_NT = jnp.arange(N * T).reshape(N, T)
  k_pos_NS = (jnp.maximum(table, 0)[:, :, None] * T + jnp.arange(T)).reshape(N, -1)
  k_ok_NS = jnp.repeat(table >= 0, T, axis=1) & (k_pos_NS < L)
  mask_NTS = pattern_mask(kind, att, q_pos_NT, k_pos_NS) & k_ok_NS[:, None, :]
  m, l, acc = _masked_partial(blocks(q_BHLK), keys_of_each_block(k_BHLK),
                              keys_of_each_block(v_BHLK), mask_NTS)
  return (m.reshape(B, H, N * T)[:, :, :L], l.reshape(B, H, N * T)[:, :, :L],
          acc.reshape(B, H, N * T, K)[:, :, :L])


def _residue_partial(q_BHLK, k_BHLK, v_BHLK, att):
  """Strided's far keys (i - j >= window, (i - j) % stride == 0), one residue class at a time."""
  B, H, L, K = q_BHLK.shape
  s = att.stride
  A = -(-L // s)
  # Position a * s + r sits at [a, r]; move the residue r next to the heads: [B, H, R, A, K].
  split = lambda x: jnp.swapaxes(_pad_length(x, A * s).reshape(B, H, A, s, K), 2, 3)
  a = jnp.arange(A)
  far_AA = (a[:, None] - a[None, :]) * s >= att.window
  k_ok_RA = a[None, :] * s + jnp.arange(s)[:, None] < L
  mask_RAA = far_AA[None] & k_ok_RA[:, None, :]
  m, l, acc = _masked_partial(split(q_BHLK), split(k_BHLK), split(v_BHLK), mask_RAA)
  unsplit = lambda x: jnp.swapaxes(x, 2, 3).reshape(B, H, A * s, *x.shape[4:])[:, :, :L]
  return unsplit(m), unsplit(l), unsplit(acc)


def _heads_major(q_BLHK, k_BLHK, v_BLHK):
  """[B, L, H, K] -> [B, H, L, K] (q scaled by 1/sqrt(K)): matmul batch dims lead."""
  scale = jnp.asarray(1 / math.sqrt(q_BLHK.shape[-1]), q_BLHK.dtype)
  return [jnp.swapaxes(x, 1, 2) for x in (q_BLHK * scale, k_BLHK, v_BLHK)]


def _finish(parts, dtype):
  out_BHLK, lse_BHL = _merge(parts)
  return jnp.swapaxes(out_BHLK, 1, 2).astype(dtype), jnp.swapaxes(lse_BHL, 1, 2)


def sparse_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, kind: str,
                     att: AttentionConfig) -> tuple[jax.Array, jax.Array]:
  """Causal self-attention restricted to `kind`'s pattern, computed only where it is nonzero.

  Query and key i are both position i (training and prefill). `dense` is the plain O(L^2)
  computation (a reference, and the way to get log-normalisers for the logit z-loss).

  Args:
    q_BLHK, k_BLHK, v_BLHK: queries, keys and values [B, L, H, K] (rotary already applied).
    kind: one of PATTERN_KINDS.
    att: the pattern's fields (block_size, window, stride, num_local_blocks, num_global_blocks).
  Returns:
    (out [B, L, H, K] in q's dtype, lse [B, L, H] float32 log-sum-exp of each query's logits).
  """
  q, k, v = _heads_major(q_BLHK, k_BLHK, v_BLHK)
  if kind == 'dense':
    pos = jnp.arange(q.shape[2])
    parts = [_masked_partial(q, k, v, pattern_mask('dense', att, pos, pos))]
  elif kind == 'strided':
    # Window and far stride positions are disjoint key sets: merge their two softmax sums.
    parts = [_block_partial(q, k, v, 'local', att), _residue_partial(q, k, v, att)]
  else:
    parts = [_block_partial(q, k, v, kind, att)]
  return _finish(parts, q_BLHK.dtype)


def attend_at_positions(q_BQHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array,
                        q_pos_BQ: jax.Array, k_pos_BS: jax.Array, kind: str,
                        att: AttentionConfig) -> tuple[jax.Array, jax.Array]:
  """`kind`'s pattern between queries and keys at explicit positions (a decode step).

  Keys may come in any order (e.g. a ring buffer holding only the last `window` keys of a
  `local` layer); a negative key position marks an empty cache slot.

  Args:
    q_BQHK: queries [B, Q, H, K]; k_BSHK, v_BSHK: keys and values [B, S, H, K].
    q_pos_BQ, k_pos_BS: int positions of each query and key.
    kind, att: as `sparse_attention`.
  Returns:
    (out [B, Q, H, K], lse [B, Q, H]).
  """
  q, k, v = _heads_major(q_BQHK, k_BSHK, v_BSHK)
  mask_BQS = pattern_mask(kind, att, q_pos_BQ, k_pos_BS) & (k_pos_BS >= 0)[:, None, :]
  return _finish([_masked_partial(q, k, v, mask_BQS[:, None])], q_BQHK.dtype)


def logit_z_loss(lse_BLH: jax.Array, mask_BL: jax.Array | None = None) -> jax.Array:
  """Attention-logit z-loss, mean over real queries and heads of logsumexp(logits)^2.

  The ST-MoE router z-loss (eq. 5) applied to attention logits, which also blow up in large
  models (ST-MoE section 3 names it; Dehghani et al. 2023 fight the same growth with QK-norm).
  """
  z_BL = jnp.mean(jnp.square(lse_BLH.astype(jnp.float32)), axis=-1)
  if mask_BL is None:
    return jnp.mean(z_BL)
  m_BL = mask_BL.astype(jnp.float32)
  return jnp.sum(z_BL * m_BL) / jnp.maximum(jnp.sum(m_BL), 1.0)


class PatternAttention(CausalSelfAttention):
  """CausalSelfAttention's parameters with a sparse pattern: [B, L, D] -> ([B, L, D], stats).

  The parameter tree equals the dense layer's, so a checkpoint moves between kinds.
  """

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    if kind not in PATTERN_KINDS:
      raise ValueError(f'attention kind {kind!r} is not one of {PATTERN_KINDS}')
    self.kind, self.att = kind, cfg.attention

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, *,
               mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the output [B, L, D] and {'logit_z_loss': scalar over real tokens}.

    The pattern is over token index 0..L-1 (training/prefill); `positions_BL` feed rotary.
    """
    q_BLHK, k_BLGK, v_BLGK = self.qkv(x_BLD, positions_BL)
    H = q_BLHK.shape[2]
    out_BLHK, lse_BLH = sparse_attention(q_BLHK, repeat_kv(k_BLGK, H), repeat_kv(v_BLGK, H),
                                         self.kind, self.att)
    y_BLD = layers.dense(out_BLHK, self.w_o[...].astype(self.dtype), contract=2)
    return y_BLD, {'logit_z_loss': logit_z_loss(lse_BLH, mask_BL)}

  def decode(self, x_BLD: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The pattern for L new tokens at positions cache.end.. given the cached earlier ones.

    `local` caches only `window` slots (a ring buffer, see `KVCache`): the new queries attend the
    ring as it was before this call plus the new keys among themselves (block by block), then
    the ring keeps the last `window` keys, so a prompt longer than the window is exact too.
    The other kinds write into a full-length cache (the caller keeps cache.end + L <= T) and
    apply the pattern to the slots' positions. Returns ([B, L, D] output, updated cache).
    """
    B, L, _ = x_BLD.shape
    q_pos_BL = jnp.broadcast_to(cache.end + jnp.arange(L), (B, L))
    q_BLHK, k_BLGK, v_BLGK = self.qkv(x_BLD, q_pos_BL)
    # The cache holds the G key/value heads; each attention call sees them repeated to H.
    heads = lambda x: repeat_kv(x, q_BLHK.shape[2])
    if self.kind == 'local':
      ring = cache.replace(k=heads(cache.k), v=heads(cache.v))
      out_BLHK = _local_over_ring(q_BLHK, heads(k_BLGK), heads(v_BLGK), q_pos_BL[0], ring,
                                  self.att)
      cache = cache.append(k_BLGK, v_BLGK)
    else:
      cache = cache.append(k_BLGK, v_BLGK)
      k_pos_BT = jnp.broadcast_to(cache.slot_positions(), (B, cache.k.shape[1]))
      out_BLHK, _ = attend_at_positions(q_BLHK, heads(cache.k), heads(cache.v), q_pos_BL,
                                        k_pos_BT, self.kind, self.att)
    y_BLD = layers.dense(out_BLHK, self.w_o[...].astype(self.dtype), contract=2)
    return y_BLD, cache


def _local_over_ring(q_BLHK, k_BLHK, v_BLHK, q_pos_L, cache, att):
  """`local` attention of L new tokens over the ring before them and themselves: [B, L, H, K].

  The window depends on i - j only, so among the new tokens the block computation of
  `sparse_attention` applies as is (O(L * window), no [L, L] logits for a long prompt).
  """
  q, k, v = _heads_major(q_BLHK, k_BLHK, v_BLHK)
  ring_pos_T = cache.slot_positions()
  ring_mask_LT = pattern_mask('local', att, q_pos_L, ring_pos_T) & (ring_pos_T >= 0)
  ring_k, ring_v = (jnp.swapaxes(x, 1, 2).astype(q.dtype) for x in (cache.k, cache.v))
  parts = [_block_partial(q, k, v, 'local', att),
           _masked_partial(q, ring_k, ring_v, ring_mask_LT)]
  return _finish(parts, q_BLHK.dtype)[0]


_BLOCK_SIZE = Option('attention.block_size', int, 64, 'Query/key block of the pattern kinds (and '
                     "of 'dense' with the logit z-loss); block_sparse's pattern block.", Range(1))
options.declare(_BLOCK_SIZE, owner='nn.sparse_attention')


@options.add_check
def _check_block_size(config) -> None:
  att = config.attention
  kinds = ATTENTION_KINDS.selected(config)
  blocked = kinds & {'local', 'strided', 'block_sparse'} or (
      'dense' in kinds and att.logit_z_loss_coef)
  if att.block_size != _BLOCK_SIZE.default and not blocked:
    raise options.ConfigError(
        f'config.attention.block_size={att.block_size!r} is read only by the pattern kinds '
        "('local', 'strided', 'block_sparse') and by 'dense' with attention.logit_z_loss_coef > "
        f'0: leave it at {_BLOCK_SIZE.default}.')
_WINDOW = Option('attention.window', int, 256, 'local and strided: a token sees itself and the '
                 'window - 1 before it.', Range(1))


def _make(kind: str):
  def make(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    # Dense attention runs as the 'dense' pattern only when the logit z-loss needs its logsumexp.
    if kind == 'dense' and not cfg.attention.logit_z_loss_coef:
      return CausalSelfAttention(cfg, rngs=rngs)
    return PatternAttention(cfg, kind, rngs=rngs)
  return make


ATTENTION_KINDS.register(AttentionKind(
    name='dense', make=_make('dense'), doc='Every earlier token (query-chunked above '
    'attention.query_chunk).'))
ATTENTION_KINDS.register(AttentionKind(
    name='local', make=_make('local'), options=(_WINDOW,),
    cache_slots=lambda cfg, length: min(cfg.attention.window, length),
    doc='A causal sliding window (Longformer); decodes with a ring buffer of window keys.'))
ATTENTION_KINDS.register(AttentionKind(
    name='strided', make=_make('strided'),
    options=(_WINDOW, Option('attention.stride', int, 64, 'strided: also every stride-th '
                             'earlier token (Sparse Transformer).', Range(1))),
    doc='The Sparse Transformer\'s strided pattern: the window plus every stride-th token.'))
ATTENTION_KINDS.register(AttentionKind(
    name='block_sparse', make=_make('block_sparse'),
    options=(Option('attention.num_local_blocks', int, 3, 'block_sparse: a query block sees its '
                    'block and the ones before, this many...', Range(1)),
             Option('attention.num_global_blocks', int, 1, '...plus the first this many blocks '
                    '(global tokens, BigBird).', Range(0))),
    doc='BigBird-style sliding and global blocks (causal: no random blocks).'))
