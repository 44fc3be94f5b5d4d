"""Grid sweeps over config fields: one train.py run per point, one after another, resumable.

Each `--sweep=field=v1,v2,...` adds an axis; the runs are the product of the axes, in order
(the last axis varies fastest). Run `field=v` overrides become `--config.field=v` flags, and
the run's workdir is `<root>/<field=v>_<field=v>...`. A run whose metrics.jsonl already holds
the evaluation at its final step is skipped, so rerunning a sweep resumes it (a half-finished run
resumes from its own checkpoints). After the runs, `<root>/results.csv` and `<root>/results.md`
list each run's overrides and final metrics.

Nothing here imports JAX: the runs are separate processes, exactly the commands `--dry_run`
prints for a cluster scheduler.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

from stmoe_jax import errors
from stmoe_jax.train import records

# The checkout holding train.py, which each run executes.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Final metrics reported per run: (column, record kind, key).
RESULT_COLUMNS = (('train_loss', 'train', 'loss'), ('eval_loss', 'eval', 'loss'),
                  ('bits_per_byte', 'eval', 'bits_per_byte'), ('accuracy', 'eval', 'accuracy'))


def parse_assignment(text: str, *, several: bool) -> tuple[str, list[str]]:
  """'moe.num_experts=4,8,16' -> ('moe.num_experts', ['4', '8', '16']) (one value unless
  `several`). Raises ValueError naming `text` when it has no field or no value."""
  field, _, values = text.partition('=')
  items = [v.strip() for v in values.split(',')] if several else [values.strip()]
  if not field.strip() or not all(items):
    raise ValueError(f'{text!r} is invalid: expected field=value' + (',value...' if several else ''))
  return field.strip(), items


def load_config_file(config_arg: str):
  """The ConfigDict of 'path/to/config.py[:arg]', loaded like ml_collections' config flags."""
  path, _, arg = config_arg.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config file {path!r} not found')
  try:  # The file's own code runs here: any failure is the file's, named in one line.
    spec = importlib.util.spec_from_file_location('sweep_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get(errors.TRACEBACK_ENV):
      raise
    raise ValueError(errors.config_file_error(config_arg, e)) from None
  if not hasattr(config, 'keys'):
    raise ValueError(f'--config={config_arg}: get_config() returned a {type(config).__name__}, '
                     'not a ConfigDict')
  return config


def run_child(argv: list[str]) -> int:
  """Runs one train.py and returns its exit code. On Ctrl-C the child (same process group) gets
  the SIGINT too, saves the step it is on and exits: it is waited for, not killed, and then the
  KeyboardInterrupt stops the sweep."""
  process = subprocess.Popen(argv)
  interrupted = False
  while True:
    try:
      code = process.wait()
      break
    except KeyboardInterrupt:
      interrupted = True
  if interrupted:
    raise KeyboardInterrupt
  return code


def check_fields(config, fields: Sequence[str]) -> None:
  """Raises ValueError naming the first dotted field that `config` does not have."""
  for field in fields:
    node = config
    for part in field.split('.'):
      if not hasattr(node, 'keys') or part not in node.keys():
        raise ValueError(f'--sweep/--set field {field!r} is not a config field')
      node = node[part]


def expand(sweeps: Sequence[tuple[str, list[str]]]) -> list[dict[str, str]]:
  """The product of the sweep axes, in order: a list of {field: value} dicts."""
  fields = [field for field, _ in sweeps]
  return [dict(zip(fields, values)) for values in itertools.product(*(v for _, v in sweeps))]


def run_name(overrides: dict[str, str]) -> str:
  """Directory name of a run: 'moe.num_experts=4_opt.lr=1e-3' ('/' replaced by '-')."""
  return '_'.join(f'{k}={v}'.replace('/', '-') for k, v in overrides.items()) or 'base'


def train_command(config_arg: str, workdir: str, overrides: dict[str, str]) -> list[str]:
  """The train.py argv for one run (python is the running interpreter)."""
  return [sys.executable, os.path.join(REPO, 'train.py'), f'--config={config_arg}',
          f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in overrides.items()]]


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  return records.read_jsonl(path, keys=('step', 'kind'))


def is_finished(workdir: str) -> bool:
  """Whether the run in `workdir` logged its evaluation at its final step (config.json's
  num_train_steps): train.py always evaluates there, after the last train step."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      final = json.load(f)['num_train_steps']
  except (OSError, ValueError, TypeError, KeyError):
    return False  # Unreadable: the run is not done; train.py names what is wrong with it.
  return any(r.get('kind') == 'eval' and r.get('step') == final for r in read_records(workdir))


def final_metrics(workdir: str) -> dict:
  """Last train and eval values of `RESULT_COLUMNS`, the last step, and mean tokens/s."""
  records = read_records(workdir)
  row = {}
  for column, kind, key in RESULT_COLUMNS:
    values = [r[key] for r in records if r.get('kind') == kind and key in r]
    row[column] = values[-1] if values else ''
  speeds = [r['tokens_per_sec'] for r in records if 'tokens_per_sec' in r]
  row['tokens_per_sec'] = sum(speeds) / len(speeds) if speeds else ''
  row['step'] = max((r['step'] for r in records if isinstance(r.get('step'), int)), default='')
  return row


def run_sweep(config_arg: str, sweeps: Sequence[str], root: str, *, sets: Sequence[str] = (),
              dry_run: bool = False,
              runner: Callable[[list[str]], int] | None = None) -> list[dict]:
  """Runs (or with `dry_run` prints) every point of the sweep; returns the results rows.

  Args:
    config_arg: train.py's --config value, e.g. 'configs/stmoe.py:size=tiny'.
    sweeps: 'field=v1,v2' strings, one per axis.
    root: directory holding one workdir per run and the results files.
    sets: 'field=value' overrides shared by every run.
    dry_run: print the train.py commands (shell-quoted) instead of running them.
    runner: runs one argv and returns its exit code (default: a subprocess).
  Raises:
    ValueError naming a malformed --sweep/--set or a field the config does not have, before any
    run starts.
  """
  axes = [parse_assignment(s, several=True) for s in sweeps]
  fixed = {f: v[0] for f, v in (parse_assignment(s, several=False) for s in sets)}
  check_fields(load_config_file(config_arg), [*fixed, *(field for field, _ in axes)])
  if os.path.exists(root) and not os.path.isdir(root):
    raise ValueError(f'--root={root} is a file, not a directory')
  runner = runner or run_child
  points = expand(axes)
  rows = []
  for i, point in enumerate(points):
    workdir = os.path.join(root, run_name(point))
    argv = train_command(config_arg, workdir, {**fixed, **point})
    row = {'run': run_name(point), **point}
    if dry_run:
      print(shlex.join(['python', *argv[1:]]))
      continue
    if is_finished(workdir):
      print(f'[{i + 1}/{len(points)}] {row["run"]}: finished before, skipped', flush=True)
      status = 'done'
    else:
      print(f'[{i + 1}/{len(points)}] {row["run"]}: {shlex.join(argv[1:])}', flush=True)
      code = runner(argv)
      status = 'done' if code == 0 and is_finished(workdir) else f'failed ({code})'
    rows.append({**row, 'status': status, **final_metrics(workdir)})
  if not dry_run:
    write_results(rows, root)
  return rows


def _format(value) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def write_results(rows: list[dict], root: str) -> None:
  """Writes `root/results.csv` (full precision) and `root/results.md` (a markdown table)."""
  if not rows:
    return
  os.makedirs(root, exist_ok=True)
  columns = list(rows[0])
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(_format(row[c]) for c in columns) + ' |' for row in rows]
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
