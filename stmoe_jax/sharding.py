"""Logical axis names -> mesh axes, through one rules table in the config.

Parameters carry logical names in their `out_sharding` metadata (see `layers.param`); the
config's `logical_axis_rules` maps each name to a mesh axis (or None: replicated). A mesh axis
of size 1 is harmless, so the same rules serve one CPU and a pod.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stmoe_jax.config import ConfigError

MESH_AXES = ('data', 'expert', 'model')


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes ('data', 'expert', 'model'); one size may be -1 to take the rest.

  Raises ConfigError naming `mesh.<axis>` when the sizes cannot tile the devices.
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
  if total != len(devices):
    raise ConfigError(f'config.mesh {sizes} needs {total} devices; {len(devices)} available')
  grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules: Sequence[Sequence]) -> PartitionSpec:
  """PartitionSpec for a tuple of logical names; an unmapped name raises ConfigError."""
  table = dict((name, mesh_axis) for name, mesh_axis in rules)
  missing = [a for a in axes if a is not None and a not in table]
  if missing:
    raise ConfigError(f'logical axis names {missing} have no entry in config.logical_axis_rules')
  return PartitionSpec(*(None if a is None else table[a] for a in axes))


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> dict:
  """NamedShardings for every variable of an (abstract) nnx.State, as a pure dict.

  Variables without logical names are replicated.
  """
  def sharding_of(variable):
    axes = variable.get_metadata().get('out_sharding') or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(axes, rules))

  shardings = jax.tree.map(sharding_of, abstract_state,
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
