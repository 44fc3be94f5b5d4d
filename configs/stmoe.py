r"""ST-MoE presets: `size=tiny|small|base|1b`, optionally `runlocal` (a few steps: a smoke test).

  python train.py --config=configs/stmoe.py:size=tiny --workdir=runs/stmoe_tiny
  python train.py --config=configs/stmoe.py:size=small --workdir=runs/stmoe_small
  python train.py --config=configs/stmoe.py:size=base --workdir=$RUNS/stmoe_base
  python train.py --config=configs/stmoe.py:size=base,runlocal --workdir=/tmp/smoke

tiny: 2 layers, d_model 32, 4 experts, 40 steps of 4 x 32 bytes: seconds on a CPU (the notebook's
model). small: configs/default.py, sized for 2 CPU cores (~5 minutes). base: 8 layers,
d_model 512, 32 experts of width 1024 in every 4th layer (ST-MoE's spacing), 512-byte windows,
batch 256, bfloat16: meant for an accelerator. 1b: about 1B parameters (~0.37B active), 24
layers, d_model 1024, 32 experts of width 1152 in every 4th layer, top-2, 1024-byte windows,
batch 256, bfloat16 compute over float32 master weights, full remat over scanned layers (6 units
of 4), meant for 16 accelerators
with FSDP x expert parallelism (docs/scaling.md; `benchmarks/scale.py` compiles it on 16
simulated CPU devices to show it fits):

  python train.py --config=configs/stmoe.py:size=1b --workdir=$RUNS/stmoe_1b \
    --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.expert=4

Any field can still be overridden with --config.<field>=<value>.
"""

from configs import common
from configs import default

SIZES = ('tiny', 'small', 'base', '1b')


def get_config(arg: str | None = None):
  """Returns the ST-MoE config for `arg` = 'size=<tiny|small|base|1b>[,runlocal]'."""
  arg = common.parse_arg(arg, size='small', runlocal=False)
  if arg.size not in SIZES:
    raise ValueError(f'config argument size={arg.size!r} is invalid: expected one of {SIZES}')
  config = default.get_config()
  if arg.size == 'tiny':
    config.data.seq_len = 32
    config.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64)
    config.moe.update(num_experts=4, top_k=2, expert_d_ff=32, group_size=64, every=2,
                      aux_loss_coef=1e-2)
    config.opt.update(lr=1e-2, warmup_steps=4, schedule='cosine', final_lr_fraction=0.1)
    config.update(batch_size=4, num_train_steps=40, log_every_steps=5, eval_every_steps=20,
                  eval_batches=4, checkpoint_every_steps=20, keep_checkpoints=2)
  elif arg.size == 'base':
    config.data.seq_len = 512
    config.model.update(d_model=512, num_layers=8, num_heads=8, head_dim=64, d_ff=2048,
                        dtype='bfloat16')
    config.moe.update(num_experts=32, top_k=2, every=4, expert_d_ff=1024, group_size=1024,
                      aux_loss_coef=1e-2)
    config.opt.update(lr=1e-3, warmup_steps=1000, schedule='cosine', final_lr_fraction=0.1)
    config.update(batch_size=256, num_train_steps=50_000, log_every_steps=100,
                  eval_every_steps=2000, eval_batches=100, checkpoint_every_steps=2000)
  elif arg.size == '1b':
    config.data.seq_len = 1024
    config.model.update(d_model=1024, num_layers=24, num_heads=16, head_dim=64, d_ff=4096,
                        dtype='bfloat16', param_dtype='float32', remat='full', scan_layers=True)
    config.moe.update(num_experts=32, top_k=2, every=4, expert_d_ff=1152, group_size=1024,
                      aux_loss_coef=1e-2)
    config.opt.update(lr=1e-3, warmup_steps=2000, schedule='cosine', final_lr_fraction=0.1)
    config.update(batch_size=256, num_train_steps=100_000, log_every_steps=100,
                  eval_every_steps=5000, eval_batches=100, checkpoint_every_steps=2000)
  if arg.runlocal:  # Same model, a handful of small steps: checks a config end to end.
    config.update(num_train_steps=10, log_every_steps=5, eval_every_steps=10, eval_batches=2,
                  checkpoint_every_steps=10)
    config.batch_size = max(8, config.moe.group_size // config.data.seq_len)
  return config
