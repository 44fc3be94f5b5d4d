"""Scan over layers (`model.scan_layers`): the stack as one `jax.lax.scan` over its repeating unit.

An unscanned stack holds one Block per layer; XLA compiles every layer separately, so compile
time grows with depth. A scanned stack holds P = `ModelConfig.layer_period()` Blocks (the unit
after which FFN and attention kinds repeat: lcm of `moe.every` and `attention.layer_kinds`),
block p standing for layers p, P + p, 2P + p, ...: each of its parameters and buffers gains a
leading 'layers' axis of U = num_layers / P units (logical name 'layers', replicated by the
rules table). A forward pass scans over the U units, applying blocks 0..P-1 in each, so XLA
compiles one unit. Under `model.remat` each block is still rematerialized on its own, and in the
backward pass the scan's loop recomputes one unit at a time.

The encoder-decoder scans its two stacks ('encoder_blocks', 'decoder_blocks') alike, each over
its own units of the same period; a decoder block's cross-attention input (the encoder output)
is the same for every layer, and in decoding its per-layer cross-attention caches are stacked
per unit position like the KV caches.

Layout: scanned `blocks/p/<name>`[u] is unscanned `blocks/(u*P + p)/<name>` (likewise under
each key of `STACKS`). `to_scanned` and `to_unscanned` convert a state dict between the two
(stacking or slicing, nothing recomputed); `init_from` applies them, so a run can start from
the other layout's checkpoint (its optimizer state starts fresh). Resuming a run in the other
layout is refused (the optimizer moments would have to be converted too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax.moe import layer_stats

# The logical axis name of the stacked-layers dim (config.logical_axis_rules maps it to None).
LAYERS_AXIS = 'layers'
_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}
# The state-dict keys of the layer stacks: the decoder-only model's, the encoder-decoder's two.
STACKS = ('blocks', 'encoder_blocks', 'decoder_blocks')


class LayoutError(ValueError):
  """A stack whose layers cannot be stacked into the scanned layout (`to_scanned`)."""


def stacked_blocks(make_block: Callable[[int, nnx.Rngs], nnx.Module], period: int, units: int,
                   rngs: nnx.Rngs) -> nnx.List:
  """P = `period` blocks, block p built by `make_block(p, rngs)` once per unit (`units` draws of
  its initialisers from `units` keys split off `rngs.params()`, stacked): every variable [U, ...]
  with 'layers' first in its logical axes."""
  make = nnx.vmap(lambda p, key: make_block(p, nnx.Rngs(params=key)), in_axes=(None, 0),
                  out_axes=0, transform_metadata=_METADATA)
  return nnx.List([make(p, jax.random.split(rngs.params(), units)) for p in range(period)])


def make_stack(make_block: Callable[[int, nnx.Rngs], nnx.Module], num_layers: int, cfg,
               rngs: nnx.Rngs) -> nnx.List:
  """A stack of `num_layers` blocks, `make_block(layer, rngs)` each: one Block per layer, or with
  `cfg.scan_layers` (a `ModelConfig`) the P = `cfg.layer_period()` stacked blocks of
  `stacked_blocks` (block p built as layer p: every unit repeats the first's kinds)."""
  if not cfg.scan_layers:
    return nnx.List([make_block(i, rngs) for i in range(num_layers)])
  period = cfg.layer_period()
  return stacked_blocks(make_block, period, num_layers // period, rngs)


def stack_over_units(tree, units: int):
  """`tree` (e.g. an empty KV cache) repeated over a leading units axis: [...] -> [U, ...]."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (units, *x.shape)), tree)


def num_units(blocks: nnx.List) -> int:
  """U: the length of the stacked 'layers' axis of scanned `blocks`."""
  return jax.tree.leaves(nnx.state(blocks[0]))[0].shape[0]


def forward(blocks: nnx.List, run_block: Callable, x_BLD: jax.Array, positions_BL: jax.Array,
            rng: jax.Array | None, mask_BL: jax.Array | None, constrain: Callable,
            layer_dims, extra: tuple = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The residual stream [B, L, D] through every layer of scanned `blocks`, in layer order.

  `run_block(block, x_BLD, positions_BL, key, mask_BL, *extra) -> (x_BLD, report)` runs one
  block (as in the unscanned loop: remat and FSDP gathering included); `extra` are inputs every
  layer reads alike (the decoder's encoder output [B, T, D] and mask [B, T]), broadcast over
  the units. Layer i = u*P + p draws its key as `fold_in(rng, i)`, as unscanned. `constrain`
  reshards the stream after each block. Returns (x_BLD, stats) with stats in
  `layer_stats.stack`'s layout over all num_layers layers; buffers the blocks update (router
  biases) are written back.
  """
  period, units = len(blocks), num_units(blocks)
  keys = None
  if rng is not None:
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(units * period))
    keys = keys.reshape(units, period, *keys.shape[1:])

  @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), transform_metadata=_METADATA)
  def unit(blocks, x_BLD, keys_P):
    reports = []
    for p, block in enumerate(blocks):
      key = None if keys_P is None else keys_P[p]
      x_BLD, report = run_block(block, x_BLD, positions_BL, key, mask_BL, *extra)
      x_BLD = constrain(x_BLD)
      reports.append(report)
    return x_BLD, layer_stats.stack(reports, layer_dims)

  x_BLD, stats = unit(blocks, x_BLD, keys)
  # [U, per unit, ...] -> [U * per unit, ...]: unit-major is layer order.
  return x_BLD, {k: v.reshape(v.shape[0] * v.shape[1], *v.shape[2:]) for k, v in stats.items()}


