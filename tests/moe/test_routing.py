"""Router, capacity and losses against plain numpy written here, plus hand-worked cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from stmoe_jax.moe import layer_stats
from stmoe_jax.moe import routing
from stmoe_jax.config import ConfigError, validate
from stmoe_jax.moe.layer import MoeLayer


def numpy_tokens_choose(logits, k, capacity, renormalize):
  """Loop reference: tokens in order, each token's choices in rank order, first come first kept."""
  G, S, E = logits.shape
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  index = np.zeros((G, S, k), np.int64)
  gate = np.zeros((G, S, k))
  kept = np.zeros((G, S, k), bool)
  for g in range(G):
    filled = [0] * E
    for s in range(S):
      order = np.argsort(-probs[g, s], kind='stable')[:k]
      chosen = probs[g, s, order]
      if renormalize and k > 1:
        chosen = chosen / chosen.sum()
      for j, e in enumerate(order):
        index[g, s, j] = e
        if filled[e] < capacity:
          kept[g, s, j] = True
          gate[g, s, j] = chosen[j]
        filled[e] += 1
  return index, gate, kept, probs


@pytest.mark.parametrize('k,capacity,renormalize', [(1, 3, True), (2, 2, True), (2, 4, False),
                                                    (3, 1, True), (2, 16, True)])
def test_tokens_choose_matches_numpy_loop(k, capacity, renormalize):
  logits = np.random.RandomState(k * 10 + capacity).randn(3, 16, 5).astype(np.float32) * 2
  route = routing.tokens_choose_top_k(jnp.asarray(logits), top_k=k, capacity=capacity,
                                      renormalize=renormalize)
  index, gate, kept, probs = numpy_tokens_choose(logits, k, capacity, renormalize)
  np.testing.assert_array_equal(route.expert_index, index)
  np.testing.assert_array_equal(route.kept, kept)
  np.testing.assert_allclose(route.gate, gate, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(route.probs, probs, rtol=1e-5, atol=1e-7)
  # Each expert keeps at most `capacity` choices and the positions it keeps are 0..n-1.
  for g in range(3):
    for e in range(5):
      slots = np.asarray(route.position)[g][(index[g] == e) & kept[g]]
      np.testing.assert_array_equal(np.sort(slots), np.arange(len(slots)))


def test_hand_worked_drops_in_token_order():
  # Four tokens all preferring expert 0, then expert 1; capacity 2, top-1.
  logits = jnp.asarray([[[3.0, 1.0], [2.0, 1.0], [4.0, 0.0], [1.0, 0.5]]])
  route = routing.tokens_choose_top_k(logits, top_k=1, capacity=2)
  np.testing.assert_array_equal(route.expert_index[0, :, 0], [0, 0, 0, 0])
  # Tokens 0 and 1 arrive first and are kept; 2 and 3 are dropped (gate 0), whatever their
  # confidence: first come, first served, never displaced by a later token.
  np.testing.assert_array_equal(route.kept[0, :, 0], [True, True, False, False])
  np.testing.assert_array_equal(route.position[0, :, 0], [0, 1, 2, 3])
  np.testing.assert_allclose(route.gate[0, :, 0], [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1)),
                                                  0, 0], rtol=1e-6)


def test_top2_second_choice_competes_in_token_order():
  # Token 0 picks (0, 1), token 1 picks (1, 0); capacity 1: token 0 takes both experts first.
  logits = jnp.asarray([[[2.0, 1.0, -5.0], [1.0, 2.0, -5.0]]])
  route = routing.tokens_choose_top_k(logits, top_k=2, capacity=1)
  np.testing.assert_array_equal(route.expert_index[0], [[0, 1], [1, 0]])
  np.testing.assert_array_equal(route.kept[0], [[True, True], [False, False]])


@pytest.mark.parametrize('scaled,expected', [(True, 5), (False, 3)])
def test_expert_capacity(scaled, expected):
  # 16 tokens, 8 experts, top-2, CF 1.25: ceil(1.25 * 2 * 16 / 8) = 5; unscaled ceil(2.5) = 3.
  assert routing.expert_capacity(16, 8, 2, 1.25, scaled_by_k=scaled, min_capacity=1) == expected
  assert routing.expert_capacity(16, 8, 2, 0.01, min_capacity=4) == 4
  assert routing.expert_capacity(16, 2, 2, 4.0) == 16  # Never more than the group.


def test_balance_loss_hand_computed():
  # One group, 2 tokens, 2 experts, top-1. Probs rows [0.8, 0.2] and [0.6, 0.4]: both go to
  # expert 0, so f = [1, 0], P = [0.7, 0.3]; loss = E * sum f*P = 2 * 0.7 = 1.4.
  probs = jnp.asarray([[[0.8, 0.2], [0.6, 0.4]]])
  index = jnp.asarray([[[0], [0]]])
  np.testing.assert_allclose(routing.load_balancing_loss(probs, index), 1.4, rtol=1e-6)
  # A uniform router with a perfectly balanced assignment gives exactly 1 for any k.
  E, S, k = 4, 8, 2
  uniform = jnp.full((1, S, E), 1 / E)
  balanced = jnp.asarray(np.arange(S * k).reshape(1, S, k) % E)
  np.testing.assert_allclose(routing.load_balancing_loss(uniform, balanced), 1.0, rtol=1e-6)


