r"""Checks and times the MoE kernels on whatever accelerator JAX finds; one JSON record.

  python benchmarks/device_check.py                  # the device: ~3-5 minutes on one GPU/TPU
  python benchmarks/device_check.py --quick --out_dir=/tmp/dc   # tiny sizes: seconds (CI, CPU)

On the device it
  1. checks every grouped-matmul backend (`stmoe_jax.moe.grouped_matmul.BACKENDS`) against a float64
     numpy loop over groups, outputs and both gradients, in float32 (highest matmul precision)
     and bfloat16; for tokamax also which of its kernels (mosaic, triton, xla) accept the shapes;
  2. checks the three dispatch paths (einsum, scatter, and dropless with each backend) of a
     whole `MoeLayer` against a loop over experts that runs every expert on every token and
     sums the routed ones, outputs and gradients of every parameter and the input;
  3. times the MoE layer's forward+backward per dispatch and backend against the FLOP-matched
     dense FFN, repeats interleaved, and reports each MoE/dense tokens/s ratio;
  4. times the base preset's train step (`configs/stmoe.py:size=base`, scatter and dropless):
     tokens/s and MFU against the device's datasheet bfloat16 peak (target >= 30%).
Backends whose kernel would only be interpreted here (megablox off TPU) are skipped outside
--quick; --quick (tiny sizes, CI) checks every backend but runs each layer path once. A failing
check is recorded with its error, not raised: the record is the result.
Writes <out_dir>/<platform>_<device>_<date>.json (default out_dir docs/results/device/) and
prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import timing  # noqa: E402
from benchmarks.moe_layer import fwd_bwd  # noqa: E402
from stmoe_jax.models import flops  # noqa: E402
from stmoe_jax.moe import grouped_matmul as gmm  # noqa: E402
from stmoe_jax.config import MoeConfig, ModelConfig  # noqa: E402
from stmoe_jax.moe.experts import Mlp  # noqa: E402
from stmoe_jax.moe.layer import MoeLayer, from_groups, to_groups  # noqa: E402

MFU_TARGET = 0.30  # Base preset on one H100, bfloat16.
# Sizes: (rows, D, F, E) of the grouped-matmul check; the layer's (tokens, d_model, expert_d_ff,
# num_experts, top_k, group_size, dtype) for the checks and for the timings.
FULL = dict(gmm=(4096, 256, 512, 8), check=(1024, 128, 256, 8, 2, 256, 'float32'),
            time=(16384, 1024, 1024, 32, 2, 1024, 'bfloat16'), repeats=5, steps=10)
QUICK = dict(gmm=(64, 16, 32, 4), check=(128, 16, 32, 4, 2, 64, 'float32'),
             time=(256, 32, 64, 4, 2, 128, 'float32'), repeats=2, steps=2)


def backends(quick: bool) -> list[str]:
  """The grouped-matmul backends to check: all with --quick, else those that run compiled on
  this device (megablox only on TPU)."""
  return [name for name in gmm.BACKENDS
          if quick or name != 'megablox' or gmm.platform() == 'tpu']


def layers(quick: bool) -> tuple[list[str], list[str]]:
  """(layers whose dispatch is checked, layers timed): every dispatch path, dropless with each
  compiled backend; --quick (CI) only exercises each code path once."""
  if quick:
    return ['scatter', 'einsum', 'dropless:auto', 'dropless:tokamax'], ['scatter', 'dropless:auto']
  names = ['scatter', 'einsum'] + [f'dropless:{name}' for name in backends(False)]
  return names, names


def guarded(fn, *args, **kwargs) -> dict:
  """fn's result dict, or {'error': its last line} (a failing check must not end the run)."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc(file=sys.stderr)
    return {'error': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'}


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_grouped_matmul(name: str, dtype, sizes) -> dict:
  """One backend against the float64 loop: y, dx, dw relative errors (max |diff| / max |ref|)."""
  X, D, F, E = sizes
  rng = np.random.RandomState(0)
  group_sizes = rng.multinomial(X - X // 8, np.ones(E) / E).astype(np.int32)  # X/8 rows in none.
  group_sizes[1] = 0  # An empty group.
  x = jnp.asarray(rng.randn(X, D), dtype)
  w = jnp.asarray(rng.randn(E, D, F) / np.sqrt(D), dtype)
  ct = jnp.asarray(rng.randn(X, F), dtype)
  f = lambda x, w: gmm.grouped_matmul(x, w, jnp.asarray(group_sizes), impl=name)
  with jax.default_matmul_precision('highest'):
    y, vjp = jax.vjp(jax.jit(f), x, w)
    dx, dw = vjp(ct)
  x64, w64, ct64 = (np.asarray(a, np.float64) for a in (x, w, ct))
  y_ref, dx_ref, dw_ref, start = np.zeros((X, F)), np.zeros((X, D)), np.zeros((E, D, F)), 0
  for e, n in enumerate(group_sizes):
    rows = slice(start, start + n)
    y_ref[rows], dx_ref[rows] = x64[rows] @ w64[e], ct64[rows] @ w64[e].T
    dw_ref[e] = x64[rows].T @ ct64[rows]
    start += n
  errors = {'y': relative_error(y, y_ref), 'dx': relative_error(dx, dx_ref),
            'dw': relative_error(dw, dw_ref)}
  tolerance = 1e-4 if dtype == jnp.float32 else 2e-2
  return {**errors, 'tolerance': tolerance, 'ok': max(errors.values()) < tolerance}


def tokamax_kernels(sizes) -> dict:
  """Which of tokamax's ragged_dot kernels accept these bfloat16 shapes on this device."""
  if not gmm.available('tokamax'):
    return {'error': 'tokamax is not installed'}
  import tokamax  # pylint: disable=g-import-not-at-top
  gmm.tokamax_matmul(jnp.ones((8, 8)), jnp.ones((1, 8, 8)), jnp.asarray([8]))  # absl flags.
  X, D, F, E = sizes
  x, w = jnp.ones((X, D), jnp.bfloat16), jnp.ones((E, D, F), jnp.bfloat16)
  sizes_E = jnp.full((E,), X // E, jnp.int32)
  result = {}
  for kernel in ('mosaic', 'triton', 'xla'):
    try:
      jax.block_until_ready(jax.jit(lambda x, w, k=kernel: tokamax.ragged_dot(
          x, w, sizes_E, implementation=k))(x, w))
      result[kernel] = 'ok'
    except Exception as e:  # pylint: disable=broad-except
      result[kernel] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]
  return result


def make_layer(dispatch: str, backend: str, sizes, capacity_factor: float = 1.25) -> MoeLayer:
  tokens, D, F, E, k, S, dtype = sizes
  moe = MoeConfig(num_experts=E, top_k=k, expert_d_ff=F, group_size=S, dispatch=dispatch,
                  grouped_matmul=backend, train_capacity_factor=capacity_factor,
                  eval_capacity_factor=capacity_factor)
  return MoeLayer(ModelConfig(d_model=D, d_ff=F, dtype=dtype, moe=moe), rngs=nnx.Rngs(0))


def loop_reference(layer: MoeLayer, x_BLD: jax.Array) -> jax.Array:
  """Every expert on every token, routed choices summed with their gates: [B, L, D]."""
  x_GSD = to_groups(x_BLD, layer.moe.group_size)
  route = layer.route(x_GSD, train=False, rng=None, mask_GS=None)
  E, D = layer.moe.num_experts, x_BLD.shape[-1]
  x_TD = x_GSD.reshape(-1, D)
  weight_TK = jnp.where(route.kept, route.gate, 0.0).reshape(x_TD.shape[0], -1)
  expert_TK = route.expert_index.reshape(x_TD.shape[0], -1)
  y_ETD = layer.experts(jnp.broadcast_to(x_TD, (E,) + x_TD.shape)).astype(jnp.float32)
  y_TD = jnp.zeros(x_TD.shape, jnp.float32)
  for e in range(E):
    y_TD += jnp.sum(jnp.where(expert_TK == e, weight_TK, 0.0), axis=1)[:, None] * y_ETD[e]
  return from_groups(y_TD.reshape(x_GSD.shape), x_BLD.shape)


def check_dispatch(dispatch: str, backend: str, sizes) -> dict:
  """`MoeLayer` (eval mode) against `loop_reference`: output and all gradients."""
  layer = make_layer(dispatch, backend, sizes, capacity_factor=2.0)
  tokens, D = sizes[0], sizes[1]
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(tokens // 32, 32, D), jnp.float32)
  ct = jnp.asarray(rng.randn(tokens // 32, 32, D), jnp.float32)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x, reference):
    module = nnx.merge(graphdef, params, rest)
    y = loop_reference(module, x) if reference else module(x, train=False)[0]
    return jnp.sum(y.astype(jnp.float32) * ct), y

  errors = {}
  with jax.default_matmul_precision('highest'):
    (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True),
                            static_argnums=2)(params, x, False)
    (_, y_ref), grads_ref = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True),
                                    static_argnums=2)(params, x, True)
  errors['y'] = relative_error(y, y_ref)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for (path, g), g_ref in zip(flat, jax.tree.leaves(grads_ref)):
    errors['d' + jax.tree_util.keystr(path)] = relative_error(g, g_ref)
  worst = max(errors.values())
  return {'max_error': worst, 'worst': max(errors, key=errors.get), 'ok': worst < 1e-4}


def time_layers(sizes, layers: list[str], repeats: int) -> dict:
  """Forward+backward seconds of each MoE layer and the dense FFN (interleaved), and ratios."""
  tokens, D, F, E, k, S, dtype = sizes
  x = jax.random.normal(jax.random.PRNGKey(0), (tokens // 64, 64, D)).astype(dtype)
  programs = {'dense_ffn': fwd_bwd(Mlp(D, k * F, 'geglu', 0.1, jnp.dtype(dtype),
                                       rngs=nnx.Rngs(0)), x)}
  for name in layers:
    dispatch, _, backend = name.partition(':')
    programs[name] = fwd_bwd(make_layer(dispatch, backend or 'auto', sizes), x)
  seconds = timing.interleaved({n: (fn, (p, x)) for n, (fn, p) in programs.items()}, repeats)
  active_flops = 3 * k * 3 * 2 * tokens * D * F
  return {name: {'seconds': s, 'tokens_per_sec': tokens / s,
                 'active_flops_per_sec': active_flops / s,
                 'over_dense_tokens_per_sec': seconds['dense_ffn'] / s}
          for name, s in seconds.items()}


def train_steps(quick: bool, steps: int) -> dict:
  """The base preset's train step (tiny with --quick), scatter and dropless: tokens/s, MFU."""
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  from configs import stmoe  # pylint: disable=g-import-not-at-top
  results = {}
  for dispatch in ('dropless',) if quick else ('scatter', 'dropless'):
    config = stmoe.get_config('size=tiny' if quick else 'size=base')
    config.moe.dispatch = dispatch
    if quick:
      config.batch_size = 4
    record = guarded(train_step.benchmark, f"stmoe {'tiny' if quick else 'base'} {dispatch}",
                     config, steps)
    if 'mfu_vs_datasheet' in record and record['mfu_vs_datasheet'] is not None:
      record['meets_mfu_target'] = record['mfu_vs_datasheet'] >= MFU_TARGET
    results[dispatch] = record
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny sizes (seconds, CPU in CI)')
  parser.add_argument('--out_dir', default=os.path.join(ROOT, 'docs', 'results', 'device'))
  parser.add_argument('--skip_train_step', action='store_true')
  args = parser.parse_args(argv)
  sizes = QUICK if args.quick else FULL
  header = timing.machine()
  record = {'kind': 'device_check', **header, 'quick': args.quick,
            'datasheet_bf16_peak': flops.peak_flops_per_device(header['device']),
            'auto_grouped_matmul': gmm.resolve('auto'),
            'tokamax_available': gmm.available('tokamax'), 'sizes': sizes}
  names = backends(args.quick)
  record['grouped_matmul'] = {
      f'{name}:{dtype}': guarded(check_grouped_matmul, name, jnp.dtype(dtype), sizes['gmm'])
      for name in names for dtype in ('float32', 'bfloat16')}
  record['tokamax_kernels'] = guarded(tokamax_kernels, sizes['gmm'])
  checked, timed = layers(args.quick)
  record['dispatch'] = {}
  for name in checked:
    dispatch, _, backend = name.partition(':')
    record['dispatch'][name] = guarded(check_dispatch, dispatch, backend or 'auto', sizes['check'])
  record['moe_layer'] = guarded(time_layers, sizes['time'], timed, sizes['repeats'])
  if not args.skip_train_step:
    record['train_step'] = train_steps(args.quick, sizes['steps'])
  record['all_checks_ok'] = all(r.get('ok', False) for r in (
      *record['grouped_matmul'].values(), *record['dispatch'].values()))
  os.makedirs(args.out_dir, exist_ok=True)
  slug = re.sub(r'[^A-Za-z0-9]+', '_', f"{header['platform']}_{header['device']}").strip('_')
  path = os.path.join(args.out_dir, f"{slug}_{header['date'][:10]}.json")
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
  print(json.dumps(record), flush=True)
  print(f'wrote {path}', file=sys.stderr)


if __name__ == '__main__':
  main()
