"""The three dispatch strategies against a naive per-token loop over experts (outputs and grads).

The loop is written here in jnp, one token and one chosen expert at a time, so that jax.grad
gives reference gradients for the router, the expert weights and the input. Tolerance: float32
round-off of differently ordered sums, rtol 2e-4 / atol 2e-6.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from configs import default
from stmoe_jax.moe import grouped_matmul as gmm
from stmoe_jax.nn import layers
from stmoe_jax.config import ConfigError, validate
from stmoe_jax.moe.dispatch import DISPATCHES
from stmoe_jax.moe.layer import MoeLayer

RTOL, ATOL = 2e-4, 2e-6


def layer_cfg(activation='geglu', **moe_overrides):
  return tiny_model_config(d_model=8, head_dim=4, d_ff=16, activation=activation,
                           moe={'group_size': 8, 'eval_capacity_factor': 8.0, **moe_overrides})


def top_k_experts(params, x_BLD, k):
  """Each token's k most probable experts, in numpy: [T, k]."""
  logits = np.asarray(x_BLD, np.float64).reshape(-1, x_BLD.shape[-1]) @ np.asarray(
      params['router'], np.float64)
  return np.argsort(-logits, axis=-1, kind='stable')[:, :k]


def loop_moe(params, x_BLD, chosen_TK, renormalize):
  """y_t = sum over t's chosen experts e of gate_e * FFN_e(x_t), one token at a time."""
  x = x_BLD.reshape(-1, x_BLD.shape[-1])
  experts = params['experts']
  k = chosen_TK.shape[1]
  rows = []
  for x_t, chosen in zip(x, chosen_TK):
    probs = jax.nn.softmax(x_t @ params['router'])
    gates = probs[chosen]
    if renormalize and k > 1:
      gates = gates / jnp.sum(gates)
    y_t = jnp.zeros_like(x_t)
    for e, g in zip(chosen, gates):
      h = x_t @ experts['w_up'][e]
      if 'w_gate' in experts:
        h = jax.nn.gelu(x_t @ experts['w_gate'][e]) * h
        if 'mult_bias' in experts:
          h = h * experts['mult_bias'][e]
      else:
        h = jax.nn.gelu(h)
      y_t = y_t + g * (h @ experts['w_down'][e])
    rows.append(y_t)
  return jnp.stack(rows).reshape(x_BLD.shape)


@pytest.mark.parametrize('k,activation,renormalize', [(1, 'gelu', True), (2, 'geglu', True),
                                                      (3, 'geglu_mult_bias', False)])
def test_every_dispatch_matches_the_loop_in_outputs_and_gradients(k, activation, renormalize,
                                                                  monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8))
  reference = None
  for dispatch, grouped, block_rows in (
      ('einsum', 'auto', 0), ('scatter', 'auto', 0), ('dropless', 'ragged_dot', 0),
      ('dropless', 'blocked', 4)):  # Block 4: several blocks per expert.
    monkeypatch.setattr(gmm, 'BLOCK_ROWS', block_rows or 64)
    cfg = layer_cfg(activation, top_k=k, renormalize_gates=renormalize, dispatch=dispatch,
                    grouped_matmul=grouped)
    name = f'{dispatch} {grouped} {block_rows}'
    layer = MoeLayer(cfg, rngs=nnx.Rngs(k))
    graphdef, params, buffers = nnx.split(layer, *layers.STATE_FILTERS)
    params = nnx.to_pure_dict(params)
    if 'mult_bias' in params['experts']:  # Not all ones, so that a missing bias would show.
      params['experts']['mult_bias'] = 1 + jax.random.uniform(jax.random.PRNGKey(2), (4, 16))

    def layer_loss(params, x):
      y, stats = nnx.merge(graphdef, params, buffers)(x, train=False)
      return jnp.sum(jnp.sin(3 * y)), (y, stats)

    # One compiled program per path: op-by-op dispatch compiles every primitive on its own.
    (_, (y, stats)), (g_params, g_x) = jax.jit(
        jax.value_and_grad(layer_loss, (0, 1), has_aux=True))(params, x)
    assert float(stats['dropped_fraction']) == 0.0
    if reference is None:  # Same init seed: every dispatch sees the same parameters.
      chosen = top_k_experts(params, x, k)
      loop_loss = lambda p, x: jnp.sum(jnp.sin(3 * loop_moe(p, x, chosen, renormalize)))
      reference = (loop_moe(params, x, chosen, renormalize),
                   jax.jit(jax.grad(loop_loss, (0, 1)))(params, x))
    y_ref, (g_params_ref, g_x_ref) = reference
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(g_x, g_x_ref, rtol=RTOL, atol=ATOL, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL,
                                                         err_msg=name),
                 g_params, g_params_ref)


