"""Model FLOPs per token worked by hand for a tiny config; MFU arithmetic."""

import dataclasses

from stmoe_jax.models import flops


def test_forward_flops_by_hand(tiny_model_cfg):
  cfg = tiny_model_cfg()  # Layer 0 dense FFN, layer 1 MoE (4 experts, top-2), GEGLU.
  D, HK, L, V = 16, 16, 10, 259
  attention = 2 * 4 * D * HK + 2 * 2 * HK * L
  dense_ffn = 2 * 3 * D * 32
  moe_ffn = 2 * D * 4 + 2 * (2 * 3 * D * 16)  # Router + the top-2 experts.
  assert flops.forward_flops_per_token(cfg, L) == 2 * D * V + 2 * attention + dense_ffn + moe_ffn
  assert flops.train_flops_per_token(cfg, L) == 3 * flops.forward_flops_per_token(cfg, L)
  # Measured experts per token of MoE layer 1 (drops, null experts, ReLU routing): 1.25 of
  # the top-2 experts' FLOPs; a layer not in the map counts top_k.
  nominal = flops.forward_flops_per_token(cfg, L)
  assert flops.forward_flops_per_token(cfg, L, experts_per_token={('', 1): 1.25}) == (
      nominal - 0.75 * 2 * 3 * D * 16)
  assert flops.forward_flops_per_token(cfg, L, experts_per_token={('', 0): 1.25}) == nominal
  dense = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, enabled=False))
  # The FLOP-matched dense layer: width top_k * expert_d_ff, no router.
  assert (flops.forward_flops_per_token(cfg, L) - flops.forward_flops_per_token(dense, L) ==
          2 * D * 4)
  # Grouped-query attention: one key/value head of 8 instead of 2 in each of the 2 layers.
  gqa = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, num_kv_heads=1))
  assert (flops.forward_flops_per_token(cfg, L) - flops.forward_flops_per_token(gqa, L) ==
          2 * (2 * 2 * D * 8))


def test_peak_and_utilization():
  assert flops.peak_flops_per_device('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops_per_device('cpu') is None
  assert flops.model_flops_utilization(1000.0, 1e9, 4e12) == 0.25
  assert flops.model_flops_utilization(1000.0, 1e9, None) is None
