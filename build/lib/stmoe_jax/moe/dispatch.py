"""Three ways to move routed tokens to their experts and back (config `moe.dispatch`).

Einsum letters: G routing groups, S tokens per group, K choices per token, E experts,
C capacity, X = E*C expert slots (or, for dropless, the G*S*K assignment rows), D model dim.

All three consume the same `routing.Routing` record and give the same result when nothing is
dropped (tests/test_dispatch.py checks them against a per-token loop):

  - `einsum`: one-hot dispatch and combine masks [G, S, E*C] and two matmuls per step, the GShard
    form that TPUs like; its cost grows with S * E * C.
  - `scatter`: index gather into [E, G*C, D] buffers and a gather back; O(S*K) index work, no
    mask. The two capacity-based strategies drop exactly the same choices.
  - `dropless`: sorts every assignment by expert and runs grouped matmuls (`jax.lax.ragged_dot`)
    over variable-sized groups: no capacity, nothing dropped (MegaBlocks, MaxText).

`DISPATCHES` maps each `moe.dispatch` name to its `Dispatch` (dispatch and combine functions):
config validation, `MoeLayer` and `expert_parallel` all read it.

A capacity-based dispatch returns expert buffers [E, G*C, D] (empty slots are zero, each group's
C slots contiguous per expert) plus whatever its combine needs; combine returns [G, S, D], where
a dropped choice contributes exactly zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option, Range
from stmoe_jax.moe import grouped_matmul as gmm
from stmoe_jax.moe.routing import Routing


def _slots(route: Routing, num_experts: int, capacity: int) -> jax.Array:
  """int32 [G, S, K]: flat slot expert * C + position of each kept choice; E*C if not kept."""
  return jnp.where(route.kept, route.expert_index * capacity + route.position,
                   num_experts * capacity)


def _to_expert_major(x_GXD: jax.Array, num_experts: int) -> jax.Array:
  """[G, E*C, D] -> [E, G*C, D]: each expert's slots from every group side by side."""
  G, X, D = x_GXD.shape
  return jnp.swapaxes(x_GXD.reshape(G, num_experts, X // num_experts, D), 0, 1).reshape(
      num_experts, -1, D)


def _to_group_major(y_ECD: jax.Array, num_groups: int) -> jax.Array:
  """Inverse of `_to_expert_major`: [E, G*C, D] -> [G, E*C, D]."""
  E, _, D = y_ECD.shape
  return jnp.swapaxes(y_ECD.reshape(E, num_groups, -1, D), 0, 1).reshape(num_groups, -1, D)


def dispatch_einsum(x_GSD: jax.Array, route: Routing, num_experts: int,
                    capacity: int) -> tuple[jax.Array, jax.Array]:
  """Gathers tokens into expert buffers with one-hot masks.

  Args:
    x_GSD: tokens [G, S, D].
    route: routing record with [G, S, K] fields.
    num_experts: E.
    capacity: C, slots per expert and group.
  Returns:
    (x_ECD, combine_GSX): expert inputs [E, G*C, D] and the combine tensor [G, S, E*C] holding
    each kept choice's gate at its slot.
  """
  E, C = num_experts, capacity
  # A choice that is not kept points past the last slot, where one_hot yields an all-zero row.
  slot_mask_GSKX = jax.nn.one_hot(_slots(route, E, C), E * C, dtype=jnp.float32)
  dispatch_GSX = jnp.sum(slot_mask_GSKX, axis=2).astype(x_GSD.dtype)
  combine_GSX = jnp.einsum('gskx,gsk->gsx', slot_mask_GSKX, route.gate)
  x_GXD = jnp.einsum('gsx,gsd->gxd', dispatch_GSX, x_GSD)
  return _to_expert_major(x_GXD, E), combine_GSX


def combine_einsum(y_ECD: jax.Array, combine_GSX: jax.Array) -> jax.Array:
  """Gate-weighted sum of expert outputs back to token order: [E, G*C, D] -> [G, S, D]."""
  y_GXD = _to_group_major(y_ECD, combine_GSX.shape[0])
  return jnp.einsum('gsx,gxd->gsd', combine_GSX.astype(y_ECD.dtype), y_GXD)


def dispatch_scatter(x_GSD: jax.Array, route: Routing, num_experts: int,
                     capacity: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Gathers tokens into expert buffers by index; arguments as `dispatch_einsum`.

  Returns:
    (x_ECD, (slot_GSK, gate_GSK)): expert inputs [E, G*C, D], and each choice's flat slot
    (E*C = not kept) with its gate, which `combine_scatter` uses to gather the outputs back.
  """
  G, S, D = x_GSD.shape
  E, C = num_experts, capacity
  K = route.expert_index.shape[-1]
  slot_GSK = _slots(route, E, C)
  # token_of_slot[g, x] = the token in slot x, or S (a zero row) for an empty slot. Choices that
  # are not kept all write to the extra slot E*C, which is cut off.
  token_GSK = jnp.broadcast_to(jnp.arange(S)[None, :, None], (G, S, K))
  token_of_slot_GX = jnp.full((G, E * C + 1), S, jnp.int32)
  token_of_slot_GX = token_of_slot_GX.at[jnp.arange(G)[:, None, None], slot_GSK].set(token_GSK)
  x_padded = jnp.concatenate([x_GSD, jnp.zeros((G, 1, D), x_GSD.dtype)], axis=1)
  x_GXD = jnp.take_along_axis(x_padded, token_of_slot_GX[:, :E * C, None], axis=1)
  return _to_expert_major(x_GXD, E), (slot_GSK, route.gate)


def combine_scatter(y_ECD: jax.Array, plan: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Gathers each choice's expert output and sums them with the gates: -> [G, S, D]."""
  slot_GSK, gate_GSK = plan
  G, S, K = slot_GSK.shape
  y_GXD = _to_group_major(y_ECD, G)
  y_padded = jnp.concatenate([y_GXD, jnp.zeros((G, 1, y_GXD.shape[-1]), y_GXD.dtype)], axis=1)
  y_GSKD = jnp.take_along_axis(y_padded, slot_GSK.reshape(G, S * K, 1), axis=1)
  y_GSKD = y_GSKD.reshape(G, S, K, -1)
  return jnp.einsum('gskd,gsk->gsd', y_GSKD, gate_GSK.astype(y_GSKD.dtype))


def dispatch_dropless(x_GSD: jax.Array, route: Routing, num_experts: int
                      ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
  """Sorts every assigned (token, choice) by expert, for grouped matmuls without capacity.

  Args:
    x_GSD: tokens [G, S, D].
    route: routing record with [G, S, K] fields, made with capacity = S so that every assigned
      choice is kept (an expert can receive at most S choices of a group).
    num_experts: E.
  Returns:
    (x_XD, group_sizes_E, plan): the G*S*K rows sorted by expert (unassigned choices last, in
    no group, so `ragged_dot` computes nothing for them), how many rows each expert owns, and
    what `combine_dropless` needs to undo the sort.
  """
  G, S, D = x_GSD.shape
  K = route.expert_index.shape[-1]
  expert_X = jnp.where(route.assigned, route.expert_index, num_experts).reshape(-1)
  order_X = jnp.argsort(expert_X, stable=True)
  token_X = order_X // K  # Row r of the sorted order is choice order_X[r] of token order_X // K.
  x_XD = jnp.take(x_GSD.reshape(G * S, D), token_X, axis=0)
  group_sizes_E = jnp.bincount(expert_X, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  return x_XD, group_sizes_E, (order_X, route.gate)


def combine_dropless(y_XD: jax.Array, plan: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Undoes the sort of `dispatch_dropless` and sums each token's choices: -> [G, S, D]."""
  order_X, gate_GSK = plan
  G, S, K = gate_GSK.shape
  y_XD = jnp.zeros_like(y_XD).at[order_X].set(y_XD)  # Back to (token, choice) order.
  y_GSKD = y_XD.reshape(G, S, K, -1)
  return jnp.einsum('gskd,gsk->gsd', y_GSKD, gate_GSK.astype(y_GSKD.dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dispatch(options.Entry):
  """One entry of `DISPATCHES`: how routed tokens reach the experts and come back.

  Attributes:
    dispatch: capacity-based: (x_GSD, route, num_experts, capacity) -> (x_ECD expert buffers
      [E, G*C, D], plan); otherwise (x_GSD, route, num_experts) -> (x_XD rows sorted by expert,
      group_sizes_E, plan) for grouped matmuls.
    combine: (expert outputs, plan) -> y_GSD, a dropped choice contributing zero.
    uses_capacity: whether experts have a capacity (buffers, batched experts, all-to-all under
      expert parallelism) or not (rows, grouped matmuls, all-gather: capacity is S).
  """
  dispatch: Callable
  combine: Callable
  uses_capacity: bool


DISPATCHES = options.Registry('dispatch', 'moe.dispatch', 'scatter',
                              'How routed tokens reach the experts (moe/dispatch.py).')

# Read by the capacity-based paths (`routing.expert_capacity`); dropless dispatch has none.
CAPACITY_OPTIONS = (
    Option('moe.train_capacity_factor', float, 1.25, 'Expert capacity factor in training '
           '(ST-MoE: 1.25)...', Range(0, low_open=True)),
    Option('moe.eval_capacity_factor', float, 2.0, '...and at evaluation (ST-MoE: 2.0).',
           Range(0, low_open=True)),
    Option('moe.capacity_scaled_by_k', bool, True, 'C = CF * k * S / E (MaxText, ST-MoE); '
           "False: CF * S / E (flaxformer's tokens-choose; it rounds, we take the ceiling)."),
    Option('moe.min_capacity', int, 4, 'Floor on per-expert capacity, so tiny groups still '
           'route.', Range(1)),
)


def _validate_dropless(config) -> None:
  moe = config.moe
  for name in ('batch_prioritized_routing', 'encoder_batch_prioritized_routing'):
    if moe[name]:
      raise options.ConfigError(
          f"config.moe.{name}=True is invalid with moe.dispatch='dropless': it orders tokens "
          'for capacity, and dropless dispatch has none.')


DISPATCHES.register(Dispatch(
    name='einsum', dispatch=dispatch_einsum, combine=combine_einsum, uses_capacity=True,
    options=CAPACITY_OPTIONS, doc='One-hot dispatch and combine masks (GShard, flaxformer).'))
DISPATCHES.register(Dispatch(
    name='scatter', dispatch=dispatch_scatter, combine=combine_scatter, uses_capacity=True,
    options=CAPACITY_OPTIONS, doc='Index gathers into capacity buffers (MaxText-style).'))
DISPATCHES.register(Dispatch(
    name='dropless', dispatch=dispatch_dropless, combine=combine_dropless, uses_capacity=False,
    options=(Option('moe.grouped_matmul', str, 'auto', 'How dropless experts multiply '
                    '(moe/grouped_matmul.py); auto = the fastest known-good kernel per '
                    'platform.', OneOf(gmm.IMPLEMENTATIONS)),),
    validate=_validate_dropless,
    doc='Tokens sorted by expert, grouped matmuls, nothing dropped (MegaBlocks).'))
