r"""Generates text from a train.py checkpoint with a KV cache (dropless MoE routing).

  python sample.py --workdir=runs/default --prompt="def " --max_new_tokens=200
  python sample.py --workdir=runs/default --prompt="import " --temperature=0 --step=425

Prints the prompt followed by the generated text. The logic lives in stmoe_jax.train.entry_points and
stmoe_jax.models.sampling.
"""

from absl import app
from absl import flags
from absl import logging

from stmoe_jax.train import checkpointing
from stmoe_jax.train import entry_points
from stmoe_jax import errors
from stmoe_jax.config import ConfigError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A train.py workdir.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue (read as the start of a file).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 200, 'Bytes to generate at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 = greedy.')
_TOP_P = flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass in (0, 1]; 1 = off.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.ERROR)  # Orbax warnings about steps we report ourselves.
  errors.quiet_orbax_errors()
  with errors.one_line_errors(ConfigError, OSError, ValueError, checkpointing.CheckpointError):
    text = entry_points.sample_workdir(
        _WORKDIR.value, _PROMPT.value, _MAX_NEW_TOKENS.value, step=_STEP.value,
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value)
  print(text)


if __name__ == '__main__':
  app.run(main)
