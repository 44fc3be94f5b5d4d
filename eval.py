r"""Evaluates a train.py checkpoint on the validation split at the eval capacity factor.

  python eval.py --workdir=runs/default [--step=1500]
  python eval.py --workdir=runs/default --eval_capacity_factors=1.0,1.25,2.0,dropless
  python eval.py --workdir=runs/default --mesh=data=2,expert=2   # another mesh than training's

Prints one JSON object and writes it to <workdir>/eval_<step>.json. The run's config is read
from <workdir>/config.json.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging

from stmoe_jax.train import checkpointing
from stmoe_jax.train import entry_points
from stmoe_jax import errors
from stmoe_jax.train import evaluation
from stmoe_jax.nn import sharding
from stmoe_jax.config import ConfigError
from stmoe_jax.data import input_pipeline

_WORKDIR = flags.DEFINE_string('workdir', None, 'A train.py workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
_MAX_BATCHES = flags.DEFINE_integer('max_batches', None, 'Limit on validation batches.',
                                     lower_bound=1)
_CAPACITY_FACTORS = flags.DEFINE_string(
    'eval_capacity_factors', '', "Also evaluate at these capacity factors, e.g. "
    "'1.0,1.25,2.0,dropless' (ST-MoE: eval capacity is a free lever).")
_MESH = flags.DEFINE_string(
    'mesh', '', "Evaluate on this mesh instead of the run's config.mesh, e.g. 'data=2,expert=2' "
    "(axes not named are 1; one may be -1); the checkpoint is resharded onto it.")
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Orbax/TFDS info and warning lines (e.g. about a damaged step we report ourselves) would
  # bury the progress bar and the one line that matters.
  logging.set_verbosity(logging.ERROR)
  errors.quiet_orbax_errors()
  with errors.one_line_errors(ConfigError, OSError, ValueError, checkpointing.CheckpointError,
                              input_pipeline.DataError):
    factors = (evaluation.parse_capacity_factors(_CAPACITY_FACTORS.value)
               if _CAPACITY_FACTORS.value else ())
    mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
    metrics = entry_points.evaluate_workdir(_WORKDIR.value, _STEP.value, _MAX_BATCHES.value,
                                            factors, mesh)
  print(json.dumps(metrics))
  bad = evaluation.nonfinite_results(metrics)
  if bad:  # Printed above for inspection, but never a result to build on.
    sys.exit(f'error: non-finite {", ".join(bad)} for checkpoint step {metrics["step"]} of '
             f'{_WORKDIR.value}')


if __name__ == '__main__':
  app.run(main)
