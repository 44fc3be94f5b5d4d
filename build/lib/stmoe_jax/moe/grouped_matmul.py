"""Grouped matmuls over expert-sorted rows, for dropless dispatch: one backend per kernel.

Rows [X, D] are sorted by group (expert), group e owning the next `group_sizes[e]` rows; row r of
group e is multiplied by w[e] [D, F]; rows past the last group come out zero. `BACKENDS` maps
each `moe.grouped_matmul` name to its `Backend`:

  - 'ragged_dot': `jax.lax.ragged_dot`. A grouped-GEMM kernel on TPU; XLA:CPU and (today)
    XLA:GPU lower it densely: every row against every group's weights, then a mask, i.e. E times
    the useful FLOPs and an [E, X, F] intermediate.
  - 'megablox': `jax.experimental.pallas.ops.tpu.megablox.gmm`, the Pallas TPU grouped-matmul
    kernel MaxText uses (tiles of rows that each belong to one group, a custom backward pass);
    on other backends it runs in Pallas interpret mode (slow: tests only).
  - 'tokamax': `tokamax.ragged_dot` (pip package tokamax): Pallas Mosaic GPU kernels on
    sm90/sm100, Triton on other GPUs, Mosaic TPU; elsewhere it falls back to XLA's ragged_dot
    (dense on CPU). Refused in one line when the package is missing.
  - 'blocked': each group's rows padded to a multiple of `block` rows and laid out as [N, block, D]
    blocks that each belong to one group; a loop multiplies each used block by its group's
    weights (unused trailing blocks are skipped), with a hand-written backward pass that
    accumulates dw in place, in float32. FLOPs are the useful ones plus the padding (under
    `block` rows per group); activations take (X + E * block) rows, never E * X: the MegaBlocks
    layout without a custom kernel. The fastest on CPU.

`resolve('auto')` picks, per platform, the first backend of `AUTO_ORDER` that is available
(its package imports): the fastest known-good one (benchmarks/device_check.py measures them).

Einsum letters: X sorted rows, E groups, N blocks, B rows per block, D in, F out features.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp

from stmoe_jax.errors import ConfigError

BLOCK_ROWS = 64  # Rows per block: padding costs under this many rows per expert.
TOKAMAX_PIN = 'tokamax==0.0.12'  # The version requirements.txt pins (tested with jax 0.10.2).


def _mask_rows(x_XD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  """bool [X, 1]: rows inside some group (kernels may leave the others unwritten)."""
  return (jnp.arange(x_XD.shape[0]) < jnp.sum(group_sizes_E))[:, None]


def ragged_dot_matmul(x_XD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  """`jax.lax.ragged_dot`: [X, D] x [E, D, F] -> [X, F] in x's dtype."""
  return jax.lax.ragged_dot(x_XD, w_EDF.astype(x_XD.dtype), group_sizes_E.astype(jnp.int32))


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
  in_group_X = _mask_rows(x_XD, group_sizes_E)
  x_PD = jnp.pad(jnp.where(in_group_X, x_XD, 0), ((0, padded - X), (0, 0)))
  tile = lambda n: 128 if n % 128 == 0 else n
  y_PF = megablox.gmm(x_PD, w_EDF.astype(x_XD.dtype), group_sizes_E.astype(jnp.int32),
                      preferred_element_type=x_XD.dtype, tiling=(tm, tile(D), tile(F)),
                      interpret=jax.default_backend() != 'tpu')
  return jnp.where(in_group_X, y_PF[:X], 0).astype(x_XD.dtype)


