r"""Trains an ST-MoE language model; resumes from the newest checkpoint in --workdir.

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/default.py --workdir=runs/e16 --config.moe.num_experts=16

The logic lives in stmoe_jax.train_lib so that notebooks can import it.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from stmoe_jax import train_lib
from stmoe_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
