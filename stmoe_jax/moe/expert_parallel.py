"""Expert parallelism: experts sharded over the mesh's expert axis, tokens exchanged in shard_map.

Einsum letters: G routing groups (local: this shard's), S tokens per group, K choices,
E experts, C capacity, X slots or rows, D model dim, F expert hidden dim.

`MoeLayer` routes globally (routing is per group, so XLA splits it along G with no
communication, and the router losses and statistics stay exact global means: the balance loss
of every `moe.balance_scope` and the routing bias updates are the gathered batch's, as
tests/sharding_checks.py checks); only dispatch,
the experts and combine run here, inside one `jax.shard_map` over the whole mesh:

  - capacity-based dispatch ('scatter', 'einsum'): each shard dispatches its own groups into
    [E, G_l*C, D] buffers; `all_to_all` over the expert axis sends expert e's slots to the shard
    holding e, giving [E/ep, ep*G_l*C, D]; the local experts run on their [E/ep, D, F] weights;
    a second `all_to_all` brings the outputs home, where they are combined locally.
  - 'dropless' (all-gather fallback, no `ragged_all_to_all`): each shard all-gathers the groups
    of its expert-axis peers, runs the ragged groups of its E/ep local experts, and a
    reduce-scatter (`psum_scatter`) returns each group's summed outputs to its owner. It moves
    ep times the tokens an all-to-all would and sorts ep times the rows.

Expert weights may also be split over their hidden dim F (logical 'mlp' -> 'model'); the down
projection's partial sums are then `psum`med over that axis. `check_vma=True` lets JAX track
which values vary over which axes, so the transposes of the collectives (and the implicit
broadcasts of replicated inputs) give exact gradients: no hand-placed 1/world_size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from stmoe_jax.moe import dispatch
from stmoe_jax.moe import grouped_matmul as gmm
from stmoe_jax.config import ConfigError
from stmoe_jax.moe.experts import Experts
from stmoe_jax.moe.routing import Routing
from stmoe_jax.nn.sharding import MeshRules

def expert_axis(mesh_rules: MeshRules | None) -> str | None:
  """The mesh axis experts are sharded over, or None when there is no expert parallelism."""
  if mesh_rules is None:
    return None
  axes = mesh_rules.mesh_axes('expert')
  if len(axes) > 1:
    raise ConfigError(f"config.logical_axis_rules maps 'expert' to {axes}: expected one mesh "
                      'axis (the all-to-all runs over a single axis)')
  if not axes or mesh_rules.mesh.shape[axes[0]] == 1:
    return None
  return axes[0]


def token_axes(mesh_rules: MeshRules) -> tuple[str, ...]:
  """Mesh axes the routing groups are split over inside the exchange: the batch axes plus the
  expert axis (each expert shard brings its own tokens), in mesh order."""
  wanted = set(mesh_rules.mesh_axes('batch')) | {expert_axis(mesh_rules)}
  return tuple(a for a in mesh_rules.mesh.axis_names if a in wanted)


def check(mesh_rules: MeshRules, num_experts: int, num_groups: int,
          grouped_matmul: str | None = None) -> None:
  """ConfigError, before compiling, when experts or groups do not split evenly over the mesh,
  or when `grouped_matmul` (pass moe.grouped_matmul for dropless dispatch) cannot run in the
  exchange's shard_map."""
  axis = expert_axis(mesh_rules)
  if axis is None:
    return
  if grouped_matmul is not None:
    gmm.resolve(grouped_matmul, in_shard_map=True)
  ep = mesh_rules.mesh.shape[axis]
  if num_experts % ep:
    raise ConfigError(f'config.moe.num_experts={num_experts} is invalid: expected a multiple '
                      f'of the mesh axis {axis}={ep} it is sharded over')
  shards = math.prod(mesh_rules.mesh.shape[a] for a in token_axes(mesh_rules))
  if num_groups % shards:
    raise ConfigError(f'config.moe.group_size gives {num_groups} routing groups per batch: '
                      f'expected a multiple of the {shards} token shards of axes '
                      f'{token_axes(mesh_rules)} (use a smaller group_size or larger batch)')


