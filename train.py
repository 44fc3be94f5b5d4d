r"""Trains an ST-MoE language model; resumes from the newest checkpoint in --workdir.

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/default.py --workdir=runs/e16 --config.moe.num_experts=16

The logic lives in stmoe_jax.train_lib so that notebooks can import it.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stmoe_jax import checkpointing
from stmoe_jax import guards
from stmoe_jax import train_lib
from stmoe_jax.config import ConfigError
from stmoe_jax.data import input_pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).replace('\\n', ' ').replace("\\'", '').replace("'", '').split())


def parse_flags(argv):
  """absl flag parsing, with a bad --config.x override reported in one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    bad = [a for a in argv[1:] if a.startswith('--config.')] or argv[1:]
    sys.exit(f'error: bad flag among {bad}: {_one_line(e)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax/TFDS info lines would bury the progress bar.
  try:
    config = _CONFIG.value
    config.get('seed')  # A config file that failed to load raises on first use.
  except OSError as e:
    sys.exit(f'error: {_one_line(e)}')
  # Every failure the library can name exits 1 with one line; SIGTERM saves and exits 0.
  try:
    train_lib.train_and_evaluate(config, _WORKDIR.value)
  except (ConfigError, FileNotFoundError, checkpointing.CheckpointError, guards.NonFiniteError,
          input_pipeline.DataError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
