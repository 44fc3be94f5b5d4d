"""The sparse MoE layer: route, dispatch, run experts, combine.

Einsum letters: B batch, L length, G routing groups, S tokens per group, K choices per token,
E experts, C capacity, X = E*C expert slots, D model dim.

The five steps, each a small function so that dispatch strategies can be swapped:
  1. `to_groups`: tokens [B, L, D] -> [G, S, D] (capacity and balance are per group, as in
     ST-MoE), ordered so that capacity competition is causal;
  2. router logits in float32 and `routing.tokens_choose_top_k`;
  3. dispatch into expert buffers [E, G*C, D], by `moe.dispatch`: `dispatch_scatter` (index
     gather, the default: O(S*K) index work) or `dispatch_einsum` (GShard one-hot [G, S, E*C]
     masks, matmul-only, but its cost grows with S*E*C);
  4. `experts.Experts` on the buffers;
  5. `combine_scatter` / `combine_einsum`: gate-weighted sum back to [G, S, D]; a dropped choice
     contributes exactly zero, so a token dropped by every choice leaves the block as its
     residual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax import layers
from stmoe_jax import routing
from stmoe_jax.config import ModelConfig
from stmoe_jax.experts import Experts


def to_groups(x_BLD: jax.Array, group_size: int) -> jax.Array:
  """[B, L, D] -> routing groups [G, S, D] in arrival order, position-major.

  A group is S/L whole sequences (or, when S < L, S consecutive positions of one sequence),
  ordered by position first: all sequences' token 0, then all token 1, ... Since capacity is
  first come first served, a token then competes only with tokens at the same or earlier
  positions, so logits at position t never depend on any token after t, in any sequence.
  """
  B, L, D = x_BLD.shape
  S = group_size
  if S % L and L % S or (B * L) % S:
    raise ValueError(f'moe.group_size={S} must divide or be a multiple of seq_len={L}, and '
                     f'divide the {B * L} tokens of a [{B}, {L}] batch')
  if S <= L:
    return x_BLD.reshape(-1, S, D)
  return jnp.swapaxes(x_BLD.reshape(-1, S // L, L, D), 1, 2).reshape(-1, S, D)


def from_groups(y_GSD: jax.Array, shape_BLD: tuple[int, int, int]) -> jax.Array:
  """Inverse of `to_groups`: [G, S, D] -> [B, L, D]."""
  B, L, D = shape_BLD
  G, S, _ = y_GSD.shape
  if S <= L:
    return y_GSD.reshape(B, L, D)
  return jnp.swapaxes(y_GSD.reshape(G, L, S // L, D), 1, 2).reshape(B, L, D)


def _slots(route: routing.Routing, num_experts: int, capacity: int) -> jax.Array:
  """int32 [G, S, K]: flat slot expert * C + position of each kept choice; E*C if dropped."""
  return jnp.where(route.kept, route.expert_index * capacity + route.position,
                   num_experts * capacity)


def dispatch_einsum(x_GSD: jax.Array, route: routing.Routing, num_experts: int,
                    capacity: int) -> tuple[jax.Array, jax.Array]:
  """Gathers tokens into per-expert buffers with one-hot masks (the GShard/TPU form).

  Args:
    x_GSD: tokens [G, S, D].
    route: routing record with [G, S, K] fields.
    num_experts: E.
    capacity: C, slots per expert and group.
  Returns:
    (x_ECD, combine_GSX): expert inputs [E, G*C, D] (empty slots are zero) and the combine
    tensor [G, S, E*C] (flattened (E, C)) holding each kept choice's gate at its slot.
  """
  G, S, D = x_GSD.shape
  E, C = num_experts, capacity
  # Each kept choice owns one of the E*C slots; a dropped choice points past the end, where
  # one_hot yields an all-zero row, so it occupies no slot and contributes nothing.
  slot_GSK = _slots(route, E, C)
  slot_mask_GSKX = jax.nn.one_hot(slot_GSK, E * C, dtype=jnp.float32)
  dispatch_GSX = jnp.sum(slot_mask_GSKX, axis=2).astype(x_GSD.dtype)
  combine_GSX = jnp.einsum('gskx,gsk->gsx', slot_mask_GSKX, route.gate)
  x_GXD = jnp.einsum('gsx,gsd->gxd', dispatch_GSX, x_GSD)
  x_ECD = jnp.transpose(x_GXD.reshape(G, E, C, D), (1, 0, 2, 3)).reshape(E, G * C, D)
  return x_ECD, combine_GSX


def combine_einsum(y_ECD: jax.Array, combine_GSX: jax.Array) -> jax.Array:
  """Weighted sum of expert outputs back to token order: [E, G*C, D] -> [G, S, D]."""
  G, _, X = combine_GSX.shape
  E = y_ECD.shape[0]
  y_GXD = jnp.transpose(y_ECD.reshape(E, G, X // E, -1), (1, 0, 2, 3)).reshape(G, X, -1)
  return jnp.einsum('gsx,gxd->gsd', combine_GSX.astype(y_ECD.dtype), y_GXD)


def dispatch_scatter(x_GSD: jax.Array, route: routing.Routing, num_experts: int,
                     capacity: int) -> tuple[jax.Array, jax.Array]:
  """Gathers tokens into per-expert buffers by index: no [S, E*C] mask, O(S*K) index work.

  Args and buffer layout as `dispatch_einsum`.
  Returns:
    (x_ECD, slot_GSK): expert inputs [E, G*C, D] and each choice's flat slot (E*C = dropped),
    which `combine_scatter` uses to gather the outputs back.
  """
  G, S, D = x_GSD.shape
  E, C = num_experts, capacity
  K = route.expert_index.shape[-1]
  slot_GSK = _slots(route, E, C)
  # token_of_slot[g, x] = the token in slot x, or S (a zero row) for an empty slot. Dropped
  # choices all write to the extra slot E*C, which is cut off.
  token_GSK = jnp.broadcast_to(jnp.arange(S)[None, :, None], (G, S, K))
  token_of_slot_GX = jnp.full((G, E * C + 1), S, jnp.int32)
  token_of_slot_GX = token_of_slot_GX.at[jnp.arange(G)[:, None, None], slot_GSK].set(token_GSK)
  x_padded = jnp.concatenate([x_GSD, jnp.zeros((G, 1, D), x_GSD.dtype)], axis=1)
  x_GXD = jnp.take_along_axis(x_padded, token_of_slot_GX[:, :E * C, None], axis=1)
  x_ECD = jnp.transpose(x_GXD.reshape(G, E, C, D), (1, 0, 2, 3)).reshape(E, G * C, D)
  return x_ECD, slot_GSK


def combine_scatter(y_ECD: jax.Array, slot_GSK: jax.Array, gate_GSK: jax.Array) -> jax.Array:
  """Gathers each choice's expert output and sums them with the gates: -> [G, S, D]."""
  G, S, K = slot_GSK.shape
  E, _, D = y_ECD.shape
  y_GXD = jnp.transpose(y_ECD.reshape(E, G, -1, D), (1, 0, 2, 3)).reshape(G, -1, D)
  y_padded = jnp.concatenate([y_GXD, jnp.zeros((G, 1, D), y_GXD.dtype)], axis=1)
  y_GSKD = jnp.take_along_axis(y_padded, slot_GSK.reshape(G, S * K, 1), axis=1)
  y_GSKD = y_GSKD.reshape(G, S, K, D)
  return jnp.einsum('gskd,gsk->gsd', y_GSKD, gate_GSK.astype(y_GSKD.dtype))


