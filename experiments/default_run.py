r"""The README's first number: the default run and its dense twin, as a new user runs them.

  python experiments/default_run.py --root=/tmp/default_run --out=docs/results/default_run.json

For configs/default.py (the MoE) and configs/dense.py (its equal-active-FLOPs dense twin), one
after the other on the whole machine: `python train.py --config=<it> --workdir=<root>/<name>`
timed from launch to exit (start-up, compilation, evaluations and checkpoints included), then
`python eval.py --workdir=<root>/<name>` on the whole validation split. Writes one record: per
config its steps, train.py's wall seconds, the run's median tokens/s, and eval.py's validation
loss and bits per byte; the MoE's gain per step (equal steps) and per second (bits/byte over
train.py's seconds, each run's own). Then the dense twin once more with as many steps as fit in
the MoE's train.py seconds at the twin's measured pace (rounded to 100): the two compared at
equal time. Runs already in --out are kept, so rerunning resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'moe': 'configs/default.py', 'dense': 'configs/dense.py'}


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def measure(name: str, config: str, root: str, steps: int = 0) -> dict:
  """Trains and evaluates `config` (for `steps`, 0 = its own) from an empty workdir; its
  numbers."""
  workdir = os.path.join(root, name)
  shutil.rmtree(workdir, ignore_errors=True)
  env = dict(os.environ, TQDM_DISABLE='1')
  start = time.time()
  flags = [f'--config.num_train_steps={steps}'] if steps else []
  subprocess.run([sys.executable, 'train.py', f'--config={config}',
                  f'--workdir={workdir}', *flags], cwd=REPO, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  seconds = time.time() - start
  out = subprocess.run([sys.executable, 'eval.py', f'--workdir={workdir}'], cwd=REPO, env=env,
                       check=True, capture_output=True, text=True).stdout
  metrics = json.loads(out.strip().splitlines()[-1])
  speeds = [r['tokens_per_sec'] for r in _records(workdir)
            if r['kind'] == 'train' and 'tokens_per_sec' in r]
  return {'config': config, 'steps': metrics['step'], 'train_py_seconds': round(seconds, 1),
          'tokens_per_sec_median': round(float(np.median(speeds)), 1),
          'validation_tokens': metrics.get('num_tokens'),
          'validation_loss': round(metrics['loss'], 5),
          'validation_bits_per_byte': round(metrics['bits_per_byte'], 4)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', default='/tmp/default_run', help='Directory for the runs.')
  parser.add_argument('--out', default='', help='Write the record here (default: print only).')
  args = parser.parse_args()
  runs = {}
  if args.out and os.path.exists(args.out):
    with open(args.out) as f:
      runs = json.load(f)['runs']
  for name, config in CONFIGS.items():
    if name not in runs:
      runs[name] = measure(name, config, args.root)
  moe, dense = runs['moe'], runs['dense']
  if 'dense_equal_time' not in runs:
    steps = round(dense['steps'] * moe['train_py_seconds'] / dense['train_py_seconds'], -2)
    runs['dense_equal_time'] = measure('dense_equal_time', CONFIGS['dense'], args.root,
                                       int(steps))
  record = {
      'command': 'python experiments/default_run.py ' + ' '.join(sys.argv[1:]),
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
      'date': time.strftime('%Y-%m-%d'), 'runs': runs,
      'bits_per_byte_below_dense': round(dense['validation_bits_per_byte'] -
                                         moe['validation_bits_per_byte'], 4),
      'train_py_seconds_ratio': round(moe['train_py_seconds'] / dense['train_py_seconds'], 3),
      'equal_time_bits_per_byte_below_dense': round(
          runs['dense_equal_time']['validation_bits_per_byte'] -
          moe['validation_bits_per_byte'], 4),
  }
  print(json.dumps(record, indent=1))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(record, f, indent=1)


if __name__ == '__main__':
  main()