def tokamax_matmul(x_XD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  """`tokamax.ragged_dot`: [X, D] x [E, D, F] -> [X, F] in x's dtype (float32 accumulation).

  tokamax tries its kernels in order (Mosaic GPU or TPU, Triton, XLA) and takes the first that
  accepts the shapes. Rows past the last group are selected away on the way in and out, as for
  megablox: a kernel need not write them.
  """
  require('tokamax')
  import tokamax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    # tokamax reads its absl flags on first use and would parse sys.argv for them, failing on
    # any other program's arguments (pytest's, argparse scripts'): take their defaults instead.
    flags.FLAGS.mark_as_parsed()
  in_group_X = _mask_rows(x_XD, group_sizes_E)
  y_XF = tokamax.ragged_dot(jnp.where(in_group_X, x_XD, 0), w_EDF.astype(x_XD.dtype),
                            group_sizes_E.astype(jnp.int32), preferred_element_type=x_XD.dtype)
  return jnp.where(in_group_X, y_XF, 0).astype(x_XD.dtype)


@functools.cache
def available(package: str | None) -> bool:
  """Whether `package` can be imported (None: nothing to import)."""
  return package is None or importlib.util.find_spec(package) is not None


def require(package: str | None) -> None:
  """ConfigError in one line when `package` is not installed."""
  if not available(package):
    pin = TOKAMAX_PIN if package == 'tokamax' else package
    raise ConfigError(f"moe.grouped_matmul needs the Python package {package!r}, which is not "
                      f"installed (pip install {pin})")


@dataclasses.dataclass(frozen=True)
class Backend:
  """One `moe.grouped_matmul` choice.

  Attributes:
    matmul: (x_XD, w_EDF, group_sizes_E) -> y_XF in x's dtype, rows past the last group zero.
    known_good: platforms ('cpu', 'gpu', 'tpu') where it is a real grouped kernel, checked
      against the loop reference (elsewhere it is correct but slow: a dense or interpreted
      fallback, for tests).
    package: the pip package it needs beyond jax, or None.
    in_shard_map: whether it runs inside `shard_map(check_vma=True)` (expert parallelism).
      megablox does not: its Pallas call's outputs carry no varying mesh axes.
  """
  matmul: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
  known_good: tuple[str, ...]
  package: str | None = None
  in_shard_map: bool = True


BACKENDS: dict[str, Backend] = {
    'ragged_dot': Backend(ragged_dot_matmul, known_good=('tpu',)),
    'blocked': Backend(lambda x, w, g: grouped_matmul(x, w, g, impl='blocked'),
                       known_good=('cpu',)),
    'megablox': Backend(megablox_matmul, known_good=('tpu',), in_shard_map=False),
    'tokamax': Backend(tokamax_matmul, known_good=('gpu', 'tpu'), package='tokamax'),
}
IMPLEMENTATIONS = ('auto', *BACKENDS)  # The allowed values of moe.grouped_matmul.
# 'auto', fastest first among the known-good ones of each platform. GPU: XLA lowers ragged_dot
# densely (23-26 effective TFLOP/s on a B200, ~1,500 for a grouped-GEMM kernel), so tokamax when
# installed; TPU: megablox (MaxText's default), tokamax's Mosaic TPU kernel next.
AUTO_ORDER = {'cpu': ('blocked',), 'gpu': ('tokamax', 'ragged_dot'),
              'tpu': ('megablox', 'tokamax', 'ragged_dot')}


def platform() -> str:
  """'cpu', 'gpu' (CUDA or ROCm) or 'tpu': the default backend's family."""
  name = jax.default_backend()
  return 'gpu' if name in ('gpu', 'cuda', 'rocm') else name


def resolve(impl: str, on: str | None = None, *, in_shard_map: bool = False) -> str:
  """A backend name: `impl` itself (checked), or for 'auto' the first available backend of
  AUTO_ORDER for platform `on` (default: this process's) that can run where it is asked to
  (`in_shard_map`: under expert parallelism). ConfigError for a name that cannot."""
  if impl not in IMPLEMENTATIONS:
    raise ConfigError(f'moe.grouped_matmul={impl!r} is invalid: expected one of {IMPLEMENTATIONS}')
  if impl != 'auto':
    if in_shard_map and not BACKENDS[impl].in_shard_map:
      usable = tuple(n for n, b in BACKENDS.items() if b.in_shard_map)
      raise ConfigError(f'moe.grouped_matmul={impl!r} cannot run under expert parallelism (its '
                        f'kernel is not typed for shard_map): expected one of {usable}')
    return impl
  order = AUTO_ORDER.get(on or platform(), ('ragged_dot',)) + ('ragged_dot',)
  return next(name for name in order if available(BACKENDS[name].package)
              and (BACKENDS[name].in_shard_map or not in_shard_map))


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


def _zero_like(*arrays: jax.Array) -> jax.Array:
  """A float32 scalar 0 that varies over every mesh axis any of `arrays` varies over.

  Inside `shard_map(check_vma=True)` a loop carry and both branches of a `cond` must have the
  same varying axes; values built from it (the zero blocks, the dw carry) get them. Outside
  shard_map it is a plain 0 that XLA folds away.
  """
  return sum(jnp.zeros_like(a.reshape(-1)[0], jnp.float32) for a in arrays)


def blocked_matmul(x_NBD: jax.Array, w_EDF: jax.Array, group_N: jax.Array,
                   used_N: jax.Array) -> jax.Array:
  """y[n] = x[n] @ w[group[n]] for used blocks, zero for unused ones: -> [N, B, F] in x's dtype.

  Runs inside `shard_map(check_vma=True)` too (expert parallelism): x and w are first made to
  vary over the same mesh axes (the transpose sums w's gradient over the axes it gains).
  """
  zero = _zero_like(x_NBD, w_EDF, group_N, used_N)
  return _blocked_matmul(x_NBD + zero.astype(x_NBD.dtype), w_EDF + zero.astype(w_EDF.dtype),
                         group_N, used_N)


@jax.custom_vjp
def _blocked_matmul(x_NBD, w_EDF, group_N, used_N):
  return _forward(x_NBD, w_EDF, group_N, used_N)


def _forward(x_NBD, w_EDF, group_N, used_N):
  zero = _zero_like(x_NBD, w_EDF, group_N, used_N)
  zeros_BF = jnp.zeros((x_NBD.shape[1], w_EDF.shape[-1]), x_NBD.dtype) + zero.astype(x_NBD.dtype)

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
  zero = _zero_like(x_NBD, w_EDF, group_N, used_N, dy_NBF)
  zeros_BD = jnp.zeros(x_NBD.shape[1:], x_NBD.dtype) + zero.astype(x_NBD.dtype)

  def one_block(dw_EDF, inputs):
    x_BD, dy_BF, group, used = inputs

    def add_block(dw_EDF):
      # dw[group] += x^T dy in the loop carry (updated in place: never an [N, D, F] stack),
      # summed in float32 like one matmul over the whole group would be.
      dw_DF = jnp.dot(x_BD.T, dy_BF, preferred_element_type=jnp.float32)
      return dw_EDF.at[group].add(dw_DF), jnp.dot(dy_BF, w_EDF[group].T).astype(x_BD.dtype)

    return jax.lax.cond(used, add_block, lambda dw_EDF: (dw_EDF, zeros_BD), dw_EDF)

  dw_EDF = jnp.zeros(w_EDF.shape, jnp.float32) + zero
  dw_EDF, dx_NBD = jax.lax.scan(one_block, dw_EDF, (x_NBD, dy_NBF, group_N, used_N))
  return dx_NBD, dw_EDF.astype(w_EDF.dtype), None, None


_blocked_matmul.defvjp(_blocked_matmul_fwd, _blocked_matmul_bwd)


def grouped_matmul(x_XD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *,
                   impl: str = 'auto', block: int | None = None) -> jax.Array:
  """Rows sorted by group times their group's weights: [X, D] x [E, D, F] -> [X, F].

  Rows past the last group come out zero. `block` (blocked only) defaults to BLOCK_ROWS. For
  several matmuls over the same rows (an expert MLP), lay the rows out once with
  `block_layout`/`to_blocks` and call `blocked_matmul`.
  """
  name = resolve(impl)
  if name != 'blocked':
    return BACKENDS[name].matmul(x_XD, w_EDF, group_sizes_E)
  layout = block_layout(group_sizes_E, x_XD.shape[0], block or BLOCK_ROWS)
  y_NBF = blocked_matmul(to_blocks(x_XD, layout), w_EDF, layout.group_N, layout.used_N)
  return from_blocks(y_NBF, layout)
