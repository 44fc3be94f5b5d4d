r"""Guard against slowing down: MoE/dense tokens/s ratios at small sizes vs a committed baseline.

  python benchmarks/ratio_guard.py                    # compare (CI: tests/test_benchmarks.py)
  python benchmarks/ratio_guard.py --write_baseline   # re-measure the baseline record,
                                                      # docs/results/moe_ratio_baseline.json

Times the forward+backward of MoE layers (scatter, einsum, dropless with moe.grouped_matmul
'auto', 8 experts, top-2) and of the FLOP-matched dense FFN, repeats interleaved, and divides
the dense median by each MoE median. Ratios, not times: the CPUs are shared and absolute times
move with the load; a slowdown of the MoE path moves the ratio. Exits 1, naming the layer, when
a ratio falls by more than `--max_drop` (a third) below the baseline's. Prints one JSON line.
Runs with XLA's default optimisation level (the tests lower it to compile faster: that would
change the ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

if __name__ == '__main__':
  # Before JAX starts: measure the programs as users run them, not as the tests compile them.
  # (Only as a script: an importer's later subprocesses keep its flags.)
  os.environ['XLA_FLAGS'] = re.sub(r'--xla_backend_optimization_level=\S+', '',
                                   os.environ.get('XLA_FLAGS', '')).strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
from flax import nnx  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import timing  # noqa: E402
from benchmarks.device_check import make_layer  # noqa: E402
from benchmarks.moe_layer import fwd_bwd  # noqa: E402
from stmoe_jax.moe.experts import Mlp  # noqa: E402

BASELINE = os.path.join(ROOT, 'docs', 'results', 'moe_ratio_baseline.json')
# (tokens, d_model, expert_d_ff, num_experts, top_k, group_size, dtype): about 2.4 GFLOP per
# MoE forward+backward, large enough that matmuls, not dispatch overhead alone, set the ratio.
SIZES = (2048, 128, 256, 8, 2, 256, 'float32')
LAYERS = ('scatter', 'einsum', 'dropless:auto')


def measure(repeats: int) -> dict[str, float]:
  """{layer: dense FFN seconds / layer seconds}, interleaved medians."""
  tokens, D, F, _, k, _, dtype = SIZES
  x = jax.random.normal(jax.random.PRNGKey(0), (tokens // 64, 64, D)).astype(dtype)
  programs = {'dense_ffn': fwd_bwd(Mlp(D, k * F, 'geglu', 0.1, jax.numpy.dtype(dtype),
                                       rngs=nnx.Rngs(0)), x)}
  for name in LAYERS:
    dispatch, _, backend = name.partition(':')
    programs[name] = fwd_bwd(make_layer(dispatch, backend or 'auto', SIZES), x)
  seconds = timing.interleaved({n: (fn, (p, x)) for n, (fn, p) in programs.items()}, repeats)
  return {name: seconds['dense_ffn'] / seconds[name] for name in LAYERS}


def compare(ratios: dict[str, float], baseline: dict[str, float],
            max_drop: float) -> list[str]:
  """One message per layer whose ratio fell more than `max_drop` (a fraction) below baseline."""
  return [f'{name}: MoE/dense tokens/s ratio {ratios[name]:.3f} is more than {max_drop:.0%} '
          f'below the baseline {baseline[name]:.3f}'
          for name in baseline if ratios[name] < (1 - max_drop) * baseline[name]]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--baseline', default=BASELINE)
  parser.add_argument('--write_baseline', action='store_true')
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--max_drop', type=float, default=1 / 3)
  args = parser.parse_args(argv)
  ratios = measure(args.repeats)
  record = {'kind': 'moe_ratio_guard', **timing.machine(), 'sizes': SIZES,
            'repeats': args.repeats, 'ratios': ratios}
  if args.write_baseline:
    with open(args.baseline, 'w') as f:
      json.dump(record, f, indent=1)
    print(json.dumps(record))
    return 0
  with open(args.baseline) as f:
    baseline = json.load(f)['ratios']
  failures = compare(ratios, baseline, args.max_drop)
  print(json.dumps({**record, 'baseline': baseline, 'failures': failures}))
  for message in failures:
    print(f'error: {message}', file=sys.stderr)
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