def test_dropless_keeps_what_capacity_drops():
  # Identical tokens all choose the same two experts: capacity 1 keeps one token, dropless all.
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(3), (8,)), (1, 8, 8))
  outputs = {}
  for dispatch in ('scatter', 'dropless'):
    cfg = layer_cfg(dispatch=dispatch, train_capacity_factor=0.01)
    layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
    y, stats = layer(x, train=True)
    outputs[dispatch] = (np.asarray(y[0]), float(stats['dropped_fraction']))
  y_scatter, dropped_scatter = outputs['scatter']
  y_dropless, dropped_dropless = outputs['dropless']
  assert dropped_scatter == 7 / 8 and dropped_dropless == 0.0
  np.testing.assert_allclose(y_dropless[0], y_scatter[0], rtol=1e-5)  # The first token: kept by both.
  np.testing.assert_array_equal(y_scatter[1:], 0.0)
  np.testing.assert_allclose(y_dropless[1:], np.broadcast_to(y_dropless[0], (7, 8)), rtol=1e-5)


def test_einsum_and_scatter_drop_exactly_the_same_choices():
  # Capacity at half the load: many choices drop; both paths must drop the same ones and give
  # the same outputs and gradients.
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 8, 8))
  results = []
  for dispatch in ('einsum', 'scatter'):
    layer = MoeLayer(layer_cfg(dispatch=dispatch, train_capacity_factor=0.5), rngs=nnx.Rngs(0))
    graphdef, params, buffers = nnx.split(layer, *layers.STATE_FILTERS)
    kept = layer.route(jnp.reshape(x, (4, 8, 8)), train=True, rng=None, mask_GS=None).kept

    def loss(params, x):
      y, stats = nnx.merge(graphdef, params, buffers)(x, train=True)
      return jnp.sum(jnp.sin(y)), stats

    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
    results.append((np.asarray(kept), value, stats, grads))
  (k1, v1, s1, g1), (k2, v2, s2, g2) = results
  assert float(s1['dropped_fraction']) > 0.2
  np.testing.assert_array_equal(k1, k2)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_config_accepts_exactly_the_registered_dispatch_paths():
  config = default.get_config()
  for name in DISPATCHES:
    config.moe.dispatch = name
    validate(config)
  config.moe.dispatch = 'gather'
  with pytest.raises(ConfigError, match="expected one of 'einsum', 'scatter', 'dropless'"):
    validate(config)
  assert [d.uses_capacity for d in DISPATCHES.values()] == [True, True, False]


def numpy_gelu(x):
  """jax.nn.gelu's default tanh approximation."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize('router', [
    # DeepSeek-V3: sigmoid scores, 2 groups of 2 experts with 1 eligible, gates times 2.5, and
    # an eval threshold that leaves some second choices unrouted.
    dict(score_fn='sigmoid', routed_scaling_factor=2.5, n_groups=2, topk_groups=1,
         second_policy_eval='threshold', threshold_eval=(0.45,), seq_aux_loss_coef=1e-4),
    dict(router='hierarchical', hierarchy=(2, 2), hierarchy_outer_k=2),  # 2 groups, 1 in each.
])
def test_every_dispatch_runs_the_gating_options_choices(router):
  """Whatever the router chose (its choices are checked against numpy in test_gating.py), the
  three dispatch paths send each routed choice to its expert with its gate: the output equals
  sum_k gate_k * FFN_{e_k}(x) over the routed choices, in numpy."""
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8))
  expected = None
  for dispatch in DISPATCHES:
    layer = MoeLayer(layer_cfg(dispatch=dispatch, **router), rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(layer)

    @jax.jit
    def forward(state, x):
      model = nnx.merge(graphdef, state)
      route = model.route(x.reshape(2, 8, 8), train=False, rng=None, mask_GS=None)
      return model(x, train=False)[0], route

    y, route = forward(state, x)
    if expected is None:  # Same init seed: every dispatch has the same experts and router.
      assigned = np.asarray(route.assigned)
      assert np.all(np.asarray(route.kept) == assigned) and 0.5 < assigned.mean()
      if 'threshold_eval' in router:
        assert assigned.mean() < 1
      w = {k: np.asarray(v[...], np.float64) for k, v in
           (('up', layer.experts.w_up), ('gate', layer.experts.w_gate),
            ('down', layer.experts.w_down))}
      xs = np.asarray(x, np.float64).reshape(16, 8)
      e_TK = np.asarray(route.expert_index).reshape(16, -1)
      g_TK = np.asarray(route.gate, np.float64).reshape(16, -1) * assigned.reshape(16, -1)
      h_TKF = (numpy_gelu(np.einsum('td,tkdf->tkf', xs, w['gate'][e_TK])) *
               np.einsum('td,tkdf->tkf', xs, w['up'][e_TK]))
      expected = np.einsum('tk,tkf,tkfd->td', g_TK, h_TKF, w['down'][e_TK]).reshape(2, 8, 8)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=1e-5, err_msg=dispatch)
