"""Training, resuming and loading the study's runs.

Each run is a train.py process pinned to one core; a run whose final evaluation is logged is
skipped, so rerunning the study resumes it. A branch run starts from a copy of its main run's
checkpoint where its own decay starts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import shutil
import subprocess
import sys
import time

import numpy as np

from configs import moe_vs_dense
from experiments.study import plan
from stmoe_jax.analysis import sweep  # Imports no JAX: the driver stays light.

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_flags(parser: argparse.ArgumentParser, root: str, tuned: bool = False) -> None:
  """The flags every experiment driver shares: --root, --quick, --data_dir, --cores and, with
  `tuned`, --tuned (the study's tuned rates and routing)."""
  parser.add_argument('--root', default=root, help='Directory for the runs (and results).')
  parser.add_argument('--quick', action='store_true', help='Tiny model, 20 steps: smoke test.')
  parser.add_argument('--data_dir', default='', help="TFDS data dir ('' = the TFDS default).")
  parser.add_argument('--cores', default='', help="Cores to pin runs to, one run per core at a "
                      "time, e.g. '0,1'; '' = one run at a time, unpinned.")
  if tuned:
    parser.add_argument('--tuned', default=os.path.join(REPO, 'docs', 'results', 'tuned.json'),
                        help="The study's tuned rates and routing (its stages 1-2).")


def cores(args: argparse.Namespace) -> list[str]:
  """--cores as a list ([] = unpinned)."""
  return [c for c in args.cores.split(',') if c]


def train_argv(run: plan.Run, size: str, root: str, data_dir: str) -> list[str]:
  """train.py's argv for `run`: the arm's config with its seed, rate, length and overrides."""
  overrides = {'seed': run.seed, 'num_train_steps': run.steps, **dict(run.overrides)}
  if data_dir:
    overrides['data.data_dir'] = data_dir
  config_arg = (f'{os.path.join(REPO, "configs", "moe_vs_dense.py")}:arm={run.arm},'
                f'size={size},lr={run.lr}' + (f',router={run.router}' if run.router else ''))
  return sweep.train_command(config_arg, os.path.join(root, run.name), overrides)


def start_branch(run: plan.Run, root: str, decay_fraction: float) -> None:
  """Seeds `run`'s workdir with its main run's checkpoint where its own decay starts."""
  workdir = os.path.join(root, run.name)
  checkpoints = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(checkpoints):
    return  # Started before: train.py resumes from its own checkpoints.
  main = os.path.join(root, run.branch_of)
  step = round(run.steps * (1 - decay_fraction))
  source = os.path.join(main, 'checkpoints', str(step))
  if not os.path.isdir(source):
    raise FileNotFoundError(f'{source} not found: the main run {run.branch_of} must checkpoint '
                            f'at step {step} for its branch {run.name}')
  os.makedirs(workdir, exist_ok=True)
  shutil.copytree(source, os.path.join(checkpoints, str(step)))
  shutil.copy(os.path.join(main, 'config.json'), os.path.join(workdir, 'config.json'))


class Runner:
  """Runs groups of runs (a main run, then its branches) on a pool of cores, one per run."""

  def __init__(self, size: str, root: str, data_dir: str, cores: list[str]):
    self.size, self.root, self.data_dir = size, root, data_dir
    self.cores = queue.Queue()
    for core in cores or ['']:
      self.cores.put(core)
    self.workers = max(len(cores), 1)
    self.first_core = cores[0] if cores else ''
    self.env = dict(os.environ, TQDM_DISABLE='1')
    # Seeds and arms of one shape compile the same programs: share them across processes.
    self.env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(root, '.xla_cache'))

  def run_one(self, run: plan.Run, core: str) -> None:
    """Trains `run` to its end on `core` ('' = unpinned), logging to its workdir's train.log;
    returns at once when it is finished already, raises with the log's tail when it fails."""
    workdir = os.path.join(self.root, run.name)
    if sweep.is_finished(workdir):
      return
    if run.branch_of:
      start_branch(run, self.root, plan.DECAY_FRACTION)
    os.makedirs(workdir, exist_ok=True)
    argv = train_argv(run, self.size, self.root, self.data_dir)
    if core and shutil.which('taskset'):
      argv = ['taskset', '-c', core, *argv]
    print(f'[{time.strftime("%H:%M:%S")}] {run.name}: training on core {core or "any"}',
          flush=True)
    with open(os.path.join(workdir, 'train.log'), 'a') as log:
      code = subprocess.run(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                            check=False).returncode
    if code:
      with open(os.path.join(workdir, 'train.log')) as f:
        tail = f.read()[-2000:]
      raise RuntimeError(f'{run.name} failed with exit code {code}:\n{tail}')

  def run_group(self, group: list[plan.Run]) -> None:
    """Trains the runs of `group` in order (a branch after its main run) on one free core."""
    core = self.cores.get()
    try:
      for run in group:
        self.run_one(run, core)
    finally:
      self.cores.put(core)

  def run_all(self, groups: list[list[plan.Run]]) -> None:
    """Trains every group, as many at a time as there are cores; raises the first failure."""
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      for future in [pool.submit(self.run_group, g) for g in groups]:
        future.result()


def parameter_counts(config) -> tuple[int, int]:
  """(total parameters, parameters a token's forward pass uses), embeddings included."""
  import jax  # pylint: disable=g-import-not-at-top  (the study's driver needs no JAX otherwise)
  from stmoe_jax.models import factory as model_factory  # pylint: disable=g-import-not-at-top
  from stmoe_jax.config import model_config  # pylint: disable=g-import-not-at-top

  model_cfg = model_config(config)
  _, params, _ = model_factory.get_model(model_cfg).abstract()
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  moe = model_cfg.moe
  if not moe.enabled:
    return total, total
  num_moe_layers = sum(map(moe.is_moe_layer, range(model_cfg.num_layers)))
  matrices = 2 if model_cfg.activation == 'gelu' else 3  # GEGLU: two input matrices.
  per_expert = (matrices * model_cfg.d_model * moe.expert_d_ff +
                moe.expert_d_ff * (model_cfg.activation == 'geglu_mult_bias'))
  inactive = num_moe_layers * (moe.num_experts - moe.top_k) * per_expert
  return total, total - inactive


def load_run(run: plan.Run, root: str, size: str) -> dict:
  """A finished run as {'run', 'records' (its metrics.jsonl), 'params', 'active_params',
  'dropped_fraction' (mean of the last 5 logged), 'first_dropped_fraction'}."""
  records = sweep.read_records(os.path.join(root, run.name))
  config = moe_vs_dense.get_config(f'arm={run.arm},size={size},lr={run.lr}' +
                                   (f',router={run.router}' if run.router else ''))
  return loaded_run(run, records, *parameter_counts(config))


def loaded_run(run: plan.Run, records: list[dict], total: int, active: int) -> dict:
  """`load_run`'s dict from a run's records and parameter counts."""
  late = [r['dropped_fraction'] for r in records
          if r['kind'] == 'train' and 'dropped_fraction' in r]
  return {'run': run, 'records': records, 'params': total, 'active_params': active,
          'dropped_fraction': round(float(np.mean(late[-5:])), 5) if late else 0.0,
          'first_dropped_fraction': round(float(late[0]), 5) if late else 0.0}
