r"""Compile time against depth, scanned and unscanned (`model.scan_layers`).

  python benchmarks/scan_compile.py --config=configs/stmoe.py:size=base --depths=8,48
  python benchmarks/scan_compile.py --config=configs/stmoe.py:size=tiny --depths=2,4 \
    --batch=4 --devices=1     # seconds

Runs `benchmarks/scale.py` (lower + compile the Trainer's train step from abstract shapes, in a
fresh process each, so no compilation cache is shared) for every depth, with and without
scanned layers, and prints one JSON line: per run the lower and compile seconds and temp bytes,
and per layout the ratio of the deepest to the shallowest model's lower + compile seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/stmoe.py:size=base', help='config file[:arg]')
  parser.add_argument('--depths', default='8,48', help='model.num_layers values, comma-separated')
  parser.add_argument('--devices', type=int, default=1, help='simulated CPU devices')
  parser.add_argument('--mesh', default='data=-1', help='mesh axis sizes')
  parser.add_argument('--batch', type=int, default=8, help='global batch')
  parser.add_argument('--remat', default='', help="model.remat (default: the config's)")
  return parser.parse_args(argv)


def compile_once(args, depth: int, scan: bool) -> dict:
  """One scale.py run in a fresh process: its JSON record."""
  command = [sys.executable, os.path.join(ROOT, 'benchmarks', 'scale.py'),
             f'--config={args.config}', f'--devices={args.devices}', f'--mesh={args.mesh}',
             f'--batch={args.batch}', f'--override=model.num_layers={depth}',
             f'--override=model.scan_layers={scan}']
  if args.remat:
    command.append(f'--remat={args.remat}')
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
  if result.returncode:
    raise SystemExit(f'scale.py failed for num_layers={depth} scan_layers={scan}:\n'
                     f'{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  args = parse_args(argv)
  depths = [int(d) for d in args.depths.split(',')]
  runs, ratio = [], {}
  for scan in (True, False):
    seconds = {}
    for depth in depths:
      record = compile_once(args, depth, scan)
      seconds[depth] = record['lower_seconds'] + record['compile_seconds']
      runs.append({'num_layers': depth, 'scan_layers': scan,
                   'lower_seconds': record['lower_seconds'],
                   'compile_seconds': record['compile_seconds'],
                   'temp_bytes': record['temp_bytes'], 'total_params': record['total_params']})
    ratio['scanned' if scan else 'unscanned'] = round(seconds[depths[-1]] / seconds[depths[0]], 2)
  out = {'config': args.config, 'depths': depths, 'batch': args.batch, 'devices': args.devices,
         'deepest_over_shallowest': ratio, 'runs': runs}
  print(json.dumps(out), flush=True)
  return out


if __name__ == '__main__':
  main()
