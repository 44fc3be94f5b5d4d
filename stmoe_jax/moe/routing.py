"""Routers: which expert each token goes to, with what weight, into which buffer slot.

Einsum letters: G routing groups, S tokens per group, K choices per token, E experts,
C expert capacity (buffer slots per expert and group).

Routing is split from dispatch: a router returns a `Routing` record saying, for every
(token, choice), which expert it goes to, with what combine weight and which slot of that
expert's buffer it takes; any dispatch strategy (`stmoe_jax.moe.dispatch`) consumes that record.

  - `tokens_choose_top_k`: each token picks k experts (Switch k=1, GShard/ST-MoE k=2), with the
    ST-MoE second-expert policy, an optional selection bias (aux-loss-free balancing) and
    first-come or Batch Prioritized capacity.
  - `expert_choice`: each expert picks its top-C tokens (Zhou et al. 2022), written as K = E
    choices per token so that the same dispatch code applies.
  - `route_hierarchical`: an outer router over groups of experts, an inner one within each
    chosen group (lucidrains mixture-of-experts `HeirarchicalMoE`).
  - `route_hash`: a fixed hash of the token id picks one expert (Hash layers, Roller et al.
    2021); the MoE layer passes it the token ids (`Router.token_ids`).
  - `route_relu`: ReLU gates, every expert with a positive gate (ReMoE), K = E, dropless.

`tokens_choose_top_k` also takes the gating options of `stmoe_jax.moe.gating`: sigmoid scores,
group-limited top-k and a routed scaling factor (DeepSeek-V3), and per-rank later-choice policies.

`ROUTERS` maps each `moe.router` name to its `Router`: config validation, `MoeLayer`, the layer
stats and the plots all read it. A new router is one function with `Router.route`'s signature,
one `ROUTERS.register(...)` with its options, and its test (docs/extending.md).

Everything runs in float32 because the softmax and logsumexp exponentiate (Switch "selective
precision", ST-MoE).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from stmoe_jax.config import options
from stmoe_jax.config.options import Option, Range
from stmoe_jax.moe import gating


@flax.struct.dataclass
class Routing:
  """Where each token's choices go.

  Attributes:
    expert_index: int32 [G, S, K], chosen experts (tokens-choose: highest score first).
    gate: float32 [G, S, K], combine weight of each choice; 0 where the choice was not kept.
    position: int32 [G, S, K], slot of the choice in its expert's buffer (>= C if over capacity).
    assigned: bool [G, S, K], the router sent this choice (a real token, not dropped by the
      second-expert policy); what expert load is measured on.
    kept: bool [G, S, K], assigned and within capacity: the choice reaches its expert.
    probs: float32 [G, S, E], router probabilities (softmax, or normalised sigmoid scores).
    logits: float32 [G, S, E], router logits.
    balance_loss, z_loss: optional float32 scalars replacing `routing_stats`'s Switch balance
      loss and z-loss of probs/logits, for routers whose losses are not those (hierarchical).
    assigned_gate: optional float32 [G, S, K], the gate of every assigned choice before capacity
      drops (0 where not assigned), what `cv_balance.importance_loss` sums; None: `gate`.
    clean_logits, noise_std: optional float32 [G, S, E], the logits before Shazeer's noise and
      its scale softplus(x W_noise), for `cv_balance.smooth_load` (`logits` are the noisy
      ones); set by `MoeLayer.route` for tokens-choose routing with noisy_top_k in training.
    null_fraction: optional float32 scalar, the share of the real tokens' choices that went to
      null (zero-computation) experts; None: no null experts (0).
  """
  expert_index: jax.Array
  gate: jax.Array
  position: jax.Array
  assigned: jax.Array
  kept: jax.Array
  probs: jax.Array
  logits: jax.Array
  balance_loss: jax.Array | None = None
  z_loss: jax.Array | None = None
  assigned_gate: jax.Array | None = None
  clean_logits: jax.Array | None = None
  noise_std: jax.Array | None = None
  null_fraction: jax.Array | None = None


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


def positions_in_arrival_order(expert_index_GSK: jax.Array, assigned_GSK: jax.Array,
                               num_experts: int, priority_GS: jax.Array | None = None
                               ) -> jax.Array:
  """int32 [G, S, K]: how many assigned choices reached each choice's expert before it.

  Arrival order is token order, and within a token its choices in rank order (token-major, as
  in MaxText). Unlike GShard's slot-major order (all first choices before any second choice),
  a later token never displaces an earlier one, so a causal decoder stays causal. With
  `priority_GS` (Batch Prioritized Routing, Riquelme et al. 2021) tokens arrive in decreasing
  priority instead, which looks at the whole group and is therefore not causal.
  """
  G, S, K = expert_index_GSK.shape
  choice_GSKE = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=jnp.int32)
  choice_GSKE *= assigned_GSK[..., None].astype(jnp.int32)
  if priority_GS is not None:
    order_GS = jnp.argsort(-priority_GS, axis=1, stable=True)
    choice_GSKE = jnp.take_along_axis(choice_GSKE, order_GS[:, :, None, None], axis=1)
  choice_GXE = choice_GSKE.reshape(G, S * K, num_experts)
  before_GXE = jnp.cumsum(choice_GXE, axis=1) - choice_GXE
  position_GSK = jnp.sum(before_GXE * choice_GXE, axis=-1).reshape(G, S, K)
  if priority_GS is not None:
    position_GSK = jnp.take_along_axis(position_GSK, jnp.argsort(order_GS, axis=1)[..., None],
                                       axis=1)
  return position_GSK


def tokens_choose_top_k(logits_GSE: jax.Array, *, top_k: int, capacity: int,
                        renormalize: bool = True, mask_GS: jax.Array | None = None,
                        bias_E: jax.Array | None = None, second_expert_threshold: float = 0.0,
                        batch_prioritized: bool = False, train: bool = False,
                        rng: jax.Array | None = None, score_fn: str = 'softmax',
                        routed_scaling_factor: float = 1.0, n_groups: int = 1,
                        topk_groups: int = 1, later_policy: str = '',
                        thresholds: tuple[float, ...] | None = None) -> Routing:
  """Each token picks its top-k experts; an expert keeps the first `capacity` that arrive.

  Args:
    logits_GSE: router logits [G, S, E]; cast to float32.
    top_k: choices per token (1 = Switch, 2 = GShard/ST-MoE).
    capacity: buffer slots per expert and group (see `expert_capacity`).
    renormalize: combine weights are the chosen scores divided by their sum (mesh-tf,
      ST-MoE, MaxText, DeepSeek-V3) rather than raw softmax probabilities (flaxformer). At k=1
      the raw score is always used: renormalised it would be 1 and the router would get no
      gradient.
    mask_GS: optional bool [G, S]; False marks padding, which takes no capacity and is never
      dispatched.
    bias_E: optional float32 [E] added to the scores for *choosing* only (DeepSeek-V3
      aux-loss-free balancing); combine weights stay the unbiased scores.
    second_expert_threshold: the threshold of every choice 2..k when `thresholds` is None
      (ST-MoE: 0.2; 0 = route them all).
    batch_prioritized: capacity goes to the most confident tokens first (highest top-1
      probability) instead of first-come: Batch Prioritized Routing, for non-causal use only.
    train: selects the default later-choice policy ('random' in training, 'threshold' at eval).
    rng: PRNG key for the 'random' policy.
    score_fn: 'softmax' or 'sigmoid' (DeepSeek-V3), see `gating.router_scores`.
    routed_scaling_factor: combine weights are multiplied by it (DeepSeek-V3: 2.5).
    n_groups, topk_groups: group-limited top-k, only the experts of each token's `topk_groups`
      best of `n_groups` groups are eligible (`gating.group_limited_mask`); 1, 1 = off.
    later_policy: `gating.later_choice_policy` for choices 2..k; '' = the train/eval default.
    thresholds: top_k - 1 per-rank thresholds of the policy (None = second_expert_threshold).
  Returns:
    A `Routing` record with K = top_k.
  """
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, E = logits_GSE.shape
  scores_GSE, probs_GSE = gating.router_scores(logits_GSE, score_fn)
  select_GSE = scores_GSE if bias_E is None else scores_GSE + bias_E.astype(jnp.float32)
  select_GSE = jax.lax.stop_gradient(select_GSE)
  if n_groups > 1:
    eligible_GSE = gating.group_limited_mask(select_GSE, n_groups, topk_groups)
    select_GSE = jnp.where(eligible_GSE, select_GSE, -jnp.inf)
  _, index_GSK = jax.lax.top_k(select_GSE, top_k)
  gate_GSK = jnp.take_along_axis(scores_GSE, index_GSK, axis=-1)
  if renormalize and top_k > 1:
    gate_GSK = gate_GSK / jnp.sum(gate_GSK, axis=-1, keepdims=True)
  valid_GS = jnp.ones((G, S), bool) if mask_GS is None else mask_GS.astype(bool)
  assigned_GSK = jnp.broadcast_to(valid_GS[..., None], (G, S, top_k))
  policy = later_policy or ('random' if train else 'threshold')
  if thresholds is None:
    thresholds = (second_expert_threshold,) * (top_k - 1)
  if top_k > 1 and not (policy == 'all' or policy in ('random', 'threshold') and
                        not any(thresholds)):
    assigned_GSK &= gating.later_choice_policy(jax.lax.stop_gradient(gate_GSK), policy,
                                               tuple(thresholds), rng)
  if routed_scaling_factor != 1.0:
    gate_GSK = gate_GSK * routed_scaling_factor
  priority_GS = jnp.max(probs_GSE, axis=-1) if batch_prioritized else None
  return _place(index_GSK, gate_GSK, assigned_GSK, probs_GSE, logits_GSE, capacity, priority_GS)


def _place(index_GSK, gate_GSK, assigned_GSK, probs_GSE, logits_GSE, capacity, priority_GS=None,
           **losses) -> Routing:
  """The `Routing` of assigned choices: their buffer positions, what fits, the kept gates."""
  position_GSK = positions_in_arrival_order(index_GSK, assigned_GSK, probs_GSE.shape[-1],
                                            priority_GS)
  kept_GSK = assigned_GSK & (position_GSK < capacity)
  return Routing(expert_index=index_GSK, gate=gate_GSK * kept_GSK, position=position_GSK,
                 assigned=assigned_GSK, kept=kept_GSK, probs=probs_GSE, logits=logits_GSE,
                 assigned_gate=gate_GSK * assigned_GSK, **losses)


def expert_choice(logits_GSE: jax.Array, *, capacity: int,
                  mask_GS: jax.Array | None = None) -> Routing:
  """Each expert takes the `capacity` tokens of its group with the highest router probability.

  Expert-choice routing (Zhou et al. 2022): every expert is exactly full, so load is perfectly
  balanced without an auxiliary loss; a token may be taken by several experts or by none. The
  choice of a token depends on every other token in its group, so it is not causal. Returned
  with K = E: choice e of a token is expert e, kept when expert e took the token, with the
  token's softmax probability for e as combine weight.

  Args:
    logits_GSE: router logits [G, S, E]; cast to float32.
    capacity: tokens each expert takes per group (at most S).
    mask_GS: optional bool [G, S]; padding is never taken.
  Returns:
    A `Routing` record with K = E.
  """
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, E = logits_GSE.shape
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  scores_GES = jnp.swapaxes(jax.lax.stop_gradient(probs_GSE), 1, 2)
  if mask_GS is not None:
    scores_GES = jnp.where(mask_GS[:, None, :].astype(bool), scores_GES, -1.0)
  _, token_GEC = jax.lax.top_k(scores_GES, capacity)
  # position[g, s, e] = rank of token s among expert e's picks, or `capacity` if not picked.
  rank_GEC = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), token_GEC.shape)
  position_GES = jnp.full((G, E, S), capacity, jnp.int32)
  position_GES = position_GES.at[jnp.arange(G)[:, None, None], jnp.arange(E)[None, :, None],
                                 token_GEC].set(rank_GEC)
  position_GSE = jnp.swapaxes(position_GES, 1, 2)
  kept_GSE = position_GSE < capacity
  if mask_GS is not None:
    kept_GSE &= mask_GS[..., None].astype(bool)
  index_GSE = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
  return Routing(expert_index=index_GSE, gate=probs_GSE * kept_GSE, position=position_GSE,
                 assigned=kept_GSE, kept=kept_GSE, probs=probs_GSE, logits=logits_GSE)


def load_balancing_loss(probs_GSE: jax.Array, expert_index_GSK: jax.Array,
                        mask_GS: jax.Array | None = None,
                        assigned_GSK: jax.Array | None = None) -> jax.Array:
  """Switch Transformer auxiliary loss, E * sum_i f_i * P_i, averaged over groups.

  f_i is the fraction of the group's assigned token-choices that went to expert i (before
  capacity drops, normalised so that sum_i f_i = 1), P_i the mean router probability of expert
  i over real tokens. A uniform router gives exactly 1.0 for any k. Switch eq. (4)-(6).

  Args:
    probs_GSE: float32 router probabilities [G, S, E].
    expert_index_GSK: int32 chosen experts [G, S, K].
    mask_GS: optional [G, S]; only tokens where it is nonzero count (towards P and f).
    assigned_GSK: optional bool [G, S, K], which choices count towards f (see
      `Routing.assigned`); default: every choice of a real token.
  Returns:
    Scalar float32 loss.
  """
  G, S, E = probs_GSE.shape
  m_GS = jnp.ones((G, S), jnp.float32) if mask_GS is None else mask_GS.astype(jnp.float32)
  w_GSK = jnp.broadcast_to(m_GS[..., None], expert_index_GSK.shape)
  if assigned_GSK is not None:
    w_GSK = w_GSK * assigned_GSK
  choices_GE = jnp.einsum('gske,gsk->ge', jax.nn.one_hot(expert_index_GSK, E), w_GSK)
  f_GE = choices_GE / jnp.maximum(jnp.sum(choices_GE, axis=-1, keepdims=True), 1.0)
  p_GE = (jnp.einsum('gse,gs->ge', probs_GSE, m_GS) /
          jnp.maximum(jnp.sum(m_GS, axis=1), 1.0)[:, None])
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
  return _masked_mean(log_z_GS**2, mask_GS)


def _masked_mean(x_GS: jax.Array, mask_GS: jax.Array | None) -> jax.Array:
  if mask_GS is None:
    return jnp.mean(x_GS)
  m_GS = mask_GS.astype(jnp.float32)
  return jnp.sum(x_GS * m_GS) / jnp.maximum(jnp.sum(m_GS), 1.0)


def routing_stats(route: Routing, mask_GS: jax.Array | None = None) -> dict[str, jax.Array]:
  """Losses and telemetry of one routing decision, over real (unmasked) tokens.

  Returns float32 values:
    balance_loss, z_loss: the two router losses (scalars);
    expert_load [E]: share of assigned token-choices sent to each expert (sums to 1);
    max_load_ratio: max / mean of expert_load (1 = balanced, E = collapsed onto one expert);
    dropped_fraction: share of assigned choices that found their expert full;
    dropped_fraction_per_slot [K]: the same for the 1st, 2nd, ... choice;
    tokens_left_behind: share of real tokens with no kept choice (every choice dropped, or
      never assigned: a token no expert took under expert choice), which pass the layer as
      their residual only;
    router_entropy: mean entropy (nats) of the router distribution per token;
    router_confidence: mean over tokens of the router's top-1 probability (max_e probs);
    null_choice_fraction: share of choices sent to null experts (`Routing.null_fraction`), so
      the expert FLOPs spent are (1 - it) times the nominal top_k experts' (0 without them);
    experts_per_token: mean over real tokens of the choices that reached an expert (kept):
      what a token's expert compute scales with (`models.flops`). top_k less drops and null
      choices for tokens-choose; varying by token for ReLU routing and expert choice;
    experts_per_token_hist [K + 1]: share of real tokens that reached 0, 1, ..., K experts
      (entry 0 is tokens_left_behind);
    max_router_logit: largest |router logit| (the ST-MoE z-loss keeps it small, so the float32
      softmax stays accurate; watch it grow when the z-loss is off).
  """
  G, S, E = route.probs.shape
  assigned_GSK = route.assigned.astype(jnp.float32)
  kept_GSK = route.kept.astype(jnp.float32)
  load_E = jnp.einsum('gske,gsk->e', jax.nn.one_hot(route.expert_index, E), assigned_GSK)
  load_E = load_E / jnp.maximum(jnp.sum(load_E), 1.0)
  assigned_K = jnp.sum(assigned_GSK, axis=(0, 1))
  dropped_K = jnp.sum(assigned_GSK - kept_GSK, axis=(0, 1))
  entropy_GS = -jnp.sum(route.probs * jnp.log(jnp.maximum(route.probs, 1e-30)), axis=-1)
  left_behind_GS = (~jnp.any(route.kept, axis=-1)).astype(jnp.float32)
  experts_GS = jnp.sum(route.kept, axis=-1)
  # N: the K + 1 counts 0..K a token's kept choices can take.
  hist_GSN = jax.nn.one_hot(experts_GS, route.kept.shape[-1] + 1, dtype=jnp.float32)
  m_GS1 = (jnp.ones((G, S, 1), jnp.float32) if mask_GS is None
           else mask_GS[..., None].astype(jnp.float32))
  return {
      'balance_loss': (load_balancing_loss(route.probs, route.expert_index, mask_GS,
                                           route.assigned)
                       if route.balance_loss is None else route.balance_loss),
      'z_loss': router_z_loss(route.logits, mask_GS) if route.z_loss is None else route.z_loss,
      'expert_load': load_E,
      'max_load_ratio': jnp.max(load_E) * E,
      'dropped_fraction': jnp.sum(dropped_K) / jnp.maximum(jnp.sum(assigned_K), 1.0),
      'dropped_fraction_per_slot': dropped_K / jnp.maximum(assigned_K, 1.0),
      'tokens_left_behind': _masked_mean(left_behind_GS, mask_GS),
      'router_entropy': _masked_mean(entropy_GS, mask_GS),
      'router_confidence': _masked_mean(jnp.max(route.probs, axis=-1), mask_GS),
      'null_choice_fraction': (jnp.zeros((), jnp.float32) if route.null_fraction is None
                               else route.null_fraction),
      'experts_per_token': _masked_mean(experts_GS.astype(jnp.float32), mask_GS),
      'experts_per_token_hist': (jnp.sum(hist_GSN * m_GS1, axis=(0, 1)) /
                                 jnp.maximum(jnp.sum(m_GS1), 1.0)),
      'max_router_logit': jnp.max(jnp.abs(route.logits) * (
          1.0 if mask_GS is None else mask_GS[..., None].astype(jnp.float32))),
  }


def route_tokens_choose(logits_GSE: jax.Array, moe: Any, *, capacity: int,
                        mask_GS: jax.Array | None = None, bias_E: jax.Array | None = None,
                        train: bool = False, rng: jax.Array | None = None) -> Routing:
  """`tokens_choose_top_k` with the settings of `moe` (a `config.MoeConfig`).

  With `moe.num_null_experts` = N > 0 the logits are [G, S, E + N]: the top-k is over all, and
  a choice of one of the N null experts (MoE++, Jin et al. 2024: zero-computation experts whose
  output is 0) is not dispatched, takes no capacity and adds nothing, its gate mass included in
  the renormalisation (so a token may spend less than k experts of compute). The returned
  record is over the E real experts (probs renormalised over them, for the stats and the
  balance loss; the z-loss sees all E + N logits).
  """
  thresholds = moe.threshold_train if train else moe.threshold_eval
  route = tokens_choose_top_k(
      logits_GSE, top_k=moe.top_k, capacity=capacity, renormalize=moe.renormalize_gates,
      mask_GS=mask_GS, bias_E=bias_E, second_expert_threshold=moe.second_expert_threshold,
      batch_prioritized=moe.batch_prioritized_routing, train=train, rng=rng,
      score_fn=moe.score_fn, routed_scaling_factor=moe.routed_scaling_factor,
      n_groups=moe.n_groups, topk_groups=moe.topk_groups,
      later_policy=moe.second_policy_train if train else moe.second_policy_eval,
      thresholds=tuple(thresholds) or None)
  if not moe.num_null_experts:
    return route
  E = moe.num_experts
  real_GSK = route.expert_index < E
  null_GSK = route.assigned & ~real_GSK
  null_fraction = jnp.sum(null_GSK) / jnp.maximum(jnp.sum(route.assigned), 1)
  probs_GSE = route.probs[..., :E]
  probs_GSE = probs_GSE / jnp.maximum(jnp.sum(probs_GSE, axis=-1, keepdims=True), 1e-30)
  priority_GS = jnp.max(route.probs, axis=-1) if moe.batch_prioritized_routing else None
  placed = _place(jnp.where(real_GSK, route.expert_index, 0), route.assigned_gate,
                  route.assigned & real_GSK, probs_GSE, route.logits, capacity, priority_GS,
                  null_fraction=null_fraction.astype(jnp.float32))
  return placed.replace(z_loss=router_z_loss(route.logits, mask_GS))


def route_hierarchical(logits_GSE: jax.Array, moe: Any, *, capacity: int,
                       mask_GS: jax.Array | None = None, bias_E: jax.Array | None = None,
                       train: bool = False, rng: jax.Array | None = None) -> Routing:
  """Two-level routing (`gating.hierarchical_top_k`) with `moe.hierarchy = (O, I)`.

  `logits_GSE` holds E inner logits then O outer logits (`Router.num_logits`). The balance loss
  is the Switch loss at each level, summed (lucidrains `loss_outer + loss_inner`): over the O
  groups, plus, averaged over groups, over each group's I experts among the tokens that chose
  it; a balanced router gives 2. The z-loss likewise sums the outer z-loss and the mean of the
  groups' inner z-losses. No selection bias, randomness or later-choice policy.
  """
  del bias_E, train, rng
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, _ = logits_GSE.shape
  O, I = moe.hierarchy
  inner_GSE, outer_GSO = logits_GSE[..., :O * I], logits_GSE[..., O * I:]
  outer_k = moe.hierarchy_outer_k
  h = gating.hierarchical_top_k(outer_GSO, inner_GSE, outer_k=outer_k,
                                inner_k=moe.top_k // outer_k, renormalize=moe.renormalize_gates)
  valid_GS = jnp.ones((G, S), bool) if mask_GS is None else mask_GS.astype(bool)
  # Inner level: every (routing group, outer group) pair is a balance group of the tokens that
  # chose that outer group.
  chose_GSO = (jnp.any(jax.nn.one_hot(h['outer_index'], O, dtype=bool), axis=2) &
               valid_GS[..., None])
  to_pairs = lambda x_GSO: jnp.swapaxes(x_GSO, 1, 2).reshape(G * O, S, *x_GSO.shape[3:])
  balance = (load_balancing_loss(h['outer_probs'], h['outer_index'], valid_GS) +
             load_balancing_loss(to_pairs(h['inner_probs']), to_pairs(h['inner_index']),
                                 to_pairs(chose_GSO)))
  z = (router_z_loss(outer_GSO, valid_GS) +
       router_z_loss(inner_GSE.reshape(G, S * O, I), jnp.repeat(valid_GS, O, axis=1)))
  assigned_GSK = jnp.broadcast_to(valid_GS[..., None], h['index'].shape)
  return _place(h['index'], h['gate'], assigned_GSK, h['probs'], inner_GSE, capacity,
                balance_loss=balance, z_loss=z)


def route_expert_choice(logits_GSE: jax.Array, moe: Any, *, capacity: int,
                        mask_GS: jax.Array | None = None, bias_E: jax.Array | None = None,
                        train: bool = False, rng: jax.Array | None = None) -> Routing:
  """`expert_choice`; it has no settings, selection bias or randomness."""
  del moe, bias_E, train, rng
  return expert_choice(logits_GSE, capacity=capacity, mask_GS=mask_GS)


def hash_expert(token_ids: jax.Array, num_experts: int) -> jax.Array:
  """int32: a fixed pseudo-random expert for each token id (murmur3's 32-bit finaliser of the
  id, modulo E), the same at every position, in every layer and every run."""
  h = token_ids.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
  h ^= h >> 16
  h *= jnp.uint32(0x85EBCA6B)
  h ^= h >> 13
  h *= jnp.uint32(0xC2B2AE35)
  h ^= h >> 16
  return (h % jnp.uint32(num_experts)).astype(jnp.int32)


def route_hash(logits_GSE: jax.Array, moe: Any, *, capacity: int,
               mask_GS: jax.Array | None = None, bias_E: jax.Array | None = None,
               train: bool = False, rng: jax.Array | None = None,
               token_ids_GS: jax.Array | None = None) -> Routing:
  """Hash layers (Roller et al. 2021): token id -> `hash_expert`, combine weight 1.

  Nothing is learned: the router's logits are not used (its weights get no gradient), and the
  balance and z-losses are 0. Balance is the hash's, over the token ids of the data. Capacity is
  first come first served as for tokens-choose.
  """
  del bias_E, train, rng
  if token_ids_GS is None:
    raise ValueError("moe.router='hash' routes by token id: call the MoE layer with "
                     'token_ids_BL (the decoder-only Transformer passes them)')
  G, S, E = logits_GSE.shape
  index_GSK = hash_expert(token_ids_GS, E)[..., None]
  valid_GS = jnp.ones((G, S), bool) if mask_GS is None else mask_GS.astype(bool)
  zero = jnp.zeros((), jnp.float32)
  return _place(index_GSK, jnp.ones((G, S, 1), jnp.float32), valid_GS[..., None],
                jax.nn.one_hot(index_GSK[..., 0], E), jnp.zeros((G, S, E), jnp.float32),
                capacity, balance_loss=zero, z_loss=zero)


def route_relu(logits_GSE: jax.Array, moe: Any, *, capacity: int,
               mask_GS: jax.Array | None = None, bias_E: jax.Array | None = None,
               train: bool = False, rng: jax.Array | None = None) -> Routing:
  """ReLU routing (ReMoE, Wang et al. 2025): gate_e = relu(logit_e), every expert with a
  positive gate is used; K = E choices per token (choice e is expert e), so the number of
  active experts varies by token and is steered by an L1 penalty, not a top-k.

  `balance_loss` is ReMoE's load-balanced L1 regulariser without its coefficient: the mean over
  real tokens of sum_e f_e * relu(logit_e), f_e = E / (k T) * (tokens with a positive gate for
  e), constant (eq. 7-8); `MoeLayer` multiplies it by the adaptive coefficient. `probs` (for the
  entropy, confidence and the plots) is the softmax of the logits. Dropless only: there is no
  capacity that a variable number of choices could be sized by.
  """
  del bias_E, train, rng
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, E = logits_GSE.shape
  gate_GSE = jax.nn.relu(logits_GSE)
  valid_GS = jnp.ones((G, S), bool) if mask_GS is None else mask_GS.astype(bool)
  assigned_GSE = (gate_GSE > 0) & valid_GS[..., None]
  m_GS = valid_GS.astype(jnp.float32)
  num_real = jnp.maximum(jnp.sum(m_GS), 1.0)
  f_E = jax.lax.stop_gradient(E / (moe.top_k * num_real) * jnp.sum(assigned_GSE, axis=(0, 1)))
  l1 = jnp.sum(jnp.einsum('gse,e->gs', gate_GSE, f_E) * m_GS) / num_real
  index_GSE = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
  return _place(index_GSE, gate_GSE, assigned_GSE, jax.nn.softmax(logits_GSE, axis=-1),
                logits_GSE, capacity, balance_loss=l1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Router(options.Entry):
  """One entry of `ROUTERS` (with `Entry`'s name, options, validate and doc).

  Attributes:
    route: (logits_GSE, moe, *, capacity, mask_GS, bias_E, train, rng) -> `Routing`, with `moe`
      the layer's `config.MoeConfig`, float32 logits [G, S, E], optional real-token mask
      [G, S], the aux-loss-free selection bias [E] (None when off), and the train flag and key
      for random routing policies.
    causal: a token's choices depend only on it and earlier tokens, so a decoder may use it.
    fixed_load: every expert takes exactly `capacity` choices, so it has no dropless form.
    num_choices: moe -> K, the choices per token of its `Routing`.
    num_logits: moe -> the router's output width (E; hierarchical: E inner + O outer).
    token_ids: `route` also takes `token_ids_GS`, the int32 token ids [G, S] of the routed
      tokens (hash routing); the MoE layer is then called with `token_ids_BL`.
  """
  route: Callable[..., Routing]
  causal: bool
  fixed_load: bool
  num_choices: Callable[[Any], int]
  num_logits: Callable[[Any], int] = lambda moe: moe.num_experts
  token_ids: bool = False


def _selected_routers(config) -> set[str]:
  moe = config.moe
  return {moe.router} | ({moe.encoder_router} if moe.encoder_router else set())


ROUTERS = options.Registry(
    'router', 'moe.router', 'tokens_choose', 'The router of every MoE layer (moe/routing.py).',
    selected=_selected_routers)


def _validate_hierarchical(config) -> None:
  moe = config.moe
  E, k, hierarchy = moe.num_experts, moe.top_k, moe.hierarchy
  if not (len(hierarchy) == 2 and all(options.type_ok(n, int) and n > 0 for n in hierarchy)
          and hierarchy[0] * hierarchy[1] == E):
    raise options.ConfigError(
        f'config.moe.hierarchy={hierarchy!r} is invalid: expected (outer groups, experts per '
        f'group) whose product is moe.num_experts={E}.')
  outer, inner = hierarchy
  outer_k = moe.hierarchy_outer_k
  if not (outer_k <= outer and k % outer_k == 0 and k // outer_k <= inner):
    raise options.ConfigError(
        f'config.moe.hierarchy_outer_k={outer_k!r} is invalid: expected at most {outer} outer '
        f'groups, dividing moe.top_k={k} into at most {inner} experts per group.')


ROUTERS.register(Router(
    name='tokens_choose', route=route_tokens_choose, causal=True, fixed_load=False,
    num_choices=lambda moe: moe.top_k,
    num_logits=lambda moe: moe.num_experts + moe.num_null_experts,
    options=gating.TOP_K_OPTIONS + (
        Option('moe.num_null_experts', int, 0, 'Zero-computation experts (MoE++): choosing one '
               'skips a choice; top_k over E + these.', Range(0, note='0 = none')),),
    doc='Each token picks its top_k experts (Switch k=1, GShard/ST-MoE k=2, DeepSeek-V3).'))
ROUTERS.register(Router(
    name='expert_choice', route=route_expert_choice, causal=False, fixed_load=True,
    num_choices=lambda moe: moe.num_experts,
    doc='Each expert picks its top-C tokens (Zhou et al. 2022); non-causal.'))
ROUTERS.register(Router(
    name='hierarchical', route=route_hierarchical, causal=True, fixed_load=False,
    num_choices=lambda moe: moe.top_k,
    num_logits=lambda moe: moe.num_experts + moe.hierarchy[0],
    options=(Option('moe.hierarchy', tuple, (), '(outer groups, experts per group), product '
                    'num_experts.'),
             Option('moe.hierarchy_outer_k', int, 1, 'Outer groups per token; top_k / it '
                    'experts in each.', Range(1))),
    validate=_validate_hierarchical,
    doc='An outer router over groups of experts, an inner one within each chosen group.'))


def _validate_hash(config) -> None:
  moe = config.moe
  if moe.encoder_router == 'hash' or config.model.get('architecture', '') == 'encoder_decoder':
    name = 'encoder_router' if moe.encoder_router == 'hash' else 'router'
    raise options.ConfigError(
        f"config.moe.{name}='hash' is invalid: the encoder-decoder does not pass token ids to "
        'its MoE layers; hash routing is for the decoder-only model.')
  if moe.top_k != 1:
    raise options.ConfigError(f"config.moe.top_k={moe.top_k!r} is invalid: expected 1 with "
                              "moe.router='hash' (one hashed expert per token).")


ROUTERS.register(Router(
    name='hash', route=route_hash, causal=True, fixed_load=False, token_ids=True,
    num_choices=lambda moe: 1, validate=_validate_hash,
    doc='Hash layers (Roller et al. 2021): a fixed hash of the token id picks one expert.'))


def _validate_relu(config) -> None:
  moe = config.moe
  if moe.dispatch != 'dropless':
    raise options.ConfigError(
        f"config.moe.dispatch={moe.dispatch!r} is invalid: expected 'dropless' with "
        "moe.router='relu' (a token uses a varying number of experts: no capacity fits).")
  if moe.encoder_router not in ('', 'relu') or moe.top_k >= moe.num_experts:
    raise options.ConfigError(
        f'config.moe.top_k={moe.top_k!r} is invalid: expected fewer than moe.num_experts='
        f"{moe.num_experts} active experts per token as the target of moe.router='relu', and "
        "every MoE layer routing with it (moe.encoder_router '' or 'relu').")


ROUTERS.register(Router(
    name='relu', route=route_relu, causal=True, fixed_load=False,
    num_choices=lambda moe: moe.num_experts, validate=_validate_relu,
    options=(Option('moe.relu_l1_init', float, 1e-8, "ReMoE: the L1 coefficient's start "
                    '(times aux_loss_coef), adapted every step...', Range(0, low_open=True)),
             Option('moe.relu_l1_step', float, 1.2, '...by this factor towards the sparsity '
                    '1 - top_k / num_experts (ReMoE alpha).', Range(1, low_open=True))),
    doc='ReLU gates (ReMoE), as many experts as have a positive gate; dropless only.'))


def noncausal_setting(moe: Any) -> str | None:
  """The setting of `moe` that lets a token's routing depend on later tokens of its group
  ('moe.router=...' or 'moe.batch_prioritized_routing=True'), or None when routing is causal."""
  if not ROUTERS[moe.router].causal:
    return f'moe.router={moe.router!r}'
  if moe.batch_prioritized_routing:
    return 'moe.batch_prioritized_routing=True'
  return None
