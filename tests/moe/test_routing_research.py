"""Routing since ST-MoE (issue #30) against numpy references: the Gemma 4 router, the routing
metrics papers report, bias re-centring, quantile balancing and the global-batch balance loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from stmoe_jax.moe import routing
from stmoe_jax.nn import layers
from stmoe_jax.moe.layer import MoeLayer


def numpy_gelu(x):  # tanh approximation, as jax.nn.gelu(approximate=True).
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def numpy_gemma4_moe(layer, x_BLD, k):
  """Per-token loop of gemma/gm/nn/gemma4/_moe.py: router on rms_norm(x) / sqrt(D) * scale,
  softmax, top-k, gates renormalised over the k, each expert's output times its scale."""
  f64 = lambda a: np.asarray(a, np.float64)
  w_router, router_scale, expert_scale = (f64(layer.router[...]), f64(layer.router_scale[...]),
                                          f64(layer.expert_scale[...]))
  w_up, w_down = f64(layer.experts.w_up[...]), f64(layer.experts.w_down[...])
  x = f64(x_BLD).reshape(-1, x_BLD.shape[-1])
  y = np.zeros_like(x)
  D = x.shape[-1]
  for t, x_t in enumerate(x):
    r = x_t / np.sqrt(np.mean(x_t**2) + 1e-6) / np.sqrt(D) * router_scale
    logits = r @ w_router
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs)[:k]
    for e in chosen:
      y[t] += probs[e] / probs[chosen].sum() * expert_scale[e] * (
          numpy_gelu(x_t @ w_up[e]) @ w_down[e])
  return y.reshape(x_BLD.shape)


@pytest.mark.parametrize('dispatch', ['einsum', 'scatter', 'dropless'])
def test_gemma4_router_matches_a_per_token_loop(dispatch):
  cfg = tiny_model_config(d_model=8, head_dim=4, activation='gelu', moe={
      'group_size': 8, 'top_k': 2, 'dispatch': dispatch, 'eval_capacity_factor': 8.0,
      'router_input_norm': True, 'expert_output_scale': True})
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  # Away from their init of ones, so that a scale applied in the wrong place shows.
  layer.router_scale[...] = jax.random.uniform(keys[0], (8,), minval=0.5, maxval=2.0)
  layer.expert_scale[...] = jax.random.uniform(keys[1], (4,), minval=0.5, maxval=2.0)
  x = 3.0 * jax.random.normal(keys[2], (2, 8, 8))
  y, stats = layer(x, train=False)
  assert float(stats['dropped_fraction']) == 0.0
  np.testing.assert_allclose(y, numpy_gemma4_moe(layer, x, 2), rtol=2e-4, atol=1e-5)
  # The router input is scale-free: the same routing for 10x the input.
  np.testing.assert_allclose(layer.route(to_groups_(10 * x), train=False, rng=None,
                                         mask_GS=None).probs,
                             layer.route(to_groups_(x), train=False, rng=None,
                                         mask_GS=None).probs, rtol=1e-5)


def to_groups_(x_BLD):
  return x_BLD.reshape(-1, 8, x_BLD.shape[-1])


