"""Gating: the steps between a router's logits and each token's chosen experts and weights.

Einsum letters: G routing groups, S tokens per group, K choices per token, E experts,
N expert groups of group-limited top-k, O outer groups and I experts per outer group of the
hierarchical router (E = O * I).

The routers of `stmoe_jax.moe.routing` compose these pure functions:
  - `router_scores`: softmax (Switch, ST-MoE) or sigmoid (DeepSeek-V3) scores;
  - `noisy_logits`: Gumbel noise (st-moe-pytorch `noise_gates`) or Shazeer et al. 2017's
    noisy top-k noise with a learned per-expert scale, in training only (its importance and
    load losses: `stmoe_jax.moe.cv_balance`);
  - `group_limited_mask`: DeepSeek-V3's group-limited top-k (only the best groups of experts
    are eligible);
  - `later_choice_policy`: which of choices 2..k are routed (mesh-tf/lucidrains
    mixture-of-experts policies 'all', 'none', 'threshold', 'random', with st-moe-pytorch's
    per-rank thresholds);
  - `hierarchical_top_k`: two-level choices (lucidrains mixture-of-experts `HeirarchicalMoE`).

Everything runs in float32, like the routers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option, Range, Satisfies

SCORE_FNS = ('softmax', 'sigmoid')
ROUTER_NOISES = ('none', 'gumbel', 'noisy_top_k')
LATER_CHOICE_POLICIES = ('all', 'none', 'threshold', 'random')

_THRESHOLDS = Satisfies(lambda ts: all(options.type_ok(t, float) and 0 <= t < 1 for t in ts),
                        '() or moe.top_k - 1 thresholds in [0, 1), for choices 2..k')
# The gating options of a flat top-k router (`routing.tokens_choose_top_k`): the routers that
# use them list them among their own options.
TOP_K_OPTIONS = (
    Option('moe.score_fn', str, 'softmax', "'sigmoid': DeepSeek-V3 per-expert sigmoid scores, "
           'gates renormalised over the k.', OneOf(SCORE_FNS)),
    Option('moe.routed_scaling_factor', float, 1.0, 'Combine weights times this (DeepSeek-V3: '
           '2.5).', Range(0, low_open=True)),
    Option('moe.n_groups', int, 1, 'Group-limited top-k: experts in n_groups groups...',
           Range(1)),
    Option('moe.topk_groups', int, 1, "...only each token's topk_groups best groups eligible "
           '(DeepSeek-V3: 8, 4).', Range(1)),
    Option('moe.second_expert_threshold', float, 0.0, 'ST-MoE policy: route choice 2..k w.p. '
           'min(1, gate/threshold) (0.2).', Range(0, 1, high_open=True, note='0 = always')),
    Option('moe.second_policy_train', str, 'random', "Choices 2..k in training: 'all', 'none', "
           "'threshold' or 'random'...", OneOf(LATER_CHOICE_POLICIES)),
    Option('moe.second_policy_eval', str, 'threshold', '...and at eval (lucidrains '
           'mixture-of-experts); thresholds 0 route all.', OneOf(LATER_CHOICE_POLICIES)),
    Option('moe.threshold_train', tuple, (), 'Per-rank thresholds of choices 2..k, e.g. '
           '(0.2, 0.1); () = second_expert_threshold...', _THRESHOLDS),
    Option('moe.threshold_eval', tuple, (), '...and at eval (st-moe-pytorch).', _THRESHOLDS),
)

options.declare(
    Option('moe.router_noise', str, 'none', "Training noise on router logits: 'gumbel' "
           "(st-moe-pytorch) or 'noisy_top_k' (Shazeer 2017).", OneOf(ROUTER_NOISES)),
    Option('moe.seq_aux_loss_coef', float, 0.0, 'DeepSeek-V3 sequence-wise balance loss weight '
           '(1e-4).', Range(0, note='0 = off')),
    Option('moe.importance_loss_coef', float, 0.0, 'Shazeer 2017 w_importance * CV(gate sums '
           'per expert)^2, per group (e.g. 0.1).', Range(0, note='0 = off')),
    Option('moe.load_loss_coef', float, 0.0, "Shazeer 2017 w_load * CV(smooth load)^2; needs "
           "router_noise='noisy_top_k'.", Range(0, note='0 = off')),
    owner='moe.gating')


@options.add_check
def _check_gating(config) -> None:
  """Group-limited top-k fits the experts; Shazeer's load loss has its noise and a flat top-k."""
  moe = config.moe
  E, k = moe.num_experts, moe.top_k
  def check(ok, name, expected):
    if not ok:
      raise options.invalid(f'moe.{name}', moe[name], expected)
  check(E % moe.n_groups == 0, 'n_groups', f'a divisor of moe.num_experts={E}')
  check(moe.topk_groups <= moe.n_groups, 'topk_groups', f'at most moe.n_groups={moe.n_groups}')
  check(moe.topk_groups * (E // moe.n_groups) >= k, 'topk_groups',
        f'enough groups of moe.n_groups={moe.n_groups} to hold moe.top_k={k} experts')
  for when in ('train', 'eval'):
    check(len(moe[f'threshold_{when}']) in (0, k - 1), f'threshold_{when}',
          f'() or moe.top_k - 1 = {k - 1} thresholds in [0, 1), for choices 2..k')
  if moe.load_loss_coef > 0:  # Shazeer's load estimator is the probability under his noise.
    check(moe.router_noise == 'noisy_top_k', 'load_loss_coef',
          f"0 unless moe.router_noise='noisy_top_k' (it is {moe.router_noise!r}: the smooth "
          'load estimator needs the learned noise scale)')
    check(moe.router == 'tokens_choose' and moe.encoder_router in ('', 'tokens_choose')
          and k < E, 'load_loss_coef',
          "0 unless every MoE layer routes with moe.router='tokens_choose' and "
          f'moe.top_k < moe.num_experts={E} (the load estimator is of a flat top-k)')


def router_scores(logits_GSE: jax.Array, score_fn: str) -> tuple[jax.Array, jax.Array]:
  """(scores_GSE, probs_GSE): what the top-k ranks and gates come from, and a distribution.

  'softmax': both are the softmax of the logits. 'sigmoid' (DeepSeek-V3): the scores are
  per-expert sigmoids, which do not compete with each other; the probabilities are those scores
  normalised over the experts (DeepSeek-V3's s'_{i,t}, what its balance loss averages), so the
  balance loss, entropy and expert-choice code that read `Routing.probs` keep their meaning.
  """
  if score_fn == 'softmax':
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    return probs_GSE, probs_GSE
  if score_fn == 'sigmoid':
    scores_GSE = jax.nn.sigmoid(logits_GSE)
    return scores_GSE, scores_GSE / jnp.sum(scores_GSE, axis=-1, keepdims=True)
  raise ValueError(f'unknown score function {score_fn!r}: expected one of {SCORE_FNS}')


def noisy_logits(logits_GSE: jax.Array, kind: str, rng: jax.Array | None,
                 noise_std_GSE: jax.Array | None = None) -> jax.Array:
  """Router logits [G, S, E] plus training noise that makes the top-k explore.

  'gumbel' (st-moe-pytorch `noise_gates`): standard Gumbel noise, so the top-1 of the noisy
  logits is a sample of the softmax. 'noisy_top_k' (Shazeer et al. 2017, eq. 4): Gaussian noise
  times a learned per-token, per-expert scale `noise_std_GSE` = softplus(x W_noise). 'none'
  returns the logits. Callers apply it in training only: evaluation is deterministic.
  """
  if kind == 'none':
    return logits_GSE
  if rng is None:
    raise ValueError(f'router noise {kind!r} needs an rng in training')
  if kind == 'gumbel':
    return logits_GSE + jax.random.gumbel(rng, logits_GSE.shape, jnp.float32)
  if kind == 'noisy_top_k':
    return logits_GSE + jax.random.normal(rng, logits_GSE.shape, jnp.float32) * noise_std_GSE
  raise ValueError(f'unknown router noise {kind!r}: expected one of {ROUTER_NOISES}')


def group_limited_mask(select_GSE: jax.Array, n_groups: int, topk_groups: int) -> jax.Array:
  """bool [G, S, E]: the experts of each token's `topk_groups` best groups (DeepSeek-V3).

  The E experts form `n_groups` contiguous groups; a group's score is the sum of its two
  highest selection scores (its one score if it has one expert), as in DeepSeek-V3's
  `noaux_tc` gate, so that a group is chosen for more than one strong expert. Its point is
  communication: with a group per device (or node), a token's experts span at most
  `topk_groups` of them.
  """
  G, S, E = select_GSE.shape
  grouped_GSNX = select_GSE.reshape(G, S, n_groups, E // n_groups)
  best_GSNX, _ = jax.lax.top_k(grouped_GSNX, min(2, E // n_groups))
  _, top_GSK = jax.lax.top_k(jnp.sum(best_GSNX, axis=-1), topk_groups)
  chosen_GSN = jnp.any(jax.nn.one_hot(top_GSK, n_groups, dtype=bool), axis=-2)
  return jnp.repeat(chosen_GSN, E // n_groups, axis=-1)


def later_choice_policy(gate_GSK: jax.Array, policy: str, thresholds: tuple[float, ...],
                        rng: jax.Array | None) -> jax.Array:
  """bool [G, S, K]: True where a choice is routed; the first choice always is.

  Policies for choices 2..k (mesh-tf, lucidrains mixture-of-experts `second_policy_*`), with
  `thresholds[j - 1]` the threshold of choice j+1 (st-moe-pytorch `threshold_train=(0.2, 0.1)`
  for the 2nd and 3rd experts): 'all' routes every choice; 'none' only the first; 'threshold'
  routes choice j iff gate_j >= its threshold; 'random' with probability min(1, gate_j /
  threshold), so a token whose later expert barely matters does not spend that expert's
  capacity. A threshold of 0 routes that rank always.

  Args:
    gate_GSK: combine weights of the choices (renormalised over the k, before any scaling).
    policy: one of `LATER_CHOICE_POLICIES`.
    thresholds: K - 1 thresholds, for choices 2..K.
    rng: PRNG key, for 'random' only.
  """
  K = gate_GSK.shape[-1]
  if policy == 'all' or K == 1:
    return jnp.ones(gate_GSK.shape, bool)
  if policy == 'none':
    return jnp.zeros(gate_GSK.shape, bool).at[..., 0].set(True)
  threshold_K = jnp.asarray((1.0, *thresholds), jnp.float32)
  if policy == 'threshold':
    use_GSK = gate_GSK >= threshold_K
  elif policy == 'random':
    if rng is None:
      raise ValueError("the 'random' later-choice policy needs an rng")
    # A zero threshold routes always; dividing by 1 there keeps the others' arithmetic as is.
    ratio_GSK = gate_GSK / jnp.where(threshold_K > 0, threshold_K, 1.0)
    use_GSK = (jax.random.uniform(rng, gate_GSK.shape) < ratio_GSK) | (threshold_K == 0)
  else:
    raise ValueError(f'unknown later-choice policy {policy!r}: expected one of '
                     f'{LATER_CHOICE_POLICIES}')
  return use_GSK.at[..., 0].set(True)


def _top_k_gates(probs_GSX: jax.Array, k: int, renormalize: bool
                 ) -> tuple[jax.Array, jax.Array]:
  """(index, gate) of the k most probable entries of the last axis, gates renormalised over
  the k when asked (at k=1 the raw probability, so the router gets a gradient)."""
  _, index = jax.lax.top_k(jax.lax.stop_gradient(probs_GSX), k)
  gate = jnp.take_along_axis(probs_GSX, index, axis=-1)
  if renormalize and k > 1:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  return index, gate


def hierarchical_top_k(outer_logits_GSO: jax.Array, inner_logits_GSE: jax.Array, *,
                       outer_k: int, inner_k: int, renormalize: bool
                       ) -> dict[str, jax.Array]:
  """Two-level choices: the top `outer_k` of O expert groups, then `inner_k` experts in each.

  The outer router is a softmax over the O groups; each group o has its own inner softmax over
  its I experts (experts o*I .. o*I + I - 1). A token's K = outer_k * inner_k choices are, group
  rank by group rank, its inner choices in that group; a choice's combine weight is the product
  of its outer and inner gates (each renormalised over its level's choices when `renormalize`
  and that level picks more than one). lucidrains mixture-of-experts `HeirarchicalMoE`, with
  capacity on the final experts only (it also caps each outer group).

  Args:
    outer_logits_GSO: outer router logits [G, S, O].
    inner_logits_GSE: inner router logits [G, S, E], group o's in columns o*I .. o*I + I - 1.
    outer_k, inner_k: choices per level.
    renormalize: as `routing.tokens_choose_top_k`'s.
  Returns:
    A dict of float32/int32 arrays: index [G, S, K] (flat expert ids), gate [G, S, K], probs
    [G, S, E] (p_outer(o) * p_inner(i | o), a distribution), and for the per-level losses
    outer_probs [G, S, O], outer_index [G, S, outer_k], inner_probs [G, S, O, I] and
    inner_index [G, S, O, inner_k] (every group's inner choices, chosen group or not).
  """
  G, S, O = outer_logits_GSO.shape
  I = inner_logits_GSE.shape[-1] // O
  outer_probs_GSO = jax.nn.softmax(outer_logits_GSO, axis=-1)
  inner_probs_GSOI = jax.nn.softmax(inner_logits_GSE.reshape(G, S, O, I), axis=-1)
  outer_index_GSA, outer_gate_GSA = _top_k_gates(outer_probs_GSO, outer_k, renormalize)
  inner_index_GSOB, inner_gate_GSOB = _top_k_gates(inner_probs_GSOI, inner_k, renormalize)
  # The inner choices of the chosen groups: [G, S, A, B] with A the outer, B the inner rank.
  pick = lambda x_GSOB: jnp.take_along_axis(x_GSOB, outer_index_GSA[..., None], axis=2)
  index_GSAB = outer_index_GSA[..., None] * I + pick(inner_index_GSOB)
  gate_GSAB = outer_gate_GSA[..., None] * pick(inner_gate_GSOB)
  return {
      'index': index_GSAB.reshape(G, S, -1), 'gate': gate_GSAB.reshape(G, S, -1),
      'probs': (outer_probs_GSO[..., None] * inner_probs_GSOI).reshape(G, S, O * I),
      'outer_probs': outer_probs_GSO, 'outer_index': outer_index_GSA,
      'inner_probs': inner_probs_GSOI, 'inner_index': inner_index_GSOB,
  }
