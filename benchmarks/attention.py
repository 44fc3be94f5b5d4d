r"""Forward+backward time and memory of one attention layer, dense vs each sparse kind.

Prints one JSON object per (kind, sequence length): `fwd_bwd_ms` (median wall time of a jitted
step computing the layer and the gradients of its output's sum w.r.t. input and parameters),
`peak_bytes` (XLA's buffer assignment for that step: temporaries + arguments + outputs) and
`gflops` (XLA's cost analysis). All kinds run side by side in one process at fixed heads and
width. `dense` is the model's CausalSelfAttention, i.e. `jax.nn.dot_product_attention`.

  python benchmarks/attention.py                 # 1k..16k tokens, 4 heads x 32, window 256
  python benchmarks/attention.py --quick         # seconds: a smoke test (tests run it)
  python benchmarks/attention.py --kinds=dense,local --seq_lens=2048,8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from stmoe_jax.models import transformer
from stmoe_jax.config import AttentionConfig, ModelConfig

ALL_KINDS = ('dense', 'local', 'strided', 'block_sparse', 'head_routed')


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='tiny sizes, one repeat')
  parser.add_argument('--kinds', default=','.join(ALL_KINDS))
  parser.add_argument('--seq_lens', default='1024,2048,4096,8192,16384')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--num_heads', type=int, default=4)
  parser.add_argument('--head_dim', type=int, default=32)
  parser.add_argument('--window', type=int, default=256)
  parser.add_argument('--query_chunk', type=int, default=256,
                      help="attention.query_chunk of dense attention; 0 = unchunked")
  parser.add_argument('--block_size', type=int, default=64)
  parser.add_argument('--stride', type=int, default=128)
  parser.add_argument('--num_local_blocks', type=int, default=4)
  parser.add_argument('--num_global_blocks', type=int, default=1)
  parser.add_argument('--head_top_k', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--max_run_bytes', type=float, default=8e9,
                      help="compile but do not run a step whose XLA peak estimate exceeds this "
                           "(dense at 16k needs ~17 GB); its row has fwd_bwd_ms null")
  args = parser.parse_args(argv)
  if args.quick:
    args.seq_lens, args.window, args.block_size, args.stride = '128', 32, 16, 16
    args.num_heads, args.head_dim = 2, 16
    args.num_local_blocks, args.repeats = 2, 1
  return args


def layer_step(kind: str, args: argparse.Namespace):
  """(jitted fwd+bwd step, its params, x) for one attention layer of `kind`."""
  d_model = args.num_heads * args.head_dim
  att = AttentionConfig(kind=kind, block_size=args.block_size, window=args.window,
                        stride=args.stride, num_local_blocks=args.num_local_blocks,
                        num_global_blocks=args.num_global_blocks, head_top_k=args.head_top_k,
                        query_chunk=args.query_chunk)
  cfg = ModelConfig(d_model=d_model, num_layers=1, num_heads=args.num_heads,
                    head_dim=args.head_dim, dtype=args.dtype, attention=att)
  layer = transformer.make_attention(cfg, 0, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)

  def loss(params, x_BLD):
    positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
    y_BLD, _ = nnx.merge(graphdef, params)(x_BLD, positions_BL)
    return jnp.sum(y_BLD.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def measure(kind: str, seq_len: int, args: argparse.Namespace) -> dict:
  """Compiles and times one (kind, seq_len) step; returns its JSON row."""
  step, params = layer_step(kind, args)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, seq_len,
                                                args.num_heads * args.head_dim), args.dtype)
  compiled = step.lower(params, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  mem = compiled.memory_analysis()
  peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
          if mem is not None else -1)
  times = []
  if peak <= args.max_run_bytes:
    jax.block_until_ready(compiled(params, x))  # Warm-up.
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, x))
      times.append(time.perf_counter() - start)
  return {'kind': kind, 'seq_len': seq_len,
          'fwd_bwd_ms': 1e3 * statistics.median(times) if times else None,
          'peak_bytes': int(peak), 'gflops': float(cost.get('flops', -1)) / 1e9,
          'batch': args.batch, 'num_heads': args.num_heads, 'head_dim': args.head_dim,
          'window': args.window, 'block_size': args.block_size, 'query_chunk': args.query_chunk,
          'device': jax.devices()[0].device_kind}


def main(argv=None) -> None:
  args = parse_args(argv)
  kinds = args.kinds.split(',')
  for kind in kinds:
    if kind not in ALL_KINDS:
      raise SystemExit(f'error: --kinds has {kind!r}; expected some of {ALL_KINDS}')
  for seq_len in (int(s) for s in args.seq_lens.split(',')):
    for kind in kinds:
      print(json.dumps(measure(kind, seq_len, args)), flush=True)


if __name__ == '__main__':
  main()