def test_left_behind_and_confidence_hand_worked_top_1():
  # 1 group of 4 tokens, 2 experts, top-1, capacity 1: tokens 0, 1, 3 pick expert 0, token 2
  # expert 1; expert 0 keeps token 0 only, so tokens 1 and 3 are left behind.
  probs = np.asarray([[[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]])
  route = routing.tokens_choose_top_k(jnp.log(jnp.asarray(probs)), top_k=1, capacity=1)
  stats = routing.routing_stats(route)
  np.testing.assert_allclose(stats['tokens_left_behind'], 2 / 4, rtol=1e-6)
  np.testing.assert_allclose(stats['router_confidence'], (0.9 + 0.6 + 0.7 + 0.8) / 4, rtol=1e-6)
  # Padding token 3 takes no capacity and is not counted: token 1 of 3 real ones.
  masked = routing.routing_stats(
      routing.tokens_choose_top_k(jnp.log(jnp.asarray(probs)), top_k=1, capacity=1,
                                  mask_GS=jnp.asarray([[True, True, True, False]])),
      jnp.asarray([[True, True, True, False]]))
  np.testing.assert_allclose(masked['tokens_left_behind'], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(masked['router_confidence'], (0.9 + 0.6 + 0.7) / 3, rtol=1e-6)


def test_left_behind_needs_every_choice_dropped_top_2():
  # 3 experts, top-2, capacity 1, arrival token-major: token 0 takes experts 0 and 1; token 1
  # (0, 2) loses expert 0 but keeps 2; token 2 (1, 2) and token 3 (0, 1) find both full.
  probs = np.asarray([[[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.1, 0.5, 0.4], [0.45, 0.35, 0.2]]])
  route = routing.tokens_choose_top_k(jnp.log(jnp.asarray(probs)), top_k=2, capacity=1)
  stats = routing.routing_stats(route)
  np.testing.assert_allclose(stats['dropped_fraction'], 5 / 8, rtol=1e-6)
  np.testing.assert_allclose(stats['tokens_left_behind'], 2 / 4, rtol=1e-6)
  np.testing.assert_allclose(stats['router_confidence'], (0.5 + 0.6 + 0.5 + 0.45) / 4,
                             rtol=1e-6)
  # Experts reached per token: 2, 1, 0, 0.
  np.testing.assert_allclose(stats['experts_per_token'], 3 / 4, rtol=1e-6)
  np.testing.assert_allclose(stats['experts_per_token_hist'], [2 / 4, 1 / 4, 1 / 4], rtol=1e-6)
  # Expert choice with capacity 1: experts 0, 1, 2 take tokens 1, 2, 2; tokens 0, 3 untaken.
  ec = routing.routing_stats(routing.expert_choice(jnp.log(jnp.asarray(probs)), capacity=1))
  np.testing.assert_allclose(ec['tokens_left_behind'], 2 / 4, rtol=1e-6)
  np.testing.assert_allclose(ec['experts_per_token'], 3 / 4, rtol=1e-6)  # 0, 1, 2, 0.
  np.testing.assert_allclose(ec['experts_per_token_hist'], [2 / 4, 1 / 4, 1 / 4, 0], rtol=1e-6)
  # Padding (token 1) is neither routed nor counted: tokens 0, 2, 3 reach 2, 1, 0 experts.
  mask = jnp.asarray([[True, False, True, True]])
  masked = jax.jit(lambda l, m: routing.routing_stats(
      routing.tokens_choose_top_k(l, top_k=2, capacity=1, mask_GS=m), m))(
          jnp.log(jnp.asarray(probs)), mask)
  np.testing.assert_allclose(masked['experts_per_token'], 3 / 3, rtol=1e-6)
  np.testing.assert_allclose(masked['experts_per_token_hist'], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)


def test_experts_per_token_hand_worked_relu_and_null_experts():
  moe = tiny_model_config(moe={'top_k': 1}).moe
  # ReLU routing, 3 experts: positive gates 2, 0, 3, 1 per token.
  logits = jnp.asarray([[[1.0, -1.0, 2.0], [-1.0, 0.0, -3.0], [0.5, 0.1, 2.0],
                         [-2.0, 4.0, -0.5]]])
  # Jitted: one compile instead of one per eager op.
  stats = jax.jit(lambda l: routing.routing_stats(routing.route_relu(l, moe, capacity=4)))(logits)
  np.testing.assert_allclose(stats['experts_per_token'], 6 / 4, rtol=1e-6)
  np.testing.assert_allclose(stats['experts_per_token_hist'], [1 / 4, 1 / 4, 1 / 4, 1 / 4],
                             rtol=1e-6)
  # Null experts: 2 real + 2 null, top-2, nothing dropped. Top-2 of each token: (0, 1), (0, n),
  # (n, n), (1, n): real experts 2, 1, 0, 1; null choices 4 of 8.
  null_moe = tiny_model_config(moe={'top_k': 2, 'num_experts': 2, 'num_null_experts': 2,
                                    'second_expert_threshold': 0.0}).moe
  logits = jnp.asarray([[[3.0, 2.0, 0.0, 0.0], [3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, 2.0],
                         [0.0, 3.0, 0.0, 2.0]]])
  stats = jax.jit(lambda l: routing.routing_stats(
      routing.route_tokens_choose(l, null_moe, capacity=4)))(logits)
  np.testing.assert_allclose(stats['null_choice_fraction'], 4 / 8, rtol=1e-6)
  np.testing.assert_allclose(stats['experts_per_token'], 4 / 4, rtol=1e-6)
  np.testing.assert_allclose(stats['experts_per_token_hist'], [1 / 4, 2 / 4, 1 / 4], rtol=1e-6)


def numpy_softmax(logits):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def skewed_layer(**moe):
  """A top-1 layer of 4 experts whose router prefers expert 0 for most tokens."""
  cfg = tiny_model_config(d_model=8, head_dim=4, moe={'group_size': 8, 'top_k': 1, **moe})
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 8)) + 1.0
  layer.router[...] = layer.router[...].at[:, 0].add(0.5)  # x ~ 1 + N(0, 1): expert 0 wins.
  return layer, x


