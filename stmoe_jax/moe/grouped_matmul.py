"""Grouped matmuls over expert-sorted rows, for dropless dispatch: ragged_dot, or blocks.

Rows [X, D] are sorted by group (expert), group e owning the next `group_sizes[e]` rows; row r of
group e is multiplied by w[e] [D, F]. Three implementations:

  - 'ragged_dot': `jax.lax.ragged_dot`, the grouped-GEMM kernel where the platform has one
    (TPU/GPU). XLA:CPU lowers it densely: every row against every group's weights, then a mask,
    i.e. E times the useful FLOPs and an [E, X, F] intermediate.
  - 'megablox': `jax.experimental.pallas.ops.tpu.megablox.gmm`, the Pallas TPU grouped-matmul
    kernel MaxText uses (tiles of rows that each belong to one group, a custom backward pass);
    on other backends it runs in Pallas interpret mode (slow: tests only).
  - 'blocked': each group's rows padded to a multiple of `block` rows and laid out as [N, block, D]
    blocks that each belong to one group; a loop multiplies each used block by its group's
    weights (unused trailing blocks are skipped), with a hand-written backward pass that
    accumulates dw in place, in float32. FLOPs are the useful ones plus the padding (under
    `block` rows per group); activations take (X + E * block) rows, never E * X: the MegaBlocks
    layout without a custom kernel.

Einsum letters: X sorted rows, E groups, N blocks, B rows per block, D in, F out features.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


IMPLEMENTATIONS = ('auto', 'ragged_dot', 'blocked', 'megablox')  # The moe.grouped_matmul values.
BLOCK_ROWS = 64  # Rows per block: padding costs under this many rows per expert.


def resolve(impl: str) -> str:
  """'auto' -> 'blocked' on CPU (its ragged_dot is dense), 'megablox' on TPU, else 'ragged_dot'."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'grouped matmul {impl!r} is invalid: expected one of {IMPLEMENTATIONS}')
  if impl == 'auto':
    return {'cpu': 'blocked', 'tpu': 'megablox'}.get(jax.default_backend(), 'ragged_dot')
  return impl


