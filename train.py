r"""Trains an ST-MoE language model; resumes from the newest checkpoint in --workdir.

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/default.py --workdir=runs/e16 --config.moe.num_experts=16

Multi-host (docs/scaling.md): run the same command on every host, adding
  --distributed                        TPU pods, SLURM, Open MPI: JAX finds the cluster itself;
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   anywhere else
(or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

The logic lives in stmoe_jax.train.train_lib so that notebooks can import it.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from stmoe_jax.train import checkpointing
from stmoe_jax import errors
from stmoe_jax.train import guards
from stmoe_jax.train import train_lib
from stmoe_jax.train import workdir
from stmoe_jax.config import ConfigError
from stmoe_jax.data import input_pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() before anything else (implied by '
    '--coordinator_address or JAX_COORDINATOR_ADDRESS); alone, JAX detects TPU/SLURM/MPI.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS', ''),
    'host:port of process 0, for multi-process runs (default $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', int(os.environ.get('JAX_NUM_PROCESSES', 0)) or None,
    'Number of processes in a multi-process run (default $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', (int(os.environ['JAX_PROCESS_ID']) if 'JAX_PROCESS_ID' in os.environ
                   else None),
    'This process\'s index in [0, num_processes) (default $JAX_PROCESS_ID).')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
  """jax.distributed.initialize when asked, before any JAX computation creates a backend."""
  if not (_DISTRIBUTED.value or _COORDINATOR.value):
    return
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value or None,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def parse_flags(argv):
  """absl flag parsing, with a bad --config.x override or config file (a syntax error, a bad
  value, an unknown preset) reported in one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # Anything may fail while a config file loads (its own code runs here): all user errors.
    if os.environ.get(errors.TRACEBACK_ENV):
      raise
    first = errors.innermost(e)
    config_arg = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), None)
    if config_arg and not isinstance(first, (flags.Error, AttributeError, KeyError, TypeError,
                                             ValueError)):
      sys.exit(f'error: {errors.config_file_error(config_arg, e)}')
    bad = [a for a in argv[1:] if a.startswith('--config')] or argv[1:]
    why = (f'config has no field {first.args[0]!r}' if type(first) is KeyError and first.args
           else errors.one_line(e))
    sys.exit(f'error: bad flag among {bad}: {why}')


def load_config():
  """The --config ConfigDict; exits with one line if its file fails to load in any way."""
  try:
    config = _CONFIG.value
    config.get('seed')  # A config file that failed to load raises on first use.
    if not isinstance(config, ml_collections.ConfigDict):
      raise ConfigError(f'get_config() returned a {type(config).__name__}, not a ConfigDict')
    return config
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get(errors.TRACEBACK_ENV):
      raise
    sys.exit(f'error: {errors.config_file_error(flags.FLAGS["config"].config_filename, e)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax/TFDS info and warning lines (e.g. about a damaged step we report ourselves) would
  # bury the progress bar and the one line that matters.
  logging.set_verbosity(logging.ERROR)
  errors.quiet_orbax_errors()
  config = load_config()
  initialize_distributed()
  # Every failure the library can name exits 1 with one line (OSError: e.g. a full disk while
  # writing metrics); SIGTERM saves and exits 0.
  with errors.one_line_errors(ConfigError, OSError, checkpointing.CheckpointError,
                              guards.NonFiniteError, input_pipeline.DataError,
                              workdir.WorkdirError):
    train_lib.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
