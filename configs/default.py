r"""Default ST-MoE byte-level language model on the embedded stdlib corpus.

The MoE-vs-dense study's best arm (docs/results.md): d_model 64, 2 layers, every FFN a
fine-grained MoE (top-8 of 64 experts of width 32, DeepSeekMoE-style), a 10x balance loss,
warmup-stable-decay at 3e-3. Sized for 2 CPU cores; configs/dense.py is its equal-active-FLOPs
twin. Every other option keeps its declared default (docs/options.md).

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/default.py --workdir=runs/e16 --config.moe.num_experts=16
  python eval.py --workdir=runs/default
"""

import ml_collections

from stmoe_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration: the declared defaults with the changes below."""
  config = config_lib.defaults()
  # A model that trains in minutes on 2 CPU cores (~0.4M parameters, 8x active in the FFNs).
  model = config.model
  model.d_model = 64
  model.num_layers = 2
  model.num_heads = 2
  model.head_dim = 32
  model.d_ff = 256  # Only configs/dense.py's twin has dense FFNs; kept at 4 x d_model.
  moe = config.moe
  moe.every = 1  # Both FFNs are MoE: with 2 layers, every=2 would leave one.
  # Fine-grained experts (DeepSeekMoE, OLMoE): top-8 of 64 experts of width 32 has the active
  # FLOPs of a dense FFN of width 256, and beat top-2 of 8 or 16 per step in the study.
  moe.num_experts = 64
  moe.top_k = 8
  moe.expert_d_ff = 32
  moe.group_size = 512  # 8 sequences of 64 bytes per routing group.
  moe.aux_loss_coef = 0.1  # The study's routing stage: 0.1 beat Switch's 1e-2 at this size.
  return config
