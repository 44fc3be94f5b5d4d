"""Feed-forward blocks: the dense FFN and the batch of experts with weights [E, D, F].

Both use the same activation (`model.activation`):
  'gelu'            Switch: gelu(x W_up) W_down;
  'geglu'           ST-MoE: (gelu(x W_gate) * x W_up) W_down (Shazeer 2020);
  'geglu_mult_bias' ST-MoE's GEGLU with a learned multiplicative bias b [F] (initialised to 1)
                    on the gated hidden units: (gelu(x W_gate) * x W_up * b) W_down;
  'swiglu'          Llama, Mixtral, OLMoE, Qwen: (silu(x W_gate) * x W_up) W_down (Shazeer 2020),
                    HF's act_fn(gate_proj(x)) * up_proj(x) with hidden_act='silu'.
No biases.
Einsum letters: E experts, C tokens per expert, X sorted assignment rows, D model dim,
F hidden dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax.moe import grouped_matmul as gmm
from stmoe_jax.nn import layers
from stmoe_jax.nn import remat

# The nonlinearity of each `model.activation`, applied to W_up's output ('gelu') or, gated,
# to W_gate's.
NONLINEARITY = {'gelu': jax.nn.gelu, 'geglu': jax.nn.gelu, 'geglu_mult_bias': jax.nn.gelu,
                'swiglu': jax.nn.silu}


def activate(h_up: jax.Array, h_gate: jax.Array | None,
             mult_bias: jax.Array | None = None, activation: str = 'geglu') -> jax.Array:
  """gelu(h_up) for GELU; act(h_gate) * h_up for the gated ones (act = gelu for GEGLU, silu for
  SwiGLU), times `mult_bias` if given."""
  act = NONLINEARITY[activation]
  if h_gate is None:
    return act(h_up)
  h = act(h_gate) * h_up
  return h if mult_bias is None else h * mult_bias.astype(h.dtype)


def _dropout(h: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `rng` is None (evaluation) or rate is 0."""
  if rng is None or rate == 0.0:
    return h
  keep = jax.random.bernoulli(rng, 1.0 - rate, h.shape)
  return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)


class Mlp(nnx.Module):
  """Dense FFN: [..., D] -> [..., D] through hidden width `d_ff`."""

  def __init__(self, d_model: int, d_ff: int, activation: str, init_scale: float,
               dtype, *, rngs: nnx.Rngs):
    init = layers.switch_init(init_scale)
    gated = activation != 'gelu'
    self.w_up = layers.param(rngs, init, (d_model, d_ff), ('embed', 'mlp'))
    self.w_gate = layers.param(rngs, init, (d_model, d_ff), ('embed', 'mlp')) if gated else None
    self.mult_bias = (layers.param(rngs, jax.nn.initializers.ones, (d_ff,), ('mlp',))
                      if activation == 'geglu_mult_bias' else None)
    self.w_down = layers.param(rngs, init, (d_ff, d_model), ('mlp', 'embed'))
    self.dtype = dtype
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    h_up = layers.dense(x, self.w_up[...].astype(self.dtype))
    h_gate = (None if self.w_gate is None else
              layers.dense(x, self.w_gate[...].astype(self.dtype)))
    mult_bias = None if self.mult_bias is None else self.mult_bias[...]
    return layers.dense(activate(h_up, h_gate, mult_bias, self.activation),
                        self.w_down[...].astype(self.dtype))


