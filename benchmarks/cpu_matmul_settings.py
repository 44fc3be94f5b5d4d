r"""Which XLA:CPU settings reach the CPU's bfloat16 matmul throughput: one record per setting.

  python benchmarks/cpu_matmul_settings.py --out=docs/results/cpu_matmul_settings.json
  python benchmarks/cpu_matmul_settings.py --quick     # seconds: two settings, small shapes

Each XLA_FLAGS setting runs in its own process (XLA reads the flags once, at start-up); the
processes stay alive and take turns, each timing once per round (interleaved: the shared
machine's load changes hit every setting alike) the matmul variants a training step uses, [T, D]
x [D, F] (default T 4096, D 512, F 2048, the issue's shape): float32; bfloat16 in and out;
bfloat16 in with float32 accumulation (`preferred_element_type`); float32 in with the
BF16_BF16_F32 dot algorithm; the same contraction on [B, L, D] (einsum 'bld,df->blf'); and
bfloat16 forward+backward (x3 FLOPs), also with float32 accumulation. GFLOP/s are medians. Each
bfloat16 variant's result is compared with the float64 product of the same (rounded) inputs:
`rel_error` is max |diff| / max |ref|, to tell a setting that is fast because it computes
something else.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    'default': '',
    'onednn': '--xla_cpu_use_onednn=true',
    'onednn_dot_fusion': '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot',
    'onednn_custom_call': '--xla_cpu_experimental_onednn_custom_call=true',
    'onednn_custom_call_dot': ('--xla_cpu_experimental_onednn_custom_call=true '
                               '--xla_cpu_experimental_onednn_fusion_type=dot'),
    'xnnpack': '--xla_cpu_use_xnnpack=true',
    'xnn_dot_fusion': '--xla_cpu_experimental_xnn_fusion_type=dot',
    'ynn_off': '--xla_cpu_experimental_ynn_fusion_type=',
    'fast_math': '--xla_cpu_enable_fast_math=true',
}


def child(T: int, D: int, F: int) -> None:
  """Serves timings in this process (its XLA_FLAGS already set): prints the variants' errors,
  then for every line read from stdin one JSON line of each variant's seconds, run once."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(0)
  x32 = jnp.asarray(rng.randn(T, D), jnp.float32)
  w32 = jnp.asarray(rng.randn(D, F) / np.sqrt(D), jnp.float32)
  x16, w16 = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
  ref16 = np.asarray(x16, np.float64) @ np.asarray(w16, np.float64)
  bf16_algorithm = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  variants = {
      'float32': (lambda x, w: x @ w, (x32, w32)),
      'bfloat16': (lambda x, w: x @ w, (x16, w16)),
      'bfloat16_f32_accumulate': (
          lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), (x16, w16)),
      'float32_bf16_algorithm': (
          lambda x, w: jnp.dot(x, w, precision=bf16_algorithm,
                               preferred_element_type=jnp.float32), (x32, w32)),
      'bfloat16_3d_einsum': (
          lambda x, w: jnp.einsum('bld,df->blf', x.reshape(-1, min(T, 512), D), w), (x16, w16)),
      'bfloat16_fwd_bwd': (jax.grad(lambda x, w: jnp.sum((x @ w).astype(jnp.float32)), (0, 1)),
                           (x16, w16)),
      'bfloat16_f32_accumulate_fwd_bwd': (jax.grad(lambda x, w: jnp.sum(jnp.dot(
          x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)),
                                                   (0, 1)), (x16, w16)),
  }
  programs, errors = {}, {}
  for name, (fn, args) in variants.items():
    try:
      jitted = jax.jit(fn)
      out = jax.block_until_ready(jitted(*args))
      programs[name] = (jitted, args)
      if name != 'float32' and not name.endswith('fwd_bwd'):  # ref16: bf16 inputs' product.
        y = np.asarray(out, np.float64).reshape(T, F)
        errors[name] = {'rel_error': float(np.max(np.abs(y - ref16)) / np.max(np.abs(ref16)))}
      else:
        errors[name] = {}
      jax.block_until_ready(jitted(*args))
    except Exception as e:  # pylint: disable=broad-except
      errors[name] = {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
  print(json.dumps(errors), flush=True)
  for _ in sys.stdin:
    seconds = {}
    for name, (fn, args) in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      seconds[name] = time.perf_counter() - start
    print(json.dumps(seconds), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='')
  parser.add_argument('--shape', default='4096,512,2048', help='T,D,F')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--settings', default=','.join(SETTINGS))
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.shape, args.repeats, args.settings = '256,64,128', 2, 'default,onednn_custom_call_dot'
  T, D, F = map(int, args.shape.split(','))
  if args.child:
    child(T, D, F)
    return
  sys.path.insert(0, ROOT)
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  record = {'kind': 'cpu_matmul_settings', **timing.machine(), 'shape': [T, D, F],
            'repeats': args.repeats, 'settings': {}}
  base_flags = os.environ.get('XLA_FLAGS', '')
  # One process per setting, all kept alive, timed in turn (setting A's variants, then B's, ...
  # repeated), so that the shared machine's load changes hit every setting alike.
  children = {}
  for name in args.settings.split(','):
    children[name] = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--child', f'--shape={args.shape}'],
        env={**os.environ, 'XLA_FLAGS': f'{base_flags} {SETTINGS[name]}'.strip()},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    record['settings'][name] = {'xla_flags': SETTINGS[name],
                                'variants': json.loads(children[name].stdout.readline())}
  times = {name: [] for name in children}
  for _ in range(args.repeats):
    for name, proc in children.items():
      proc.stdin.write('\n')
      proc.stdin.flush()
      times[name].append(json.loads(proc.stdout.readline()))
  for name, proc in children.items():
    proc.stdin.close()
    proc.wait()
    for variant, entry in record['settings'][name]['variants'].items():
      if 'error' not in entry:
        seconds = statistics.median(t[variant] for t in times[name])
        passes = 3 if variant.endswith('fwd_bwd') else 1  # Backward: two more matmuls.
        entry['gflops'] = passes * 2 * T * D * F / seconds / 1e9
    print(json.dumps({'setting': name, **record['settings'][name]}), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(record, f, indent=1)


if __name__ == '__main__':
  main()
