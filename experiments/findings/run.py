r"""Published MoE findings reproduced at the study's size: one command per finding.

  python experiments/findings/run.py --findings=capacity_factor --root=runs/findings --cores=0,1
  python experiments/findings/run.py --root=runs/findings --cores=0,1       # all, one queue
  python experiments/findings/run.py --root=/tmp/f --quick --findings=z_loss  # smoke test

Findings (FINDINGS): capacity_factor (Switch Table 1), z_loss (ST-MoE Table 4), granularity
(DeepSeekMoE, OLMoE), load_balance (OLMoE, DeepSeek-V3), upcycling (Komatsuzaki et al.). Each
trains configs/moe_vs_dense.py's arms on the study's short complete schedule (400 steps) at the
study's tuned rates and routing (docs/results/tuned.json), seeds 0 and 1 (z_loss: 0, 1, 2);
same seed = same initialisation and batches. The runs of all the findings asked for form one
queue, one run per core of --cores at a time; runs two findings share (fine64 at its tuned
routing) train once; finished runs are skipped, so rerunning resumes.

Writes --out/<finding>.json (default docs/results/findings/): the command, machine and date,
the paper's claim and numbers, ours per variant (final validation loss per seed, tokens/s of
the runs, dropped fraction, expert usage entropy, largest loss spike) and a verdict with its
reason. docs/generate.py writes docs/findings.md's tables from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top
from experiments.findings import capacity_factor
from experiments.findings import granularity
from experiments.findings import load_balance
from experiments.findings import upcycling
from experiments.findings import z_loss
from experiments.study import runs as study_runs

FINDINGS = {f.name: f for f in (capacity_factor.FINDING, z_loss.FINDING, granularity.FINDING,
                                load_balance.FINDING, upcycling.FINDING)}


def queue(names: list[str], size: str, tuned: dict, root: str) -> list[list]:
  """The groups of runs of the findings `names`, each run once, the longest groups first."""
  seen, groups = set(), []
  for name in names:
    for group in FINDINGS[name].runs(size, tuned, root):
      group = [r for r in group if r.name not in seen]
      seen.update(r.name for r in group)
      if group:
        groups.append(group)
  cost = lambda g: sum(r.steps * study_runs.plan.RELATIVE_COST[r.arm] for r in g)
  return sorted(groups, key=cost, reverse=True)


def record(finding, summary: dict, argv: list[str], tuned: dict, size: str) -> dict:
  return {
      'command': 'python experiments/findings/run.py ' + ' '.join(argv),
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
      'date': time.strftime('%Y-%m-%d'), 'size': size, 'tuned': tuned,
      **{k: v for k, v in dataclasses.asdict(finding).items() if k not in ('runs', 'summarize')},
      **summary,
  }


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--findings', default=','.join(FINDINGS),
                      help=f'Comma-separated, of {list(FINDINGS)} (default: all).')
  study_runs.add_flags(parser, 'runs/findings', tuned=True)
  parser.add_argument('--out', default=os.path.join(REPO, 'docs', 'results', 'findings'),
                      help='Directory for the records.')
  args = parser.parse_args(argv)
  names = [n for n in args.findings.split(',') if n]
  unknown = [n for n in names if n not in FINDINGS]
  if unknown:
    parser.error(f'--findings={args.findings!r}: unknown {unknown}; expected {list(FINDINGS)}')
  size = 'quick' if args.quick else 'full'
  with open(args.tuned) as f:
    tuned = json.load(f)
  root = os.path.abspath(args.root)
  runner = study_runs.Runner(size, root, args.data_dir, study_runs.cores(args))
  runner.run_all(queue(names, size, tuned, root))
  os.makedirs(args.out, exist_ok=True)
  for name in names:
    finding = FINDINGS[name]
    batch = [r for g in finding.runs(size, tuned, root) for r in g]
    loaded = {r.name: study_runs.load_run(r, root, size) for r in batch}
    summary = finding.summarize(loaded, size)
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
      json.dump(record(finding, summary, argv, tuned, size), f, indent=1)
    print(f"{name}: {summary['verdict']}: {summary['why']}")


if __name__ == '__main__':
  main()
