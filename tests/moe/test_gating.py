"""The gating options (DeepSeek-V3 scores and group-limited top-k, the sequence-wise balance
loss, router noise, later-choice policies with per-rank thresholds, hierarchical routing)
against plain numpy written here, and their config refusals."""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from stmoe_jax import config as config_lib
from stmoe_jax.moe import gating
from stmoe_jax.moe import layer as moe_lib
from stmoe_jax.moe import routing
from stmoe_jax.config import ConfigError, validate


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def first_come(index, assigned, capacity, E):
  """Loop reference of capacity: tokens in order, choices in rank order, first come kept."""
  G, S, K = index.shape
  kept = np.zeros_like(assigned)
  for g in range(G):
    filled = [0] * E
    for s in range(S):
      for j in range(K):
        if assigned[g, s, j]:
          kept[g, s, j] = filled[index[g, s, j]] < capacity
          filled[index[g, s, j]] += 1
  return kept


def numpy_deepseek(logits, bias, k, n_groups, topk_groups, scale):
  """DeepSeek-V3's gate, one token at a time: sigmoid scores, biased selection among the
  experts of the best groups (group score: sum of its two best biased scores), weights the
  unbiased chosen scores over their sum times the scaling factor."""
  G, S, E = logits.shape
  scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
  index = np.zeros((G, S, k), np.int64)
  gate = np.zeros((G, S, k))
  for g in range(G):
    for s in range(S):
      select = scores[g, s] + bias
      per_group = select.reshape(n_groups, -1)
      group_score = np.sort(per_group, axis=1)[:, -2:].sum(axis=1)
      groups = np.argsort(-group_score, kind='stable')[:topk_groups]
      eligible = np.where(np.repeat(np.isin(np.arange(n_groups), groups), E // n_groups),
                          select, -np.inf)
      index[g, s] = np.argsort(-eligible, kind='stable')[:k]
      chosen = scores[g, s, index[g, s]]
      gate[g, s] = (chosen / chosen.sum() if k > 1 else chosen) * scale
  return index, gate, scores / scores.sum(-1, keepdims=True)


@pytest.mark.parametrize('k,n_groups,topk_groups,scale', [(3, 4, 2, 2.5), (1, 1, 1, 1.0)])
def test_deepseek_gate_matches_numpy(k, n_groups, topk_groups, scale):
  rng = np.random.RandomState(k)
  logits = rng.randn(2, 12, 8).astype(np.float32) * 2
  bias = rng.randn(8).astype(np.float32) * 0.3
  route = jax.jit(lambda l, b: routing.tokens_choose_top_k(
      l, top_k=k, capacity=3, bias_E=b, score_fn='sigmoid', routed_scaling_factor=scale,
      n_groups=n_groups, topk_groups=topk_groups))(jnp.asarray(logits), jnp.asarray(bias))
  index, gate, probs = numpy_deepseek(logits, bias, k, n_groups, topk_groups, scale)
  kept = first_come(index, np.ones(index.shape, bool), 3, 8)
  np.testing.assert_array_equal(route.expert_index, index)
  np.testing.assert_array_equal(route.kept, kept)
  assert 0 < kept.mean() < 1  # Capacity 3 drops some: the drops are compared too.
  np.testing.assert_allclose(route.gate, gate * kept, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(route.probs, probs, rtol=1e-5)
  if n_groups > 1:  # Every token's experts lie in at most topk_groups groups.
    assert max(len(set(row // 2)) for row in index.reshape(-1, k)) <= topk_groups


def test_group_limited_top_k_hand_worked():
  # Groups {0,1}, {2,3}, {4,5}: sums of best two 0.9+0.1, 0.6+0.5, 0.8+0.0. Best 2 groups: the
  # second (1.1) and the first (1.0); expert 4 (0.8) is not eligible although it is 2nd best.
  select = jnp.asarray([[[0.9, 0.1, 0.6, 0.5, 0.8, 0.0]]])
  mask = gating.group_limited_mask(select, n_groups=3, topk_groups=2)
  np.testing.assert_array_equal(mask[0, 0], [True, True, True, True, False, False])


def test_sequence_balance_loss_matches_numpy_per_sequence():
  # 4 sequences of 4 tokens in groups of 8 (two sequences per group, position-major).
  B, L, S, E, k = 4, 4, 8, 4, 2
  logits = np.random.RandomState(0).randn(B * L // S, S, E).astype(np.float32) * 2
  mask = np.ones((B, L), bool)
  mask[3, 2:] = False  # Padding counts towards neither f nor P.

  @jax.jit
  def route_and_loss(logits, mask):
    route = routing.tokens_choose_top_k(logits, top_k=k, capacity=S, score_fn='sigmoid')
    return route, moe_lib.sequence_balance_loss(route, (B, L, 16), mask)

  route, loss = route_and_loss(jnp.asarray(logits), jnp.asarray(mask))
  # Reference: token (b, l) sits in group b // 2 at slot l * 2 + b % 2.
  probs, index = np.asarray(route.probs), np.asarray(route.expert_index)
  losses = []
  for b in range(B):
    rows = [(b // 2, l * 2 + b % 2) for l in range(L) if mask[b, l]]
    f = np.bincount(np.concatenate([index[g, s] for g, s in rows]), minlength=E) / (len(rows) * k)
    p = np.mean([probs[g, s] for g, s in rows], axis=0)
    losses.append(E * np.sum(f * p))
  np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)


def numpy_policy(gate, policy, thresholds, u):
  """Which choices are routed, by the lucidrains/mesh-tf rule for each policy."""
  t = np.asarray((1.0, *thresholds))
  routed = {'all': np.ones(gate.shape, bool), 'none': np.zeros(gate.shape, bool),
            'threshold': gate >= t,
            'random': (u < gate / np.where(t > 0, t, 1)) | (t == 0)}[policy]
  routed[..., 0] = True
  return routed


@pytest.mark.parametrize('policy', gating.LATER_CHOICE_POLICIES)
def test_later_choice_policies_with_per_rank_thresholds_match_numpy(policy):
  logits = np.random.RandomState(1).randn(2, 64, 6).astype(np.float32)
  rng = jax.random.PRNGKey(3)
  thresholds = (0.3, 0.15, 0.0)  # Choices 2, 3, 4; the 4th always routed.
  route, full = jax.jit(lambda l: (
      routing.tokens_choose_top_k(l, top_k=4, capacity=20, train=True, rng=rng,
                                  later_policy=policy, thresholds=thresholds),
      routing.tokens_choose_top_k(l, top_k=4, capacity=64)))(jnp.asarray(logits))
  gate = np.asarray(full.gate)  # The renormalised top-4 gates, nothing dropped.
  u = np.asarray(jax.random.uniform(rng, gate.shape))
  routed = numpy_policy(gate, policy, thresholds, u)
  np.testing.assert_array_equal(route.assigned, routed)
  index = np.asarray(route.expert_index)
  kept = first_come(index, routed, 20, 6)  # Unrouted choices take no capacity.
  np.testing.assert_array_equal(route.kept, kept)
  np.testing.assert_allclose(route.gate, gate * kept, rtol=1e-6)  # Not renormalised again.
  if policy in ('threshold', 'random'):
    assert 0 < routed[..., 1:3].mean() < 1


def test_default_policy_fields_are_the_second_expert_threshold():
  """second_expert_threshold=0.2 and its mapping, 'random'/'threshold' with thresholds (0.2,)
  per rank, route the same choices in training and at evaluation."""
  logits = jnp.asarray(np.random.RandomState(2).randn(2, 32, 5), jnp.float32)
  rng = jax.random.PRNGKey(0)
  for train, policy in ((True, 'random'), (False, 'threshold')):
    old, new = jax.jit(lambda l: (
        routing.tokens_choose_top_k(l, top_k=3, capacity=8, second_expert_threshold=0.2,
                                    train=train, rng=rng),
        routing.tokens_choose_top_k(l, top_k=3, capacity=8, train=train, rng=rng,
                                    later_policy=policy, thresholds=(0.2, 0.2))))(logits)
    np.testing.assert_array_equal(old.assigned, new.assigned)
    assert not np.all(old.assigned)


def layer(moe_fields, seed=0):
  from conftest import tiny_model_config  # pylint: disable=g-import-not-at-top
  return moe_lib.MoeLayer(tiny_model_config(d_model=8, moe={'group_size': 16, **moe_fields}),
                          rngs=nnx.Rngs(seed))


def test_gumbel_noise_samples_the_softmax_in_training_only():
  # One token repeated: with Gumbel noise the top-1 expert is a sample of softmax(logits)
  # (Gumbel-max), without it always the argmax.
  moe_layer = layer({'router_noise': 'gumbel', 'top_k': 1, 'num_experts': 4})
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(1), (8,)), (1, 4096, 8))
  logits = np.asarray(x[0, 0], np.float64) @ np.asarray(moe_layer.router[...], np.float64) * 3
  moe_layer.router[...] *= 3  # Spread the probabilities out.
  graphdef, state = nnx.split(moe_layer)
  route = lambda train: jax.jit(lambda s: nnx.merge(graphdef, s).route(
      x.reshape(256, 16, 8), train=train, rng=jax.random.PRNGKey(2), mask_GS=None,
      capacity=16))(state)
  counts = np.bincount(np.asarray(route(True).expert_index).ravel(), minlength=4) / 4096
  np.testing.assert_allclose(counts, softmax(logits), atol=0.03)
  np.testing.assert_array_equal(route(False).expert_index, np.argmax(logits))


def test_noisy_top_k_adds_learned_scale_gaussian_noise():
  """Shazeer et al. 2017 eq. 4: logits + N(0, 1) * softplus(x W_noise), in training only, and
  W_noise (zero at init) gets a gradient, so the noise scale is learned."""
  moe_layer = layer({'router_noise': 'noisy_top_k'})
  assert not np.any(moe_layer.noise_router[...])
  moe_layer.noise_router[...] = jax.random.normal(jax.random.PRNGKey(4), (8, 4))
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 8))
  rng = jax.random.PRNGKey(6)
  xs, w, w_noise = (np.asarray(a, np.float64) for a in
                    (x, moe_layer.router[...], moe_layer.noise_router[...]))
  std = np.log1p(np.exp(xs @ w_noise))
  normal = np.asarray(jax.random.normal(jax.random.fold_in(rng, 1), (2, 16, 4)))
  graphdef, params, rest = nnx.split(moe_layer, nnx.Param, ...)
  route = lambda p, train: nnx.merge(graphdef, p, rest).route(x, train=train, rng=rng,
                                                               mask_GS=None)

  @jax.jit
  def run(p):
    gate_sum = lambda p: jnp.sum(jnp.sin(route(p, True).gate))
    return route(p, True).logits, route(p, False).logits, jax.grad(gate_sum)(p)

  noisy, clean, grads = run(params)
  np.testing.assert_allclose(noisy, xs @ w + normal * std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(clean, xs @ w, rtol=1e-5, atol=1e-6)
  assert np.abs(nnx.to_pure_dict(grads)['noise_router']).sum() > 0


def numpy_hierarchical(inner_logits, outer_logits, outer_k, inner_k):
  """Two-level routing and its per-level losses, one token and one outer group at a time."""
  G, S, O = outer_logits.shape
  I = inner_logits.shape[-1] // O
  po, pi = softmax(outer_logits), softmax(inner_logits.reshape(G, S, O, I))
  norm = lambda x: x / x.sum() if len(x) > 1 else x
  index, gate, outer_choice = [], [], []
  for g in range(G):
    for s in range(S):
      groups = np.argsort(-po[g, s], kind='stable')[:outer_k]
      outer_choice.append(groups)
      for o, go in zip(groups, norm(po[g, s, groups])):
        experts = np.argsort(-pi[g, s, o], kind='stable')[:inner_k]
        index += list(o * I + experts)
        gate += list(go * norm(pi[g, s, o, experts]))
  index = np.asarray(index).reshape(G, S, -1)
  outer_choice = np.asarray(outer_choice).reshape(G, S, outer_k)
  balance = []
  for g in range(G):  # Outer: Switch loss over groups.
    f = np.bincount(outer_choice[g].ravel(), minlength=O) / outer_choice[g].size
    outer = O * np.sum(f * po[g].mean(0))
    inner = []  # Inner: per outer group, over the tokens that chose it.
    for o in range(O):
      tokens = [s for s in range(S) if o in outer_choice[g, s]]
      if not tokens:
        inner.append(0.0)
        continue
      picks = np.concatenate([np.argsort(-pi[g, s, o], kind='stable')[:inner_k] for s in tokens])
      f = np.bincount(picks, minlength=I) / len(picks)
      inner.append(I * np.sum(f * pi[g, tokens, o].mean(0)))
    balance.append(outer + np.mean(inner))
  lse2 = lambda x: np.mean(np.log(np.exp(x).sum(-1)) ** 2)
  z = lse2(outer_logits) + lse2(inner_logits.reshape(G, S, O, I))
  return index, np.asarray(gate).reshape(G, S, -1), np.mean(balance), z


@pytest.mark.parametrize('outer_k,top_k', [(2, 4), (1, 1)])
def test_hierarchical_router_matches_numpy(outer_k, top_k):
  O, I = 3, 4
  logits = np.random.RandomState(top_k).randn(2, 12, O * I + O).astype(np.float32) * 2
  moe = default.get_config().moe
  moe.update(router='hierarchical', num_experts=O * I, top_k=top_k, hierarchy=(O, I),
             hierarchy_outer_k=outer_k)
  frozen = dataclasses.replace(config_lib.MoeConfig(), **moe.to_dict())
  route, stats = jax.jit(lambda l: (lambda r: (r, routing.routing_stats(r)))(
      routing.ROUTERS['hierarchical'].route(l, frozen, capacity=4)))(jnp.asarray(logits))
  index, gate, balance, z = numpy_hierarchical(logits[..., :O * I], logits[..., O * I:], outer_k,
                                               top_k // outer_k)
  kept = first_come(index, np.ones(index.shape, bool), 4, O * I)
  np.testing.assert_array_equal(route.expert_index, index)
  np.testing.assert_array_equal(route.kept, kept)
  np.testing.assert_allclose(route.gate, gate * kept, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(route.probs).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(stats['balance_loss'], balance, rtol=1e-5)
  np.testing.assert_allclose(stats['z_loss'], z, rtol=1e-5)


def test_hierarchical_layer_has_outer_router_columns():
  moe_layer = layer({'router': 'hierarchical', 'num_experts': 4, 'hierarchy': (2, 2),
                     'top_k': 2, 'hierarchy_outer_k': 1})
  assert moe_layer.router[...].shape == (8, 4 + 2)
  graphdef, state = nnx.split(moe_layer)
  y, stats = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))(
      state, jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8)))
  assert y.shape == (2, 8, 8) and stats['dropped_fraction_per_slot'].shape == (2,)


@pytest.mark.parametrize('overrides, message', [
    ({'score_fn': 'tanh'}, "config.moe.score_fn='tanh' is invalid: expected one of 'softmax'"),
    ({'n_groups': 3}, 'config.moe.n_groups=3 is invalid: expected a divisor of moe.num_experts'),
    ({'n_groups': 4, 'topk_groups': 5}, 'config.moe.topk_groups=5 is invalid: expected at most '
                                        'moe.n_groups=4'),
    ({'n_groups': 16, 'topk_groups': 1}, 'config.moe.topk_groups=1 is invalid: expected enough '
                                         'groups'),
    ({'routed_scaling_factor': 0.0}, 'config.moe.routed_scaling_factor=0.0 is invalid'),
    ({'seq_aux_loss_coef': -1.0}, 'config.moe.seq_aux_loss_coef=-1.0 is invalid'),
    ({'router_noise': 'jitter'}, "config.moe.router_noise='jitter' is invalid"),
    ({'second_policy_eval': 'sometimes'}, "config.moe.second_policy_eval='sometimes' is invalid"),
    ({'threshold_train': (0.2, 0.1)}, 'config.moe.threshold_train=(0.2, 0.1) is invalid: '
                                      'expected () or moe.top_k - 1 = 7 thresholds'),
    ({'threshold_eval': (0.2,) * 6 + (1.5,)}, 'config.moe.threshold_eval='),
    ({'hierarchy': (8, 8)}, "config.moe.hierarchy=(8, 8) is read only with "
                            "moe.router='hierarchical'"),
    ({'router': 'hierarchical', 'hierarchy': (8, 4)}, 'config.moe.hierarchy=(8, 4) is invalid: '
                                                      'expected (outer groups, experts per group)'),
    ({'router': 'hierarchical', 'hierarchy': (8, 8), 'hierarchy_outer_k': 3},
     'config.moe.hierarchy_outer_k=3 is invalid'),
    ({'router': 'hierarchical', 'hierarchy': (8, 8), 'score_fn': 'sigmoid'},
     "config.moe.score_fn='sigmoid' is read only with moe.router='tokens_choose' (it is "
     "'hierarchical')"),
    ({'threshold_train': ['a'] * 7}, 'config.moe.threshold_train='),
    ({'hierarchy': 4}, 'config.moe.hierarchy=4 is invalid: expected a tuple'),
])
def test_bad_gating_settings_are_refused_in_one_line(overrides, message):
  config = with_moe(overrides)  # 64 experts, top-8.
  with pytest.raises(ConfigError) as error:
    validate(config)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_good_gating_settings_and_json_lists_pass():
  validate(with_moe(dict(score_fn='sigmoid', routed_scaling_factor=2.5, n_groups=8, topk_groups=4,
                         seq_aux_loss_coef=1e-4, router_noise='noisy_top_k',
                         bias_balancer_rate=1e-3, second_policy_train='all',
                         threshold_eval=[0.1] * 7)))  # A list, as config.json stores it.
  validate(with_moe(dict(router='hierarchical', hierarchy=[8, 8], hierarchy_outer_k=2)))


def with_moe(overrides):
  """The default config at 64 experts, top-8, with `overrides` in its moe section, of any type
  (as a config.json would give them: ConfigDict.update refuses a type change)."""
  config = default.get_config()
  config.moe = ml_collections.ConfigDict({**config.moe.to_dict(), 'num_experts': 64,
                                          'top_k': 8, 'expert_d_ff': 32, **overrides})
  return config


def test_every_router_option_is_a_valid_study_arm_and_tuples_parse_on_the_command_line(
    monkeypatch):
  """configs/moe_vs_dense.py:router=<option> on every MoE arm validates, and train.py's flags
  (what sweeps and the study pass, `sweep.train_command`) parse tuple fields."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from configs import moe_vs_dense  # pylint: disable=g-import-not-at-top
  for arm, (family, _, _) in moe_vs_dense.ARMS.items():
    for option in moe_vs_dense.ROUTER_OPTIONS if family != 'dense' else ():
      validate(moe_vs_dense.get_config(f'arm={arm},size=quick,router={option}'))
  with pytest.raises(ValueError, match="router='top_3' is invalid"):
    moe_vs_dense.get_config('arm=stmoe16,router=top_3')

  def load(*overrides):  # As train.py loads it; config_flags reads overrides from sys.argv.
    argv = ['train.py', '--config=configs/moe_vs_dense.py:arm=stmoe16,size=quick', *overrides]
    monkeypatch.setattr(sys, 'argv', argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, 'Config.', flag_values=values,
                                    lock_config=True)
    values(argv)
    return config_lib.model_config(values.config).moe

  moe = load('--config.moe.router=hierarchical', '--config.moe.hierarchy=(2,8)')
  assert moe.hierarchy == (2, 8) and moe.router == 'hierarchical'
  assert load('--config.moe.threshold_eval=(0.3,)').threshold_eval == (0.3,)


def test_route_tokens_choose_reads_every_gating_field():
  """The layer's router passes each config field to `tokens_choose_top_k` (train and eval
  policies and thresholds each their own)."""
  logits = jnp.asarray(np.random.RandomState(5).randn(2, 16, 8), jnp.float32)
  rng = jax.random.PRNGKey(0)
  moe = dataclasses.replace(
      config_lib.MoeConfig(), num_experts=8, top_k=3, score_fn='sigmoid',
      routed_scaling_factor=2.5, n_groups=4, topk_groups=2, second_policy_train='random',
      threshold_train=(0.4, 0.3), second_policy_eval='threshold', threshold_eval=(0.2, 0.35))
  kwargs = dict(top_k=3, capacity=4, score_fn='sigmoid', routed_scaling_factor=2.5, n_groups=4,
                topk_groups=2, rng=rng)

  @jax.jit
  def routes(logits):
    return [(routing.route_tokens_choose(logits, moe, capacity=4, train=train, rng=rng),
             routing.tokens_choose_top_k(logits, train=train, later_policy=policy,
                                         thresholds=thresholds, **kwargs))
            for train, policy, thresholds in ((True, 'random', (0.4, 0.3)),
                                              (False, 'threshold', (0.2, 0.35)))]

  for got, want in routes(logits):
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert 0 < np.mean(got.assigned) < 1


def test_tuple_fields_survive_config_json():
  """config.json stores tuples as lists: the loaded config validates, builds tuples, and
  resumes the run that wrote it."""
  config = with_moe(dict(router='hierarchical', hierarchy=(8, 8), hierarchy_outer_k=2))
  loaded = ml_collections.ConfigDict(json.loads(config.to_json()))
  assert loaded.moe.hierarchy == [8, 8]
  assert config_lib.model_config(loaded).moe == config_lib.model_config(config).moe
  config_lib.check_resumable(config, loaded, 'the workdir')
  loaded.moe.hierarchy = [4, 16]
  with pytest.raises(ConfigError, match=r'config.moe.hierarchy=\(8, 8\) differs from \[4, 16\]'):
    config_lib.check_resumable(config, loaded, 'the workdir')
