r"""Routers compared on the study's fine-grained arm: every ROUTER_OPTIONS entry, matched seeds.

  python experiments/routers.py --root=runs/routers --cores=1          # about 80 core-minutes
  python experiments/routers.py --root=/tmp/r --quick --routers=relu   # smoke test

Each router of configs/moe_vs_dense.py's ROUTER_OPTIONS (classic and since ST-MoE,
docs/routers.md) replaces the gating of fine64 (top-8 of 64 experts of width 32) and trains the
study's short complete schedule (stage 1's SWEEP_STEPS on the warmup-stable-decay schedule) at
fine's tuned peak rate and the study's tuned routing (docs/results/tuned.json), seeds 0 and 1;
'softmax_topk' is fine64's own gating. Same seed = same initialisation of the shared parameters
and the same batches. Each router's difference in final validation loss is taken seed for seed
against softmax_topk on that seed. Finished runs are skipped, so rerunning resumes.

Writes root/routers.json: per router, its overrides, seeds, final validation loss and bits/byte
per seed, the per-seed difference to softmax_topk, the runs' median tokens/s, and the final
evaluation's routing metrics (mean over MoE layers). docs/generate.py writes the table in
docs/routers.md from its copy in docs/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import moe_vs_dense  # pylint: disable=g-import-not-at-top
from experiments.study import analysis  # pylint: disable=g-import-not-at-top
from experiments.study import plan  # pylint: disable=g-import-not-at-top
from experiments.study import runs  # pylint: disable=g-import-not-at-top

ARM = 'fine64'
BASELINE = 'softmax_topk'
SEEDS = (0, 1)
# Routing metrics of the final evaluation, averaged over the MoE layers.
LAYER_METRICS = ('dropped_fraction', 'tokens_left_behind', 'router_entropy', 'router_confidence',
                 'max_load_ratio', 'null_choice_fraction', 'experts_per_token')


def router_runs(size: str, tuned: dict, routers: list[str]) -> list[plan.Run]:
  """One run per router and seed: fine64 at the tuned rate and routing, the sweep's schedule;
  a router's own settings win over the tuned routing's (quantile balancing drops the loss)."""
  fam = plan.family(ARM)
  own = moe_vs_dense.router_options(*moe_vs_dense.ARMS[ARM][1:])
  out = []
  for router in routers:
    mine = {f'moe.{k}' for k in own.get(router, {})}
    overrides = tuple((k, v) for k, v in tuned['routing_overrides'].items() if k not in mine)
    for seed in SEEDS:
      out.append(plan.Run(f'routers/{ARM}_{router}_s{seed}', ARM, seed, tuned['lr'][fam],
                          plan.SWEEP_STEPS[size], 'routers', overrides,
                          router='' if router == BASELINE else router))
  return out


def layer_means(final: dict) -> dict:
  layers = final.get('moe_layers', [])
  return {k: round(float(np.mean([l[k] for l in layers])), 5)
          for k in LAYER_METRICS if layers and all(k in l for l in layers)}


def summarize(loaded: list[dict], routers: list[str]) -> list[dict]:
  """routers.json's entries, softmax_topk's first."""
  by = {(x['run'].router or BASELINE, x['run'].seed): x for x in loaded}
  base = {s: analysis.final_eval(by[BASELINE, s]['records'])['loss'] for s in SEEDS}
  out = []
  for router in routers:
    finals = [analysis.final_eval(by[router, s]['records']) for s in SEEDS]
    losses = [f['loss'] for f in finals]
    speeds = [analysis.run_tokens_per_sec(by[router, s]['records']) for s in SEEDS]
    means = [layer_means(f) for f in finals]
    out.append({
        'router': router, 'run': by[router, SEEDS[0]]['run'].name.rsplit('_s', 1)[0],
        'overrides': {k: list(v) if isinstance(v, tuple) else v for k, v in
                      moe_vs_dense.router_options(*moe_vs_dense.ARMS[ARM][1:]).get(router, {})
                      .items()},
        'seeds': list(SEEDS),
        'params': by[router, SEEDS[0]]['params'],
        'final_val_loss': [round(x, 5) for x in losses],
        'final_val_loss_mean': round(float(np.mean(losses)), 5),
        'final_bits_per_byte': [round(f['bits_per_byte'], 5) for f in finals],
        'delta_vs_baseline': [round(l - base[s], 5) for l, s in zip(losses, SEEDS)],
        'tokens_per_sec_in_runs': round(float(np.median(speeds)), 1),
        **{k: round(float(np.mean([m[k] for m in means])), 5)
           for k in means[0] if all(k in m for m in means)},
    })
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  runs.add_flags(parser, 'runs/routers', tuned=True)
  parser.add_argument('--routers', default='', help='Comma-separated subset (default: all).')
  args = parser.parse_args(argv)
  size = 'quick' if args.quick else 'full'
  routers = [BASELINE, *moe_vs_dense.ROUTER_OPTIONS]
  if args.routers:
    routers = [BASELINE] + [r for r in args.routers.split(',') if r != BASELINE]
    unknown = sorted(set(routers) - {BASELINE, *moe_vs_dense.ROUTER_OPTIONS})
    if unknown:
      parser.error(f'--routers={args.routers!r}: unknown {unknown}; expected '
                   f'{list(moe_vs_dense.ROUTER_OPTIONS)}')
  with open(args.tuned) as f:
    tuned = json.load(f)
  start = time.time()
  runner = runs.Runner(size, args.root, args.data_dir, runs.cores(args))
  batch = router_runs(size, tuned, routers)
  runner.run_all([[r] for r in batch])
  summary = summarize([runs.load_run(r, args.root, size) for r in batch], routers)
  record = {
      'command': 'python experiments/routers.py ' + ' '.join(argv or sys.argv[1:]),
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
      'date': time.strftime('%Y-%m-%d'), 'arm': ARM, 'steps': plan.SWEEP_STEPS[size],
      'lr': tuned['lr'][plan.family(ARM)], 'tuned_routing': tuned['routing_overrides'],
      'routers': summary,
  }
  with open(os.path.join(args.root, 'routers.json'), 'w') as f:
    json.dump(record, f, indent=1)
  for e in summary:
    print(f"{e['router']:>17}  loss {e['final_val_loss_mean']:.4f}  "
          f"delta {e['delta_vs_baseline']}  tok/s {e['tokens_per_sec_in_runs']:.0f}")
  print(f'wrote {args.root}/routers.json in {(time.time() - start) / 60:.1f} minutes')


if __name__ == '__main__':
  main()
