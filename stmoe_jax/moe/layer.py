"""The sparse MoE layer: route, dispatch, run experts, combine.

Einsum letters: B batch, L length, G routing groups, S tokens per group, K choices per token,
E experts, C capacity, X dispatched rows, D model dim.

`MoeLayer.__call__` runs five steps, each a small function elsewhere so that routers and
dispatch strategies can be swapped:
  1. `to_groups`: tokens [B, L, D] -> [G, S, D]; capacity and balance are per group (the ST-MoE
     scope), ordered so that capacity competition is causal;
  2. float32 router logits and the router `routing.ROUTERS[moe.router]`;
  3. dispatch into expert inputs by `dispatch.DISPATCHES[moe.dispatch]`;
  4. `experts.Experts` on them (plus shared experts that see every token);
  5. combine back to [G, S, D] and `from_groups`; a dropped choice contributes exactly zero, so
     a token dropped by every choice leaves the block as its residual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option, Range
from stmoe_jax.moe import cv_balance
from stmoe_jax.moe import dispatch
from stmoe_jax.moe import expert_parallel
from stmoe_jax.moe import gating
from stmoe_jax.nn import layers
from stmoe_jax.nn import remat
from stmoe_jax.moe import routing
from stmoe_jax.config import ModelConfig
from stmoe_jax.moe.experts import Experts, Mlp


BALANCE_SCOPES = ('group', 'sequence', 'global')

options.declare(
    Option('moe.router_input_norm', bool, False, 'Gemma 4 router input: RMS-normalised, times '
           'd_model^-1/2 and a learned per-feature router_scale [D] (init 1).'),
    Option('moe.expert_output_scale', bool, False, "Gemma 4: a learned per-expert scale [E] "
           "(init 1) on each expert's output."),
    Option('moe.bias_balancer_recenter', bool, False, 'Re-centre the routing bias to zero mean '
           'after each update (torchtitan #1506): no drift.'),
    Option('moe.quantile_balance_rate', float, 0.0, 'Quantile balancing: bias moves this far '
           "towards -(1 - k/E) quantile of each expert's scores.", Range(0, 1, note='0 = off')),
    Option('moe.balance_scope', str, 'group', "Balance loss frequencies per routing 'group', "
           "per 'sequence', or over the 'global' batch (Qiu et al. 2025).",
           OneOf(BALANCE_SCOPES)),
    owner='moe.layer')


def _bias_routers(moe) -> bool:
  """Every MoE layer's router reads the selection bias (`routing.route_tokens_choose`)."""
  return moe.router == 'tokens_choose' and moe.encoder_router in ('', 'tokens_choose')


@options.add_check
def _check_balancing(config) -> None:
  """One bias balancer at a time, on a router that reads it; the loss scopes need the Switch
  loss."""
  moe = config.moe
  def refuse(name, expected):
    raise options.ConfigError(f'config.moe.{name}={moe[name]!r} is invalid: expected {expected}.')
  if moe.quantile_balance_rate > 0:
    if moe.bias_balancer_rate > 0:
      refuse('quantile_balance_rate', '0 while moe.bias_balancer_rate > 0 (both set the one '
             'routing bias)')
    if not _bias_routers(moe):
      refuse('quantile_balance_rate', "0 unless every MoE layer routes with moe.router="
             "'tokens_choose' (the only router that reads the selection bias)")
  if moe.bias_balancer_recenter and not (moe.bias_balancer_rate > 0 or
                                         moe.quantile_balance_rate > 0):
    refuse('bias_balancer_recenter', 'False unless moe.bias_balancer_rate or '
           'moe.quantile_balance_rate > 0 (there is no bias to re-centre)')
  if moe.num_null_experts and (moe.bias_balancer_rate > 0 or moe.quantile_balance_rate > 0 or
                               moe.n_groups > 1 or moe.load_loss_coef > 0):
    refuse('num_null_experts', '0 with a routing bias, group-limited top-k or Shazeer\'s load '
           'loss (they are sized by the real experts)')
  own_loss = {'hierarchical', 'relu'} & {moe.router, moe.encoder_router}
  if moe.balance_scope != 'group' and own_loss:
    refuse('balance_scope', f"'group' with moe.router={own_loss.pop()!r} (its balance loss is its "
           'own: two-level, or ReMoE\'s L1)')


class RouterBias(layers.Buffer):
  """Per-expert routing bias of aux-loss-free balancing: not a Param, so no optimizer touches
  it; `MoeLayer` updates it in the train forward pass and the train step carries it along."""


class ReluL1Coef(layers.Buffer):
  """The adaptive L1 coefficient of ReLU routing (ReMoE), updated in the train forward pass."""