def test_balance_loss_top2_hand_computed_with_mask():
  # 3 tokens, 3 experts, top-2; the last token is padding and must not count.
  probs = jnp.asarray([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.9, 0.05, 0.05]]])
  index = jnp.asarray([[[0, 1], [1, 2], [0, 1]]])
  mask = jnp.asarray([[True, True, False]])
  # Real choices: experts 0, 1, 1, 2 -> f = [1/4, 2/4, 1/4]; P = mean of rows 0, 1 =
  # [0.3, 0.45, 0.25]; loss = 3 * (0.075 + 0.225 + 0.0625) = 1.0875.
  np.testing.assert_allclose(routing.load_balancing_loss(probs, index, mask), 1.0875, rtol=1e-6)
  np.testing.assert_allclose(routing.load_balancing_loss(probs[:, :2], index[:, :2]), 1.0875,
                             rtol=1e-6)


def test_z_loss_hand_computed():
  logits = jnp.asarray([[[0.0, 0.0], [1.0, 2.0]]])
  expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
  np.testing.assert_allclose(routing.router_z_loss(logits), expected, rtol=1e-6)


def test_router_grads_flow_at_top1():
  """Switch top-1 scales the output by the raw probability so the router learns."""
  logits = jnp.asarray(np.random.RandomState(0).randn(1, 8, 4), jnp.float32)
  grad = jax.grad(lambda l: jnp.sum(routing.tokens_choose_top_k(
      l, top_k=1, capacity=8, renormalize=True).gate))(logits)
  assert np.abs(np.asarray(grad)).sum() > 0


def test_second_expert_policy_hand_worked_at_eval():
  # Renormalised gates: token 0 [0.9, 0.1], token 1 [0.7, 0.3]. Threshold 0.2 at eval routes a
  # later choice iff its gate >= 0.2: only token 1's second choice goes.
  probs = np.asarray([[[0.9, 0.1, 0.0], [0.0, 0.7, 0.3]]]) + 1e-9
  route = routing.tokens_choose_top_k(jnp.log(jnp.asarray(probs)), top_k=2, capacity=2,
                                      second_expert_threshold=0.2, train=False)
  np.testing.assert_array_equal(route.assigned[0], [[True, False], [True, True]])
  np.testing.assert_allclose(route.gate[0], [[0.9, 0.0], [0.7, 0.3]], atol=1e-6)


def test_second_expert_policy_samples_with_probability_gate_over_threshold():
  logits = jnp.asarray(np.random.RandomState(0).randn(4, 256, 8) * 1.5, jnp.float32)
  rng = jax.random.PRNGKey(7)
  route = routing.tokens_choose_top_k(logits, top_k=3, capacity=256, second_expert_threshold=0.2,
                                      train=True, rng=rng)
  # Reference: the same uniform draws against min(1, gate / 0.2), written out here.
  full = routing.tokens_choose_top_k(logits, top_k=3, capacity=256)
  u = np.asarray(jax.random.uniform(rng, (4, 256, 3)))
  expected = u < np.asarray(full.gate) / 0.2
  expected[..., 0] = True
  np.testing.assert_array_equal(route.assigned, expected)
  # Statistically: the routed share of later choices is the mean of min(1, gate / 0.2).
  p = np.minimum(1.0, np.asarray(full.gate)[..., 1:] / 0.2)
  np.testing.assert_allclose(np.mean(route.assigned[..., 1:]), p.mean(), atol=0.02)


def test_policy_dropped_choices_take_no_capacity():
  # Token 0's second choice (expert 1, gate 0.1) is not routed, so token 1's first choice of
  # expert 1 still finds the single slot free.
  probs = np.asarray([[[0.9, 0.1, 0.0], [0.0, 0.7, 0.3]]]) + 1e-9
  route = routing.tokens_choose_top_k(jnp.log(jnp.asarray(probs)), top_k=2, capacity=1,
                                      second_expert_threshold=0.2, train=False)
  np.testing.assert_array_equal(route.kept[0], [[True, False], [True, True]])


def test_batch_prioritized_routing_keeps_the_most_confident():
  # Four tokens all choose expert 0 (top-1), capacity 2: BPR keeps the two with the highest
  # probability (tokens 2 and 0), first-come would keep tokens 0 and 1.
  logits = jnp.asarray([[[3.0, 1.0], [2.0, 1.0], [4.0, 0.0], [1.0, 0.5]]])
  first_come = routing.tokens_choose_top_k(logits, top_k=1, capacity=2)
  bpr = routing.tokens_choose_top_k(logits, top_k=1, capacity=2, batch_prioritized=True)
  np.testing.assert_array_equal(first_come.kept[0, :, 0], [True, True, False, False])
  np.testing.assert_array_equal(bpr.kept[0, :, 0], [True, False, True, False])
  np.testing.assert_array_equal(bpr.position[0, :, 0], [1, 2, 0, 3])


