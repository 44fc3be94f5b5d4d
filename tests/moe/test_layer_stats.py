"""The one definition of the per-layer stats: stacking over layers, empty values, the model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmoe_jax.moe import layer_stats
from stmoe_jax.config import AttentionConfig, MoeConfig
from stmoe_jax.models.transformer import Transformer

DIMS = (('E', 4), ('K', 2), ('K+1', 3), ('H', 3))


def moe_report(value: float) -> dict:
  sizes = dict(DIMS)
  return {name: jnp.full([sizes[d] for d in shape], value)
          for name, shape in layer_stats.MOE.items()}


def test_stack_over_moe_dense_and_head_routed_layers():
  head = {'balance_loss': 1.0, 'z_loss': 2.0, 'dropped_fraction': 0.5,
          'head_load': jnp.ones(3) / 3, 'logit_z_loss': 7.0, 'max_load_ratio': 1.0}
  per_layer = [{'moe': {}, 'attention': {}},  # Dense FFN, plain dense attention.
               {'moe': moe_report(1.0), 'attention': {'logit_z_loss': 3.0}},
               {'moe': moe_report(2.0), 'attention': head}]
  stats = layer_stats.stack(per_layer, DIMS)
  assert stats['expert_load'].shape == (2, 4) and stats['dropped_fraction_per_slot'].shape == (2, 2)
  np.testing.assert_array_equal(stats['balance_loss'], [1.0, 2.0])
  np.testing.assert_array_equal(stats['attn_logit_z_loss'], [0.0, 3.0, 7.0])  # 0: not computed.
  assert stats['attn_head_load'].shape == (1, 3) and stats['attn_dropped_fraction'].shape == (1,)
  assert 'attn_max_load_ratio' not in stats  # Only the HEAD_ROUTING stats are kept.
  expected = ({*layer_stats.MOE} | {'attn_' + n for n in layer_stats.ATTENTION} |
              {'attn_' + n for n in layer_stats.HEAD_ROUTING})
  assert set(stats) == expected


def test_no_moe_layers_give_empty_stats_of_the_right_shapes():
  stats = layer_stats.stack([{'moe': {}, 'attention': {}}], DIMS)
  assert stats['expert_load'].shape == (0, 4) and stats['router_bias'].shape == (0, 4)
  assert stats['dropped_fraction_per_slot'].shape == (0, 2) and stats['z_loss'].shape == (0,)
  assert stats['experts_per_token_hist'].shape == (0, 3)
  assert stats['attn_head_load'].shape == (0, 3)


def test_the_model_reports_exactly_the_defined_stats(tiny_model_cfg):
  cfg = dataclasses.replace(
      tiny_model_cfg(num_layers=2), moe=MoeConfig(num_experts=4, top_k=2, group_size=8),
      attention=AttentionConfig(layer_kinds='dense,head_routed', head_top_k=1))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  _, stats = jax.eval_shape(lambda t: model(t), jnp.zeros((2, 8), jnp.int32))
  sizes = dict(layer_stats.dims(cfg))
  for name, shape in layer_stats.MOE.items():
    assert stats[name].shape == (1, *(sizes[d] for d in shape)), name
  assert stats['attn_logit_z_loss'].shape == (2,) and stats['attn_head_load'].shape == (1, 2)