def megablox_matmul(x_XD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  """`megablox.gmm`: [X, D] x [E, D, F] -> [X, F] in x's dtype; rows past the last group zero.

  The kernel takes row tiles of `tm` rows (X is padded to a multiple) and feature tiles of 128
  where D and F allow it (else the whole dim); off TPU it runs in Pallas interpret mode.
  """
  # Imported on first use: importing Pallas costs every other run a second.
  from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=g-import-not-at-top
  X, D = x_XD.shape
  F = w_EDF.shape[-1]
  tm = min(128, -(-X // 8) * 8)
  padded = -(-X // tm) * tm
  # The kernel leaves rows in no group unwritten (garbage), forward and backward: select them
  # away on the way in (so their dx is zero too) and out.
  in_group_X = (jnp.arange(X) < jnp.sum(group_sizes_E))[:, None]
  x_PD = jnp.pad(jnp.where(in_group_X, x_XD, 0), ((0, padded - X), (0, 0)))
  tile = lambda n: 128 if n % 128 == 0 else n
  y_PF = megablox.gmm(x_PD, w_EDF.astype(x_XD.dtype), group_sizes_E.astype(jnp.int32),
                      preferred_element_type=x_XD.dtype, tiling=(tm, tile(D), tile(F)),
                      interpret=jax.default_backend() != 'tpu')
  return jnp.where(in_group_X, y_PF[:X], 0).astype(x_XD.dtype)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Where each sorted row lives in the padded block layout (all int32/bool arrays).

  dest_X [X]: padded row of each sorted row (N * B for rows in no group, which are dropped);
  group_N [N]: the group each block belongs to; used_N [N]: whether the block holds any row.
  """
  dest_X: jax.Array
  group_N: jax.Array
  used_N: jax.Array
  block: int


def block_layout(group_sizes_E: jax.Array, num_rows: int, block: int) -> BlockLayout:
  """Pads each group to a multiple of `block` rows; N = ceil(X / B) + E blocks bound the total."""
  E = group_sizes_E.shape[0]
  num_blocks = -(-num_rows // block) + E
  sizes_E = group_sizes_E.astype(jnp.int32)
  padded_E = (sizes_E + block - 1) // block * block
  start_E = jnp.cumsum(sizes_E) - sizes_E
  padded_start_E = jnp.cumsum(padded_E) - padded_E
  rows_X = jnp.arange(num_rows, dtype=jnp.int32)
  group_X = jnp.searchsorted(start_E + sizes_E, rows_X, side='right')  # E: rows in no group.
  e_X = jnp.minimum(group_X, E - 1)
  dest_X = jnp.where(group_X < E, padded_start_E[e_X] + rows_X - start_E[e_X],
                     num_blocks * block)
  block_starts_N = jnp.arange(num_blocks, dtype=jnp.int32) * block
  group_N = jnp.searchsorted(padded_start_E + padded_E, block_starts_N, side='right')
  return BlockLayout(dest_X.astype(jnp.int32), jnp.minimum(group_N, E - 1).astype(jnp.int32),
                     group_N < E, block)


def to_blocks(x_XD: jax.Array, layout: BlockLayout) -> jax.Array:
  """Sorted rows [X, D] -> zero-padded blocks [N, B, D]."""
  N, B = layout.group_N.shape[0], layout.block
  x_PD = jnp.zeros((N * B, x_XD.shape[-1]), x_XD.dtype).at[layout.dest_X].set(x_XD, mode='drop')
  return x_PD.reshape(N, B, -1)


def from_blocks(y_NBF: jax.Array, layout: BlockLayout) -> jax.Array:
  """Blocks [N, B, F] -> sorted rows [X, F]; rows in no group come out zero."""
  N, B, F = y_NBF.shape
  y_PF = jnp.concatenate([y_NBF.reshape(N * B, F), jnp.zeros((1, F), y_NBF.dtype)])
  return jnp.take(y_PF, layout.dest_X, axis=0)


@jax.custom_vjp
def blocked_matmul(x_NBD: jax.Array, w_EDF: jax.Array, group_N: jax.Array,
                   used_N: jax.Array) -> jax.Array:
  """y[n] = x[n] @ w[group[n]] for used blocks, zero for unused ones: -> [N, B, F] in x's dtype.

  Not for use inside shard_map with check_vma: its loop's zero branches and dw carry are not
  typed for varying mesh axes (expert parallelism uses ragged_dot there).
  """
  return _forward(x_NBD, w_EDF, group_N, used_N)


def _forward(x_NBD, w_EDF, group_N, used_N):
  zeros_BF = jnp.zeros((x_NBD.shape[1], w_EDF.shape[-1]), x_NBD.dtype)

  def one_block(_, inputs):
    x_BD, group, used = inputs
    y_BF = jax.lax.cond(used, lambda: jnp.dot(x_BD, w_EDF[group]).astype(x_BD.dtype),
                        lambda: zeros_BF)
    return None, y_BF

  return jax.lax.scan(one_block, None, (x_NBD, group_N, used_N))[1]


def _blocked_matmul_fwd(x_NBD, w_EDF, group_N, used_N):
  return _forward(x_NBD, w_EDF, group_N, used_N), (x_NBD, w_EDF, group_N, used_N)


def _blocked_matmul_bwd(residuals, dy_NBF):
  x_NBD, w_EDF, group_N, used_N = residuals
  zeros_BD = jnp.zeros(x_NBD.shape[1:], x_NBD.dtype)

  def one_block(dw_EDF, inputs):
    x_BD, dy_BF, group, used = inputs

    def add_block(dw_EDF):
      # dw[group] += x^T dy in the loop carry (updated in place: never an [N, D, F] stack),
      # summed in float32 like one matmul over the whole group would be.
      dw_DF = jnp.dot(x_BD.T, dy_BF, preferred_element_type=jnp.float32)
      return dw_EDF.at[group].add(dw_DF), jnp.dot(dy_BF, w_EDF[group].T).astype(x_BD.dtype)

    return jax.lax.cond(used, add_block, lambda dw_EDF: (dw_EDF, zeros_BD), dw_EDF)

  dw_EDF = jnp.zeros(w_EDF.shape, jnp.float32)
  dw_EDF, dx_NBD = jax.lax.scan(one_block, dw_EDF, (x_NBD, dy_NBF, group_N, used_N))
  return dx_NBD, dw_EDF.astype(w_EDF.dtype), None, None


blocked_matmul.defvjp(_blocked_matmul_fwd, _blocked_matmul_bwd)


def grouped_matmul(x_XD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *,
                   impl: str = 'auto', block: int | None = None) -> jax.Array:
  """Rows sorted by group times their group's weights: [X, D] x [E, D, F] -> [X, F].

  Rows past the last group come out zero. `block` defaults to BLOCK_ROWS. For several matmuls
  over the same rows (an expert MLP), lay the rows out once with `block_layout`/`to_blocks` and
  call `blocked_matmul`.
  """
  if resolve(impl) == 'ragged_dot':
    return jax.lax.ragged_dot(x_XD, w_EDF, group_sizes_E)
  if resolve(impl) == 'megablox':
    return megablox_matmul(x_XD, w_EDF, group_sizes_E)
  layout = block_layout(group_sizes_E, x_XD.shape[0], block or BLOCK_ROWS)
  y_NBF = blocked_matmul(to_blocks(x_XD, layout), w_EDF, layout.group_N, layout.used_N)
  return from_blocks(y_NBF, layout)
