"""Logical axis names -> mesh axes, through one rules table in the config.

Parameters carry logical names in their `out_sharding` metadata (see `layers.param`); the
config's `logical_axis_rules` maps each name to a mesh axis, a tuple of mesh axes (the dim is
split over their product, e.g. ('batch', ('data', 'fsdp', 'expert'))) or None: replicated. A
mesh axis of size 1 is harmless, so the same rules serve one CPU and a pod.

Within one array a mesh axis shards at most one dim, the first whose name maps to it (flax's
`logical_to_mesh_axes` does the same). That is what makes FSDP one rule: 'embed' -> 'fsdp'
shards every parameter (each has a model dim) and so its optimizer moments, ZeRO-3 style, while
activations [batch, length, embed], whose batch dim already takes 'fsdp', keep embed whole; XLA
gathers each weight where a layer uses it and reduce-scatters its gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stmoe_jax.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'expert', 'model')
# Every logical name a parameter or activation carries; a rule for any other name is a typo.
LOGICAL_AXES = ('batch', 'length', 'embed', 'mlp', 'expert', 'heads', 'kv', 'vocab', 'layers')


def _mesh_axes(entry) -> tuple[str, ...]:
  """A rule's target (None, 'axis' or a list/tuple of axes) as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def check_rules(rules: Sequence[Sequence]) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Validates `config.logical_axis_rules` and returns it as a hashable tuple of pairs.

  Raises ConfigError (one line naming the rule) for an unknown logical name, an unknown mesh
  axis, a logical name listed twice, or a mesh axis used twice within one rule.
  """
  normalized, seen = [], set()
  for rule in rules:
    name, entry = rule
    axes = _mesh_axes(entry)
    if name not in LOGICAL_AXES:
      raise ConfigError(f'config.logical_axis_rules entry {tuple(rule)!r} is invalid: unknown '
                        f'logical name {name!r}; expected one of {LOGICAL_AXES}')
    bad = [a for a in axes if a not in MESH_AXES]
    if bad or len(set(axes)) != len(axes):
      raise ConfigError(f'config.logical_axis_rules entry {tuple(rule)!r} is invalid: expected '
                        f'distinct mesh axes from {MESH_AXES} or None')
    if name in seen:
      raise ConfigError(f'config.logical_axis_rules names {name!r} twice; keep one entry')
    seen.add(name)
    target = None if not axes else axes[0] if len(axes) == 1 else axes
    normalized.append((name, target))
  return tuple(normalized)


@dataclasses.dataclass(frozen=True)
class MeshRules:
  """The device mesh and the (checked) rules table, as the model layers see them.

  The Trainer puts one on `ModelConfig.mesh_rules`, so the MoE layer knows whether and over
  which axes to run expert parallelism without global state; None there means one device.
  """
  mesh: Mesh
  rules: tuple

  def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec of a tuple of logical names (see `logical_to_spec`)."""
    return logical_to_spec(axes, self.rules)

  def mesh_axes(self, logical: str) -> tuple[str, ...]:
    """The mesh axes a logical name maps to, as a tuple ((): replicated)."""
    return _mesh_axes(dict(self.rules).get(logical))

  def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint from its logical axis names (one per dim)."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(axes)))

  def size(self, logical: str) -> int:
    """How many shards the logical name's dim is cut into on this mesh."""
    return int(np.prod([self.mesh.shape[a] for a in self.mesh_axes(logical)]))


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes `MESH_AXES` (absent ones: size 1); one size may be -1 to take the rest.

  Raises ConfigError naming `config.mesh` when the sizes need more devices than there are (or,
  with several processes, fewer: every process's devices must take part).
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f'config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}')
  sizes = {axis: int(mesh_shape.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ConfigError(f'config.mesh: only one axis may be -1, got {fill}')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f'config.mesh.{axis}={size} is invalid: expected a positive size or -1')
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if len(devices) % known:
      raise ConfigError(f'config.mesh: {len(devices)} devices are not divisible by the fixed '
                        f'axes {sizes} (product {known})')
    sizes[fill[0]] = len(devices) // known
  total = int(np.prod(list(sizes.values())))
  if total > len(devices):
    raise ConfigError(f'config.mesh={sizes} is invalid: it needs {total} devices; '
                      f'{len(devices)} available')
  if total < len(devices) and jax.process_count() > 1:
    raise ConfigError(f'config.mesh={sizes} is invalid: a multi-process run must use all '
                      f'{len(devices)} devices (set one axis to -1)')
  # A smaller mesh on one process takes the first devices (e.g. evaluating on one device).
  grid = np.asarray(devices[:total]).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,expert=2' -> {'data': 2, 'fsdp': 1, 'expert': 2, 'model': 1}: axes not named are 1.

  Raises ConfigError naming the bad entry (unknown axis, or a size that is not an integer).
  """
  sizes = {axis: 1 for axis in MESH_AXES}
  for item in filter(None, (part.strip() for part in text.split(','))):
    axis, _, size = item.partition('=')
    if axis not in MESH_AXES or not size.lstrip('-').isdigit():
      raise ConfigError(f'--mesh entry {item!r} is invalid: expected axis=size with axis one '
                        f'of {MESH_AXES}')
    sizes[axis] = int(size)
  return sizes


def logical_to_spec(axes: Sequence[str | None], rules: Sequence[Sequence]) -> PartitionSpec:
  """PartitionSpec for a tuple of logical names; an unmapped name raises ConfigError.

  A mesh axis an earlier dim already uses is left out of a later dim's entry (see the module
  docstring): ('batch', 'embed') with batch -> ('data', 'fsdp'), embed -> 'fsdp' gives
  P(('data', 'fsdp'), None).
  """
  table = dict((name, mesh_axis) for name, mesh_axis in rules)
  missing = [a for a in axes if a is not None and a not in table]
  if missing:
    raise ConfigError(f'logical axis names {missing} have no entry in config.logical_axis_rules')
  used, entries = set(), []
  for a in axes:
    free = tuple(m for m in (() if a is None else _mesh_axes(table[a])) if m not in used)
    used.update(free)
    entries.append(None if not free else free[0] if isinstance(table[a], str) else free)
  return PartitionSpec(*entries)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> dict:
  """NamedShardings for every variable of an (abstract) nnx.State, as a pure dict.

  Variables without logical names are replicated. Raises ConfigError, before compiling, when a
  dim does not split evenly over the mesh axes its logical name maps to.
  """
  def sharding_of(path, variable):
    axes = variable.get_metadata().get('out_sharding') or (None,) * len(variable.shape)
    spec = logical_to_spec(axes, rules)
    for dim, name, entry in zip(variable.shape, axes, spec):
      if dim % num_shards(mesh, entry):
        where = '.'.join(str(getattr(k, 'key', k)) for k in path)
        raise ConfigError(f'parameter {where} dim {name!r} of size {dim} does not split over '
                          f'mesh axes {entry} ({num_shards(mesh, entry)} shards): change '
                          'config.mesh or map the name to None in config.logical_axis_rules')
    return NamedSharding(mesh, spec)

  shardings = jax.tree.map_with_path(sharding_of, abstract_state,
                                     is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of [batch, length] input arrays: batch over the mesh axis of 'batch'."""
  return NamedSharding(mesh, logical_to_spec(('batch', None), rules))


def num_shards(mesh: Mesh, spec_entry) -> int:
  """How many pieces one PartitionSpec entry (None, an axis, or a tuple of axes) cuts a dim into."""
  axes = () if spec_entry is None else (spec_entry if isinstance(spec_entry, tuple)
                                        else (spec_entry,))
  return int(np.prod([mesh.shape[a] for a in axes]))
