r"""Does sparsity pay? MoE vs dense at equal active FLOPs, with schedule-fair speedups.

  python experiments/moe_vs_dense.py --root=runs/moe_vs_dense --cores=0,1    # about 80 minutes
  python experiments/moe_vs_dense.py --root=/tmp/mvd --quick --cores=0,1     # smoke test, ~1 min

The arms are configs/moe_vs_dense.py's (a d_model-64, 2-layer byte LM whose every FFN is the
arm's: dense, Switch top-1/32, ST-MoE top-2/8, /16, /64, fine-grained top-8/64). Four stages,
each run a train.py process (pinned to one of --cores, one run per core at a time):

  1. Learning rate: every family's representative arm (SWEEP_ARMS) trains a complete short
     schedule (SWEEP_STEPS) at each of SWEEP_LRS, seed 0; each family takes the peak learning
     rate with the lowest final validation loss (a best rate at the grid's edge gets a rate a
     factor 2 beyond it, twice at most). Dense is tuned exactly as hard as the MoEs.
  2. Routing (full size only): stmoe64 at the tuned rate with the ROUTING_OPTIONS (routing group
     size, bias balancer, a 10x balance loss, dropless dispatch), same short schedule; the
     lowest final loss sets every MoE arm's routing. The drop rates are reported beside it.
  3. Main runs: every arm, seeds 0 and 1, NUM_STEPS on a warmup-stable-decay schedule. The
     complete schedules of 1/4 and 1/2 the length branch off each main run's checkpoint where
     their decay starts (0.8 x their length) and run only their own decay, so every arm has
     three complete runs per seed (see `steps_to_match`). Same seed = same batches in the same
     order and the same initialisation.
  4. A third seed for dense and for the best MoE arm (lowest mean final loss of stage 3).

Schedule-fair speedup: with a decaying schedule a run's loss halfway through is not what that
model reaches when trained for half the steps, so speedups read complete runs only. An arm's
steps to dense's final loss interpolate, linearly in log(steps), between its complete runs
(N/4, N/2, N); step speedup = dense's N / those steps (a lower bound 4.0 when the N/4 run
already gets there; below 1 the dense runs are interpolated instead: dense steps to the arm's
final loss / N). Time speedup = step speedup x the arm's tokens/s / dense's tokens/s, with
tokens/s measured by benchmarks/train_step.py for each arm, one after another on the first of
--cores after the runs (stage 5), so that runs sharing the machine do not skew it; the runs'
own tokens/s (median over logging windows, best seed) are reported beside it. Runs whose final
evaluation is logged are skipped, so rerunning resumes the study.

Writes to --root: results.csv (every evaluation of every run), results.md, summary.json (one
entry per arm), tuned.json (the stage 1-2 choices), throughput.json (stage 5),
loss_curves.png and experts.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=g-import-not-at-top

from configs import moe_vs_dense  # pylint: disable=g-import-not-at-top
from stmoe_jax import sweep  # pylint: disable=g-import-not-at-top  (imports no JAX)

SWEEP_ARMS = {'dense': 'dense', 'switch': 'switch32', 'stmoe': 'stmoe16', 'fine': 'fine64'}
SWEEP_LRS = {'full': (3e-3, 6e-3, 1.2e-2), 'quick': (1e-2, 3e-2)}
SWEEP_STEPS = {'full': 400, 'quick': 20}
# Routing options tried on stmoe64 (name -> config overrides); the first is the config's own.
ROUTING_OPTIONS = {
    'group4096': {},
    'group256': {'moe.group_size': 256},
    'bias_balancer': {'moe.bias_balancer_rate': 1e-3},
    'aux_loss_0.1': {'moe.aux_loss_coef': 0.1},
    'dropless': {'moe.dispatch': 'dropless'},
}
MAIN_ARMS = {'full': tuple(moe_vs_dense.ARMS), 'quick': ('dense', 'stmoe16')}
SEEDS = {'full': (0, 1), 'quick': (0,)}
NUM_STEPS = {'full': 1600, 'quick': 20}
BRANCH_FRACTIONS = (4, 2)  # Complete runs of N/4 and N/2 branch off the main run of N.
EXPERT_SCALING_ARMS = ('stmoe8', 'stmoe16', 'stmoe64')  # Same k and width, more experts.
# Seconds per step relative to dense (the sweep's runs on one core), to start slow arms first.
RELATIVE_COST = {'dense': 1.0, 'stmoe8': 1.6, 'stmoe16': 1.8, 'switch32': 1.8, 'stmoe64': 2.2,
                 'fine64': 3.6}
DECAY_FRACTION = moe_vs_dense.get_config().opt.decay_fraction  # Where a branch's decay starts.


@dataclasses.dataclass(frozen=True)
class Run:
  """One train.py run: an arm, a seed, a peak learning rate and a complete schedule length.

  `branch_of` names the main run whose checkpoint at 0.8 * steps this run starts from.
  """
  name: str
  arm: str
  seed: int
  lr: float
  steps: int
  stage: str
  overrides: tuple[tuple[str, object], ...] = ()
  branch_of: str = ''


def train_argv(run: Run, size: str, root: str, data_dir: str) -> list[str]:
  """train.py's argv for `run`: the arm's config with its seed, rate, length and overrides."""
  overrides = {'seed': run.seed, 'num_train_steps': run.steps, **dict(run.overrides)}
  if data_dir:
    overrides['data.data_dir'] = data_dir
  config_arg = (f'{os.path.join(REPO, "configs", "moe_vs_dense.py")}:arm={run.arm},'
                f'size={size},lr={run.lr}')
  return sweep.train_command(config_arg, os.path.join(root, run.name), overrides)


def start_branch(run: Run, root: str, decay_fraction: float) -> None:
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

  def run_one(self, run: Run, core: str) -> None:
    workdir = os.path.join(self.root, run.name)
    if sweep.is_finished(workdir):
      return
    if run.branch_of:
      start_branch(run, self.root, DECAY_FRACTION)
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

  def run_group(self, group: list[Run]) -> None:
    core = self.cores.get()
    try:
      for run in group:
        self.run_one(run, core)
    finally:
      self.cores.put(core)

  def run_all(self, groups: list[list[Run]]) -> None:
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      for future in [pool.submit(self.run_group, g) for g in groups]:
        future.result()


# ---------------------------------------------------------------------------------------------
# The plan: which runs each stage trains.


def sweep_run(arm: str, lr: float, size: str) -> Run:
  return Run(f'sweep/{arm}_lr{lr:g}', arm, 0, lr, SWEEP_STEPS[size], 'sweep')


def sweep_runs(size: str) -> list[Run]:
  return [sweep_run(arm, lr, size) for arm in SWEEP_ARMS.values() for lr in SWEEP_LRS[size]]


def edge_extensions(loaded: list[dict], size: str) -> list[Run]:
  """One more rate, a factor of 2 beyond the grid, for each family whose best is at its edge."""
  extra = []
  for arm in SWEEP_ARMS.values():
    runs = sorted((x for x in loaded if x['run'].arm == arm), key=lambda x: x['run'].lr)
    best = min(range(len(runs)), key=lambda i: final_eval(runs[i]['records'])['loss'])
    if best == 0:
      extra.append(sweep_run(arm, runs[0]['run'].lr / 2, size))
    elif best == len(runs) - 1:
      extra.append(sweep_run(arm, runs[-1]['run'].lr * 2, size))
  return extra


def routing_runs(size: str, lr: float) -> list[Run]:
  if size == 'quick':
    return []
  return [Run(f'routing/stmoe64_{name}', 'stmoe64', 0, lr, SWEEP_STEPS[size], 'routing',
              tuple(overrides.items())) for name, overrides in ROUTING_OPTIONS.items()]


def family(arm: str) -> str:
  return moe_vs_dense.ARMS[arm][0]


def main_group(arm: str, seed: int, size: str, tuned: dict) -> list[Run]:
  """A main run of NUM_STEPS and the complete shorter schedules that branch off it."""
  overrides = () if family(arm) == 'dense' else tuple(tuned['routing_overrides'].items())
  lr, steps = tuned['lr'][family(arm)], NUM_STEPS[size]
  main = Run(f'{arm}_s{seed}', arm, seed, lr, steps, 'main', overrides)
  return [main] + [dataclasses.replace(main, name=f'{main.name}_n{steps // f}', steps=steps // f,
                                       branch_of=main.name, stage='branch')
                   for f in BRANCH_FRACTIONS]


# ---------------------------------------------------------------------------------------------
# Analysis: plain numpy over the runs' records, so tests can check it against hand values.


def measure_throughput(arms: list[str], size: str, root: str, core: str) -> dict[str, float]:
  """{arm: train-step tokens/s}, benchmarks/train_step.py on one core (random tokens, median
  step after compilation), one arm at a time; cached in root/throughput.json."""
  path = os.path.join(root, 'throughput.json')
  cached = {}
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
  for arm in arms:
    if arm in cached:
      continue
    config_arg = f'{os.path.join(REPO, "configs", "moe_vs_dense.py")}:arm={arm},size={size}'
    argv = [sys.executable, os.path.join(REPO, 'benchmarks', 'train_step.py'),
            f'--config={config_arg}', f'--steps={20 if size == "full" else 3}']
    if core and shutil.which('taskset'):
      argv = ['taskset', '-c', core, *argv]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout
    record = json.loads([line for line in out.splitlines() if line.startswith('{')][-1])
    cached[arm] = record['tokens_per_sec']
    with open(path, 'w') as f:
      json.dump(cached, f, indent=1)
  return cached


def final_eval(records: list[dict]) -> dict:
  """The last evaluation record of a run."""
  return [r for r in records if r['kind'] == 'eval'][-1]


def run_tokens_per_sec(records: list[dict]) -> float:
  """Median tokens/s over the run's logging windows (each excludes compilation and evals)."""
  speeds = [r['tokens_per_sec'] for r in records if r['kind'] == 'train' and 'tokens_per_sec' in r]
  return float(np.median(speeds)) if speeds else float('nan')


