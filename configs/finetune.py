r"""Fine-tuning on the stdlib_func_name task (function body -> function name): the default
model, or with `from=W` the model of workdir W (an imported Hugging Face checkpoint).

The model is configs/default.py's, so the default pre-trained run loads into it; without
init_from the same config trains on the task from scratch (the baseline). The decoder-only
model reads each example as one prefix-LM row `[BOS] body [EOS] name [EOS]`, loss on the name
only; eval reports exact match (docs/finetuning.md).

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/finetune.py --workdir=runs/ft --config.init_from=runs/default
  python train.py --config=configs/finetune.py:trainable=non_moe --workdir=runs/ft_non_moe \
      --config.init_from=runs/default
  python train.py --config=configs/finetune.py --workdir=runs/ft_scratch

`from=W[:<step>]` starts from W's config.json instead of default.py's (the checkpoint's model
whatever its sizes, its tokenizer and data directory) and sets init_from=W; this file's task
and schedule go on top (docs/open_models.md):

  python -m stmoe_jax.convert --from_hf=path/to/mixtral --workdir=runs/mixtral
  python train.py --config=configs/finetune.py:from=runs/mixtral,trainable=non_moe \
      --workdir=runs/mixtral_ft
"""

from configs import common
from configs import default


def get_config(arg: str | None = None):
  """default.py, or `from=`'s model, on the func_name task; `trainable=` one of
  finetune.trainable's values."""
  args = common.parse_arg(arg, trainable='all', **{'from': ''})
  if args['from']:
    config = common.workdir_config(args['from'])
    config.init_from = args['from']
  else:
    config = default.get_config()
  config.data.update(task='func_name', name='stdlib_func_name', seq_len=128)
  config.finetune.trainable = args.trainable
  config.batch_size = 32  # 4096 tokens per step, as in pre-training; one example per row.
  config.opt.update(lr=1e-3, warmup_steps=20)
  config.num_train_steps = 300
  config.log_every_steps = 25
  config.eval_every_steps = 100
  config.eval_batches = 0  # The whole validation split: 991 functions (CPython 3.11).
  config.checkpoint_every_steps = 100
  config.eval_sample_tokens = 0  # A text sample means little here; exact match says it.
  return config
