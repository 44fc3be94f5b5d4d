"""Multi-device checks run by tests/test_sharding.py in a subprocess with 8 fake CPU devices.

One process pays JAX start-up once and checks every mesh: for each dispatch strategy the loss
and gradients of one step equal the single-device ones; parameters and optimizer moments are
sharded as the rules declare; the compiled expert-parallel step contains an all-to-all. Prints
one JSON line of results; assertion failures exit non-zero with the message.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from stmoe_jax.models import losses
from stmoe_jax.train import train_lib
from stmoe_jax.config import ConfigError

MESHES = [{'data': 8}, {'expert': 8}, {'data': 2, 'expert': 4},
          {'data': 2, 'expert': 2, 'model': 2}, {'fsdp': 2, 'expert': 2, 'model': 2}]
# Scatter on every mesh; einsum and dropless on the two meshes that exercise most (compiles on
# 8 fake CPU devices are slow).
STRATEGIES = {0: ('scatter',), 1: ('scatter', 'einsum', 'dropless'), 2: ('scatter',),
              3: ('scatter', 'einsum', 'dropless'), 4: ('scatter',)}
RTOL, ATOL = 1e-5, 1e-6  # float32; reductions are split differently across shards.
# Routing is global and every router's `Routing` takes the same exchange, so instead of more
# compiles einsum runs the DeepSeek-V3 gating options and dropless the hierarchical router
# (tests/test_gating.py): their noise, sampled policy and per-level or per-sequence losses must
# match one device's too. Scatter keeps the plain top-2 router. Balancing is over the global
# batch (issue #30), and each token shard holds one routing group, so a value computed per
# shard would be the per-group one: scatter's balance loss has balance_scope='global' (weighted
# up so that its gradient shows in the router's) and the bias balancer re-centred; einsum sets
# its bias by quantile balancing (its sort over the tokens is resharded by an all-to-all, so it
# runs on the meshes that have one anyway).
STRATEGY_ROUTING = {
    'scatter': dict(balance_scope='global', aux_loss_coef=0.1, bias_balancer_rate=1e-3,
                    bias_balancer_recenter=True),
    'einsum': dict(score_fn='sigmoid', routed_scaling_factor=2.5, n_groups=4, topk_groups=2,
                   seq_aux_loss_coef=1e-2, router_noise='gumbel', threshold_train=(0.3,),
                   quantile_balance_rate=0.5),
    'dropless': dict(router='hierarchical', hierarchy=(4, 2), hierarchy_outer_k=2,
                     router_noise='noisy_top_k'),
}


def make_config(mesh: dict, strategy: str):
  config = tiny.get_config()
  config.mesh = {'data': 1, 'expert': 1, 'model': 1, **mesh}
  # 8 sequences of 32 tokens in groups of 32: 8 routing groups, one per token shard.
  config.batch_size = 8
  config.model.vocab_size = 260  # The vocab dim is split over 'model'.
  config.model.num_layers = 1  # One block, and it is MoE.
  config.moe.every = 1
  config.moe.update(num_experts=8, group_size=32, dispatch=strategy,
                    **STRATEGY_ROUTING[strategy])
  if strategy != 'scatter':  # SwiGLU experts (Mixtral, OLMoE, Qwen) through the exchanges too.
    config.model.activation = 'swiglu'
  if strategy != 'dropless':  # Capacity: the capacity-based paths' options.
    config.moe.update(train_capacity_factor=1.0, min_capacity=2)
  return config


def make_batch(config):
  rng = np.random.default_rng(0)
  shape = (config.batch_size, config.data.seq_len)
  inputs = rng.integers(3, 259, shape, dtype=np.int32)
  return {'inputs': inputs, 'targets': np.roll(inputs, -1, axis=1),
          'weights': np.ones(shape, np.float32)}


def loss_and_grads(trainer, state, batch):
  """Jitted value_and_grad of the train loss under the trainer's shardings: (loss, metrics,
  grads, compiled HLO, the buffers the forward pass left (routing biases))."""
  loss_fn = lambda params, buffers, batch, rng: losses.compute_loss(
      params, buffers, trainer.graphdef, batch, rng, trainer.model_cfg)
  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
               in_shardings=(trainer.state_shardings.params, trainer.state_shardings.buffers,
                             trainer.batch_sharding, None))
  args = (state.params, state.buffers, trainer.global_batch(batch), jax.random.PRNGKey(1))
  compiled = fn.lower(*args).compile()
  (loss, (metrics, buffers)), grads = compiled(*args)
  hlo = compiled.as_text()
  return float(loss), metrics, jax.device_get(grads), hlo, jax.device_get(buffers)


def config_errors() -> dict[str, str]:
  """The ConfigError message of each bad setting; Trainer() raises before compiling anything."""
  bad = {
      'num_experts': ({'expert': 4}, lambda c: c.moe.update(num_experts=6, top_k=2)),
      'batch_size': ({'data': 8}, lambda c: setattr(c, 'batch_size', 4)),
      'mesh': ({'data': 4, 'expert': 4}, lambda c: None),
      'logical_axis_rules': ({'data': 8}, lambda c: c.logical_axis_rules.append(('exprt', None))),
      'groups': ({'expert': 8}, lambda c: c.moe.update(group_size=64)),
  }
  messages = {}
  for key, (mesh, change) in bad.items():
    config = make_config(mesh, 'scatter')
    change(config)
    try:
      train_lib.Trainer(config, '/nonexistent')
      messages[key] = 'no error'
    except ConfigError as e:
      messages[key] = str(e)
  return messages


def main():
  results, refs = {'errors': config_errors()}, {}
  for strategy in ('scatter', 'einsum', 'dropless'):
    config = make_config({}, strategy)
    ref = train_lib.Trainer(config, '/nonexistent')
    ref_state = ref.init()
    refs[strategy] = loss_and_grads(ref, ref_state, make_batch(config))
    if strategy == 'scatter':
      host_params = jax.device_get(ref_state.params)
  expert_grads = refs['scatter'][2]['blocks'][0]['ffn']['experts']['w_up']
  # Nonzero expert gradients, so a missing or extra 1/world_size factor could not pass.
  assert np.all(np.abs(expert_grads).max(axis=(1, 2)) > 1e-6), 'an expert got no gradient'
  for i, mesh in enumerate(MESHES):
    state = None
    for strategy in STRATEGIES[i]:
      name = f'{strategy}:' + ','.join(f'{k}={v}' for k, v in mesh.items())
      trainer = train_lib.Trainer(make_config(mesh, strategy), '/nonexistent')
      if state is None:
        state = trainer.init()
        check_state(state, mesh, host_params, name)
      elif strategy == 'dropless':  # The hierarchical router has an outer and a noise router.
        state = trainer.init()
      ref_loss, ref_metrics, ref_grads, _, ref_buffers = refs[strategy]
      batch = make_batch(trainer.config)
      loss, metrics, grads, hlo, buffers = loss_and_grads(trainer, state, batch)
      # The same loss, dropped fraction and gradients as one device, within float32 tolerance.
      np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg=name)
      for key in ('dropped_fraction', 'balance_loss', 'seq_balance_loss', 'z_loss'):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=RTOL, err_msg=name)
      jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=ATOL,
                                                           err_msg=name), grads, ref_grads)
      # The routing bias after the step (quantile balancing, the bias balancer): one device's.
      jax.tree.map(lambda b, r: np.testing.assert_allclose(b, r, rtol=1e-5, atol=ATOL,
                                                           err_msg=name), buffers, ref_buffers)
      all_to_all = 'all-to-all' in hlo
      if strategy != 'dropless':  # Dropless exchanges by all-gather and reduce-scatter.
        assert all_to_all == (mesh.get('expert', 1) > 1), (name, all_to_all)
      bias = buffers['blocks'][0]['ffn']['router_bias']
      results[name] = {'loss': loss, 'ref_loss': ref_loss, 'all_to_all': all_to_all,
                       'dropped_fraction': float(metrics['dropped_fraction']),
                       'balance_loss': float(metrics['balance_loss']),
                       'ref_balance_loss': float(ref_metrics['balance_loss']),
                       'seq_balance_loss': float(metrics['seq_balance_loss']),
                       'router_bias': np.asarray(bias).tolist(),
                       'max_bias_err': float(np.max(np.abs(
                           bias - ref_buffers['blocks'][0]['ffn']['router_bias']))),
                       'max_grad_err': max(float(np.max(np.abs(g - r))) for g, r in zip(
                           jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))}
  results['scanned'] = check_scanned()
  print(json.dumps(results))


def check_grouped_matmuls() -> dict:
  """Every grouped-matmul backend that runs under expert parallelism, inside
  shard_map(check_vma=True) on a data=2 x expert=2 mesh (rows split over both axes, weights
  over 'expert'), against a numpy loop: outputs and the weight gradient, which sums over the
  'data' shards. Returns {backend: max relative error}."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from stmoe_jax.moe import grouped_matmul as gmm  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('data', 'expert'))
  rows, E, D, F = 24, 4, 8, 16  # Rows per shard; 2 local experts per shard.
  rng = np.random.RandomState(0)
  x = rng.randn(4 * rows, D).astype(np.float32)
  w = rng.randn(E, D, F).astype(np.float32)
  sizes = rng.multinomial(rows - 3, [0.5, 0.5], size=4).astype(np.int32)  # 3 rows in no group.
  y_ref, dw_ref = np.zeros((4 * rows, F)), np.zeros(w.shape)
  for shard in range(4):  # Shard (data, expert) = divmod(shard, 2) holds experts 2e, 2e + 1.
    start = shard * rows
    for j, n in enumerate(sizes[shard]):
      e = 2 * (shard % 2) + j
      y_ref[start:start + n] = x[start:start + n] @ w[e]
      dw_ref[e] += x[start:start + n].T @ (2 * y_ref[start:start + n])  # d sum(y^2) / dw.
      start += n
  rows_spec, put = PartitionSpec(('data', 'expert')), lambda a, s: jax.device_put(
      a, NamedSharding(mesh, s))
  args = (put(x, rows_spec), put(w, PartitionSpec('expert')), put(sizes.reshape(-1), rows_spec))
  errors = {}
  for name, backend in gmm.BACKENDS.items():
    if not backend.in_shard_map:
      continue
    run = jax.shard_map(lambda x, w, g, name=name: gmm.grouped_matmul(x, w, g, impl=name, block=4),
                        mesh=mesh, in_specs=(rows_spec, PartitionSpec('expert'), rows_spec),
                        out_specs=rows_spec, check_vma=True)
    y = jax.jit(run)(*args)
    dw = jax.jit(jax.grad(lambda x, w, g: jnp.sum(run(x, w, g) ** 2), 1))(*args)
    errors[name] = max(float(np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref))),
                       float(np.max(np.abs(dw - dw_ref)) / np.max(np.abs(dw_ref))))
  return errors


