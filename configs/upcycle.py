r"""Sparse upcycling (Komatsuzaki et al. 2023): a dense model, then an MoE model started from it.

stage=dense: configs/default.py with every FFN dense (GEGLU, width 256). stage=moe: the same
model with every FFN an MoE of 8 experts of width 256, top-2; with init_from a stage=dense
workdir, every expert starts as a copy of the FFN it replaces and the routers fresh
(docs/finetuning.md). Without init_from, the same MoE from scratch.

  python train.py --config=configs/upcycle.py:stage=dense --workdir=runs/dense_ffn
  python train.py --config=configs/upcycle.py:stage=moe --workdir=runs/upcycled \
      --config.init_from=runs/dense_ffn
  python train.py --config=configs/upcycle.py:stage=moe --workdir=runs/moe_scratch
"""

from configs import common
from configs import default


def get_config(arg: str | None = None):
  """The dense model (stage=dense) or its upcycling target (stage=moe)."""
  args = common.parse_arg(arg, stage='dense')
  if args.stage not in ('dense', 'moe'):
    raise ValueError(f"config argument stage={args.stage!r} is invalid: expected 'dense' or 'moe'")
  config = default.get_config()
  if args.stage == 'dense':
    config.moe.every = 0  # No MoE layer: every FFN dense, width model.d_ff.
  else:
    config.moe.update(num_experts=8, top_k=2, expert_d_ff=config.model.d_ff)
  return config
