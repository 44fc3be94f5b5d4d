"""The model seam: a config gives the model family's module, loss, eval step and batch keys."""

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax.models import factory as model_factory
from stmoe_jax.models.transformer import Transformer


def test_get_model_builds_the_decoder_and_its_state(tiny_model_cfg):
  model = model_factory.get_model(tiny_model_cfg())
  assert model.batch_keys == ('inputs', 'targets', 'weights')
  graphdef, params, buffers = model.abstract()
  assert isinstance(nnx.merge(graphdef, params, buffers), Transformer)
  init_params, init_buffers = model.init(jax.random.PRNGKey(0))
  assert jax.tree.structure(init_params) == jax.tree.structure(nnx.to_pure_dict(params))
  # The MoE layer's router bias is the one buffer: a Buffer, never a parameter.
  assert list(init_buffers['blocks']) == [1]
  assert 'router_bias' not in init_params['blocks'][1]['ffn']
  assert jnp.all(init_buffers['blocks'][1]['ffn']['router_bias'] == 0)


def test_the_loss_and_eval_step_take_the_batch_keys(tiny_model_cfg):
  model = model_factory.get_model(tiny_model_cfg(moe=dict(group_size=8)))
  graphdef, _, _ = model.abstract()
  params, buffers = model.init(jax.random.PRNGKey(0))
  batch = {k: jnp.ones((1, 8), jnp.float32 if k == 'weights' else jnp.int32)
           for k in model.batch_keys}
  (loss, (metrics, _)) = jax.eval_shape(
      lambda p, b: model.loss_fn(p, buffers, graphdef, b, jax.random.PRNGKey(0)), params, batch)
  assert loss.shape == () and metrics['cross_entropy'].shape == ()
  sums = jax.eval_shape(lambda p, b: model.eval_step(p, buffers, b, graphdef=graphdef),
                        params, batch)
  assert sums['ce_sum'].shape == () and sums['expert_load'].shape == (1, 4)
