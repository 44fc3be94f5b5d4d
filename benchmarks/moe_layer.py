r"""Forward+backward time of one MoE layer per dispatch strategy vs a FLOP-matched dense FFN.

  python benchmarks/moe_layer.py                      # the issue's sizes, float32 + bfloat16
  python benchmarks/moe_layer.py --quick              # seconds: a smoke test (CI runs it)
  python benchmarks/moe_layer.py --dispatch=dropless:ragged_dot,dropless:blocked   # grouped matmuls

Prints one JSON object per line. First a `matmul_peak` line: the best FLOP/s of plain
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
  parser.add_argument('--quick', action='store_true', help='tiny sizes, one repeat')
  args = parser.parse_args(argv)
  if args.quick:
    args.tokens, args.d_model, args.d_ff, args.group_size = 256, 32, 64, 128
    args.experts, args.dtypes, args.repeats = '4,8', 'float32', 1
  grouped_matmul.BLOCK_ROWS = args.block_rows

  tokens, D, F, k = args.tokens, args.d_model, args.d_ff, args.top_k
  active_flops = 3 * k * 3 * 2 * tokens * D * F  # fwd+bwd x k experts x 3 GEGLU matmuls.
  for dtype_name in args.dtypes.split(','):
    dtype = jnp.dtype(dtype_name)
    peak = matmul_peak(tokens, D, F, dtype, args.repeats)
    print(json.dumps({'kind': 'matmul_peak', 'dtype': dtype_name, 'flops_per_sec': peak,
                      'device': jax.devices()[0].device_kind}), flush=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens // 64, 64, D)).astype(dtype)
    runs = [('dense_ffn', None, None)] + [
        (name, E, name) for E in map(int, args.experts.split(','))
        for name in args.dispatch.split(',')]
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
      seconds = timed(fn, params, x, repeats=args.repeats)
      record = {'kind': 'layer', 'dtype': dtype_name, 'layer': layer_name, 'num_experts': E,
                'tokens': tokens, 'd_model': D, 'expert_d_ff': F, 'top_k': k,
                'capacity_factor': args.capacity_factor, 'block_rows': args.block_rows,
                'seconds': seconds, 'tokens_per_sec': tokens / seconds,
                'active_flops_per_sec': active_flops / seconds,
                'fraction_of_peak': active_flops / seconds / peak, **memory(fn, params, x)}
      print(json.dumps(record), flush=True)


if __name__ == '__main__':
  main()