@pytest.mark.parametrize('recenter', [False, True])
def test_bias_balancer_recentres_to_zero_mean(recenter):
  layer, x = skewed_layer(bias_balancer_rate=0.1, bias_balancer_recenter=recenter)
  _, stats = layer(x, train=True, rng=jax.random.PRNGKey(0))
  load = np.asarray(stats['expert_load'], np.float64)
  expected = 0.1 * np.sign(load.mean() - load)
  assert abs(expected.mean()) > 0.01  # Sign steps do not sum to zero: the bias drifts...
  if recenter:
    expected -= expected.mean()  # ...unless re-centred.
  np.testing.assert_allclose(layer.router_bias[...], expected, atol=1e-6)


def test_quantile_bias_gives_every_expert_its_share():
  layer, x = skewed_layer(quantile_balance_rate=1.0)
  scores = numpy_softmax(np.asarray(x, np.float64).reshape(-1, 8) @
                         np.asarray(layer.router[...], np.float64))  # [32 tokens, 4 experts]
  _, before = layer(x, train=True, rng=jax.random.PRNGKey(0))
  bias = -np.quantile(scores, 1 - 1 / 4, axis=0)  # numpy's default (linear) interpolation.
  np.testing.assert_allclose(layer.router_bias[...], bias, rtol=1e-5, atol=1e-6)
  # Exactly a k/E share of the tokens rate each expert above 0 with the bias: 8 of 32 each.
  np.testing.assert_array_equal(np.sum(scores + bias > 0, axis=0), [8, 8, 8, 8])
  # The top-1 loads routing with it are numpy's argmax of the biased scores: no longer all on
  # expert 0 (top-1 is not thresholding at 0, so not exactly even either).
  _, after = layer(x, train=False)
  load = np.bincount(np.argmax(scores + bias, axis=-1), minlength=4) / 32
  np.testing.assert_allclose(after['expert_load'], load, rtol=1e-6)
  assert float(before['max_load_ratio']) == 4.0 and float(after['max_load_ratio']) <= 2.0
  # Padding is left out of the quantiles; rate 0.5 moves halfway from the bias it had.
  mask = np.arange(32).reshape(4, 8) % 3 != 0
  from stmoe_jax.moe.layer import quantile_bias  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(
      quantile_bias(jnp.asarray(scores, jnp.float32).reshape(4, 8, 4), 1, jnp.asarray(mask)),
      -np.quantile(scores[mask.reshape(-1)], 0.75, axis=0), rtol=1e-5, atol=1e-6)


def test_global_balance_loss_is_the_gathered_batch_loss_with_its_gradient():
  layer, x = skewed_layer(balance_scope='global', group_size=8)  # 4 groups of 8 tokens.
  # Groups 0, 2 (first halves of the sequences) mostly pick expert 0, groups 1, 3 others.
  x = x * jnp.repeat(jnp.asarray([1.0, -1.0]), 8)[None, :, None]
  graphdef, params, buffers = nnx.split(layer, *layers.STATE_FILTERS)
  params = nnx.to_pure_dict(params)
  w = params['router']

  def loss(w):
    return nnx.merge(graphdef, {**params, 'router': w}, buffers)(x, train=False)[1][
        'balance_loss']

  value, grad = jax.value_and_grad(loss)(w)

  def gathered(w):  # Independent: the Switch loss of all 32 tokens as one group, f constant.
    probs = jax.nn.softmax(x.reshape(-1, 8) @ w, axis=-1)
    f = jnp.bincount(jnp.argmax(jax.lax.stop_gradient(probs), -1), length=4) / 32
    return 4 * jnp.sum(f * jnp.mean(probs, axis=0))

  ref_value, ref_grad = jax.value_and_grad(gathered)(w)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
  # Per-group frequencies are another loss on this batch; 'sequence' is the per-sequence one.
  group, _ = skewed_layer(group_size=8)
  assert abs(float(group(x, train=False)[1]['balance_loss']) - float(value)) > 1e-3
  seq, _ = skewed_layer(balance_scope='sequence')
  stats = seq(x, train=False)[1]
  np.testing.assert_allclose(stats['balance_loss'], stats['seq_balance_loss'], rtol=1e-6)


