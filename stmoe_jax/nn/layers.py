"""Small shared building blocks: parameters with logical axes, non-trainable buffers, RMSNorm,
rotary embedding.

Every parameter carries logical axis names (`'embed'`, `'mlp'`, `'expert'`, `'heads'`, `'kv'`,
`'vocab'`) in its `out_sharding` metadata; `stmoe_jax.nn.sharding` maps them to mesh axes through
the single rules table in the config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def switch_init(scale: float, in_axis=-2, out_axis=-1, batch_axis=()):
  """Truncated normal with std sqrt(scale / fan_in): Switch Transformer's init (scale 0.1).

  Switch section 2.3: the default scale 1.0 made MoE training unstable; 0.1 fixed it.
  """
  return jax.nn.initializers.variance_scaling(
      scale, 'fan_in', 'truncated_normal', in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
  """A float32 parameter of `shape` from `init`, tagged with one logical axis name per dim."""
  if len(axes) != len(shape):
    raise ValueError(f'logical axes {axes} do not match parameter shape {shape}')
  # Not sharded eagerly: the names are logical, and `sharding` places whole states at once.
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), out_sharding=tuple(axes),
                   eager_sharding=False)


def store_params_as(module: nnx.Module, param_dtype: str) -> None:
  """Casts every parameter of `module` to `param_dtype` (model.param_dtype). Every layer creates
  float32 parameters (`param`); a bfloat16 `param_dtype` stores them, and so the optimizer
  state that follows their dtype, at half the bytes."""
  if param_dtype != 'float32':
    for _, variable in nnx.iter_graph(module):
      if isinstance(variable, nnx.Param):
        variable.set_value(variable.get_value().astype(param_dtype))


class Buffer(nnx.Variable):
  """Base class of all non-trainable model state (e.g. `moe.RouterBias`): no optimizer touches
  it, the forward pass may update it, and the train state carries it as `buffers`.

  Every model state splits with `STATE_FILTERS` into (params, buffers); the split is
  exhaustive, so a Variable that is neither fails loudly instead of going missing.
  """


STATE_FILTERS = (nnx.Param, Buffer)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """Contracts the last `contract` dims of x with the first `contract` dims of w.

  [..., *w.shape[:contract]] x [*w.shape[:contract], *out] -> [..., *out], computed as one 2-D
  matmul: XLA:CPU ran the equivalent 3-D einsum (and its weight gradient) 1.7x slower.
  """
  lead, inner = x.shape[:x.ndim - contract], w.shape[:contract]
  if x.shape[x.ndim - contract:] != inner:
    raise ValueError(f'cannot contract {x.shape} with {w.shape}')
  out = w.shape[contract:]
  y = x.reshape(-1, math.prod(inner)) @ w.reshape(math.prod(inner), -1)
  return y.reshape(*lead, *out)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned scale (T5, ST-MoE); statistics in float32."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ('embed',))
    self.eps = eps

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    """[..., D] -> [..., D] in the input dtype."""
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(x_BLD.dtype)


ROPE_LAYOUTS = ('half_split', 'interleaved')


def apply_rotary(x_BLHK: jax.Array, positions_BL: jax.Array, max_wavelength: float,
                 layout: str = 'half_split') -> jax.Array:
  """Rotary position embedding (RoFormer) on the last dim of [B, L, H, K] (K even), in float32.

  Pair i (of K/2) rotates by angle position / max_wavelength^(2i/K). `layout` says which two
  features form pair i: 'half_split' (x[i], x[i + K/2]): HF Llama/Mixtral/Qwen `rotate_half`;
  'interleaved' (x[2i], x[2i + 1]): RoFormer, GPT-J and Meta's original Llama code. The two
  are the same rotation of differently ordered features, so a checkpoint moves between them by
  permuting the rows of W_q and W_k.
  """
  K = x_BLHK.shape[-1]
  half = K // 2
  inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angle_BLK)[:, :, None, :], jnp.cos(angle_BLK)[:, :, None, :]
  x = x_BLHK.astype(jnp.float32)
  if layout == 'half_split':
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  elif layout == 'interleaved':
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    raise ValueError(f'unknown rotary layout {layout!r}: expected one of {ROPE_LAYOUTS}')
  return out.astype(x_BLHK.dtype)
