r"""Dense baseline with the same active FLOPs per token as configs/default.py.

Each layer that is MoE in the default config becomes a dense FFN whose hidden width is
top_k * expert_d_ff, so a token does the same matmul work as in the MoE model.

  python train.py --config=configs/dense.py --workdir=runs/dense
"""

from configs import default


def get_config():
  """Returns the FLOP-matched dense configuration."""
  config = default.get_config()
  config.moe.enabled = False
  config.opt.lr = 1.5e-3  # Dense's own best rate in the study's sweep (the MoE's is 6e-3).
  return config