def routing_stats(route: routing.Routing, mask_GS: jax.Array | None = None
                  ) -> dict[str, jax.Array]:
  """Per-layer losses and telemetry from one routing decision, over real (unmasked) tokens.

  Returns float32 scalars `balance_loss`, `z_loss`, `dropped_fraction` (share of token-choices
  that found their expert full) and `expert_load` [E] (share of token-choices sent to each
  expert, before drops; sums to 1).
  """
  G, S, E = route.probs.shape
  m_GS = jnp.ones((G, S), jnp.float32) if mask_GS is None else mask_GS.astype(jnp.float32)
  num_choices = jnp.maximum(jnp.sum(m_GS) * route.kept.shape[-1], 1.0)
  choices_E = jnp.einsum('gske,gs->e', jax.nn.one_hot(route.expert_index, E), m_GS)
  return {
      'balance_loss': routing.load_balancing_loss(route.probs, route.expert_index, m_GS),
      'z_loss': routing.router_z_loss(route.logits, m_GS),
      'dropped_fraction': 1.0 - jnp.sum(route.kept) / num_choices,
      'expert_load': choices_E / num_choices,
  }


class MoeLayer(nnx.Module):
  """Tokens-choose top-k mixture of experts replacing one FFN: [B, L, D] -> [B, L, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    moe = cfg.moe
    self.router = layers.param(rngs, layers.switch_init(cfg.init_scale),
                               (cfg.d_model, moe.num_experts), ('embed', None))
    self.experts = Experts(moe.num_experts, cfg.d_model, moe.expert_d_ff, cfg.activation,
                           cfg.init_scale, jnp.dtype(cfg.dtype), rngs=rngs)
    self.moe = moe

  def capacity(self, train: bool) -> int:
    """Expert capacity for the train or eval capacity factor."""
    moe = self.moe
    factor = moe.train_capacity_factor if train else moe.eval_capacity_factor
    return routing.expert_capacity(moe.group_size, moe.num_experts, moe.top_k, factor,
                                   scaled_by_k=moe.capacity_scaled_by_k,
                                   min_capacity=moe.min_capacity)

  def __call__(self, x_BLD: jax.Array, *, train: bool, rng: jax.Array | None = None,
               mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the MoE output [B, L, D] and `routing_stats` for this layer.

    `rng` is needed only for router jitter in training. `mask_BL` (optional, [B, L]) marks real
    tokens: padding takes no expert capacity, gets a zero output and is left out of the stats.
    """
    moe = self.moe
    x_GSD = to_groups(x_BLD, moe.group_size)
    mask_GS = None if mask_BL is None else to_groups(mask_BL[..., None], moe.group_size)[..., 0]
    router_in = x_GSD.astype(jnp.float32)  # Float32 router: bf16 logits made Switch diverge.
    if train and moe.router_jitter > 0:
      router_in *= jax.random.uniform(rng, router_in.shape, jnp.float32,
                                      1.0 - moe.router_jitter, 1.0 + moe.router_jitter)
    logits_GSE = layers.dense(router_in, self.router[...])
    capacity = self.capacity(train)
    route = routing.tokens_choose_top_k(logits_GSE, top_k=moe.top_k, capacity=capacity,
                                        renormalize=moe.renormalize_gates, mask_GS=mask_GS)
    if moe.dispatch == 'einsum':
      x_ECD, combine_GSX = dispatch_einsum(x_GSD, route, moe.num_experts, capacity)
      y_GSD = combine_einsum(self.experts(x_ECD), combine_GSX)
    else:
      x_ECD, slot_GSK = dispatch_scatter(x_GSD, route, moe.num_experts, capacity)
      y_GSD = combine_scatter(self.experts(x_ECD), slot_GSK, route.gate)
    y_BLD = from_groups(y_GSD, x_BLD.shape)
    return y_BLD.astype(x_BLD.dtype), routing_stats(route, mask_GS)