def decode(blocks: nnx.List, x_BLD: jax.Array, caches: tuple,
           crosses: tuple | None = None, token_ids_BL: jax.Array | None = None
           ) -> tuple[jax.Array, tuple]:
  """`Block.decode` through every layer of scanned `blocks`: x [B, L, D] and P caches, cache p
  stacked over the units like block p's variables ([U, B, T, H, K]); -> (x, updated caches).
  `crosses`: for decoder blocks, their P cross-attention caches, stacked alike (`per_unit`),
  passed to `block.decode` after the cache; else `token_ids_BL` [B, L] (the decoder-only
  model's new tokens, for hash routing) are."""

  @nnx.scan(in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata=_METADATA)
  def unit(blocks, x_BLD, caches_P, crosses_P):
    new_caches = []
    for p, (block, cache) in enumerate(zip(blocks, caches_P)):
      after = (crosses_P[p],) if crosses_P is not None else (
          (token_ids_BL,) if token_ids_BL is not None else ())
      x_BLD, cache = block.decode(x_BLD, cache, *after)
      new_caches.append(cache)
    return x_BLD, tuple(new_caches)

  return unit(blocks, x_BLD, caches, crosses)


def per_unit(blocks: nnx.List, fn: Callable, *args) -> tuple:
  """`fn(block, *args)` for every layer of scanned `blocks`, `args` alike for all: P results,
  result p stacked over the units ([U, ...]) as `decode` takes them (the decoder's
  cross-attention caches of one encoder output)."""
  run = nnx.vmap(fn, in_axes=(0, *(None for _ in args)), out_axes=0, transform_metadata=_METADATA)
  return tuple(run(block, *args) for block in blocks)


def unstacked_blocks(blocks: nnx.List) -> list[nnx.Module]:
  """Scanned `blocks` as one Block per layer, in layer order (copies, with the 'layers' axis
  dropped from their sharding names): what tools that hook single layers run on."""
  out = []
  for u in range(num_units(blocks)):
    for block in blocks:
      graphdef, state = nnx.split(block)
      sliced = jax.tree.map(lambda x: x[u], state)
      sliced = nnx.spmd.remove_axis(sliced, 0, _METADATA)
      out.append(nnx.merge(graphdef, sliced))
  return out


def to_scanned(tree: Mapping, period: int) -> dict:
  """A params/buffers dict of the unscanned layout ({'blocks': {layer: {...}}, ...}) in the
  scanned one ({'blocks': {p: {...} stacked over units}}), each stack of `STACKS` present
  converted; other entries unchanged. Layers without state (e.g. dense blocks in a buffers
  dict) may be missing, consistently per p. Raises LayoutError naming the first layer whose
  parameters differ from its unit's first."""
  return {**tree, **{k: _stack(tree[k], period, k) for k in STACKS if k in tree}}


def _stack(blocks: Mapping, period: int, stack: str) -> dict:
  stacked = {}
  for p in sorted({layer % period for layer in blocks}):
    group = [i for i in sorted(blocks) if i % period == p]
    shapes = lambda i: jax.tree.map(jnp.shape, blocks[i])
    for i in group[1:]:
      if shapes(i) != shapes(group[0]):
        where = '' if stack == 'blocks' else f'{stack} '
        raise LayoutError(f'{where}layer {i} differs from layer {group[0]} in its parameters: the '
                          f'stack does not repeat every {period} layers, so it cannot be scanned')
    stacked[p] = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in group])
  return stacked


def to_unscanned(tree: Mapping, period: int) -> dict:
  """The inverse of `to_scanned`: layer u*P + p is slice u of scanned block p."""
  return {**tree, **{k: _unstack(tree[k], period) for k in STACKS if k in tree}}


def _unstack(blocks: Mapping, period: int) -> dict:
  layers = {}
  for p, block in blocks.items():
    for u in range(jax.tree.leaves(block)[0].shape[0]):
      layers[u * period + p] = jax.tree.map(lambda x: x[u], block)
  return dict(sorted(layers.items()))


def relayout(tree: Mapping, source_cfg, target_cfg) -> dict:
  """A params/buffers dict of a model built from `source_cfg` (a `ModelConfig`) in the layer
  layout of `target_cfg`: unchanged when both scan or neither does (with the same period)."""
  source_period = source_cfg.layer_period() if source_cfg.scan_layers else None
  target_period = target_cfg.layer_period() if target_cfg.scan_layers else None
  if source_period == target_period or not any(k in tree for k in STACKS):
    return dict(tree)
  if source_period is not None:
    tree = to_unscanned(tree, source_period)
  return tree if target_period is None else to_scanned(tree, target_period)