@pytest.mark.parametrize('settings,named', [
    ({'quantile_balance_rate': 0.5, 'bias_balancer_rate': 1e-3}, 'quantile_balance_rate'),
    ({'quantile_balance_rate': 0.5, 'router': 'hierarchical', 'hierarchy': (2, 2)},
     'quantile_balance_rate'),
    ({'bias_balancer_recenter': True}, 'bias_balancer_recenter'),
    ({'balance_scope': 'global', 'router': 'hierarchical', 'hierarchy': (2, 2)},
     'balance_scope'),
    ({'quantile_balance_rate': 1.5}, 'quantile_balance_rate'),
    ({'router': 'hash', 'top_k': 2}, 'top_k'),
    ({'router': 'relu', 'dispatch': 'scatter'}, 'dispatch'),
    ({'router': 'relu', 'dispatch': 'dropless', 'balance_scope': 'global'}, 'balance_scope'),
    ({'num_null_experts': 2, 'bias_balancer_rate': 1e-3}, 'num_null_experts'),
])
def test_settings_that_would_be_ignored_are_refused(settings, named):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from stmoe_jax.config import ConfigError, validate  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.moe.num_experts = 4
  config.moe.update(settings)
  with pytest.raises(ConfigError, match=f'config.moe.{named}='):
    validate(config)
  if settings.get('router') == 'hash':  # The encoder-decoder passes no token ids.
    config.moe.top_k = 1
    validate(config)
    config.model.update(architecture='encoder_decoder', num_encoder_layers=1)
    config.data.objective = 'span_corruption'
    with pytest.raises(ConfigError, match="config.moe.router='hash'"):
      validate(config)


def numpy_hash_expert(ids, num_experts):
  """murmur3's 32-bit finaliser in numpy uint32 arithmetic (wrapping), modulo E."""
  h = np.asarray(ids, np.uint64) * 0x9E3779B1 % 2**32
  h ^= h >> 16
  h = h * 0x85EBCA6B % 2**32
  h ^= h >> 13
  h = h * 0xC2B2AE35 % 2**32
  h ^= h >> 16
  return (h % num_experts).astype(np.int64)


@pytest.mark.parametrize('dispatch', ['einsum', 'scatter', 'dropless'])
def test_hash_router_sends_each_token_id_to_its_hashed_expert(dispatch):
  cfg = tiny_model_config(d_model=8, head_dim=4, activation='gelu', moe={
      'group_size': 8, 'top_k': 1, 'router': 'hash', 'dispatch': dispatch,
      'eval_capacity_factor': 1.0})
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.PRNGKey(5), (2, 8), 0, 259)
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 8, 8))
  y, stats = layer(x, train=False, token_ids_BL=ids)
  w_up = np.asarray(layer.experts.w_up[...], np.float64)
  w_down = np.asarray(layer.experts.w_down[...], np.float64)
  experts = numpy_hash_expert(np.asarray(ids).reshape(-1), 4)
  # Capacity ceil(8 / 4) = 2 per group of 8 (dropless: all 8): a later token finding its
  # expert full is dropped, exactly as first come first served.
  capacity = 8 if dispatch == 'dropless' else 2
  expected = np.zeros((16, 8))
  dropped = 0
  for g in range(2):
    taken = np.zeros(4, int)
    for s in range(8):
      t, e = 8 * g + s, experts[8 * g + s]
      if taken[e] < capacity:
        expected[t] = numpy_gelu(np.asarray(x, np.float64).reshape(16, 8)[t] @ w_up[e]) @ w_down[e]
      else:
        dropped += 1
      taken[e] += 1
  np.testing.assert_allclose(y.reshape(16, 8), expected, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(stats['dropped_fraction'], dropped / 16, rtol=1e-6)
  np.testing.assert_allclose(stats['expert_load'], np.bincount(experts, minlength=4) / 16,
                             rtol=1e-6)
  assert float(stats['balance_loss']) == 0.0 and float(stats['z_loss']) == 0.0
  if dispatch == 'einsum':
    assert dropped > 0  # The capacity case is exercised.
    with pytest.raises(ValueError, match='token_ids_BL'):
      layer(x, train=False)


def test_transformer_passes_token_ids_to_hash_layers_in_forward_and_decode():
  # Scanned layers: the token ids go through layer_scan's forward and decode as well as Block.
  from stmoe_jax.models import transformer  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config(scan_layers=True, num_layers=2,
                          moe={'router': 'hash', 'top_k': 1, 'group_size': 8, 'every': 1,
                               'dispatch': 'dropless'})
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(7), (1, 8), 0, 259)
  logits, stats = model(tokens, train=False)
  load = np.bincount(numpy_hash_expert(np.asarray(tokens).reshape(-1), 4), minlength=4) / 8
  np.testing.assert_allclose(stats['expert_load'], np.stack([load, load]), rtol=1e-6)
  # Decoding the prompt routes by the same ids: the same logits.
  decoded, _ = model.decode(tokens, transformer.init_caches(cfg, 1, 8))
  np.testing.assert_allclose(decoded, logits, rtol=2e-4, atol=2e-5)