class Experts(nnx.Module):
  """E independent FFNs stored as single arrays with a leading expert axis.

  Weights: w_up/w_gate [E, D, F], w_down [E, F, D], logical axes ('expert', 'embed', 'mlp');
  the GEGLU multiplicative bias is [E, F]. Each expert's weights are initialised as a separate
  FFN (fan_in excludes the expert axis). Expert dropout (Switch: 0.4 inside experts when
  fine-tuning, 0.1 elsewhere) acts on the hidden units with its own rate. `grouped_matmul`
  picks how `grouped` (dropless) multiplies (`stmoe_jax.moe.grouped_matmul`).
  """

  def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str,
               init_scale: float, dtype, *, dropout: float = 0.0, grouped_matmul: str = 'auto',
               rngs: nnx.Rngs):
    init = layers.switch_init(init_scale, batch_axis=(0,))
    shape_in, shape_out = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
    gated = activation != 'gelu'
    self.w_up = layers.param(rngs, init, shape_in, ('expert', 'embed', 'mlp'))
    self.w_gate = (layers.param(rngs, init, shape_in, ('expert', 'embed', 'mlp'))
                   if gated else None)
    self.mult_bias = (layers.param(rngs, jax.nn.initializers.ones, (num_experts, d_ff),
                                   ('expert', 'mlp'))
                      if activation == 'geglu_mult_bias' else None)
    self.w_down = layers.param(rngs, init, shape_out, ('expert', 'mlp', 'embed'))
    self.dtype = dtype
    self.activation = activation
    self.dropout = dropout
    self.grouped_matmul = grouped_matmul

  def _weights(self):
    cast = lambda v: None if v is None else v[...].astype(self.dtype)
    return cast(self.w_up), cast(self.w_gate), cast(self.mult_bias), cast(self.w_down)

  def __call__(self, x_ECD: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Applies expert e to x_ECD[e]: [E, C, D] -> [E, C, D]; dropout only with `dropout_rng`."""
    w_up, w_gate, mult_bias, w_down = self._weights()
    x_ECD = remat.name(x_ECD.astype(self.dtype), remat.EXPERT_INPUTS)
    h_up = jnp.einsum('ecd,edf->ecf', x_ECD, w_up)
    h_gate = None if w_gate is None else jnp.einsum('ecd,edf->ecf', x_ECD, w_gate)
    h_ECF = activate(h_up, h_gate, None if mult_bias is None else mult_bias[:, None, :],
                     self.activation)
    h_ECF = _dropout(h_ECF, self.dropout, dropout_rng)
    return remat.name(jnp.einsum('ecf,efd->ecd', h_ECF, w_down), remat.EXPERT_OUTPUTS)

  def grouped(self, x_XD: jax.Array, group_sizes_E: jax.Array, *,
              dropout_rng: jax.Array | None = None, impl: str | None = None,
              in_shard_map: bool = False) -> jax.Array:
    """Rows sorted by expert, expert e owning the next group_sizes_E[e] rows: [X, D] -> [X, D].

    Grouped matmuls (dropless dispatch) with the `grouped_matmul.BACKENDS` entry the module's
    `grouped_matmul` names ('auto': the platform's fastest), `impl` overriding it. 'blocked'
    lays the rows out once for all three matmuls (dropout then draws its mask over the
    blocks). Rows past the last group come out zero. `in_shard_map` (expert parallelism):
    'auto' picks among the backends that run there, and a named one that cannot is refused.
    """
    w_up, w_gate, mult_bias, w_down = self._weights()
    x_XD = remat.name(x_XD.astype(self.dtype), remat.EXPERT_INPUTS)
    name = gmm.resolve(impl or self.grouped_matmul, in_shard_map=in_shard_map)
    if name == 'blocked':
      layout = gmm.block_layout(group_sizes_E, x_XD.shape[0], gmm.BLOCK_ROWS)
      x_NBD = gmm.to_blocks(x_XD, layout)
      matmul = lambda x, w: gmm.blocked_matmul(x, w, layout.group_N, layout.used_N)
      h_up = matmul(x_NBD, w_up)
      h_gate = None if w_gate is None else matmul(x_NBD, w_gate)
      bias = None if mult_bias is None else mult_bias[layout.group_N][:, None, :]
      h_NBF = _dropout(activate(h_up, h_gate, bias, self.activation), self.dropout, dropout_rng)
      return remat.name(gmm.from_blocks(matmul(h_NBF, w_down), layout), remat.EXPERT_OUTPUTS)
    matmul = gmm.BACKENDS[name].matmul
    h_up = matmul(x_XD, w_up, group_sizes_E)
    h_gate = None if w_gate is None else matmul(x_XD, w_gate, group_sizes_E)
    if mult_bias is not None:  # Each row's own expert's bias: repeat expert e's row group_sizes_E[e] times.
      mult_bias = jnp.repeat(mult_bias, group_sizes_E, axis=0,
                             total_repeat_length=x_XD.shape[0])
    h_XF = _dropout(activate(h_up, h_gate, mult_bias, self.activation), self.dropout,
                    dropout_rng)
    return remat.name(matmul(h_XF, w_down, group_sizes_E), remat.EXPERT_OUTPUTS)
