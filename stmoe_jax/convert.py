r"""Hugging Face checkpoints to train.py workdirs and back (stmoe_jax/train/convert.py).

  python -m stmoe_jax.convert --from_hf=DIR --workdir=W [--check]
  python -m stmoe_jax.convert --to_hf --workdir=W --out=DIR [--step=S] [--check]

Llama, Mixtral, OLMoE and Qwen3-MoE (config.json model_type); fields our options do not express
(rope_scaling, clip_qkv, mlp_only_layers, sliding windows, ...) are refused in one line.
`--check` prints one JSON line with the largest absolute logit difference against
`transformers` on a fixed batch (exit status 2 when torch or transformers is not importable).
"""

import sys

from absl import app
from absl import flags
from absl import logging

from stmoe_jax import errors
from stmoe_jax.config import ConfigError
from stmoe_jax.train import checkpointing
from stmoe_jax.train import convert

_FROM_HF = flags.DEFINE_string('from_hf', None, 'A Hugging Face checkpoint directory to read.')
_TO_HF = flags.DEFINE_bool('to_hf', False, 'Write --workdir as a Hugging Face checkpoint.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The train.py workdir to write (--from_hf) or '
                               'read (--to_hf).')
_OUT = flags.DEFINE_string('out', None, '--to_hf: the directory to write.')
_STEP = flags.DEFINE_integer('step', None, '--to_hf: checkpoint step; default: the latest.')
_CHECK = flags.DEFINE_bool('check', False, 'Compare logits with transformers (PyTorch, CPU).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', "--from_hf: the TFDS data_dir the workdir's "
                                'config records for training and evaluation (the TFDS default).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(_FROM_HF.value) == _TO_HF.value:
    raise app.UsageError('give exactly one of --from_hf=DIR and --to_hf')
  if _TO_HF.value and not _OUT.value:
    raise app.UsageError('--to_hf needs --out=DIR')
  logging.set_verbosity(logging.ERROR)
  errors.quiet_orbax_errors()
  with errors.one_line_errors(ConfigError, OSError, ValueError, checkpointing.CheckpointError):
    if _FROM_HF.value:
      convert.from_hf(_FROM_HF.value, _WORKDIR.value, data_dir=_DATA_DIR.value)
    else:
      convert.to_hf(_WORKDIR.value, _OUT.value, _STEP.value)
  if _CHECK.value:
    sys.exit(convert.run_check(_FROM_HF.value or _OUT.value, _WORKDIR.value, _STEP.value))


if __name__ == '__main__':
  app.run(main)