def relu_l1_coef(coef: jax.Array, assigned_GSE: jax.Array, mask_GS: jax.Array | None,
                 top_k: int, step: float) -> jax.Array:
  """ReMoE eq. 6: coef * step^sign(target - sparsity), target sparsity 1 - k/E, sparsity the
  share of zero gates over real tokens: more zeros than the target lowers the penalty."""
  G, S, E = assigned_GSE.shape
  m_GS = jnp.ones((G, S), jnp.float32) if mask_GS is None else mask_GS.astype(jnp.float32)
  active = jnp.sum(assigned_GSE * m_GS[..., None]) / jnp.maximum(jnp.sum(m_GS) * E, 1.0)
  return coef * step ** jnp.sign((1.0 - top_k / E) - (1.0 - active))


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


def balanced_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 aux-loss-free update: bias_i + rate * sign(mean_load - load_i), float32 [E]."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def quantile_bias(scores_GSE: jax.Array, top_k: int, mask_GS: jax.Array | None = None
                  ) -> jax.Array:
  """Quantile balancing: float32 [E], minus each expert's (1 - k/E) quantile of its scores.

  With it added to the scores, exactly a k/E share of the real tokens rate expert e above 0,
  for every e: each expert's expected load is its share, set in one step from the scores (no
  aux loss, no step size to tune as in `balanced_bias`). `scores_GSE` are the scores the top-k
  ranks (`gating.router_scores`); padding (mask 0) is left out of the quantiles.
  """
  G, S, E = scores_GSE.shape
  scores_XE = jax.lax.stop_gradient(scores_GSE).reshape(G * S, E).astype(jnp.float32)
  if mask_GS is not None:
    scores_XE = jnp.where(mask_GS.reshape(G * S, 1).astype(bool), scores_XE, jnp.nan)
  return -jnp.nanquantile(scores_XE, 1.0 - top_k / E, axis=0)


def global_balance_loss(route: routing.Routing, mask_GS: jax.Array | None = None) -> jax.Array:
  """The Switch loss with f_i and P_i over every routing group at once (Qiu et al. 2025).

  Per-group frequencies push every group (a few sequences) to use every expert, which works
  against specialisation by domain; the global-batch loss only asks the whole batch to. Under
  jit with the batch sharded over data-parallel devices the sums over G are over the global
  batch (XLA inserts the all-reduce), so this is the loss of the gathered batch; expert
  parallelism routes outside its shard_map, so there too.
  """
  G, S, E = route.probs.shape
  flat = lambda x: x.reshape(1, G * S, *x.shape[2:])
  return routing.load_balancing_loss(flat(route.probs), flat(route.expert_index),
                                     None if mask_GS is None else flat(mask_GS),
                                     flat(route.assigned))