def interpolate_log_steps(steps, losses, target: float) -> float | None:
  """Steps at which the complete-run curve (linear in log steps) first reaches `target`.

  Args:
    steps: [N] increasing lengths of complete runs.
    losses: [N] their final validation losses.
    target: the loss to reach.
  Returns:
    steps[0] when the shortest run already reaches it (so the true value is at most that),
    None when no run does.
  """
  steps, losses = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
  below = np.nonzero(losses <= target)[0]
  if not len(below):
    return None
  i = int(below[0])
  if i == 0:
    return float(steps[0])
  fraction = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
  return float(np.exp(np.log(steps[i - 1]) + fraction * (np.log(steps[i]) - np.log(steps[i - 1]))))


def steps_to_match(dense_steps, dense_losses, steps, losses) -> tuple[float, bool]:
  """(step speedup over dense, whether it is a lower bound) from complete runs.

  Dense's target is its longest run's final loss. If the arm reaches it, speedup = dense's
  steps / the arm's interpolated steps (a lower bound when its shortest run already does).
  Otherwise the roles swap: speedup = dense's interpolated steps to the arm's final loss / the
  arm's steps (< 1), or dense's shortest / the arm's steps as an upper bound when even that
  is better; the flag is then False.
  """
  target_steps, target = dense_steps[-1], dense_losses[-1]
  needed = interpolate_log_steps(steps, losses, target)
  if needed is not None:
    return target_steps / needed, bool(losses[0] <= target)
  dense_needed = interpolate_log_steps(dense_steps, dense_losses, losses[-1])
  return (dense_needed or dense_steps[0]) / steps[-1], False


