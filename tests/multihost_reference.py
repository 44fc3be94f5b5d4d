"""Reference for tests/test_multihost.py: the two-process run's steps in one process.

One process with 8 devices builds each global batch as the two processes would (process i
loads documents i::2, the global batch is process 0's rows then process 1's) and runs the same
jitted train step. Prints the per-step losses as one JSON list. Args: data_dir num_steps.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from configs import tiny
from stmoe_jax.train import train_lib
from stmoe_jax.data import input_pipeline

# The run both sides train: tiny, 8 experts over all 8 devices (the all-to-all crosses the
# process boundary), a global batch of 8, a loss logged every step.
OVERRIDES = {'mesh.data': 1, 'mesh.expert': 8, 'moe.num_experts': 8, 'moe.group_size': 32,
             'batch_size': 8, 'num_train_steps': 3, 'log_every_steps': 1,
             'eval_every_steps': 3, 'eval_batches': 1, 'checkpoint_every_steps': 3}


def flags(data_dir: str) -> list[str]:
  """train.py flags for the same config."""
  return ['--config=configs/tiny.py', f'--config.data.data_dir={data_dir}',
          *(f'--config.{k}={v}' for k, v in OVERRIDES.items())]


def main(data_dir: str, num_steps: int):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  for key, value in OVERRIDES.items():
    section, _, field = key.rpartition('.')
    setattr(config[section] if section else config, field, value)
  trainer = train_lib.Trainer(config, '/nonexistent')
  kwargs = trainer.data_kwargs(config.data.train_split)
  iterators = [input_pipeline.make_train_iterator(
      **{**kwargs, 'batch_size': config.batch_size // 2, 'process_index': i,
         'process_count': 2}, seed=config.seed) for i in range(2)]
  state, losses = trainer.init(), []
  for _ in range(num_steps):
    parts = [next(it) for it in iterators]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, metrics = trainer.train_step(state, trainer.global_batch(batch))
    losses.append(float(metrics['loss']))
  print(json.dumps(losses))


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
