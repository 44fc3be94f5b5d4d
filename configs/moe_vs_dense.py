r"""The arms of the MoE-vs-dense study (experiments/moe_vs_dense.py; README "Results").

  python train.py --config=configs/moe_vs_dense.py:arm=stmoe16 --workdir=runs/mvd/stmoe16
  python train.py --config=configs/moe_vs_dense.py:arm=dense,size=quick --workdir=/tmp/q

Every arm is configs/default.py's model (4 layers, d_model 128, layers 1 and 3 MoE) with the
same active FLOPs per token: each MoE layer's token runs top_k experts of width 512 / top_k, and
the dense arm runs one FFN of width 512 there.
  dense     no experts;
  switch16  Switch: top-1 of 16 experts of width 512, router jitter 1e-2, no z-loss;
  stmoe8    ST-MoE: top-2 of 8 experts of width 256, z-loss 1e-3;
  stmoe16   ST-MoE: top-2 of 16 experts of width 256, z-loss 1e-3.
All MoE arms train at capacity factor 1.25 and evaluate at 2.0 (ST-MoE). size=full: 500 steps
of 64 x 64 bytes (2M tokens), validation loss on 20 fixed batches every 50 steps. size=quick:
one layer of configs/stmoe.py's tiny model, 20 steps: a smoke test of the study.
"""

from configs import common
from configs import default

ARMS = ('dense', 'switch16', 'stmoe8', 'stmoe16')
SIZES = ('full', 'quick')
# Hidden units a token passes through in each MoE layer, whatever the arm (equal active FLOPs).
ACTIVE_FFN_WIDTH = {'full': 512, 'quick': 64}


def get_config(arg: str | None = None):
  """Returns the config of one study arm: `arg` = 'arm=<arm>[,size=full|quick]'."""
  arg = common.parse_arg(arg, arm='stmoe16', size='full')
  if arg.arm not in ARMS:
    raise ValueError(f'config argument arm={arg.arm!r} is invalid: expected one of {ARMS}')
  if arg.size not in SIZES:
    raise ValueError(f'config argument size={arg.size!r} is invalid: expected one of {SIZES}')
  config = default.get_config()
  config.update(num_train_steps=500, log_every_steps=50, eval_every_steps=50, eval_batches=20,
                checkpoint_every_steps=500, keep_checkpoints=1, eval_sample_tokens=0)
  if arg.size == 'quick':  # One layer, and it is the MoE one: the least to compile.
    config.data.seq_len = 32
    config.model.update(d_model=32, num_layers=1, num_heads=2, head_dim=16, d_ff=64)
    config.moe.update(group_size=64, every=1)
    config.opt.update(lr=1e-2, warmup_steps=4)
    config.update(batch_size=8, num_train_steps=20, log_every_steps=10, eval_every_steps=10,
                  eval_batches=2, checkpoint_every_steps=20)
  width = ACTIVE_FFN_WIDTH[arg.size]
  moe = config.moe
  moe.update(train_capacity_factor=1.25, eval_capacity_factor=2.0)
  if arg.arm == 'dense':
    moe.update(enabled=False, top_k=2, expert_d_ff=width // 2)  # Dense FFN width top_k * d_ff.
  elif arg.arm == 'switch16':
    moe.update(num_experts=16, top_k=1, expert_d_ff=width, router_jitter=1e-2, z_loss_coef=0.0)
  else:
    moe.update(num_experts=int(arg.arm.removeprefix('stmoe')), top_k=2, expert_d_ff=width // 2,
               z_loss_coef=1e-3)
  return config
