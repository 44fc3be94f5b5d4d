"""The sparse MoE layer: route, dispatch, run experts, combine.

Einsum letters: B batch, L length, G routing groups, S tokens per group, K choices per token,
E experts, C capacity, D model dim.

The five steps, each a small function so that dispatch strategies can be swapped:
  1. group tokens [B, L, D] -> [G, S, D] (capacity and balance are per group, as in ST-MoE);
  2. router logits in float32 and `routing.tokens_choose_top_k`;
  3. `dispatch_einsum`: one-hot [G, S, E, C] masks gather tokens into expert buffers [E, G*C, D];
  4. `experts.Experts` on the buffers;
  5. `combine_einsum`: weighted sum back to [G, S, D]; a dropped choice contributes exactly zero,
     so a token dropped by every choice leaves the block as its residual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax import layers
from stmoe_jax import routing
from stmoe_jax.config import ModelConfig
from stmoe_jax.experts import Experts


def dispatch_einsum(x_GSD: jax.Array, route: routing.Routing, num_experts: int,
                    capacity: int) -> tuple[jax.Array, jax.Array]:
  """Gathers tokens into per-expert buffers with one-hot masks (the GShard/TPU form).

  Args:
    x_GSD: tokens [G, S, D].
    route: routing record with [G, S, K] fields.
    num_experts: E.
    capacity: C, slots per expert and group.
  Returns:
    (x_ECD, combine_GSEC): expert inputs [E, G*C, D] (empty slots are zero) and the combine
    tensor [G, S, E, C] holding each kept choice's gate at its (expert, slot).
  """
  G, S, D = x_GSD.shape
  expert_GSKE = jax.nn.one_hot(route.expert_index, num_experts, dtype=jnp.float32)
  # A dropped choice (position >= C) one-hots to all zeros, so it occupies no slot.
  slot_GSKC = jax.nn.one_hot(route.position, capacity, dtype=jnp.float32)
  combine_GSEC = jnp.einsum('gske,gskc,gsk->gsec', expert_GSKE, slot_GSKC, route.gate)
  dispatch_GSEC = jnp.einsum('gske,gskc->gsec', expert_GSKE, slot_GSKC).astype(x_GSD.dtype)
  x_GECD = jnp.einsum('gsec,gsd->gecd', dispatch_GSEC, x_GSD)
  x_ECD = jnp.transpose(x_GECD, (1, 0, 2, 3)).reshape(num_experts, G * capacity, D)
  return x_ECD, combine_GSEC


def combine_einsum(y_ECD: jax.Array, combine_GSEC: jax.Array) -> jax.Array:
  """Weighted sum of expert outputs back to token order: [E, G*C, D] -> [G, S, D]."""
  G, _, E, C = combine_GSEC.shape
  y_GECD = jnp.transpose(y_ECD.reshape(E, G, C, -1), (1, 0, 2, 3))
  return jnp.einsum('gsec,gecd->gsd', combine_GSEC.astype(y_ECD.dtype), y_GECD)


def routing_stats(route: routing.Routing) -> dict[str, jax.Array]:
  """Per-layer losses and telemetry from one routing decision.

  Returns float32 scalars `balance_loss`, `z_loss`, `dropped_fraction` (share of token-choices
  that found their expert full) and `expert_load` [E] (share of token-choices sent to each
  expert, before drops; sums to 1).
  """
  E = route.probs.shape[-1]
  return {
      'balance_loss': routing.load_balancing_loss(route.probs, route.expert_index),
      'z_loss': routing.router_z_loss(route.logits),
      'dropped_fraction': 1.0 - jnp.mean(route.kept.astype(jnp.float32)),
      'expert_load': jnp.mean(jax.nn.one_hot(route.expert_index, E), axis=(0, 1, 2)),
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

  def __call__(self, x_BLD: jax.Array, *, train: bool,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the MoE output [B, L, D] and `routing_stats` for this layer.

    `rng` is needed only for router jitter in training.
    """
    B, L, D = x_BLD.shape
    moe = self.moe
    if (B * L) % moe.group_size:
      raise ValueError(f'moe.group_size={moe.group_size} does not divide the {B * L} tokens '
                       f'of a [{B}, {L}] batch')
    x_GSD = x_BLD.reshape(-1, moe.group_size, D)
    router_in = x_GSD.astype(jnp.float32)  # Float32 router: bf16 logits made Switch diverge.
    if train and moe.router_jitter > 0:
      router_in *= jax.random.uniform(rng, router_in.shape, jnp.float32,
                                      1.0 - moe.router_jitter, 1.0 + moe.router_jitter)
    logits_GSE = jnp.einsum('gsd,de->gse', router_in, self.router[...])
    capacity = self.capacity(train)
    route = routing.tokens_choose_top_k(logits_GSE, top_k=moe.top_k, capacity=capacity,
                                        renormalize=moe.renormalize_gates)
    x_ECD, combine_GSEC = dispatch_einsum(x_GSD, route, moe.num_experts, capacity)
    y_GSD = combine_einsum(self.experts(x_ECD), combine_GSEC)
    return y_GSD.reshape(B, L, D).astype(x_BLD.dtype), routing_stats(route)
