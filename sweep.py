r"""Runs a grid of train.py runs, one after another, each in its own workdir under --root.

  python sweep.py --config=configs/default.py --sweep=moe.num_experts=4,8,16 \
    --sweep=opt.lr=1e-3,3e-3 --root=runs/sweep
  python sweep.py --config=configs/stmoe.py:size=tiny --sweep=moe.top_k=1,2 \
    --set=num_train_steps=20 --root=runs/topk --dry_run    # print the commands only

Finished runs are skipped, so rerunning resumes the sweep. Writes <root>/results.csv and
<root>/results.md. The logic lives in stmoe_jax.analysis.sweep.
"""

import os
import sys

from absl import app
from absl import flags

from stmoe_jax import errors
from stmoe_jax.analysis import sweep

_CONFIG = flags.DEFINE_string('config', None, 'train.py --config value: path[:arg].')
_SWEEP = flags.DEFINE_multi_string('sweep', [], 'field=v1,v2,...; one flag per sweep axis.')
_SET = flags.DEFINE_multi_string('set', [], 'field=value for every run.')
_ROOT = flags.DEFINE_string('root', 'runs/sweep', 'Directory for the runs and results.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the train.py commands, run nothing.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    rows = sweep.run_sweep(_CONFIG.value, _SWEEP.value, _ROOT.value, sets=_SET.value,
                           dry_run=_DRY_RUN.value)
  except (OSError, ValueError) as e:  # OSError: e.g. a full disk writing the results.
    if os.environ.get(errors.TRACEBACK_ENV):
      raise
    sys.exit(f'error: {errors.one_line(e)}')
  except KeyboardInterrupt:
    sys.exit('interrupted (Ctrl-C): the run in flight saved its step; rerun the same command '
             'to continue the sweep')
  if rows:
    print(f'results: {_ROOT.value}/results.md')
  if any(row['status'] != 'done' for row in rows):
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
