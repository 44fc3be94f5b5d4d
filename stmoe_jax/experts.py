"""Feed-forward blocks: the dense FFN and the batch of experts with weights [E, D, F].

Both use the same activation: 'gelu' (Switch) or 'geglu' (ST-MoE: gelu(x W_gate) * (x W_up)).
Einsum letters: E experts, C tokens per expert, D model dim, F hidden dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax import layers


def activate(h_up: jax.Array, h_gate: jax.Array | None) -> jax.Array:
  """gelu(h_up) for GELU; gelu(h_gate) * h_up for GEGLU (Shazeer 2020)."""
  if h_gate is None:
    return jax.nn.gelu(h_up)
  return jax.nn.gelu(h_gate) * h_up


class Mlp(nnx.Module):
  """Dense FFN: [..., D] -> [..., D] through hidden width `d_ff`."""

  def __init__(self, d_model: int, d_ff: int, activation: str, init_scale: float,
               dtype, *, rngs: nnx.Rngs):
    init = layers.switch_init(init_scale)
    self.w_up = layers.param(rngs, init, (d_model, d_ff), ('embed', 'mlp'))
    self.w_gate = (layers.param(rngs, init, (d_model, d_ff), ('embed', 'mlp'))
                   if activation == 'geglu' else None)
    self.w_down = layers.param(rngs, init, (d_ff, d_model), ('mlp', 'embed'))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    h_up = layers.dense(x, self.w_up[...].astype(self.dtype))
    h_gate = (None if self.w_gate is None else
              layers.dense(x, self.w_gate[...].astype(self.dtype)))
    return layers.dense(activate(h_up, h_gate), self.w_down[...].astype(self.dtype))


class Experts(nnx.Module):
  """E independent FFNs stored as single arrays with a leading expert axis.

  Weights: w_up/w_gate [E, D, F], w_down [E, F, D], logical axes ('expert', 'embed', 'mlp').
  Each expert's weights are initialised as a separate FFN (fan_in excludes the expert axis).
  """

  def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str,
               init_scale: float, dtype, *, rngs: nnx.Rngs):
    init = layers.switch_init(init_scale, batch_axis=(0,))
    shape_in, shape_out = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
    self.w_up = layers.param(rngs, init, shape_in, ('expert', 'embed', 'mlp'))
    self.w_gate = (layers.param(rngs, init, shape_in, ('expert', 'embed', 'mlp'))
                   if activation == 'geglu' else None)
    self.w_down = layers.param(rngs, init, shape_out, ('expert', 'mlp', 'embed'))
    self.dtype = dtype

  def __call__(self, x_ECD: jax.Array) -> jax.Array:
    """Applies expert e to x_ECD[e]: [E, C, D] -> [E, C, D]."""
    x_ECD = x_ECD.astype(self.dtype)
    h_up = jnp.einsum('ecd,edf->ecf', x_ECD, self.w_up[...].astype(self.dtype))
    h_gate = (None if self.w_gate is None else
              jnp.einsum('ecd,edf->ecf', x_ECD, self.w_gate[...].astype(self.dtype)))
    h_ECF = activate(h_up, h_gate)
    return jnp.einsum('ecf,efd->ecd', h_ECF, self.w_down[...].astype(self.dtype))