def _experts_apply(experts: Experts, mesh_rules: MeshRules):
  """(graphdef, weights dict, specs dict) of `experts`, specs from their logical names but for
  'embed': an FSDP-sharded model dim is gathered where the weights enter the shard_map (and
  the gradient reduce-scattered on the way out), as XLA does for every other layer."""
  graphdef, state = nnx.split(experts)
  whole_embed = lambda names: tuple(None if n == 'embed' else n for n in names)
  specs = jax.tree.map(lambda v: mesh_rules.spec(whole_embed(v.get_metadata()['out_sharding'])),
                       state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(specs)


def _shard_index(axes: tuple[str, ...]) -> jax.Array:
  """This shard's linear index over `axes` (inside shard_map), for per-shard dropout keys."""
  index = jnp.zeros((), jnp.int32)
  for axis in axes:
    index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
  return index


def run_experts(experts: Experts, x_GSD: jax.Array, route: Routing, *,
                strategy: dispatch.Dispatch,
                num_experts: int, capacity: int, mesh_rules: MeshRules,
                dropout_rng: jax.Array | None = None) -> jax.Array:
  """Dispatch, experts and combine under expert parallelism: [G, S, D] -> [G, S, D].

  Args:
    experts: the layer's `Experts`, weights [E, D, F] sharded as their logical names say.
    x_GSD: tokens [G, S, D] (global; split over `token_axes` inside).
    route: the global routing record, [G, S, K] fields.
    strategy: `dispatch.DISPATCHES[moe.dispatch]`: its buffers are exchanged all-to-all, or,
      without capacity, its rows by all-gather.
    num_experts: E, a multiple of the expert axis size ep.
    capacity: C per expert and group (capacity-based strategies).
    mesh_rules: mesh and rules; `expert_axis(mesh_rules)` must not be None.
    dropout_rng: expert dropout key (training), folded with the shard index.
  Returns:
    y_GSD, equal to the single-device result of the same strategy.
  """
  mesh = mesh_rules.mesh
  e_axis = expert_axis(mesh_rules)
  tokens = token_axes(mesh_rules)
  # Even a size-1 axis: the psum tells check_vma the output no longer varies over it.
  hidden_axes = mesh_rules.mesh_axes('mlp')
  graphdef, weights, weight_specs = _experts_apply(experts, mesh_rules)
  route = Routing(expert_index=route.expert_index, gate=route.gate, position=route.position,
                  assigned=route.assigned, kept=route.kept, probs=None, logits=None)
  token_spec = PartitionSpec(tokens)
  route_specs = jax.tree.map(lambda _: token_spec, route)
  use_dropout = dropout_rng is not None and experts.dropout > 0

  def local_experts(weights_local, x, group_sizes=None, rng=None):
    module = nnx.merge(graphdef, weights_local)
    if rng is not None:
      rng = jax.random.fold_in(rng, _shard_index(mesh.axis_names))
    # Grouped matmuls by the layer's moe.grouped_matmul, as on one device.
    y = (module(x, dropout_rng=rng) if group_sizes is None
         else module.grouped(x, group_sizes, dropout_rng=rng, in_shard_map=True))
    # F split over `hidden_axes`: each shard holds a partial sum of the down projection.
    return jax.lax.psum(y, hidden_axes) if hidden_axes else y

  def capacity_body(weights_local, x_GSD, route, rng):
    x_ECD, plan = strategy.dispatch(x_GSD, route, num_experts, capacity)  # [E, G_l*C, D]
    # Expert e's slots go to the shard holding e: [E/ep, ep*G_l*C, D].
    x_ECD = jax.lax.all_to_all(x_ECD, e_axis, 0, 1, tiled=True)
    y_ECD = local_experts(weights_local, x_ECD, rng=rng)
    y_ECD = jax.lax.all_to_all(y_ECD, e_axis, 1, 0, tiled=True)  # Back home: [E, G_l*C, D].
    return strategy.combine(y_ECD, plan)

  def dropless_body(weights_local, x_GSD, route, rng):
    local_e = num_experts // jax.lax.axis_size(e_axis)
    gather = lambda a: jax.lax.all_gather(a, e_axis, axis=0, tiled=True)
    x_all = gather(x_GSD)  # The groups of every expert-axis peer: [ep*G_l, S, D].
    first = jax.lax.axis_index(e_axis) * local_e
    index = gather(route.expert_index) - first
    mine = gather(route.assigned) & (index >= 0) & (index < local_e)
    local_route = route.replace(expert_index=jnp.where(mine, index, local_e), assigned=mine,
                                gate=jnp.where(mine, gather(route.gate), 0.0))
    x_XD, group_sizes_E, plan = strategy.dispatch(x_all, local_route, local_e)
    y_XD = local_experts(weights_local, x_XD, group_sizes_E, rng=rng)
    y_all = strategy.combine(y_XD, plan)  # This shard's experts' share, all groups.
    return jax.lax.psum_scatter(y_all, e_axis, scatter_dimension=0, tiled=True)

  body: Callable = capacity_body if strategy.uses_capacity else dropless_body
  rng = dropout_rng if use_dropout else jnp.zeros((2,), jnp.uint32)
  run = jax.shard_map(
      lambda w, x, r, k: body(w, x, r, k if use_dropout else None), mesh=mesh,
      in_specs=(weight_specs, token_spec, route_specs, PartitionSpec()),
      out_specs=token_spec, check_vma=True)
  return run(weights, x_GSD, route, rng)
