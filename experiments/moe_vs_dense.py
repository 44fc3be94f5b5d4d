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
  3. Main runs: every arm at the same seeds (0, 1, 2), NUM_STEPS on a warmup-stable-decay
     schedule. The complete schedules of 1/4 and 1/2 the length branch off each main run's
     checkpoint where their decay starts (0.8 x their length) and run only their own decay, so
     every arm has three complete runs per seed (see `analysis.steps_to_match`). Same seed =
     same batches in the same order and the same initialisation.
  4. The summary, tables and plots.

Schedule-fair speedup: with a decaying schedule a run's loss halfway through is not what that
model reaches when trained for half the steps, so speedups read complete runs only. An arm's
steps to dense's final loss interpolate, linearly in log(steps), between its complete runs
(N/4, N/2, N); step speedup = dense's N / those steps (a lower bound 4.0 when the N/4 run
already gets there; below 1 the dense runs are interpolated instead: dense steps to the arm's
final loss / N). Each speedup is taken seed for seed against dense on the same seed, then
averaged (the spread is reported); the analysis refuses arms whose seeds differ from dense's.
Time speedup = step speedup x the arm's tokens/s / dense's, both the runs' own (median over
each run's logging windows; every run measured the same way, one run per core). Runs whose
final evaluation is logged are skipped, so rerunning resumes the study.

  python experiments/moe_vs_dense.py --reanalyze=docs/results    # summary from results.csv

  python experiments/moe_vs_dense.py --complete_seeds=docs/results --root=runs/mvd --cores=0,1

`--complete_seeds=DIR` trains (in --root) the main runs and branches of every arm and seed of
plan.SEEDS that DIR/results.csv lacks, appends their evaluations and reanalyzes.
  python experiments/moe_vs_dense.py --horizon=docs/results --root=runs/mvd --cores=0,1 --seeds=0

`--horizon=DIR` trains (in --root) the longer horizon (experiments/study/horizon.py): dense and
the two best MoE arms as complete runs of N/4, N/2, N, 2N and 4N at DIR/tuned.json's choices,
for --seeds, and writes DIR/horizon.json (step and time speedups at each horizon, seed for seed)
and DIR/horizon.png. Rerunning resumes it, and a later call with more seeds adds them.
`--reanalyze=DIR` rewrites DIR/summary.json and DIR/results.md from DIR/results.csv and
DIR/tuned.json with the current analysis, training nothing (the seeds every arm shares).

Writes to --root: results.csv (every evaluation of every run), results.md, summary.json (one
entry per arm), tuned.json (the stage 1-2 choices), loss_curves.png and experts.png.

The library is experiments/study/: plan.py (the runs of each stage), runs.py (training,
resuming, loading runs), analysis.py (speedups), report.py (tables, plots) and
stages.py (the stages in order).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from experiments.study import runs  # pylint: disable=g-import-not-at-top
from experiments.study import stages  # pylint: disable=g-import-not-at-top


def main(argv: list[str] | None = None) -> None:
  """Parses the flags and runs (or resumes) the study; `--quick` is the tiny smoke-test size."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  runs.add_flags(parser, 'runs/moe_vs_dense')
  parser.add_argument('--reanalyze', default='', help='A directory holding a finished study\'s '
                      'results.csv and tuned.json: rewrite its summary.json and results.md.')
  parser.add_argument('--complete_seeds', default='', help='A directory holding a finished '
                      "study's results.csv and tuned.json: train (in --root) the main runs of "
                      'the arms and seeds it lacks, append them and reanalyze.')
  parser.add_argument('--horizon', default='', help='A directory holding a finished study\'s '
                      'tuned.json: train (in --root) the N/4..4N horizon runs and write '
                      'horizon.json and horizon.png there.')
  parser.add_argument('--seeds', default='0,1,2', help='--horizon only: the seeds to train.')
  args = parser.parse_args(argv)
  size = 'quick' if args.quick else 'full'
  cores = runs.cores(args)
  if args.seeds != parser.get_default('seeds') and not args.horizon:
    parser.error(f'--seeds={args.seeds!r} is read by --horizon only')
  if args.horizon:
    seeds = [int(s) for s in args.seeds.split(',') if s]
    command = 'python experiments/moe_vs_dense.py ' + ' '.join(sys.argv[1:] if argv is None
                                                               else argv)
    print(stages.run_horizon(args.horizon, args.root, size, args.data_dir, cores, seeds, command))
    return
  if args.complete_seeds:
    print(stages.complete_seeds(args.complete_seeds, args.root, size, args.data_dir, cores))
    return
  if args.reanalyze:
    print(stages.reanalyze(args.reanalyze, size))
    return
  stages.run_study(args.root, size, args.data_dir, cores)


if __name__ == '__main__':
  main()
