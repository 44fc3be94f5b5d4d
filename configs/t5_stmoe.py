r"""Encoder-decoder ST-MoE presets (the paper's setting: T5 span corruption), `size=tiny|small|base`,
optionally `runlocal` (a few steps, for a smoke test), or `task=func_name` (fine-tuning, below).

  python train.py --config=configs/t5_stmoe.py:size=tiny --workdir=runs/t5_tiny
  python eval.py --workdir=runs/t5_tiny
  python sample.py --workdir=runs/t5_tiny --prompt="def " --temperature=0
  python train.py --config=configs/t5_stmoe.py:size=small --workdir=runs/t5_small
  python train.py --config=configs/t5_stmoe.py:size=base --workdir=$RUNS/t5_base

Span corruption (noise density 0.15, mean span 3) turns every `data.seq_len`-byte encoder input
into a decoder target of masked spans; the vocabulary is the bytes plus one sentinel per span
(`span_corruption.lengths`). tiny: 2 + 2 layers, d_model 32, 4 experts in every 2nd FFN of
each stack, 40 steps of 8 x 32 encoder bytes: under a minute on a 2-core CPU. small: 2 + 2
layers of d_model 64, every FFN 64 experts top-8 of width 32 (configs/default.py's fine-grained
arm), 64-byte encoder inputs. base: 8 + 8 layers, d_model 512, 32 experts of width 1024 in every
4th FFN (ST-MoE's spacing), 512-byte inputs, batch 256, bfloat16: for an accelerator. The
encoder may route non-causally, e.g. --config.moe.encoder_router=expert_choice or
--config.moe.encoder_batch_prioritized_routing=True; moe.enabled=False gives the dense twin at
equal active FLOPs.

task=func_name[,trainable=all|non_moe|moe_only|attention]: the same size's model (vocabulary
included, so its span-corruption run loads with init_from) fine-tuned on stdlib_func_name, body
to the encoder, name to the decoder (`tasks.seq2seq_example`); without init_from, the task from
scratch. Encoder inputs grow to 128 bytes (tiny, small), which makes the decoder 32 long.

  python train.py --config=configs/t5_stmoe.py:size=tiny,task=func_name,trainable=non_moe \
      --workdir=runs/t5_tiny_ft --config.init_from=runs/t5_tiny
"""

from configs import common
from configs import default
from stmoe_jax.data.tasks import TASKS
from stmoe_jax.data import span_corruption
from stmoe_jax.data import tokenizer

SIZES = ('tiny', 'small', 'base')


def get_config(arg: str | None = None):
  """Returns the encoder-decoder config for `arg` =
  'size=<tiny|small|base>[,runlocal][,task=func_name[,trainable=<finetune.trainable>]]'."""
  arg = common.parse_arg(arg, size='tiny', runlocal=False, task='lm', trainable='all')
  if arg.size not in SIZES:
    raise ValueError(f'config argument size={arg.size!r} is invalid: expected one of {SIZES}')
  config = default.get_config()
  config.data.objective = 'span_corruption'
  config.model.architecture = 'encoder_decoder'
  if arg.size == 'tiny':
    config.data.seq_len = 32
    config.model.update(d_model=32, num_encoder_layers=2, num_layers=2, num_heads=2,
                        head_dim=16, d_ff=64)
    # 8 x 8 decoder and 8 x 32 encoder tokens a batch: one routing group of each per batch.
    config.moe.update(num_experts=4, top_k=2, expert_d_ff=32, every=2, group_size=64,
                      encoder_group_size=256, aux_loss_coef=1e-2)
    config.opt.update(lr=1e-2, warmup_steps=4, schedule='cosine', final_lr_fraction=0.1)
    config.update(batch_size=8, num_train_steps=40, log_every_steps=5, eval_every_steps=20,
                  eval_batches=4, checkpoint_every_steps=20, keep_checkpoints=2,
                  eval_sample_tokens=16)
  elif arg.size == 'small':
    config.data.seq_len = 64
    config.model.update(num_encoder_layers=2, num_layers=2)  # default.py's width and experts.
    config.moe.update(group_size=512, encoder_group_size=512)
    config.update(batch_size=32)
  else:
    config.data.seq_len = 512
    config.model.update(d_model=512, num_encoder_layers=8, num_layers=8, num_heads=8,
                        head_dim=64, d_ff=2048, dtype='bfloat16')
    config.moe.update(num_experts=32, top_k=2, every=4, expert_d_ff=1024, group_size=1024,
                      encoder_group_size=1024, aux_loss_coef=1e-2)
    config.opt.update(lr=1e-3, warmup_steps=1000, schedule='cosine', final_lr_fraction=0.1)
    config.update(batch_size=256, num_train_steps=50_000, log_every_steps=100,
                  eval_every_steps=2000, eval_batches=100, checkpoint_every_steps=2000)
  shape = span_corruption.lengths(config.data.seq_len, config.data.noise_density,
                                  config.data.mean_noise_span_length)
  config.model.vocab_size = tokenizer.VOCAB_SIZE + shape.num_sentinels
  if arg.task != 'lm':  # After vocab_size: the pre-trained model's, sentinels included.
    config.data.update(task=arg.task, name=TASKS.get(arg.task) or config.data.name,
                       seq_len=max(config.data.seq_len, 128))
    config.finetune.trainable = arg.trainable
    config.update(eval_batches=0, eval_sample_tokens=0)  # All validation; exact match says it.
    if arg.size == 'tiny':
      config.opt.update(lr=3e-3, warmup_steps=10)
      config.update(num_train_steps=300, log_every_steps=25, eval_every_steps=100,
                    checkpoint_every_steps=100)
  if arg.runlocal:  # Same model, a handful of small steps: checks a config end to end.
    config.update(num_train_steps=10, log_every_steps=5, eval_every_steps=10, eval_batches=2,
                  checkpoint_every_steps=10)
  return config
