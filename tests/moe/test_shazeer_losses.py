"""Shazeer et al. 2017's importance and load losses (`stmoe_jax.moe.cv_balance`) against a plain
numpy loop and a jnp transcription of the paper's formulas written here, their gradients, their
config refusals and their place in the training loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from stmoe_jax import config as config_lib
from stmoe_jax.moe import cv_balance
from stmoe_jax.nn import layers
from stmoe_jax.models import losses
from stmoe_jax.moe import layer as moe_lib
from stmoe_jax.moe import routing
from stmoe_jax.config import ConfigError, validate
from stmoe_jax.models.transformer import Transformer


def phi(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def cv2(x):
  return np.var(x) / np.mean(x) ** 2


def numpy_losses(clean, noisy, std, k, mask):
  """(importance CV^2, load CV^2) averaged over groups, one token and expert at a time, straight
  from the paper: gates = softmax over the top k of the noisy logits; P(x, i) with the k-th
  largest noisy logit of the other experts."""
  G, S, E = clean.shape
  importance, load = np.zeros((G, E)), np.zeros((G, E))
  for g in range(G):
    for s in range(S):
      if not mask[g, s]:
        continue
      top = np.argsort(-noisy[g, s], kind='stable')[:k]
      e = np.exp(noisy[g, s, top] - noisy[g, s, top].max())
      importance[g, top] += e / e.sum()
      for i in range(E):
        others = np.sort(np.delete(noisy[g, s], i))[::-1]
        load[g, i] += phi((clean[g, s, i] - others[k - 1]) / std[g, s, i])
  return (np.mean([cv2(importance[g]) for g in range(G)]),
          np.mean([cv2(load[g]) for g in range(G)]))


def test_kth_excluding_is_the_k_plus_1th_for_a_chosen_expert_and_the_kth_otherwise():
  noisy = jnp.asarray([[[3.0, 2.0, 1.0, 0.0, -1.0]]])
  # k=2: experts 0, 1 chosen -> 3rd largest overall (1.0); the others -> 2nd largest (2.0).
  np.testing.assert_array_equal(cv_balance.kth_excluding(noisy, 2)[0, 0], [1, 1, 2, 2, 2])
  np.testing.assert_array_equal(cv_balance.kth_excluding(noisy, 1)[0, 0], [2, 3, 3, 3, 3])


def test_importance_and_load_match_a_numpy_loop():
  G, S, E, k = 2, 12, 5, 2
  rng = np.random.RandomState(0)
  clean = rng.randn(G, S, E).astype(np.float32)
  std = np.log1p(np.exp(rng.randn(G, S, E))).astype(np.float32)
  noisy = clean + rng.randn(G, S, E).astype(np.float32) * std
  mask = np.ones((G, S), bool)
  mask[1, 9:] = False  # Padding counts towards neither sum.

  @jax.jit
  def stats(clean, noisy, std, mask):
    # Capacity 3 of 12 tokens' choices: dropped choices' gates must still count as importance.
    route = routing.tokens_choose_top_k(noisy, top_k=k, capacity=3, mask_GS=mask)
    noisy_stats = cv_balance.cv_stats(route.replace(clean_logits=clean, noise_std=std), k, mask)
    return route, noisy_stats, cv_balance.cv_stats(route, k, mask)

  route, got, hard = stats(*map(jnp.asarray, (clean, noisy, std, mask)))
  assert 0 < np.asarray(route.kept)[mask].mean() < 1
  importance, load = numpy_losses(clean.astype(np.float64), noisy.astype(np.float64),
                                  std.astype(np.float64), k, mask)
  np.testing.assert_allclose(got['importance_loss'], importance, rtol=1e-5)
  np.testing.assert_allclose(got['load_loss'], load, rtol=1e-5)
  # Without the noise (evaluation, other routers): CV^2 of the counts of assigned choices.
  index = np.asarray(route.expert_index)
  counts = [np.bincount(index[g][mask[g]].ravel(), minlength=E) for g in range(G)]
  np.testing.assert_allclose(hard['load_loss'], np.mean([cv2(c) for c in counts]), rtol=1e-5)
  np.testing.assert_allclose(hard['importance_loss'], importance, rtol=1e-5)


def jnp_losses(x, w, w_noise, normal, k):
  """The paper's formulas in jnp (sorts and a loop over experts, not the module's top-k trick):
  for the reference gradients."""
  clean = x @ w
  std = jax.nn.softplus(x @ w_noise)
  noisy = clean + normal * std
  E = clean.shape[-1]
  chosen = noisy >= jnp.sort(noisy, axis=-1)[..., -k:-k + 1]
  gates = jnp.where(chosen, jax.nn.softmax(noisy, axis=-1), 0.0)
  gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  prob = jnp.stack([
      0.5 * (1 + jax.scipy.special.erf(
          (clean[..., i] - jnp.sort(jnp.delete(noisy, i, axis=-1), axis=-1)[..., -k])
          / (std[..., i] * math.sqrt(2.0))))
      for i in range(E)], axis=-1)
  cv = lambda v: jnp.mean(jnp.var(v, axis=-1) / jnp.mean(v, axis=-1) ** 2)
  return jnp.stack([cv(jnp.sum(gates, axis=1)), cv(jnp.sum(prob, axis=1))])


def test_moe_layer_losses_and_their_gradients_to_gate_and_noise_weights():
  from conftest import tiny_model_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config(d_model=8, moe={'group_size': 16, 'router_noise': 'noisy_top_k'})
  moe_layer = moe_lib.MoeLayer(cfg, rngs=nnx.Rngs(0))
  moe_layer.noise_router[...] = jax.random.normal(jax.random.PRNGKey(4), (8, 4))
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 16, 8))
  rng = jax.random.PRNGKey(6)
  # MoeLayer.__call__ routes with the first half of its key, the noise from fold_in(that, 1).
  normal = jax.random.normal(jax.random.fold_in(jax.random.split(rng)[0], 1), (2, 16, 4))
  graphdef, params, rest = nnx.split(moe_layer, nnx.Param, ...)

  def layer_losses(p):
    _, stats = nnx.merge(graphdef, p, rest)(x, train=True, rng=rng)
    return jnp.stack([stats['importance_loss'], stats['load_loss']])

  @jax.jit
  def run(p):
    ref = lambda w, wn: jnp_losses(x, w, wn, normal, 2)
    return (layer_losses(p), jax.jacrev(layer_losses)(p), ref(p['router'], p['noise_router']),
            jax.jacrev(ref, argnums=(0, 1))(p['router'], p['noise_router']))

  got, grads, want, (want_w, want_wn) = run(nnx.to_pure_dict(params))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(np.asarray(got) > 0)
  for name, ref in (('router', want_w), ('noise_router', want_wn)):
    for j in range(2):  # Importance, load: each reaches both weights.
      assert np.abs(ref[j]).max() > 1e-4, (name, j)
      np.testing.assert_allclose(grads[name][j], ref[j], rtol=1e-4, atol=1e-6,
                                 err_msg=f'{name} {j}')


@pytest.mark.parametrize('overrides, message', [
    ({'load_loss_coef': 0.1}, "config.moe.load_loss_coef=0.1 is invalid: expected 0 unless "
                              "moe.router_noise='noisy_top_k' (it is 'none'"),
    ({'load_loss_coef': 0.1, 'router_noise': 'gumbel'}, "moe.router_noise='noisy_top_k' (it is "
                                                        "'gumbel'"),
    ({'load_loss_coef': 0.1, 'router_noise': 'noisy_top_k', 'router': 'hierarchical',
      'hierarchy': (2, 4)}, "config.moe.load_loss_coef=0.1 is invalid: expected 0 unless every "
                            "MoE layer routes with moe.router='tokens_choose'"),
    ({'importance_loss_coef': -1.0}, 'config.moe.importance_loss_coef=-1.0 is invalid'),
])
def test_bad_shazeer_loss_settings_are_refused_in_one_line(overrides, message):
  config = default.get_config()
  config.moe.update(overrides)
  with pytest.raises(ConfigError) as error:
    validate(config)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_training_loss_adds_both_losses_at_their_coefficients():
  config = default.get_config()
  config.moe.update(num_experts=4, top_k=2, expert_d_ff=16, group_size=16, every=2,
                    router_noise='noisy_top_k', importance_loss_coef=0.3, load_loss_coef=0.7)
  config.model.update(d_model=16, num_layers=2, num_heads=2, head_dim=8, d_ff=32)
  config.data.seq_len, config.batch_size = 8, 2
  cfg = config_lib.model_config(config)  # Validates: noisy_top_k allows the load loss.
  graphdef, params, buffers = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)),
                                        *layers.STATE_FILTERS)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 256)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': jnp.ones((2, 8))}
  loss, (metrics, _) = jax.jit(lambda p, b: losses.compute_loss(
      p, b, graphdef, batch, jax.random.PRNGKey(1), cfg))(params, buffers)
  others = (metrics['cross_entropy'] + cfg.moe.aux_loss_coef * metrics['balance_loss'] +
            cfg.moe.z_loss_coef * metrics['z_loss'])
  assert metrics['importance_loss'] > 0 and metrics['load_loss'] > 0
  np.testing.assert_allclose(loss - others, 0.3 * metrics['importance_loss'] +
                             0.7 * metrics['load_loss'], rtol=1e-4)
