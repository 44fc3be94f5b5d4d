"""Causal multi-head self-attention with rotary positions.

Einsum letters: B batch, L length, D model dim, H heads, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax import layers
from stmoe_jax.config import ModelConfig


class CausalSelfAttention(nnx.Module):
  """Multi-head attention where position t attends to positions <= t: [B, L, D] -> [B, L, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    init_in = layers.switch_init(cfg.init_scale, in_axis=0, out_axis=(1, 2))
    self.w_q = layers.param(rngs, init_in, (D, H, K), ('embed', 'heads', 'kv'))
    self.w_k = layers.param(rngs, init_in, (D, H, K), ('embed', 'heads', 'kv'))
    self.w_v = layers.param(rngs, init_in, (D, H, K), ('embed', 'heads', 'kv'))
    init_out = layers.switch_init(cfg.init_scale, in_axis=(0, 1), out_axis=2)
    self.w_o = layers.param(rngs, init_out, (H, K, D), ('heads', 'kv', 'embed'))
    self.rope_max_wavelength = cfg.rope_max_wavelength
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array) -> jax.Array:
    x_BLD = x_BLD.astype(self.dtype)
    project = lambda w: layers.dense(x_BLD, w[...].astype(self.dtype))  # [B, L, H, K]
    q_BLHK = layers.apply_rotary(project(self.w_q), positions_BL, self.rope_max_wavelength)
    k_BLHK = layers.apply_rotary(project(self.w_k), positions_BL, self.rope_max_wavelength)
    v_BLHK = project(self.w_v)
    # XLA implementation: softmax in float32 internally, runs on CPU, GPU and TPU alike.
    out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, is_causal=True)
    return layers.dense(out_BLHK, self.w_o[...].astype(self.dtype), contract=2)


def make_attention(cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The attention module of `layer`, as `cfg.attention.layer_kind(layer)` says.

  Plain dense attention returns [B, L, D]; every other module (a sparse pattern, head-routed,
  or dense with the logit z-loss on) returns ([B, L, D], stats dict) and takes `mask_BL`.
  """
  # Imported here: both modules build on CausalSelfAttention from this one.
  from stmoe_jax.head_routing import HeadRoutedAttention  # pylint: disable=g-import-not-at-top
  from stmoe_jax.sparse_attention import PatternAttention  # pylint: disable=g-import-not-at-top
  kind = cfg.attention.layer_kind(layer)
  if kind == 'head_routed':
    return HeadRoutedAttention(cfg, rngs=rngs)
  if kind == 'dense' and not cfg.attention.logit_z_loss_coef:
    return CausalSelfAttention(cfg, rngs=rngs)
  return PatternAttention(cfg, kind, rngs=rngs)


def returns_stats(cfg: ModelConfig, layer: int) -> bool:
  """Whether `make_attention(cfg, layer)` returns (output, stats) rather than the output alone."""
  return cfg.attention.layer_kind(layer) != 'dense' or bool(cfg.attention.logit_z_loss_coef)
