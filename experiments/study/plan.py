"""The study's plan: its arms, seeds, schedule lengths and grids, and the runs each stage trains.

Pure data (no processes, no files): `Run` names one train.py run; the functions here list the
runs of the learning-rate sweep (stage 1), the routing stage (2) and the main runs with their
branches (3, 4).
"""

from __future__ import annotations

import dataclasses

from configs import moe_vs_dense

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
# Every arm runs the same seeds: speedups are taken seed for seed (analysis.arm_summary).
SEEDS = {'full': (0, 1, 2), 'quick': (0, 1)}
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

  `branch_of` names the main run whose checkpoint at 0.8 * steps this run starts from;
  `router` is one of configs/moe_vs_dense.py's ROUTER_OPTIONS ('' = the arm's own gating).
  """
  name: str
  arm: str
  seed: int
  lr: float
  steps: int
  stage: str
  overrides: tuple[tuple[str, object], ...] = ()
  branch_of: str = ''
  router: str = ''


def sweep_run(arm: str, lr: float, size: str) -> Run:
  """Stage 1's run of `arm` at peak rate `lr`: seed 0, a complete SWEEP_STEPS schedule."""
  return Run(f'sweep/{arm}_lr{lr:g}', arm, 0, lr, SWEEP_STEPS[size], 'sweep')


def sweep_families(size: str) -> list[str]:
  """The families stage 1 tunes: those of the size's MAIN_ARMS."""
  return [fam for fam in SWEEP_ARMS if fam in {family(a) for a in MAIN_ARMS[size]}]


def sweep_runs(size: str) -> list[Run]:
  """Stage 1's grid: each tuned family's representative arm (SWEEP_ARMS) at each of
  SWEEP_LRS."""
  return [sweep_run(SWEEP_ARMS[fam], lr, size) for fam in sweep_families(size)
          for lr in SWEEP_LRS[size]]


def routing_runs(size: str, lr: float) -> list[Run]:
  """Stage 2's runs: stmoe64 at the tuned MoE rate `lr` with each of ROUTING_OPTIONS, seed 0,
  the sweep's schedule; none at the quick size."""
  if size == 'quick':
    return []
  return [Run(f'routing/stmoe64_{name}', 'stmoe64', 0, lr, SWEEP_STEPS[size], 'routing',
              tuple(overrides.items())) for name, overrides in ROUTING_OPTIONS.items()]


def family(arm: str) -> str:
  """The family of `arm` ('dense', 'switch', 'stmoe' or 'fine'), which sets its tuned rate."""
  return moe_vs_dense.ARMS[arm][0]


def main_group(arm: str, seed: int, size: str, tuned: dict) -> list[Run]:
  """A main run of NUM_STEPS and the complete shorter schedules that branch off it."""
  overrides = () if family(arm) == 'dense' else tuple(tuned['routing_overrides'].items())
  lr, steps = tuned['lr'][family(arm)], NUM_STEPS[size]
  main = Run(f'{arm}_s{seed}', arm, seed, lr, steps, 'main', overrides)
  return [main] + [dataclasses.replace(main, name=f'{main.name}_n{steps // f}', steps=steps // f,
                                       branch_of=main.name, stage='branch')
                   for f in BRANCH_FRACTIONS]