def sequence_balance_loss(route: routing.Routing, shape_BLD: tuple[int, int, int],
                          mask_BL: jax.Array | None = None) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss (eq. 17-20): the Switch loss of each sequence.

  E * sum_i f_i P_i per sequence of L tokens instead of per routing group, with `route.probs`
  the normalised scores s'_{i,t} and f_i over the sequence's assigned choices; averaged over
  the B sequences (1.0 when balanced). It keeps single sequences from collapsing onto a few
  experts even when the group as a whole is balanced. Float32 scalar.
  """
  B, L, _ = shape_BLD
  regroup = lambda x_GSX: from_groups(x_GSX, (B, L, x_GSX.shape[-1]))
  return routing.load_balancing_loss(regroup(route.probs), regroup(route.expert_index), mask_BL,
                                     regroup(route.assigned))


class MoeLayer(nnx.Module):
  """Mixture of experts replacing one FFN: [B, L, D] -> [B, L, D] (see module docstring).

  `causal=True` (the decoder) refuses routers whose choice for a token depends on later tokens:
  expert-choice and Batch Prioritized Routing. Encoder-style users pass `causal=False`.
  """

  def __init__(self, cfg: ModelConfig, *, causal: bool = True, rngs: nnx.Rngs):
    moe = cfg.moe
    bad = routing.noncausal_setting(moe)
    if causal and bad:
      raise ValueError(f'{bad} looks at the whole routing group, later tokens included, so it '
                       'cannot be used in a causal decoder; use tokens_choose routing there')
    self.router_kind = routing.ROUTERS[moe.router]
    self.strategy = dispatch.DISPATCHES[moe.dispatch]
    if self.router_kind.fixed_load and not self.strategy.uses_capacity:
      with_capacity = ' or '.join(repr(n) for n, d in dispatch.DISPATCHES.items()
                                  if d.uses_capacity)
      raise ValueError(f'moe.router={moe.router!r} fixes every expert\'s load at its capacity; '
                       f'use moe.dispatch={with_capacity} with it, not {moe.dispatch!r}')
    dtype = jnp.dtype(cfg.dtype)
    num_logits = self.router_kind.num_logits(moe)
    self.router = layers.param(rngs, layers.switch_init(cfg.init_scale),
                               (cfg.d_model, num_logits), ('embed', None))
    # Shazeer et al. 2017's noise scale softplus(x W_noise), W_noise zero-initialised as there.
    self.noise_router = (layers.param(rngs, nnx.initializers.zeros, (cfg.d_model, num_logits),
                                      ('embed', None))
                         if moe.router_noise == 'noisy_top_k' else None)
    # Gemma 4 (gemma/gm/nn/gemma4/_moe.py): the router sees rms_norm(x) / sqrt(D) * router_scale.
    self.router_scale = (layers.param(rngs, nnx.initializers.ones, (cfg.d_model,), ('embed',))
                         if moe.router_input_norm else None)
    self.expert_scale = (layers.param(rngs, nnx.initializers.ones, (moe.num_experts,), (None,))
                         if moe.expert_output_scale else None)
    self.router_bias = RouterBias(jnp.zeros((moe.num_experts,), jnp.float32))
    self.relu_l1_coef = (ReluL1Coef(jnp.asarray(moe.relu_l1_init, jnp.float32))
                         if moe.router == 'relu' else None)
    self.experts = Experts(moe.num_experts, cfg.d_model, moe.expert_d_ff, cfg.activation,
                           cfg.init_scale, dtype, dropout=moe.expert_dropout,
                           grouped_matmul=moe.grouped_matmul, rngs=rngs)
    # Shared experts (DeepSeek-MoE): one dense FFN as wide as all of them, seen by every token.
    self.shared = (Mlp(cfg.d_model, moe.num_shared_experts * moe.shared_d_ff, cfg.activation,
                       cfg.init_scale, dtype, rngs=rngs)
                   if moe.num_shared_experts else None)
    self.moe = moe
    # Mesh and rules (set by the Trainer): with an expert axis > 1, step 3-5 run in shard_map.
    self.mesh_rules = cfg.mesh_rules

  @property
  def uses_bias(self) -> bool:
    """A balancer sets the routing bias (aux-loss-free or quantile balancing)."""
    return self.moe.bias_balancer_rate > 0 or self.moe.quantile_balance_rate > 0

  def capacity(self, train: bool) -> int:
    """Expert capacity per group at the train or eval capacity factor (S when dropless)."""
    moe = self.moe
    if not self.strategy.uses_capacity:
      return moe.group_size  # No expert can get more than S choices of a group: nothing drops.
    factor = moe.train_capacity_factor if train else moe.eval_capacity_factor
    return routing.expert_capacity(moe.group_size, moe.num_experts, moe.top_k, factor,
                                   scaled_by_k=moe.capacity_scaled_by_k,
                                   min_capacity=moe.min_capacity)

  def route(self, x_GSD: jax.Array, *, train: bool, rng: jax.Array | None,
            mask_GS: jax.Array | None, capacity: int | None = None,
            token_ids_GS: jax.Array | None = None) -> routing.Routing:
    """Router logits in float32 and the configured router: -> `routing.Routing`.

    `capacity` defaults to `self.capacity(train)` (the plots pass S: choices before drops).
    `token_ids_GS` go to routers that read them (`Router.token_ids`: hash routing).
    """
    moe = self.moe
    jitter_rng, policy_rng = (None, None) if rng is None else jax.random.split(rng)
    router_in = x_GSD.astype(jnp.float32)  # Float32 router: bf16 logits made Switch diverge.
    if self.router_scale is not None:
      router_in = router_in * jax.lax.rsqrt(jnp.mean(router_in**2, axis=-1, keepdims=True) + 1e-6)
      router_in *= self.router_scale[...] / jnp.sqrt(jnp.float32(router_in.shape[-1]))
    if train and moe.router_jitter > 0:
      router_in *= jax.random.uniform(jitter_rng, router_in.shape, jnp.float32,
                                      1.0 - moe.router_jitter, 1.0 + moe.router_jitter)
    clean_GSE = logits_GSE = layers.dense(router_in, self.router[...])
    noise_std_GSE = None
    if train and moe.router_noise != 'none':
      # Its own stream, so that the jitter and policy keys (and their numbers) stay as they were.
      noise_std_GSE = (jax.nn.softplus(layers.dense(router_in, self.noise_router[...]))
                       if self.noise_router is not None else None)
      logits_GSE = gating.noisy_logits(logits_GSE, moe.router_noise,
                                       None if rng is None else jax.random.fold_in(rng, 1),
                                       noise_std_GSE)
    logits_GSE = remat.name(logits_GSE, remat.ROUTER_LOGITS)
    route = self.router_kind.route(
        logits_GSE, moe, capacity=self.capacity(train) if capacity is None else capacity,
        mask_GS=mask_GS, bias_E=self.router_bias[...] if self.uses_bias else None,
        train=train, rng=policy_rng,
        **({'token_ids_GS': token_ids_GS} if self.router_kind.token_ids else {}))
    if noise_std_GSE is not None and moe.router == 'tokens_choose':
      # Shazeer's smooth load estimator (`cv_balance.smooth_load`) needs all three.
      route = route.replace(clean_logits=clean_GSE, noise_std=noise_std_GSE)
    return route

  def __call__(self, x_BLD: jax.Array, *, train: bool, rng: jax.Array | None = None,
               mask_BL: jax.Array | None = None, token_ids_BL: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the MoE output [B, L, D] and this layer's `layer_stats.MOE` stats.

    Args:
      x_BLD: input tokens [B, L, D].
      train: training capacity factor, jitter, sampled second-expert policy, expert dropout and
        bias-balancer update; evaluation settings otherwise.
      rng: PRNG key; needed in training when jitter, the sampled policy or dropout is on.
      mask_BL: optional [B, L], nonzero for real tokens: padding takes no expert capacity, gets
        no routed output and is left out of the stats.
      token_ids_BL: optional int32 token ids [B, L], for routers that read them (hash).
    Returns:
      (y_BLD, stats): `routing.routing_stats` plus `seq_balance_loss`, `cv_balance.cv_stats`'s
      `importance_loss` and `load_loss`, and `router_bias` [E].
    """
    moe = self.moe
    route_rng, dropout_rng = (None, None) if rng is None else jax.random.split(rng)
    if not train:
      dropout_rng = None
    x_GSD = to_groups(x_BLD, moe.group_size)
    mask_GS = None if mask_BL is None else to_groups(mask_BL[..., None], moe.group_size)[..., 0]
    ids_GS = (None if token_ids_BL is None
              else to_groups(token_ids_BL[..., None], moe.group_size)[..., 0])
    route = self.route(x_GSD, train=train, rng=route_rng, mask_GS=mask_GS, token_ids_GS=ids_GS)
    if self.expert_scale is not None:
      # Scaling an expert's output is scaling the combine weight of every choice it takes, which
      # every dispatch path reads from the route.
      route = route.replace(gate=route.gate * self.expert_scale[...][route.expert_index])
    strategy = self.strategy
    if expert_parallel.expert_axis(self.mesh_rules) is not None:
      y_GSD = expert_parallel.run_experts(
          self.experts, x_GSD, route, strategy=strategy, num_experts=moe.num_experts,
          capacity=self.capacity(train), mesh_rules=self.mesh_rules, dropout_rng=dropout_rng)
    elif strategy.uses_capacity:
      x_ECD, plan = strategy.dispatch(x_GSD, route, moe.num_experts, self.capacity(train))
      y_GSD = strategy.combine(self.experts(x_ECD, dropout_rng=dropout_rng), plan)
    else:
      x_XD, group_sizes_E, plan = strategy.dispatch(x_GSD, route, moe.num_experts)
      y_XD = self.experts.grouped(x_XD, group_sizes_E, dropout_rng=dropout_rng)
      y_GSD = strategy.combine(y_XD, plan)
    y_BLD = from_groups(y_GSD, x_BLD.shape).astype(x_BLD.dtype)
    if self.shared is not None:
      y_BLD += self.shared(x_BLD).astype(x_BLD.dtype)
    stats = routing.routing_stats(route, mask_GS)
    stats['seq_balance_loss'] = sequence_balance_loss(route, x_BLD.shape, mask_BL)
    stats.update(cv_balance.cv_stats(route, moe.top_k, mask_GS))
    if moe.balance_scope == 'sequence':
      stats['balance_loss'] = stats['seq_balance_loss']
    elif moe.balance_scope == 'global':
      stats['balance_loss'] = global_balance_loss(route, mask_GS)
    stats['router_bias'] = self.router_bias[...]
    if self.relu_l1_coef is not None:
      stats['balance_loss'] = self.relu_l1_coef[...] * stats['balance_loss']
      if train:
        self.relu_l1_coef[...] = relu_l1_coef(self.relu_l1_coef[...], route.assigned, mask_GS,
                                              moe.top_k, moe.relu_l1_step)
    if train and self.uses_bias:
      bias_E = self.router_bias[...]
      if moe.bias_balancer_rate > 0:
        bias_E = balanced_bias(bias_E, stats['expert_load'], moe.bias_balancer_rate)
      else:
        scores_GSE, _ = gating.router_scores(route.logits, moe.score_fn)
        target_E = quantile_bias(scores_GSE, moe.top_k, mask_GS)
        bias_E += moe.quantile_balance_rate * (target_E - bias_E)
      if moe.bias_balancer_recenter:  # Only differences between experts' biases route.
        bias_E -= jnp.mean(bias_E)
      self.router_bias[...] = bias_E
    return y_BLD, stats
