"""Tokens-choose top-k routing (Switch, GShard, ST-MoE) and the router losses.

Einsum letters: G routing groups, S tokens per group, K choices per token, E experts,
C expert capacity (buffer slots per expert and group).

Routing is split from dispatch: the router returns, for every (token, choice), which expert it
goes to, with what combine weight, and which slot of that expert's buffer it takes. Any dispatch
strategy (one-hot einsum masks here) consumes that record. Everything here runs in float32
because the softmax and logsumexp exponentiate (Switch "selective precision", ST-MoE).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Routing:
  """Where each token's k choices go.

  Attributes:
    expert_index: int32 [G, S, K], chosen experts, highest probability first.
    gate: float32 [G, S, K], combine weight of each choice; 0 where the choice was dropped.
    position: int32 [G, S, K], slot of the choice in its expert's buffer (may be >= capacity).
    kept: bool [G, S, K], position < capacity: the choice reaches its expert.
    probs: float32 [G, S, E], router softmax probabilities.
    logits: float32 [G, S, E], router logits.
  """
  expert_index: jax.Array
  gate: jax.Array
  position: jax.Array
  kept: jax.Array
  probs: jax.Array
  logits: jax.Array


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float,
                    *, scaled_by_k: bool = True, min_capacity: int = 4) -> int:
  """Buffer slots per expert and group: ceil(CF * [k *] S / E), at least `min_capacity`, at most S.

  Rounds up so that capacity factor 1.0 with a perfectly balanced router drops nothing. Scaling
  by k (MaxText, MegaBlocks, ST-MoE's "capacity per assignment") keeps the drop rate of CF 1.25
  the same for top-1 and top-2; flaxformer does not scale. No expert can receive more than S
  assignments (a token picks distinct experts), so S is a hard upper bound.
  """
  assignments = group_size * (top_k if scaled_by_k else 1)
  capacity = math.ceil(capacity_factor * assignments / num_experts)
  return int(min(group_size, max(min_capacity, capacity)))


def tokens_choose_top_k(logits_GSE: jax.Array, *, top_k: int, capacity: int,
                        renormalize: bool = True, mask_GS: jax.Array | None = None) -> Routing:
  """Each token picks its top-k experts; an expert keeps the first `capacity` that arrive.

  Arrival order is token order, and within a token its choices in rank order (token-major, as
  in MaxText). Unlike GShard's slot-major order (all first choices before any second choice),
  this never lets a later token displace an earlier one, so a causal decoder stays causal.

  Args:
    logits_GSE: router logits [G, S, E]; cast to float32.
    top_k: choices per token (1 = Switch, 2 = GShard/ST-MoE).
    capacity: buffer slots per expert and group (see `expert_capacity`).
    renormalize: combine weights are the chosen probabilities divided by their sum (mesh-tf,
      ST-MoE, MaxText) rather than raw softmax probabilities (flaxformer). At k=1 the raw
      probability is always used: renormalised it would be 1 and the router would get no gradient.
    mask_GS: optional bool [G, S]; False marks padding, which takes no capacity and is never
      dispatched.
  Returns:
    A `Routing` record.
  """
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, E = logits_GSE.shape
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  gate_GSK, index_GSK = jax.lax.top_k(probs_GSE, top_k)
  if renormalize and top_k > 1:
    gate_GSK = gate_GSK / jnp.sum(gate_GSK, axis=-1, keepdims=True)
  # Token-major arrival order: flatten (S, K) with K minor, count earlier arrivals per expert.
  valid_GS = jnp.ones((G, S), bool) if mask_GS is None else mask_GS.astype(bool)
  choice_GSKE = jax.nn.one_hot(index_GSK, E, dtype=jnp.int32) * valid_GS[:, :, None, None]
  choice_mask = choice_GSKE.reshape(G, S * top_k, E)
  arrivals_before = jnp.cumsum(choice_mask, axis=1) - choice_mask
  position_GSK = jnp.sum(arrivals_before * choice_mask, axis=-1).reshape(G, S, top_k)
  kept_GSK = (position_GSK < capacity) & valid_GS[:, :, None]
  return Routing(expert_index=index_GSK, gate=gate_GSK * kept_GSK, position=position_GSK,
                 kept=kept_GSK, probs=probs_GSE, logits=logits_GSE)


def load_balancing_loss(probs_GSE: jax.Array, expert_index_GSK: jax.Array,
                        mask_GS: jax.Array | None = None) -> jax.Array:
  """Switch Transformer auxiliary loss, E * sum_i f_i * P_i, averaged over groups.

  f_i is the fraction of the group's token-choices assigned to expert i (before capacity drops,
  normalised over all k choices so that sum_i f_i = 1), P_i the mean router probability of
  expert i. A perfectly uniform router gives exactly 1.0 for any k. Switch eq. (4)-(6).

  Args:
    probs_GSE: float32 router probabilities [G, S, E].
    expert_index_GSK: int32 chosen experts [G, S, K].
    mask_GS: optional [G, S]; only tokens where it is nonzero count (padding is excluded).
  Returns:
    Scalar float32 loss.
  """
  G, S, E = probs_GSE.shape
  K = expert_index_GSK.shape[-1]
  m_GS = jnp.ones((G, S), jnp.float32) if mask_GS is None else mask_GS.astype(jnp.float32)
  tokens_G = jnp.maximum(jnp.sum(m_GS, axis=1), 1.0)
  choices_GE = jnp.einsum('gske,gs->ge', jax.nn.one_hot(expert_index_GSK, E), m_GS)
  f_GE = choices_GE / (K * tokens_G[:, None])
  p_GE = jnp.einsum('gse,gs->ge', probs_GSE, m_GS) / tokens_G[:, None]
  return jnp.mean(E * jnp.sum(f_GE * p_GE, axis=-1))


def router_z_loss(logits_GSE: jax.Array, mask_GS: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss, mean over tokens of logsumexp(logits)^2 (ST-MoE eq. 5).

  Penalises large router logits, which overflow bfloat16 and destabilise training.

  Args:
    logits_GSE: router logits [G, S, E].
    mask_GS: optional [G, S]; only tokens where it is nonzero count.
  Returns:
    Scalar float32 loss.
  """
  log_z_GS = jax.nn.logsumexp(logits_GSE.astype(jnp.float32), axis=-1)
  if mask_GS is None:
    return jnp.mean(log_z_GS**2)
  m_GS = mask_GS.astype(jnp.float32)
  return jnp.sum(log_z_GS**2 * m_GS) / jnp.maximum(jnp.sum(m_GS), 1.0)