def complete_runs(runs_by_name: dict[str, dict], arm: str, seed: int, size: str
                  ) -> tuple[list[int], list[float]]:
  """(lengths, final validation losses) of the complete runs of one arm and seed, shortest
  first."""
  steps = NUM_STEPS[size]
  names = [f'{arm}_s{seed}_n{steps // f}' for f in BRANCH_FRACTIONS] + [f'{arm}_s{seed}']
  lengths = [steps // f for f in BRANCH_FRACTIONS] + [steps]
  return lengths, [final_eval(runs_by_name[n]['records'])['loss'] for n in names]


def arm_summary(runs_by_name: dict[str, dict], arm: str, seeds: list[int],
                dense_seeds: list[int], size: str, throughput: dict[str, float]) -> dict:
  """One summary.json entry: quality, speed and speedups of `arm` (mean curves over seeds)."""
  lengths, _ = complete_runs(runs_by_name, arm, seeds[0], size)
  per_seed = np.array([complete_runs(runs_by_name, arm, s, size)[1] for s in seeds])
  dense = np.array([complete_runs(runs_by_name, 'dense', s, size)[1] for s in dense_seeds])
  step_speedup, lower_bound = steps_to_match(lengths, dense.mean(0), lengths, per_seed.mean(0))
  per_seed_speedup = []
  for s, losses in zip(seeds, per_seed):
    if s in dense_seeds:
      dense_losses = dense[dense_seeds.index(s)]
      per_seed_speedup.append(round(steps_to_match(lengths, dense_losses, lengths, losses)[0], 3))
  speed, dense_speed = throughput[arm], throughput['dense']
  in_runs = max(run_tokens_per_sec(runs_by_name[f'{arm}_s{s}']['records']) for s in seeds)
  main = runs_by_name[f'{arm}_s{seeds[0]}']
  finals = per_seed[:, -1]
  return {
      'arm': arm, 'family': family(arm), 'seeds': seeds, 'lr': main['run'].lr,
      'params': main['params'], 'active_params': main['active_params'],
      'tokens_per_sec': round(speed, 1), 'tokens_per_sec_in_runs': round(in_runs, 1),
      'final_val_loss_mean': round(float(finals.mean()), 5),
      'final_val_loss_spread': round(float(finals.max() - finals.min()), 5),
      'final_bits_per_byte_mean': round(float(finals.mean()) / math.log(2), 4),
      'complete_run_steps': lengths,
      'complete_run_val_loss_mean': [round(float(x), 5) for x in per_seed.mean(0)],
      'step_speedup': round(step_speedup, 3),
      'step_speedup_is_lower_bound': lower_bound,
      'time_speedup': round(step_speedup * speed / dense_speed, 3),
      'per_seed_step_speedup': per_seed_speedup,
      'dropped_fraction': main['dropped_fraction'],
  }


# ---------------------------------------------------------------------------------------------
# Reporting.


def parameter_counts(config) -> tuple[int, int]:
  """(total parameters, parameters a token's forward pass uses), embeddings included."""
  import jax  # pylint: disable=g-import-not-at-top  (the study's driver needs no JAX otherwise)
  from stmoe_jax import model_factory  # pylint: disable=g-import-not-at-top
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


def load_run(run: Run, root: str, size: str) -> dict:
  records = sweep.read_records(os.path.join(root, run.name))
  config = moe_vs_dense.get_config(f'arm={run.arm},size={size},lr={run.lr}')
  total, active = parameter_counts(config)
  train = [r for r in records if r['kind'] == 'train']
  late = [r['dropped_fraction'] for r in train if 'dropped_fraction' in r]
  return {'run': run, 'records': records, 'params': total, 'active_params': active,
          'dropped_fraction': round(float(np.mean(late[-5:])), 5) if late else 0.0,
          'first_dropped_fraction': round(float(late[0]), 5) if late else 0.0}


def write_csv(loaded: list[dict], path: str) -> None:
  columns = ['run', 'stage', 'arm', 'seed', 'lr', 'complete_steps', 'step', 'wall_s',
             'val_loss', 'val_bits_per_byte', 'train_loss', 'dropped_fraction', 'tokens_per_sec']
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for item in loaded:
      run, records = item['run'], item['records']
      start = min((r['wall_time'] for r in records), default=0.0)
      train_at = {r['step']: r for r in records if r['kind'] == 'train'}
      for r in records:
        if r['kind'] != 'eval':
          continue
        t = train_at.get(r['step'], {})
        writer.writerow({
            'run': run.name, 'stage': run.stage, 'arm': run.arm, 'seed': run.seed,
            'lr': run.lr, 'complete_steps': run.steps, 'step': r['step'],
            'wall_s': round(r['wall_time'] - start, 1), 'val_loss': f"{r['loss']:.5f}",
            'val_bits_per_byte': f"{r['bits_per_byte']:.5f}",
            'train_loss': f"{t['cross_entropy']:.5f}" if 'cross_entropy' in t else '',
            'dropped_fraction': f"{t['dropped_fraction']:.5g}" if 'dropped_fraction' in t else '',
            'tokens_per_sec': f"{t['tokens_per_sec']:.0f}" if 'tokens_per_sec' in t else ''})


def _speedup_text(entry: dict, key: str) -> str:
  bound = '>= ' if entry.get('step_speedup_is_lower_bound') else ''
  return f'{bound}{entry[key]:.2f}x'


def markdown(summary: list[dict], tuned: dict, sweep_loaded: list[dict],
             routing_loaded: list[dict], size: str) -> str:
  """The results tables as markdown."""
  steps = NUM_STEPS[size]
  dense = next(e for e in summary if e['arm'] == 'dense')
  lines = [f'Headline ({size} size, complete runs of {steps // 4}, {steps // 2} and {steps} '
           f'steps; dense target = mean final validation loss of dense at {steps} steps, '
           f"{dense['final_val_loss_mean']:.4f} nats/byte):", '',
           '| arm | seeds | lr | params | active params | final val loss (mean ± half spread) '
           '| bits/byte | step speedup | per-seed | time speedup | tokens/s (benchmark; runs) '
           '| dropped |', '|' + '---|' * 12]
  for e in summary:
    lines.append(
        f"| {e['arm']} | {','.join(map(str, e['seeds']))} | {e['lr']:g} | {e['params']:,} "
        f"| {e['active_params']:,} | {e['final_val_loss_mean']:.4f} ± "
        f"{e['final_val_loss_spread'] / 2:.4f} | {e['final_bits_per_byte_mean']:.3f} "
        f"| {_speedup_text(e, 'step_speedup')} "
        f"| {', '.join(f'{x:.2f}' for x in e['per_seed_step_speedup']) or '-'} "
        f"| {_speedup_text(e, 'time_speedup')} | {e['tokens_per_sec']:,.0f}; "
        f"{e['tokens_per_sec_in_runs']:,.0f} "
        f"| {e['dropped_fraction']:.4f} |")
  lines += ['', 'Complete runs (mean final validation loss over seeds):', '',
            '| arm | ' + ' | '.join(f'{n} steps' for n in summary[0]['complete_run_steps']) + ' |',
            '|' + '---|' * (1 + len(summary[0]['complete_run_steps']))]
  for e in summary:
    lines.append(f"| {e['arm']} | " + ' | '.join(f'{x:.4f}' for x in
                                                e['complete_run_val_loss_mean']) + ' |')
  rates = sorted({x['run'].lr for x in sweep_loaded})
  lines += ['', f'Learning-rate sweep (seed 0, complete {SWEEP_STEPS[size]}-step schedules; '
            'final validation loss; a rate beyond the grid was tried where the best was at its '
            'edge):', '',
            '| family (arm) | ' + ' | '.join(f'lr {lr:g}' for lr in rates) + ' | chosen |',
            '|' + '---|' * (2 + len(rates))]
  for fam, arm in SWEEP_ARMS.items():
    losses = {x['run'].lr: final_eval(x['records'])['loss'] for x in sweep_loaded
              if x['run'].arm == arm}
    lines.append(f'| {fam} ({arm}) | ' + ' | '.join(
        f'{losses[lr]:.4f}' if lr in losses else '-' for lr in rates) +
                 f" | {tuned['lr'][fam]:g} |")
  if routing_loaded:
    lines += ['', f"Routing (stmoe64, seed 0, lr {tuned['lr']['stmoe']:g}, complete "
              f'{SWEEP_STEPS[size]}-step schedules):', '',
              '| option | overrides | final val loss | dropped (first 80 steps) | '
              'dropped (end) | tokens/s |', '|---|---|---|---|---|---|']
    for item in routing_loaded:
      run = item['run']
      lines.append(f"| {run.name.split('_', 1)[1]} | {dict(run.overrides) or '-'} "
                   f"| {final_eval(item['records'])['loss']:.4f} "
                   f"| {item['first_dropped_fraction']:.4f} | {item['dropped_fraction']:.4f} "
                   f"| {run_tokens_per_sec(item['records']):,.0f} |")
    lines.append(f"\nChosen: {tuned['routing']} ({tuned['routing_overrides'] or 'no overrides'}).")
  return '\n'.join(lines) + '\n'


def plot(summary: list[dict], main_loaded: list[dict], root: str, size: str) -> list[str]:
  """loss_curves.png (by step and by training time, seed bands) and experts.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  colors = dict(zip(moe_vs_dense.ARMS, ('k', 'C0', 'C1', 'C2', 'C3', 'C4')))
  speed = {e['arm']: e['tokens_per_sec'] for e in summary}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for e in summary:
    arm = e['arm']
    curves = [[(r['step'], r['loss']) for r in x['records'] if r['kind'] == 'eval']
              for x in main_loaded if x['run'].arm == arm]
    steps = np.array([s for s, _ in curves[0]], np.float64)
    losses = np.array([[l for _, l in c] for c in curves])
    config = moe_vs_dense.get_config(f'arm={arm},size={size}')
    tokens_per_step = config.batch_size * config.data.seq_len
    minutes = steps * tokens_per_step / speed[arm] / 60
    for ax, x in zip(axes, (steps, minutes)):
      ax.plot(x, losses.mean(0), '-', color=colors[arm], label=f"{arm} ({len(curves)} seeds)")
      ax.fill_between(x, losses.min(0), losses.max(0), color=colors[arm], alpha=0.2)
      complete_x = np.array(e['complete_run_steps'], np.float64)
      if ax is axes[1]:
        complete_x = complete_x * tokens_per_step / speed[arm] / 60
      ax.plot(complete_x, e['complete_run_val_loss_mean'], 'o', color=colors[arm], markersize=5)
  for ax in axes:
    ax.axhline(summary[0]['final_val_loss_mean'], color='gray', lw=0.8, ls=':')
    ax.grid(alpha=0.3)
  axes[0].set_xlabel('train step')
  axes[1].set_xlabel('training time at the measured tokens/s, one core per run (minutes)')
  axes[0].set_ylabel('validation loss (nats/byte)')
  axes[1].legend(fontsize=8)
  lo = min(min(e['complete_run_val_loss_mean']) for e in summary)
  axes[0].set_ylim(lo - 0.05, lo + 0.8)
  fig.suptitle('MoE vs dense at equal active FLOPs: lines = main runs (band: seeds), '
               'dots = complete schedules; dotted = dense final')
  fig.tight_layout()
  paths = [os.path.join(root, 'loss_curves.png')]
  fig.savefig(paths[0], dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5.5, 4))
  dense = summary[0]
  scaling = [e for e in summary if e['arm'] in EXPERT_SCALING_ARMS]
  if scaling:
    experts = [moe_vs_dense.ARMS[e['arm']][1] for e in scaling]
    gains = [dense['final_val_loss_mean'] - e['final_val_loss_mean'] for e in scaling]
    errors = [(dense['final_val_loss_spread'] + e['final_val_loss_spread']) / 2 for e in scaling]
    ax.errorbar(experts, gains, yerr=errors, fmt='-o', capsize=4, color='C3')
    ax.set_xscale('log', base=2)
    ax.set_xticks(experts, [str(x) for x in experts])
  ax.axhline(0, color='gray', lw=0.8)
  ax.set(xlabel='experts (top-2, width 128)', ylabel='final val loss gain over dense (nats)',
         title='Gain at equal active FLOPs vs experts\n(bars: half the summed seed spreads)')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(root, 'experts.png'))
  fig.savefig(paths[1], dpi=110)
  plt.close(fig)
  return paths


def choose_lr(loaded: list[dict]) -> dict[str, float]:
  """Each family's peak learning rate with the lowest final validation loss."""
  best = {}
  for fam, arm in SWEEP_ARMS.items():
    runs = [x for x in loaded if x['run'].arm == arm]
    best[fam] = min(runs, key=lambda x: final_eval(x['records'])['loss'])['run'].lr
  return best


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', default='runs/moe_vs_dense', help='Directory for runs, results.')
  parser.add_argument('--quick', action='store_true', help='Tiny model, 20 steps: smoke test.')
  parser.add_argument('--data_dir', default='', help="TFDS data dir ('' = the TFDS default).")
  parser.add_argument('--cores', default='', help="Cores to pin runs to, one run per core at a "
                      "time, e.g. '0,1'; '' = one run at a time, unpinned.")
  parser.add_argument('--best_extra_seed', default=True, action=argparse.BooleanOptionalAction,
                      help='Train a third seed of the best MoE arm (stage 4).')
  args = parser.parse_args(argv)
  size = 'quick' if args.quick else 'full'
  study_start = time.time()
  os.makedirs(args.root, exist_ok=True)
  runner = Runner(size, args.root, args.data_dir, [c for c in args.cores.split(',') if c])
  load = lambda runs: [load_run(r, args.root, size) for r in runs]

  sweeps = sweep_runs(size)
  runner.run_all([[r] for r in sweeps])
  sweep_loaded = load(sweeps)
  for _ in range(2 if size == 'full' else 0):  # A best rate at the grid's edge may not be best.
    extensions = edge_extensions(sweep_loaded, size)
    runner.run_all([[r] for r in extensions])
    sweep_loaded += load(extensions)
  tuned = {'lr': choose_lr(sweep_loaded), 'routing': 'group4096', 'routing_overrides': {}}
  routing = routing_runs(size, tuned['lr']['stmoe'])
  runner.run_all([[r] for r in routing])
  routing_loaded = load(routing)
  if routing_loaded:
    best = min(routing_loaded, key=lambda x: final_eval(x['records'])['loss'])
    tuned['routing'] = best['run'].name.split('_', 1)[1]
    tuned['routing_overrides'] = dict(best['run'].overrides)
  with open(os.path.join(args.root, 'tuned.json'), 'w') as f:
    json.dump(tuned, f, indent=1)

  arms, seeds = MAIN_ARMS[size], list(SEEDS[size])
  extra_seed = max(seeds) + 1
  # Dense's third seed does not wait for the best MoE; the slowest arms start first.
  groups = [main_group(arm, seed, size, tuned) for arm in sorted(arms, key=RELATIVE_COST.get,
                                                                  reverse=True)
            for seed in seeds + ([extra_seed] if arm == 'dense' else [])]
  runner.run_all(groups)
  by_name = {x['run'].name: x for x in load([r for g in groups for r in g])}
  moe_arms = [a for a in arms if a != 'dense']
  best_arm = min(moe_arms, key=lambda a: np.mean(
      [final_eval(by_name[f'{a}_s{s}']['records'])['loss'] for s in seeds]))
  extra = [main_group(best_arm, extra_seed, size, tuned)] if args.best_extra_seed else []
  runner.run_all(extra)
  by_name.update({x['run'].name: x for x in load([r for g in extra for r in g])})
  seeds_of = {a: seeds + ([extra_seed] if a == 'dense' or (a == best_arm and extra) else [])
              for a in arms}

  throughput = measure_throughput(list(arms), size, args.root, runner.first_core)
  summary = [arm_summary(by_name, arm, seeds_of[arm], seeds_of['dense'], size, throughput)
             for arm in arms]
  summary[0]['best_moe_arm'] = best_arm
  everything = sweep_loaded + routing_loaded + list(by_name.values())
  write_csv(everything, os.path.join(args.root, 'results.csv'))
  with open(os.path.join(args.root, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  table = markdown(summary, tuned, sweep_loaded, routing_loaded, size)
  with open(os.path.join(args.root, 'results.md'), 'w') as f:
    f.write(table)
  main_loaded = [x for x in by_name.values() if x['run'].stage == 'main']
  paths = plot(summary, main_loaded, args.root, size)
  print(table)
  print(f'wrote {args.root}/results.csv, results.md, summary.json, tuned.json, ' +
        ', '.join(map(os.path.basename, paths)))
  print(f'study took {(time.time() - study_start) / 60:.1f} minutes')


if __name__ == '__main__':
  main()