def check_scanned():
  """model.scan_layers under FSDP x expert x model: stacked parameters keep the 'layers' dim
  whole and shard the rest as unscanned ones; loss and gradients equal one device's."""
  def scanned_config(mesh):
    config = make_config(mesh, 'scatter')
    config.model.update(num_layers=2, scan_layers=True)  # Period 1: a scan over 2 units.
    return config
  ref = train_lib.Trainer(scanned_config({}), '/nonexistent')
  ref_loss, _, ref_grads, _, _ = loss_and_grads(ref, ref.init(), make_batch(ref.config))
  mesh = {'fsdp': 2, 'expert': 2, 'model': 2}
  trainer = train_lib.Trainer(scanned_config(mesh), '/nonexistent')
  state = trainer.init()
  w_up = state.params['blocks'][0]['ffn']['experts']['w_up']
  assert w_up.shape == (2, 8, 32, 32), w_up.shape
  assert w_up.sharding.spec == PartitionSpec(None, 'expert', 'fsdp', 'model'), w_up.sharding
  loss, _, grads, hlo, _ = loss_and_grads(trainer, state, make_batch(trainer.config))
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, err_msg='scanned')
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=ATOL,
                                                       err_msg='scanned'), grads, ref_grads)
  assert 'all-to-all' in hlo and 'while' in hlo, 'scanned: no all-to-all or no loop'
  return {'loss': loss, 'ref_loss': ref_loss}


