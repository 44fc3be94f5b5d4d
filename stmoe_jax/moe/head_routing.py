"""Head-routed attention: each token runs only its top-k of H attention heads.

Mixture of Attention Heads (MoA, Zhang et al. 2022) and SwitchHead (Csordas et al. 2023): the
heads are experts. Keys and values are one shared projection (MoA section 3.1), so only the
per-head query and output projections depend on the routing, and only the chosen heads' are
computed: token-choices are dispatched into per-head buffers exactly as MoE tokens are into
expert buffers (`dispatch.dispatch_scatter`, capacity ceil(CF * k * L / H) per sequence, first come
in token order, so it stays causal), projected by that head's W_q, attended over the shared keys
in token order, projected by that head's W_o and combined with the router gates. Decoding caches
the shared keys/values only ([B, T, 1, K]) and runs the chosen heads with grouped matmuls.

Einsum letters: B batch, L length, D model dim, H heads (the experts), R chosen heads per token,
C capacity (slots per head and sequence), K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax.config import ModelConfig
from stmoe_jax.config import options
from stmoe_jax.config.options import Option, Range
from stmoe_jax.moe import dispatch
from stmoe_jax.moe import routing
from stmoe_jax.nn import layers
from stmoe_jax.nn import sparse_attention
from stmoe_jax.nn.attention import ATTENTION_KINDS, AttentionKind, KVCache


def gather_choices(x_HCK: jax.Array, slot_BLR: jax.Array) -> jax.Array:
  """Per-head buffers [H, B*C, K] -> each token-choice's row [B, L, R, K] (dropped: zeros)."""
  B, L, R = slot_BLR.shape
  H, _, K = x_HCK.shape
  x_BXK = jnp.transpose(x_HCK.reshape(H, B, -1, K), (1, 0, 2, 3)).reshape(B, -1, K)
  x_padded = jnp.concatenate([x_BXK, jnp.zeros((B, 1, K), x_BXK.dtype)], axis=1)
  return jnp.take_along_axis(x_padded, slot_BLR.reshape(B, L * R, 1), axis=1).reshape(B, L, R, K)


def scatter_choices(x_BLRK: jax.Array, slot_BLR: jax.Array, num_heads: int,
                    capacity: int) -> jax.Array:
  """Inverse of `gather_choices`: [B, L, R, K] -> [H, B*C, K]; dropped choices are discarded."""
  B, L, R, K = x_BLRK.shape
  H, C = num_heads, capacity
  # Dropped choices all land in the extra slot H*C, which is cut off.
  buf_BXK = jnp.zeros((B, H * C + 1, K), x_BLRK.dtype)
  buf_BXK = buf_BXK.at[jnp.arange(B)[:, None], slot_BLR.reshape(B, L * R)].set(
      x_BLRK.reshape(B, L * R, K))
  return jnp.transpose(buf_BXK[:, :H * C].reshape(B, H, C, K), (1, 0, 2, 3)).reshape(H, B * C, K)


