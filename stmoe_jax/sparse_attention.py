"""Pattern-sparse causal attention computed block by block: `local`, `strided`, `block_sparse`.

Einsum letters: B batch, L length, H heads, K head dim, N query blocks, T tokens per block,
J key blocks one query block sees, S keys one query sees, R stride residues, A positions per
residue, Q queries.

The patterns (query at position i, key at position j; every pattern is causal, j <= i):
  dense:        every j <= i;
  local:        i - j < window (a causal sliding window, Longformer);
  strided:      i - j < window, or (i - j) % stride == 0: the Sparse Transformer's strided
                factorisation (Child et al. 2019, section 4.2), both parts in one softmax;
  block_sparse: j's block is one of the `num_local_blocks` blocks ending with i's block, or one
                of the first `num_global_blocks` blocks (BigBird's sliding and global blocks;
                a causal model has no use for BigBird's random blocks' lookahead).

Why work is skipped rather than masked: queries are cut into blocks of T = `block_size` tokens,
and each query block gathers only the key blocks its pattern can reach (a static [N, J] table),
so logits are [B, N, H, T, J*T]: time and memory O(L * J * T), never [L, L]. Strided's far part
groups positions by their residue mod `stride`: each residue class is a causal sequence of
L / stride tokens, so it costs L^2 / stride (the Sparse Transformer takes stride ~ sqrt(L)).
A sequence whose length is not a multiple of the block is padded with masked keys.

`pattern_mask` is the single definition of each pattern; `attend_at_positions` applies it to
explicit query and key positions (a decode step: one query at t over cached keys).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmoe_jax import layers
from stmoe_jax.attention import CausalSelfAttention
from stmoe_jax.config import AttentionConfig, ModelConfig

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


def key_block_table(kind: str, att: AttentionConfig, num_blocks: int) -> np.ndarray:
  """int [N, J]: the key blocks query block n can see, each once; -1 pads short rows.

  local/strided: the ceil((window - 1) / T) blocks before n that hold its window, and n.
  block_sparse: the global blocks, then the `num_local_blocks` blocks ending at n.
  dense: every block <= n (J = N; a reference, no work skipped).
  """
  rows = []
  for n in range(num_blocks):
    if kind in ('local', 'strided'):
      back = -(-(att.window - 1) // att.block_size)
      row = list(range(max(n - back, 0), n + 1))
    elif kind == 'block_sparse':
      local = list(range(max(n - att.num_local_blocks + 1, 0), n + 1))
      row = [g for g in range(min(att.num_global_blocks, n + 1)) if g not in local] + local
    elif kind == 'dense':
      row = list(range(n + 1))
    else:
      raise ValueError(f'attention kind {kind!r} is not one of {PATTERN_KINDS}')
    rows.append(row)
  width = max(len(r) for r in rows)
  return np.array([r + [-1] * (width - len(r)) for r in rows], np.int32)


def _masked_partial(q_QHK, k_SHK, v_SHK, mask_QS):
  """Unnormalised softmax attention over one key set, for merging with `_merge`.

  Leading dims (written `...`) are shared batch dims. q is already scaled by 1/sqrt(K).
  Returns (m [..., Q, H] running max, l [..., Q, H] sum of exp(logit - m),
  acc [..., Q, H, K] float32 sum of exp(logit - m) * v), with masked keys contributing 0.
  """
  logits = jnp.einsum('...qhk,...shk->...hqs', q_QHK, k_SHK, preferred_element_type=jnp.float32)
  mask = mask_QS[..., None, :, :]
  logits = jnp.where(mask, logits, _MASKED)
  # The max only keeps exp() in range; lse = m + log(l) is exact for any constant m, so no
  # gradient needs to flow through it.
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  p = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
  acc = jnp.einsum('...hqs,...shk->...qhk', p.astype(v_SHK.dtype), v_SHK,
                   preferred_element_type=jnp.float32)
  return jnp.swapaxes(m, -1, -2), jnp.swapaxes(jnp.sum(p, axis=-1), -1, -2), acc


def _merge(parts):
  """Merges `_masked_partial` results over disjoint key sets into (out [..., Q, H, K], lse)."""
  m = parts[0][0]
  for part in parts[1:]:
    m = jnp.maximum(m, part[0])
  l = sum(pl * jnp.exp(pm - m) for pm, pl, _ in parts)
  acc = sum(pa * jnp.exp(pm - m)[..., None] for pm, _, pa in parts)
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  return out, m + jnp.log(jnp.maximum(l, 1e-30))


def _pad_length(x_BLHK, length):
  return jnp.pad(x_BLHK, ((0, 0), (0, length - x_BLHK.shape[1]), (0, 0), (0, 0)))


def _block_partial(q_BLHK, k_BLHK, v_BLHK, kind, att):
  """The pattern over gathered key blocks: partial results in [B, L, H(, K)] layout."""
  B, L, H, K = q_BLHK.shape
  T = att.block_size
  N = -(-L // T)
  table_NJ = key_block_table(kind, att, N)
  J = table_NJ.shape[1]
  q_BNTHK = _pad_length(q_BLHK, N * T).reshape(B, N, T, H, K)
  gather = lambda x: jnp.take(_pad_length(x, N * T).reshape(B, N, T, H, K),
                              np.maximum(table_NJ, 0), axis=1).reshape(B, N, J * T, H, K)
  k_BNSHK, v_BNSHK = gather(k_BLHK), gather(v_BLHK)
  # Positions from iota, not numpy constants: XLA computes the [N, T, S] mask on the fly.
  q_pos_NT = jnp.arange(N * T).reshape(N, T)
  table = jnp.asarray(table_NJ)
  k_pos_NS = (jnp.maximum(table, 0)[:, :, None] * T + jnp.arange(T)).reshape(N, J * T)
  k_ok_NS = jnp.repeat(table >= 0, T, axis=1) & (k_pos_NS < L)
  mask_NTS = pattern_mask(kind, att, q_pos_NT, k_pos_NS) & k_ok_NS[:, None, :]
  m, l, acc = _masked_partial(q_BNTHK, k_BNSHK, v_BNSHK, mask_NTS)
  return (m.reshape(B, N * T, H)[:, :L], l.reshape(B, N * T, H)[:, :L],
          acc.reshape(B, N * T, H, K)[:, :L])


def _residue_partial(q_BLHK, k_BLHK, v_BLHK, att):
  """Strided's far keys (i - j >= window, (i - j) % stride == 0), one residue class at a time."""
  B, L, H, K = q_BLHK.shape
  s = att.stride
  A = -(-L // s)
  # Position a * s + r sits at [a, r]; move the residue r next to the batch.
  split = lambda x: jnp.swapaxes(_pad_length(x, A * s).reshape(B, A, s, H, K), 1, 2)
  a = jnp.arange(A)
  far_AA = (a[:, None] - a[None, :]) * s >= att.window
  k_ok_RA = a[None, :] * s + jnp.arange(s)[:, None] < L
  mask_RAA = far_AA[None] & k_ok_RA[:, None, :]
  m, l, acc = _masked_partial(split(q_BLHK), split(k_BLHK), split(v_BLHK), mask_RAA)
  unsplit = lambda x: jnp.swapaxes(x, 1, 2).reshape(B, A * s, *x.shape[3:])[:, :L]
  return unsplit(m), unsplit(l), unsplit(acc)


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
  q_BLHK = q_BLHK * jnp.asarray(1 / math.sqrt(q_BLHK.shape[-1]), q_BLHK.dtype)
  if kind == 'dense':
    L = q_BLHK.shape[1]
    pos = jnp.arange(L)
    parts = [_masked_partial(q_BLHK, k_BLHK, v_BLHK, pattern_mask('dense', att, pos, pos))]
  elif kind == 'strided':
    # Window and far stride positions are disjoint key sets: merge their two softmax sums.
    parts = [_block_partial(q_BLHK, k_BLHK, v_BLHK, 'local', att),
             _residue_partial(q_BLHK, k_BLHK, v_BLHK, att)]
  else:
    parts = [_block_partial(q_BLHK, k_BLHK, v_BLHK, kind, att)]
  out, lse = _merge(parts)
  return out.astype(q_BLHK.dtype), lse


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
  q_BQHK = q_BQHK * jnp.asarray(1 / math.sqrt(q_BQHK.shape[-1]), q_BQHK.dtype)
  mask_BQS = pattern_mask(kind, att, q_pos_BQ, k_pos_BS) & (k_pos_BS >= 0)[:, None, :]
  out, lse = _merge([_masked_partial(q_BQHK, k_BSHK, v_BSHK, mask_BQS)])
  return out.astype(q_BQHK.dtype), lse


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
    x_BLD = x_BLD.astype(self.dtype)
    project = lambda w: layers.dense(x_BLD, w[...].astype(self.dtype))  # [B, L, H, K]
    q_BLHK = layers.apply_rotary(project(self.w_q), positions_BL, self.rope_max_wavelength)
    k_BLHK = layers.apply_rotary(project(self.w_k), positions_BL, self.rope_max_wavelength)
    out_BLHK, lse_BLH = sparse_attention(q_BLHK, k_BLHK, project(self.w_v), self.kind, self.att)
    y_BLD = layers.dense(out_BLHK, self.w_o[...].astype(self.dtype), contract=2)
    return y_BLD, {'logit_z_loss': logit_z_loss(lse_BLH, mask_BL)}
