r"""Switch Transformer presets: top-1 routing, `size=tiny|small|base|1b` as in configs/stmoe.py.

  python train.py --config=configs/switch.py:size=small --workdir=runs/switch_small
  python train.py --config=configs/switch.py:size=tiny --workdir=runs/switch_tiny

Switch (Fedus et al. 2021) differs from ST-MoE in the router: each token goes to its single most
probable expert, weighted by that raw probability (section 2.1); capacity factor 1.0 in training
(section 2.2, table 1); multiplicative router-input jitter 1e-2 (mesh-tf's `switch_jitter`
default); load-balancing loss 1e-2 and no z-loss (the z-loss came with ST-MoE).
"""

from configs import stmoe


def get_config(arg: str | None = None):
  """Returns the top-1 Switch config for `arg` = 'size=<tiny|small|base|1b>[,runlocal]'."""
  config = stmoe.get_config(arg)
  config.moe.update(top_k=1, train_capacity_factor=1.0, eval_capacity_factor=2.0,
                    router_jitter=0.01, aux_loss_coef=1e-2, z_loss_coef=0.0)
  return config