def check_state(state, mesh, host_params, name):
  """Initial parameters as on one device, sharded as declared; Adam moments like params."""
  jax.tree.map(np.testing.assert_array_equal, host_params, jax.device_get(state.params))
  w_up = state.params['blocks'][0]['ffn']['experts']['w_up']
  assert w_up.sharding.spec == PartitionSpec('expert', 'fsdp', 'model'), (name, w_up.sharding)
  shard = tuple(w_up.addressable_shards[0].data.shape)
  assert shard == (8 // mesh.get('expert', 1), 32 // mesh.get('fsdp', 1),
                   32 // mesh.get('model', 1)), (name, shard)
  # FSDP (ZeRO-3): every parameter has a model dim, split over 'fsdp', so each device holds
  # 1/fsdp of the parameters that the expert and model axes leave whole.
  for path, p in jax.tree_util.tree_leaves_with_path(state.params):
    spec = [a for entry in p.sharding.spec if entry
            for a in (entry if isinstance(entry, tuple) else (entry,))]
    assert 'fsdp' in spec, (name, path, p.sharding.spec)
    split = np.prod([mesh.get(a, 1) for a in spec])
    assert p.addressable_shards[0].data.size * split == p.size, (name, path)
  adam = state.opt_state[1][0]
  for moment in (adam.mu, adam.nu):
    jax.tree.map(lambda m, p: assert_same_sharding(m, p, name), moment, state.params)


def assert_same_sharding(moment, param, name):
  assert isinstance(moment.sharding, NamedSharding), name
  assert moment.sharding.spec == param.sharding.spec, (name, moment.sharding, param.sharding)


if __name__ == '__main__':
  if sys.argv[1:] == ['--grouped']:
    print(json.dumps(check_grouped_matmuls()))
  else:
    main()