def numpy_expert_choice(logits, capacity):
  """Loop reference: each expert takes the `capacity` tokens with the highest probability."""
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  G, S, E = probs.shape
  taken = np.zeros((G, S, E), bool)
  for g in range(G):
    for e in range(E):
      taken[g, np.argsort(-probs[g, :, e], kind='stable')[:capacity], e] = True
  return taken, probs


def test_expert_choice_matches_numpy_and_is_exactly_balanced():
  logits = np.random.RandomState(3).randn(2, 16, 4).astype(np.float32)
  route = routing.expert_choice(jnp.asarray(logits), capacity=5)
  taken, probs = numpy_expert_choice(logits, 5)
  np.testing.assert_array_equal(route.kept, taken)
  np.testing.assert_allclose(route.gate, probs * taken, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.sum(route.kept, axis=1), 5)  # Every expert exactly full.
  stats = routing.routing_stats(route)
  np.testing.assert_allclose(stats['expert_load'], 0.25, rtol=1e-6)
  np.testing.assert_allclose(stats['max_load_ratio'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats['dropped_fraction'], 0.0)


def test_selection_bias_moves_choices_but_not_gates():
  logits = jnp.log(jnp.asarray([[[0.5, 0.3, 0.2]]]))
  route = routing.tokens_choose_top_k(logits, top_k=1, capacity=1,
                                      bias_E=jnp.asarray([0.0, 0.0, 0.35]))
  assert int(route.expert_index[0, 0, 0]) == 2  # 0.2 + 0.35 beats 0.5.
  np.testing.assert_allclose(route.gate[0, 0, 0], 0.2, rtol=1e-6)  # The unbiased probability.


def test_routing_stats_hand_worked():
  # 1 group, 4 tokens, 2 experts, top-1, capacity 1. Probs: three tokens prefer expert 0.
  probs = np.asarray([[[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]]])
  route = routing.tokens_choose_top_k(jnp.log(jnp.asarray(probs)), top_k=1, capacity=1)
  stats = routing.routing_stats(route)
  np.testing.assert_allclose(stats['expert_load'], [0.75, 0.25], rtol=1e-6)
  np.testing.assert_allclose(stats['max_load_ratio'], 1.5, rtol=1e-6)
  np.testing.assert_allclose(stats['dropped_fraction'], 0.5, rtol=1e-6)  # Tokens 1 and 3.
  np.testing.assert_allclose(stats['dropped_fraction_per_slot'], [0.5], rtol=1e-6)
  entropy = -np.sum(probs * np.log(probs), axis=-1).mean()
  np.testing.assert_allclose(stats['router_entropy'], entropy, rtol=1e-5)
  np.testing.assert_allclose(stats['z_loss'], 0.0, atol=1e-6)  # logsumexp(log p) = log 1.
  np.testing.assert_allclose(stats['max_router_logit'], -np.log(0.1), rtol=1e-6)
  masked = routing.routing_stats(route, jnp.asarray([[True, True, True, False]]))
  np.testing.assert_allclose(masked['max_router_logit'], -np.log(0.2), rtol=1e-6)


def route_to_first_expert(logits_GSE, moe, *, capacity, mask_GS=None, bias_E=None, train=False,
                          rng=None):
  """A toy router for the registry test: every token's one choice is expert 0, weight 1."""
  del moe, bias_E, train, rng
  first_GSE = jnp.where(jnp.arange(logits_GSE.shape[-1]) == 0, 30.0, -30.0) + 0 * logits_GSE
  return routing.tokens_choose_top_k(first_GSE, top_k=1, capacity=capacity, mask_GS=mask_GS)


def test_a_registered_router_is_what_validation_the_layer_and_the_stats_use(monkeypatch,
                                                                             tiny_model_cfg):
  config = default.get_config()
  config.moe.router = 'first_expert'
  with pytest.raises(ConfigError, match="config.moe.router='first_expert' is invalid"):
    validate(config)
  monkeypatch.setitem(routing.ROUTERS, 'first_expert', routing.Router(
      name='first_expert', route=route_to_first_expert, causal=True, fixed_load=False,
      num_choices=lambda moe: 1))
  validate(config)  # One registration: the config accepts it...
  cfg = tiny_model_cfg(moe=dict(router='first_expert', group_size=8, eval_capacity_factor=8.0))
  assert dict(layer_stats.dims(cfg))['K'] == 1  # ...the stats size its choices...
  graphdef, state = nnx.split(MoeLayer(cfg, rngs=nnx.Rngs(0)))
  _, stats = jax.jit(lambda x: nnx.merge(graphdef, state)(x, train=False))(
      jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16)))
  np.testing.assert_allclose(stats['expert_load'], [1.0, 0.0, 0.0, 0.0])  # ...the layer routes.
  monkeypatch.setitem(routing.ROUTERS, 'first_expert', routing.Router(
      name='first_expert', route=route_to_first_expert, causal=False, fixed_load=False,
      num_choices=lambda moe: 1))
  with pytest.raises(ConfigError,
                     match="expected 'tokens_choose' or 'hierarchical' or 'hash' or 'relu' in "
                           'this causal decoder'):
    validate(config)  # A non-causal router is refused in the decoder.
