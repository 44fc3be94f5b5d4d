"""`model.scan_layers`: a scanned stack computes what the unscanned one computes with the same
(converted) parameters — loss, gradients, telemetry, buffer updates, decoding — its traced
program does not grow with depth, a scanned run resumes exactly, and checkpoints convert
between the layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from conftest import tiny_model_config
from stmoe_jax.models import layer_scan
from stmoe_jax.nn import layers
from stmoe_jax.models import losses
from stmoe_jax.analysis import specialization
from stmoe_jax.train import train_lib
from stmoe_jax.train import train_state
from stmoe_jax.config import ConfigError, check_resumable, validate
from stmoe_jax.models.transformer import Transformer, init_caches

B, L = 2, 16
# 4 layers, period 2 (MoE every 2nd layer, attention dense then local): U = 2 units. Router
# jitter and the bias balancer, so keys per layer and buffer updates must line up too.
CFG = tiny_model_config(num_layers=4, moe=dict(every=2, router_jitter=0.1, bias_balancer_rate=0.1),
                        attention=dict(layer_kinds='dense,local', window=4))
PERIOD = 2


def _split(cfg):
  graphdef, params, buffers = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), *layers.STATE_FILTERS)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


def _batch():
  tokens = np.random.default_rng(0).integers(0, 256, (B, L + 1), dtype=np.int32)
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
          'weights': jnp.ones((B, L), jnp.float32)}


def _loss_and_grads(cfg, params, buffers, graphdef):
  fn = lambda p: losses.compute_loss(p, buffers, graphdef, _batch(), jax.random.PRNGKey(1), cfg)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_stack_equals_unscanned_with_converted_params(remat):
  cfg = dataclasses.replace(CFG, remat=remat)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  graphdef, params, buffers = _split(cfg)
  scanned_graphdef = _split(scanned_cfg)[0]
  (loss, (metrics, new_buffers)), grads = _loss_and_grads(cfg, params, buffers, graphdef)
  (s_loss, (s_metrics, s_new_buffers)), s_grads = _loss_and_grads(
      scanned_cfg, layer_scan.to_scanned(params, PERIOD), layer_scan.to_scanned(buffers, PERIOD),
      scanned_graphdef)

  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  assert set(s_metrics) == set(metrics)
  for name in metrics:  # Per-layer telemetry in layer order, e.g. expert_load [M, E].
    np.testing.assert_allclose(s_metrics[name], metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
  assert metrics['expert_load'].shape == (2, 4)  # [M, E]: both MoE layers, in order.
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7),
               layer_scan.to_unscanned(s_grads, PERIOD), grads)
  # The bias balancer moved the router biases of both MoE layers, identically.
  moved = layer_scan.to_unscanned(s_new_buffers, PERIOD)
  assert all(np.abs(moved['blocks'][i]['ffn']['router_bias']).sum() > 0 for i in (1, 3))
  jax.tree.map(np.testing.assert_allclose, moved, jax.device_get(new_buffers))


def test_scanned_parameters_are_stacked_with_a_layers_axis():
  model = Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
  assert len(model.blocks) == PERIOD
  w_up = model.blocks[1].ffn.experts.w_up
  assert w_up.shape == (2, 4, 16, 16)  # [U, E, D, F]
  assert w_up.get_metadata()['out_sharding'] == ('layers', 'expert', 'embed', 'mlp')
  # Each unit draws its own initial values.
  assert not np.allclose(w_up[0], w_up[1])


def test_layout_conversion_round_trips_and_unscanned_model_matches():
  _, params, buffers = _split(CFG)
  for tree in (params, buffers):
    back = layer_scan.to_unscanned(layer_scan.to_scanned(tree, PERIOD), PERIOD)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
  # A stack that does not repeat every 1 layer (dense, MoE, ...) has no 1-layer scanned layout.
  with pytest.raises(layer_scan.LayoutError, match='^layer 1 differs from layer 0 in its '
                     'parameters: the stack does not repeat every 1 layers'):
    layer_scan.to_scanned(params, 1)
  scanned = Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
  plain = scanned.unscanned()
  assert len(plain.blocks) == 4 and not plain.scan_layers
  tokens = _batch()['inputs']
  forward = nnx.jit(lambda model: model(tokens)[0])
  np.testing.assert_allclose(forward(plain), forward(scanned), rtol=1e-5, atol=1e-6)
  # Routing capture hooks single layers: it runs on the unscanned copy and sees both layers.
  capture = nnx.jit(lambda model: specialization.capture_routing(model, tokens,
                                                                  jnp.ones_like(tokens)))
  expert_index, kept = capture(scanned)
  ref_index, ref_kept = capture(plain)
  assert expert_index.shape == (2, B, L, 2)
  np.testing.assert_array_equal(expert_index, ref_index)
  np.testing.assert_array_equal(kept, ref_kept)


def test_scanned_decoding_matches_unscanned():
  cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, group_size=1))
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  graphdef, params, buffers = _split(cfg)
  plain = nnx.merge(graphdef, params, buffers)
  scanned = nnx.merge(_split(scanned_cfg)[0], layer_scan.to_scanned(params, PERIOD),
                      layer_scan.to_scanned(buffers, PERIOD))
  caches = init_caches(scanned_cfg, 1, 12)
  assert len(caches) == PERIOD and caches[1].k.shape == (2, 1, 4, 2, 8)  # Local: window slots.
  prompt, plain_caches = jnp.asarray([[3, 1, 4, 1, 5, 9]]), init_caches(cfg, 1, 12)
  decode = nnx.jit(lambda model, tokens, caches: model.decode(tokens, caches))
  for step in range(3):  # The prompt, then single tokens past the local window.
    tokens = prompt if step == 0 else jnp.asarray([[step + 2]])
    logits, caches = decode(scanned, tokens, caches)
    ref, plain_caches = decode(plain, tokens, plain_caches)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(caches[1].k[1], plain_caches[3].k, rtol=1e-6)  # Layer 3 = (1, 1).


def _jaxpr_size(num_layers: int, scan: bool) -> int:
  cfg = dataclasses.replace(CFG, num_layers=num_layers, scan_layers=scan)
  graphdef, params, buffers = _split(cfg)
  fn = lambda p: losses.compute_loss(p, buffers, graphdef, _batch(), jax.random.PRNGKey(1), cfg)[0]
  return len(jax.make_jaxpr(jax.grad(fn))(params).eqns)


def test_scanned_program_does_not_grow_with_depth():
  # What XLA compiles: with scan, one unit's body whatever the depth; without, every layer.
  assert _jaxpr_size(8, scan=True) == _jaxpr_size(2, scan=True)
  assert _jaxpr_size(8, scan=False) > 3 * _jaxpr_size(2, scan=False)


def test_period_must_divide_the_layers():
  config = tiny.get_config()
  config.model.update(num_layers=3, scan_layers=True)
  with pytest.raises(ConfigError) as e:
    validate(config)
  assert str(e.value).startswith('config.model.num_layers=3 is invalid: expected a multiple of 2')


def test_optimizer_step_is_the_unscanned_one_per_layer():
  """Weight decay reads logical axes, so a scanned [U, D] norm scale is not a matrix; one AdamW
  step on converted parameters and gradients equals the unscanned step, converted."""
  config = tiny.get_config()
  config.model.update(num_layers=4, activation='geglu_mult_bias')
  config.opt.weight_decay = 0.5
  plain = train_state.place(config)
  config.model.scan_layers = True
  scanned = train_state.place(config)
  masks = [train_state.decay_mask(p.model.abstract()[1]) for p in (plain, scanned)]
  jax.tree.map(lambda m, ref: np.testing.assert_array_equal(np.broadcast_to(m, np.shape(ref)), ref),
               masks[1], layer_scan.to_scanned(masks[0], PERIOD))
  assert masks[1]['blocks'][0]['attn_norm']['scale'] is False
  assert masks[1]['blocks'][0]['attn']['w_q'] is True
  assert masks[1]['blocks'][1]['ffn']['experts']['mult_bias'] is False  # [U, E, F]: a bias.
  params, _ = plain.model.init(jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape),
                       params)
  step = lambda tx: jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])
  want = step(plain.tx)(params, grads)
  got = step(scanned.tx)(layer_scan.to_scanned(params, PERIOD),
                         layer_scan.to_scanned(grads, PERIOD))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               layer_scan.to_unscanned(got, PERIOD), want)
  config.opt.name = 'adafactor'
  with pytest.raises(ConfigError, match="config.opt.name='adafactor' is invalid"):
    validate(config)


def test_resuming_in_the_other_layout_is_refused_with_the_way_to_convert():
  saved, config = tiny.get_config(), tiny.get_config()
  config.model.scan_layers = True
  with pytest.raises(ConfigError) as e:
    check_resumable(config, saved, '/runs/x/config.json')
  assert str(e.value) == (
      "config.model.scan_layers=True differs from False in the run saved at /runs/x/config.json; "
      'use a new --workdir to train a different model (or, to go on from these weights in the '
      'other layer layout, start one with --config.init_from=/runs/x; its optimizer starts fresh)')


def _scanned_trainer(stdlib_data_dir, workdir, **model):
  config = tiny.get_config()
  config.data.data_dir = stdlib_data_dir
  config.model.update(num_layers=4, **model)
  config.moe.bias_balancer_rate = 1e-3
  return train_lib.Trainer(config, workdir)


def test_scanned_run_resumes_exactly(stdlib_data_dir, tmp_path):
  trainer = _scanned_trainer(stdlib_data_dir, str(tmp_path), scan_layers=True)
  state, data = trainer.init(), trainer.train_iterator()
  losses_seen = []
  for step in range(1, 5):
    state, metrics = trainer.train_step(state, trainer.global_batch(next(data)))
    losses_seen.append(float(metrics['loss']))
    if step == 2:
      trainer.checkpointer.save(2, state, data.get_state(), force=True)
      trainer.checkpointer.wait()
  restored, data_state = trainer.checkpointer.restore(2, trainer.abstract_state)
  resumed_data = trainer.train_iterator()
  resumed_data.set_state(data_state)
  resumed = []
  for _ in range(2):
    restored, metrics = trainer.train_step(restored, trainer.global_batch(next(resumed_data)))
    resumed.append(float(metrics['loss']))
  assert resumed == losses_seen[2:]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
               jax.device_get(state.params))