def test_relu_router_uses_every_expert_with_a_positive_gate_and_adapts_its_l1():
  cfg = tiny_model_config(d_model=8, head_dim=4, activation='gelu', moe={
      'group_size': 8, 'top_k': 1, 'router': 'relu', 'dispatch': 'dropless',
      'relu_l1_init': 0.5, 'relu_l1_step': 1.2})
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(8), (2, 8, 8))
  y, stats = layer(x, train=True, rng=jax.random.PRNGKey(0))
  f64 = lambda a: np.asarray(a, np.float64)
  xs = f64(x).reshape(16, 8)
  gates = np.maximum(xs @ f64(layer.router[...]), 0.0)  # [16 tokens, 4 experts]
  w_up, w_down = f64(layer.experts.w_up[...]), f64(layer.experts.w_down[...])
  expected = np.stack([sum(gates[t, e] * (numpy_gelu(xs[t] @ w_up[e]) @ w_down[e])
                           for e in range(4)) for t in range(16)])
  np.testing.assert_allclose(y.reshape(16, 8), expected, rtol=2e-4, atol=1e-5)
  active = gates > 0
  assert 1 < active.sum(-1).mean() < 4  # A varying number of experts per token.
  np.testing.assert_allclose(stats['expert_load'], active.sum(0) / active.sum(), rtol=1e-6)
  np.testing.assert_allclose(stats['experts_per_token'], active.sum(-1).mean(), rtol=1e-6)
  np.testing.assert_allclose(stats['experts_per_token_hist'],
                             np.bincount(active.sum(-1), minlength=5) / 16, rtol=1e-6)
  # ReMoE's load-balanced L1 (eq. 7-8), times the coefficient before this step's update...
  f = 4 / (1 * 16) * active.sum(0)
  np.testing.assert_allclose(stats['balance_loss'], 0.5 * np.mean(gates @ f), rtol=1e-5)
  # ...which rises by the step while more than top_k / E = 1/4 of the gates are positive.
  assert active.mean() > 0.25
  np.testing.assert_allclose(layer.relu_l1_coef[...], 0.5 * 1.2, rtol=1e-6)


@pytest.mark.parametrize('dispatch', ['einsum', 'scatter', 'dropless'])
def test_null_experts_skip_choices_and_are_counted(dispatch):
  # 4 real + 4 null experts, top-2: a choice of a null expert adds 0 and takes no capacity.
  cfg = tiny_model_config(d_model=8, head_dim=4, activation='gelu', moe={
      'group_size': 8, 'top_k': 2, 'dispatch': dispatch, 'eval_capacity_factor': 8.0,
      'num_null_experts': 4})
  layer = MoeLayer(cfg, rngs=nnx.Rngs(1))
  assert layer.router[...].shape == (8, 8)
  x = jax.random.normal(jax.random.PRNGKey(9), (2, 8, 8))
  y, stats = layer(x, train=False)
  f64 = lambda a: np.asarray(a, np.float64)
  xs = f64(x).reshape(16, 8)
  probs = numpy_softmax(xs @ f64(layer.router[...]))  # [16, 8]: experts 4..7 are null.
  w_up, w_down = f64(layer.experts.w_up[...]), f64(layer.experts.w_down[...])
  expected, null, real = np.zeros((16, 8)), 0, np.zeros(16, int)
  for t in range(16):
    chosen = np.argsort(-probs[t])[:2]
    for e in chosen:
      if e >= 4:
        null += 1
      else:
        real[t] += 1
        expected[t] += probs[t, e] / probs[t, chosen].sum() * (
            numpy_gelu(xs[t] @ w_up[e]) @ w_down[e])
  assert 0 < null < 32  # Both kinds of choice occur.
  np.testing.assert_allclose(y.reshape(16, 8), expected, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(stats['null_choice_fraction'], null / 32, rtol=1e-6)
  np.testing.assert_allclose(stats['experts_per_token'], real.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats['experts_per_token_hist'], np.bincount(real, minlength=3) / 16,
                             rtol=1e-6)
  assert float(stats['dropped_fraction']) == 0.0 and stats['expert_load'].shape == (4,)
