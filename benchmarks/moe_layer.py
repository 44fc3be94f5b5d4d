r"""Forward+backward time of one MoE layer per dispatch strategy vs a FLOP-matched dense FFN.

  python benchmarks/moe_layer.py                      # the issue's sizes, float32 + bfloat16
  python benchmarks/moe_layer.py --quick              # seconds: a smoke test (CI runs it)
  python benchmarks/moe_layer.py --dispatch=dropless:ragged_dot,dropless:blocked   # grouped matmuls
  python benchmarks/moe_layer.py --bound --out=docs/results/moe_layer_<date>.json   # + matmul bound

Prints one JSON object per line. Every layer of a dtype is compiled first and then timed in
turn, repeats interleaved (A, B, A, B, ...), so `over_dense_tokens_per_sec` (dense FFN seconds
over the layer's) holds on a shared machine. First a `matmul_peak` line: the best FLOP/s of plain
[T, D] x [D, F] matmuls (forward+backward, the same shapes the experts run), measured in this
process, so every fraction below is relative to what this machine really does. Then one line
per (dtype, layer, num_experts): seconds per forward+backward (median of --repeats),
tokens/s, active FLOP/s (only the FLOPs a token really uses: k experts' GEGLU matmuls, x3 for
forward+backward; routing, dispatch and combine are overhead and count for nothing),
`fraction_of_peak`, and XLA's compiled memory (`temp_bytes`: scratch the step needs,
`argument_bytes`: parameters and input).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, __file__.rsplit('/benchmarks/', 1)[0])
from benchmarks import timing  # noqa: E402
from stmoe_jax.moe import grouped_matmul  # noqa: E402
from stmoe_jax.config import MoeConfig, ModelConfig  # noqa: E402
from stmoe_jax.moe.experts import Mlp  # noqa: E402
from stmoe_jax.moe.layer import MoeLayer  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
  """Median wall seconds of `fn(*args)` after one warm-up call (which also compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def memory(fn, *args) -> dict:
  stats = fn.lower(*args).compile().memory_analysis()
  if stats is None:
    return {}
  return {'temp_bytes': int(stats.temp_size_in_bytes),
          'argument_bytes': int(stats.argument_size_in_bytes)}


def matmul_peak(tokens: int, d_model: int, d_ff: int, dtype, repeats: int) -> float:
  """Best FLOP/s over forward+backward of x @ w for the expert and dense matmul shapes."""
  best = 0.0
  for rows, cols in ((tokens, d_ff), (tokens, 2 * d_ff)):
    x = jnp.ones((rows, d_model), dtype)
    w = jnp.ones((d_model, cols), dtype)
    fn = jax.jit(jax.grad(lambda x, w: jnp.sum(x @ w), (0, 1)))
    seconds = timed(fn, x, w, repeats=repeats)
    best = max(best, 3 * 2 * rows * d_model * cols / seconds)
  return best


def fwd_bwd(module, x):
  """Jitted d/d(params, x) of sum(module(x)): a training step's work for this layer."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, x):
    out = nnx.merge(graphdef, params, rest)(x, train=True) if isinstance(module, MoeLayer) else (
        nnx.merge(graphdef, params, rest)(x),)
    return jnp.sum(out[0].astype(jnp.float32))

  return jax.jit(jax.grad(loss, (0, 1))), params


def matmul_bound(tokens: int, D: int, F: int, E: int, k: int, dtype) -> tuple:
  """(fn, args): the expert matmuls alone at perfect balance and capacity factor 1.0, as one
  batched GEGLU over [E, k*T/E, D] (fwd+bwd): what a layer with free dispatch would cost."""
  rows = k * tokens // E
  x = jnp.ones((E, rows, D), dtype)
  w_up, w_gate = jnp.ones((E, D, F), dtype) * 0.01, jnp.ones((E, D, F), dtype) * 0.01
  w_down = jnp.ones((E, F, D), dtype) * 0.01

  def loss(x, w_up, w_gate, w_down):
    h = jax.nn.gelu(jnp.einsum('ecd,edf->ecf', x, w_gate)) * jnp.einsum('ecd,edf->ecf', x, w_up)
    return jnp.sum(jnp.einsum('ecf,efd->ecd', h, w_down).astype(jnp.float32))

  return jax.jit(jax.grad(loss, (0, 1, 2, 3))), (x, w_up, w_gate, w_down)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tokens', type=int, default=2048)
  parser.add_argument('--d_model', type=int, default=512)
  parser.add_argument('--d_ff', type=int, default=2048, help='hidden width of each expert')
  parser.add_argument('--top_k', type=int, default=2)
  parser.add_argument('--group_size', type=int, default=512)
  parser.add_argument('--experts', default='8,16,32,64')
  parser.add_argument('--dispatch', default='scatter,einsum,dropless',
                      help="moe.dispatch values; 'dropless:<moe.grouped_matmul>' picks the "
                      "grouped matmul (default 'auto')")
  parser.add_argument('--capacity_factor', type=float, default=1.25, help='train capacity factor')
  parser.add_argument('--block_rows', type=int, default=grouped_matmul.BLOCK_ROWS,
                      help="rows per block of the 'blocked' grouped matmul")
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--bound', action='store_true',
                      help='also time the matmul-only bound (batched expert GEGLU, CF 1.0)')
  parser.add_argument('--out', default='', help='Also write every record to this JSON file.')
  parser.add_argument('--quick', action='store_true', help='tiny sizes, one repeat')
  args = parser.parse_args(argv)
  if args.quick:
    args.tokens, args.d_model, args.d_ff, args.group_size = 256, 32, 64, 128
    args.experts, args.dtypes, args.repeats = '4,8', 'float32', 1
  grouped_matmul.BLOCK_ROWS = args.block_rows

  tokens, D, F, k = args.tokens, args.d_model, args.d_ff, args.top_k
  active_flops = 3 * k * 3 * 2 * tokens * D * F  # fwd+bwd x k experts x 3 GEGLU matmuls.
  records = [{'kind': 'machine', **timing.machine()}]
  for dtype_name in args.dtypes.split(','):
    dtype = jnp.dtype(dtype_name)
    peak = matmul_peak(tokens, D, F, dtype, args.repeats)
    records.append({'kind': 'matmul_peak', 'dtype': dtype_name, 'flops_per_sec': peak,
                    'device': jax.devices()[0].device_kind})
    print(json.dumps(records[-1]), flush=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens // 64, 64, D)).astype(dtype)
    runs = [('dense_ffn', None, None)] + [
        (name, E, name) for E in map(int, args.experts.split(','))
        for name in args.dispatch.split(',')]
    # Every program built first, then timed in turn (A, B, C, A, B, C, ...): the ratios to the
    # dense FFN hold even when the machine's load changes during the run.
    programs, meta = {}, {}
    for layer_name, E, dispatch in runs:
      dispatch, _, grouped = (dispatch or 'scatter').partition(':')
      moe = MoeConfig(num_experts=E or 8, top_k=k, expert_d_ff=F, group_size=args.group_size,
                      dispatch=dispatch, grouped_matmul=grouped or 'auto',
                      train_capacity_factor=args.capacity_factor)
      cfg = ModelConfig(d_model=D, d_ff=F, dtype=dtype_name, moe=moe)
      if layer_name == 'dense_ffn':  # FLOP-matched: one FFN as wide as the k experts together.
        module = Mlp(D, k * F, 'geglu', 0.1, dtype, rngs=nnx.Rngs(0))
      else:
        module = MoeLayer(cfg, rngs=nnx.Rngs(0))
      fn, params = fwd_bwd(module, x)
      programs[(layer_name, E)] = (fn, (params, x))
      meta[(layer_name, E)] = memory(fn, params, x)
      if args.bound and layer_name != 'dense_ffn' and ('matmul_bound', E) not in programs:
        programs[('matmul_bound', E)] = matmul_bound(tokens, D, F, E, k, dtype)
        meta[('matmul_bound', E)] = {}
    seconds = timing.interleaved(programs, args.repeats)
    dense_seconds = seconds[('dense_ffn', None)]
    for (layer_name, E), s in seconds.items():
      record = {'kind': 'layer', 'dtype': dtype_name, 'layer': layer_name, 'num_experts': E,
                'tokens': tokens, 'd_model': D, 'expert_d_ff': F, 'top_k': k,
                'capacity_factor': args.capacity_factor, 'block_rows': args.block_rows,
                'seconds': s, 'tokens_per_sec': tokens / s,
                'over_dense_tokens_per_sec': dense_seconds / s,
                'active_flops_per_sec': active_flops / s,
                'fraction_of_peak': active_flops / s / peak, **meta[(layer_name, E)]}
      records.append(record)
      print(json.dumps(record), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(records, f, indent=1)


if __name__ == '__main__':
  main()
