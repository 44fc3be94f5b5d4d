"""Evaluation's reduction over batches, worked by hand; capacity-factor parsing."""

import numpy as np
import pytest

from stmoe_jax.train import evaluation
from stmoe_jax.moe import layer_stats


def batch_out(ce_sum, tokens, correct, num_bytes, routed, load):
  """One eval step's output for a model with one MoE layer of 2 experts, top-1."""
  stats = {name: np.zeros((1, *(2 if d in ('E', 'K+1') else 1 for d in shape)))
           for name, shape in layer_stats.MOE.items()}
  stats['expert_load'] = np.array([load])
  stats['dropped_fraction'] = np.array([0.5 * load[0]])
  # Tokens reaching 0 or 1 experts: the kept share of the choices.
  stats['experts_per_token'] = np.array([1 - 0.5 * load[0]])
  stats['experts_per_token_hist'] = np.array([[0.5 * load[0], 1 - 0.5 * load[0]]])
  return {'ce_sum': ce_sum, 'num_tokens': tokens, 'num_correct': correct,
          'num_bytes': num_bytes, 'num_routed': routed, **stats}


def test_evaluate_sums_and_weights_routing_stats_by_real_tokens(tiny_model_cfg):
  cfg = tiny_model_cfg()  # One MoE layer: layer 1.
  outs = [batch_out(10.0, 5, 2, 4, 6, [1.0, 0.0]), batch_out(20.0, 15, 6, 16, 2, [0.0, 1.0])]
  metrics = evaluation.evaluate(lambda out: out, outs, cfg)
  assert metrics['loss'] == 30.0 / 20
  assert metrics['bits_per_byte'] == pytest.approx(30.0 / np.log(2) / 20)
  assert metrics['accuracy'] == 8 / 20 and metrics['num_tokens'] == 20
  (layer,) = metrics['moe_layers']
  assert layer['layer'] == 1
  assert layer['expert_load'] == [0.75, 0.25]  # Weighted 6 : 2 by real tokens.
  assert layer['max_load_ratio'] == 1.5 and layer['dropped_fraction'] == 0.375
  assert layer['experts_per_token'] == 0.625 and layer['experts_per_token_hist'] == [0.375, 0.625]
  with pytest.raises(ValueError, match='no tokens'):
    evaluation.evaluate(lambda out: out, [], cfg)


def test_flops_report_counts_the_measured_experts_per_token(tiny_model_cfg):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from stmoe_jax.models import flops  # pylint: disable=g-import-not-at-top
  cfg, data = tiny_model_cfg(), tiny.get_config().data  # MoE layer 1: top-2 of 4 experts.
  report = evaluation.flops_report(cfg, data, [{'layer': 1, 'experts_per_token': 0.5}])
  nominal = flops.forward_flops_per_token(cfg, data.seq_len)
  assert report['forward_flops_per_token'] == nominal
  # 1.5 of the 2 experts' FLOPs unspent: each 2 * 3 (GEGLU) * d_model 16 * expert_d_ff 16.
  assert report['spent_forward_flops_per_token'] == nominal - 1.5 * 2 * 3 * 16 * 16


def test_capacity_factors():
  assert evaluation.parse_capacity_factors('1.0, 2,dropless') == [1.0, 2.0, 'dropless']
  with pytest.raises(ValueError, match="entry 'abc' is invalid"):
    evaluation.parse_capacity_factors('1.0,abc')


def test_with_eval_capacity(tiny_model_cfg):
  cfg = tiny_model_cfg()
  assert evaluation.with_eval_capacity(cfg, 0.5).moe.eval_capacity_factor == 0.5
  assert evaluation.with_eval_capacity(cfg, 'dropless').moe.dispatch == 'dropless'
