"""`model.scan_layers` and `model.remat` in the encoder-decoder: both stacks scanned compute what
the unscanned model computes with the same (converted) parameters — loss, gradients, per-stack
telemetry, router-bias updates, cached decoding and sampling — and every remat policy gives
the loss and gradients of none."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import t5_stmoe
from conftest import tiny_model_config
from stmoe_jax.train import entry_points
from stmoe_jax.train import finetune
from stmoe_jax.models import layer_scan
from stmoe_jax.models import factory as model_factory
from stmoe_jax.models import sampling
from stmoe_jax.train import train_state
from stmoe_jax.config import validate
from stmoe_jax.data import tokenizer
from stmoe_jax.models.encoder_decoder import init_caches

B, T, L = 2, 16, 8
PERIOD = 1
# 2 + 2 layers, every FFN MoE: each stack scans 2 units of one layer. Router jitter and
# the bias balancer, so per-layer keys (redrawn alike by remat's recomputation) and buffer
# updates must line up too; the encoder's MoE layers route by expert choice (its own K).
CFG = tiny_model_config(architecture='encoder_decoder', num_encoder_layers=2, num_layers=2,
                        vocab_size=261, moe=dict(every=1, group_size=16, router_jitter=0.1,
                                                 bias_balancer_rate=0.1,
                                                 encoder_router='expert_choice'))
SCANNED = dataclasses.replace(CFG, scan_layers=True)


def _batch():
  rng = np.random.default_rng(0)
  enc = rng.integers(3, 256, (B, T)).astype(np.int32)
  enc[1, T - 3:] = tokenizer.PAD_ID  # Padding: hidden from attention, never routed.
  dec = rng.integers(3, 261, (B, L + 1)).astype(np.int32)
  return {'encoder_inputs': jnp.asarray(enc), 'decoder_inputs': jnp.asarray(dec[:, :-1]),
          'targets': jnp.asarray(dec[:, 1:]), 'weights': jnp.ones((B, L), jnp.float32)}


def _loss_and_grads(cfg, params, buffers):
  model = model_factory.get_model(cfg)
  graphdef = model.abstract()[0]
  fn = lambda p: model.loss_fn(p, buffers, graphdef, _batch(), jax.random.PRNGKey(1))
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)


@pytest.fixture(scope='module')
def plain():
  """Unscanned parameters and buffers, and their loss, metrics, new buffers and gradients
  without remat: the reference."""
  params, buffers = model_factory.get_model(CFG).init(jax.random.PRNGKey(0))
  return params, buffers, _loss_and_grads(CFG, params, buffers)


def _assert_same_step(got, want, convert=lambda t: t):
  (loss, (metrics, new_buffers)), grads = got
  (ref_loss, (ref_metrics, ref_buffers)), ref_grads = want
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert set(metrics) == set(ref_metrics)
  for name in ref_metrics:  # Per-stack telemetry in layer order, e.g. expert_load/encoder [M, E].
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-7,
                               err_msg=name)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7),
               convert(grads), ref_grads)
  jax.tree.map(np.testing.assert_allclose, convert(jax.device_get(new_buffers)),
               jax.device_get(ref_buffers))


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_scanned_stacks_equal_unscanned_with_converted_params(plain, remat):
  params, buffers, want = plain
  cfg = dataclasses.replace(SCANNED, remat=remat)
  scanned = layer_scan.to_scanned(params, PERIOD)
  # [U, E, D, F]: each stack's block 0 stacked over 2 units.
  assert scanned['encoder_blocks'][0]['ffn']['experts']['w_up'].shape == (2, 4, 16, 16)
  assert scanned['decoder_blocks'][0]['cross']['w_k'].shape[0] == 2
  got = _loss_and_grads(cfg, scanned, layer_scan.to_scanned(buffers, PERIOD))
  _assert_same_step(got, want, lambda t: layer_scan.to_unscanned(t, PERIOD))
  (_, (metrics, new_buffers)), _ = want
  # Both MoE layers of each stack, in layer order: expert choice's K = E choices in the encoder.
  assert metrics['expert_load/encoder'].shape == metrics['expert_load/decoder'].shape == (2, 4)
  assert metrics['dropped_fraction_per_slot/encoder'].shape == (2, 4)
  # The balancer moved the router biases of every MoE layer of both stacks.
  for stack in ('encoder_blocks', 'decoder_blocks'):
    assert all(np.abs(new_buffers[stack][i]['ffn']['router_bias']).sum() > 0 for i in (0, 1))


@pytest.mark.parametrize('policy', ['moe_save_dispatched'])
def test_remat_policies_equal_no_remat(plain, policy):
  params, buffers, want = plain
  _assert_same_step(_loss_and_grads(dataclasses.replace(CFG, remat=policy), params, buffers), want)


def test_layout_conversion_names_the_stack_and_unscanned_copy_matches():
  model = model_factory.get_model(SCANNED).make(rngs=nnx.Rngs(0))
  copy = model.unscanned()
  assert len(copy.encoder_blocks) == len(copy.decoder_blocks) == 2 and not copy.scan_layers
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(copy)),
               layer_scan.to_unscanned(nnx.to_pure_dict(nnx.state(model)), PERIOD))
  params, _ = model_factory.get_model(CFG).init(jax.random.PRNGKey(0))
  back = layer_scan.to_unscanned(layer_scan.to_scanned(params, PERIOD), PERIOD)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(layer_scan.LayoutError, match='^encoder_blocks layer 1 differs from layer 0'):
    dense_first = dict(params, encoder_blocks={**params['encoder_blocks'], 0: {'x': jnp.ones(2)}})
    layer_scan.to_scanned(dense_first, 1)
  assert jax.tree.structure(layer_scan.relayout(params, CFG, SCANNED)) == jax.tree.structure(
      nnx.to_pure_dict(model_factory.get_model(SCANNED).abstract()[1]))


def test_scanned_decoding_and_sampling_match_unscanned():
  params, buffers = model_factory.get_model(CFG).init(jax.random.PRNGKey(2))
  layouts = {'plain': (CFG, (params, buffers)),
             'scanned': (SCANNED, (layer_scan.to_scanned(params, PERIOD),
                                   layer_scan.to_scanned(buffers, PERIOD)))}
  samplers = {k: sampling.EncoderDecoderSampler(c, T, L) for k, (c, _) in layouts.items()}
  # Through the sampler's own compiled steps (the shapes it generates with: no extra compiles):
  # cross caches of one padded input, a [BOS, sentinel 0] prompt, then single tokens.
  enc = _batch()['encoder_inputs'][1:]
  crosses, caches, logits = {}, {}, {}
  for k, (_, variables) in layouts.items():
    crosses[k] = samplers[k]._encode(variables, enc)
    caches[k] = init_caches(samplers[k].cfg, 1, L)
  assert len(crosses['scanned']) == len(caches['scanned']) == PERIOD
  assert crosses['scanned'][0].k.shape == (2, 1, T, 2, 8)  # [U, B, T, H, K]
  np.testing.assert_allclose(crosses['scanned'][0].k[1], crosses['plain'][1].k, rtol=1e-5,
                             atol=1e-6)  # Layer 1 = unit 1.
  for tokens in ([[tokenizer.BOS_ID, tokenizer.VOCAB_SIZE]], [[70]], [[71]]):
    for k, (_, variables) in layouts.items():
      logits[k], caches[k] = samplers[k]._decode(variables, jnp.asarray(tokens), caches[k],
                                                 crosses[k])
    np.testing.assert_allclose(logits['scanned'], logits['plain'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(caches['scanned'][0].k[1], caches['plain'][1].k, rtol=1e-5,
                             atol=1e-6)
  # Generation: the same greedy tokens (spans re-encoded) from either layout's model.
  prompt = [tokenizer.BOS_ID, *tokenizer.encode('def f(x):').tolist()]
  tokens = [samplers[k].generate_tokens(p, prompt, 8, temperature=0.0, buffers=b).tolist()
            for k, (_, (p, b)) in layouts.items()]
  assert tokens[0] and tokens[0] == tokens[1]


def test_t5_config_scans_and_rematerializes():
  config = t5_stmoe.get_config('size=tiny')
  config.model.update(scan_layers=True, remat='full')
  validate(config)  # Refused before; an encoder not a multiple of the period still is
  # (test_encoder_decoder.test_bad_encoder_decoder_configs_are_refused).


def _t5_placement(scan_layers: bool, **moe):
  config = t5_stmoe.get_config('size=tiny')  # 2 + 2 layers, MoE in FFN 1 of each stack.
  config.model.scan_layers = scan_layers
  config.moe.update(**moe)
  config.mesh = {'data': 1, 'expert': 1, 'model': 1}
  return config, train_state.place(config)


def _record(config, workdir) -> str:
  """A workdir holding only `config`'s config.json: all `finetune.plan` reads."""
  workdir.mkdir()
  entry_points.record_config(config, str(workdir), 0, lambda line: None)
  return str(workdir)


def test_init_from_plans_across_layouts_in_both_stacks(tmp_path):
  """`finetune.plan` (what `init_from` copies) reads a checkpoint of the other layout: every
  parameter of both stacks is found after `layer_scan.relayout`, and a dense scanned run's
  FFNs upcycle into either stack's MoE layers (the checkpoint's block 1 % P)."""
  source, _ = _t5_placement(True)
  the_plan = finetune.plan(_record(source, tmp_path / 'scanned'), _t5_placement(False)[1])
  assert the_plan.actions and all(a == ('copy', n) for n, a in the_plan.actions.items())
  assert 'encoder_blocks/1/ffn/router' in the_plan.actions
  dense, _ = _t5_placement(True, every=0)  # Period 1: one scanned block per stack.
  target = _t5_placement(False, expert_d_ff=dense.model.d_ff, num_shared_experts=0)[1]
  the_plan = finetune.plan(_record(dense, tmp_path / 'dense'), target)
  assert set(the_plan.upcycled) == {'encoder_blocks/1/ffn', 'decoder_blocks/1/ffn'}
  assert the_plan.actions['decoder_blocks/1/ffn/experts/w_up'] == ('experts',
                                                                   'decoder_blocks/1/ffn/w_up')
