"""Router, capacity and losses against plain numpy written here, plus hand-worked cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe_jax import routing


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