class HeadRoutedAttention(nnx.Module):
  """Causal attention whose heads are experts chosen per token: [B, L, D] -> ([B, L, D], stats)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.router = layers.param(rngs, layers.switch_init(cfg.init_scale), (D, H), ('embed', None))
    init_q = layers.switch_init(cfg.init_scale, in_axis=1, out_axis=2, batch_axis=0)
    self.w_q = layers.param(rngs, init_q, (H, D, K), ('heads', 'embed', 'kv'))
    self.w_k = layers.param(rngs, layers.switch_init(cfg.init_scale), (D, K), ('embed', 'kv'))
    self.w_v = layers.param(rngs, layers.switch_init(cfg.init_scale), (D, K), ('embed', 'kv'))
    self.w_o = layers.param(rngs, init_q, (H, K, D), ('heads', 'kv', 'embed'))
    self.num_heads, self.att = H, cfg.attention
    self.rope_max_wavelength = cfg.rope_max_wavelength
    self.rope_layout = cfg.attention.rope_layout
    self.dtype = jnp.dtype(cfg.dtype)

  def capacity(self, length: int) -> int:
    """Slots per head and sequence: ceil(head_capacity_factor * k * L / H), at most L."""
    return routing.expert_capacity(length, self.num_heads, self.att.head_top_k,
                                   self.att.head_capacity_factor, min_capacity=1)

  def route(self, x_BLD: jax.Array, mask_BL: jax.Array | None = None) -> routing.Routing:
    """Tokens-choose top-k over heads, one routing group per sequence ([G, S] = [B, L])."""
    logits_BLH = layers.dense(x_BLD.astype(jnp.float32), self.router[...])  # Float32 router.
    return routing.tokens_choose_top_k(logits_BLH, top_k=self.att.head_top_k,
                                       capacity=self.capacity(x_BLD.shape[1]), mask_GS=mask_BL)

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, *,
               mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the output [B, L, D] and this layer's stats: `balance_loss`, `z_loss`,
    `dropped_fraction`, `head_load` [H] (share of token-choices per head) as the MoE router's
    `routing.routing_stats`, and `logit_z_loss` over the kept choices' attention logits."""
    B, L, _ = x_BLD.shape
    H, C = self.num_heads, self.capacity(L)
    x_BLD = x_BLD.astype(self.dtype)
    route = self.route(x_BLD, mask_BL)
    x_HCD, (slot_BLR, gate_BLR) = dispatch.dispatch_scatter(x_BLD, route, H, C)
    q_HCK = jnp.einsum('hcd,hdk->hck', x_HCD, self.w_q[...].astype(self.dtype))
    q_BLRK = layers.apply_rotary(gather_choices(q_HCK, slot_BLR), positions_BL,
                                 self.rope_max_wavelength, self.rope_layout)
    R = q_BLRK.shape[2]
    shared = lambda w: layers.dense(x_BLD, w[...].astype(self.dtype))[:, :, None, :]
    k_BL1K = layers.apply_rotary(shared(self.w_k), positions_BL, self.rope_max_wavelength,
                                 self.rope_layout)
    # Every chosen head of a token attends the same keys: R query heads over one key head.
    expand = lambda x: jnp.broadcast_to(x, (B, L, R, x.shape[-1]))
    out_BLRK, lse_BLR = sparse_attention.sparse_attention(
        q_BLRK, expand(k_BL1K), expand(shared(self.w_v)), 'dense', self.att)
    o_HCK = scatter_choices(out_BLRK, slot_BLR, H, C)
    y_HCD = jnp.einsum('hck,hkd->hcd', o_HCK, self.w_o[...].astype(self.dtype))
    y_BLD = dispatch.combine_scatter(y_HCD, (slot_BLR, gate_BLR))
    stats = routing.routing_stats(route, mask_BL)
    stats['head_load'] = stats.pop('expert_load')
    kept_BLR = route.kept.astype(jnp.float32)
    stats['logit_z_loss'] = (jnp.sum(jnp.square(lse_BLR) * kept_BLR) /
                             jnp.maximum(jnp.sum(kept_BLR), 1.0))
    return y_BLD.astype(x_BLD.dtype), stats

  def decode(self, x_BLD: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Head-routed attention for L new tokens at positions cache.end.. given the cached ones.

    The call's tokens are routed with capacity L per sequence: a token's k choices are distinct
    heads, so no head can overflow and every token gets the heads (and gates) of a forward pass
    that drops nothing. The choices are sorted by head (`dispatch.dispatch_dropless`) and only
    the chosen heads' W_q and W_o run, as grouped matmuls; all R query heads of a token attend
    the one shared key head of `cache` ([B, T, 1, K], full length: the caller keeps
    cache.end + L <= T). Returns ([B, L, D] output, updated cache).
    """
    B, L, _ = x_BLD.shape
    R, K = self.att.head_top_k, self.w_q.shape[-1]
    x_BLD = x_BLD.astype(self.dtype)
    logits_BLH = layers.dense(x_BLD.astype(jnp.float32), self.router[...])  # Float32 router.
    route = routing.tokens_choose_top_k(logits_BLH, top_k=R, capacity=L)
    x_XD, sizes_H, plan = dispatch.dispatch_dropless(x_BLD, route, self.num_heads)
    order_X = plan[0]
    q_XK = jax.lax.ragged_dot(x_XD, self.w_q[...].astype(self.dtype), sizes_H)
    q_BLRK = jnp.zeros_like(q_XK).at[order_X].set(q_XK).reshape(B, L, R, K)
    q_pos_BL = jnp.broadcast_to(cache.end + jnp.arange(L), (B, L))
    q_BLRK = layers.apply_rotary(q_BLRK, q_pos_BL, self.rope_max_wavelength,
                                 self.rope_layout)
    shared = lambda w: layers.dense(x_BLD, w[...].astype(self.dtype))[:, :, None, :]
    k_BL1K = layers.apply_rotary(shared(self.w_k), q_pos_BL, self.rope_max_wavelength,
                                 self.rope_layout)
    cache = cache.append(k_BL1K, shared(self.w_v))
    # One key head: the L*R chosen query heads are L*R queries of that head (no key copies).
    T = cache.k.shape[1]
    out_BX1K, _ = sparse_attention.attend_at_positions(
        q_BLRK.reshape(B, L * R, 1, K), cache.k, cache.v, jnp.repeat(q_pos_BL, R, axis=1),
        jnp.broadcast_to(cache.slot_positions(), (B, T)), 'dense', self.att)
    o_XK = jnp.take(out_BX1K.reshape(B * L * R, K), order_X, axis=0)  # Sorted by head again.
    y_XD = jax.lax.ragged_dot(o_XK, self.w_o[...].astype(self.dtype), sizes_H)
    return dispatch.combine_dropless(y_XD, plan).astype(x_BLD.dtype), cache


def _validate(config) -> None:
  att, heads = config.attention, config.model.num_heads
  if att.head_top_k > heads:
    raise options.ConfigError(f'config.attention.head_top_k={att.head_top_k!r} is invalid: '
                              f'expected at most model.num_heads={heads}.')
  # Its keys and values are one shared head already, projected without a norm.
  if att.num_kv_heads:
    raise options.invalid('attention.num_kv_heads', att.num_kv_heads,
                          "0 with attention kind 'head_routed' (its keys and values are one "
                          'shared head)')
  if att.qk_norm != 'none':
    raise options.invalid('attention.qk_norm', att.qk_norm,
                          "'none' with attention kind 'head_routed'")


ATTENTION_KINDS.register(AttentionKind(
    name='head_routed', make=lambda cfg, *, rngs: HeadRoutedAttention(cfg, rngs=rngs),
    cache_heads=lambda cfg: 1, validate=_validate,
    options=(
        Option('attention.head_top_k', int, 2, 'head_routed: heads each token runs (of '
               'model.num_heads; MoA, SwitchHead).', Range(1)),
        Option('attention.head_capacity_factor', float, 2.0, 'head_routed: head capacity = '
               'ceil(CF * k * seq_len / num_heads).', Range(0, low_open=True)),
        Option('attention.head_aux_loss_coef', float, 1e-2, 'head_routed: Switch balance loss '
               'over heads.', Range(0, note='0 = off')),
        Option('attention.head_z_loss_coef', float, 1e-3, 'head_routed: router z-loss over '
               'heads.', Range(0, note='0 = off'))),
    doc='Each token runs its top-k of the heads, keys and values shared (MoA, SwitchHead).'))
