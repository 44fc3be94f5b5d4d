r"""A seconds-long ST-MoE config for tests and smoke runs (same code paths as default.py).

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

from configs import default


def get_config():
  """Returns default.py shrunk to a 2-layer, 4-expert model on 4 x 32-token batches."""
  config = default.get_config()
  config.data.seq_len = 32
  config.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64)
  config.moe.update(num_experts=4, top_k=2, expert_d_ff=32, group_size=64, every=2,
                    aux_loss_coef=1e-2)
  config.opt.update(lr=1e-2, warmup_steps=2, schedule='cosine', final_lr_fraction=0.1)
  config.batch_size = 4
  config.num_train_steps = 8
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.eval_batches = 2
  config.checkpoint_every_steps = 4
  config.keep_checkpoints = 2
  config.eval_sample_tokens = 0  # No sampler compile in every test run.
  return config
