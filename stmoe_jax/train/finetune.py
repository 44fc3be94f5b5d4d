"""`config.init_from`: start a run from another run's parameters (fine-tuning, sparse upcycling).

`init_from='<workdir>[:<step>]'` restores that train.py workdir's checkpoint through the
readers' path (`entry_points.workdir_placement` + `checkpointing.read_checkpoint`: its own
config, checksums verified, nothing written) and moves its parameters into this run's freshly
initialised state, name by name. Optimizer state, step, RNG and data position stay fresh. Only
a run with no checkpoint of its own does this: a fine-tuning run resumes from its own workdir.

Every parameter of this model is one of
  copy     the same name and shape in the checkpoint;
  experts  sparse upcycling (Komatsuzaki et al. 2023): this model has an MoE layer where the
           checkpoint's model has a dense FFN (the same module path), so each expert of
           [E, ...] starts as a copy of that FFN's [...] parameter; with renormalised top-k
           gates the layer then computes exactly the dense FFN for every token it does not drop;
  fresh    the router (and Gemma 4 router and expert scales) of an upcycled layer, kept as
           initialised;
and anything else (another shape, a parameter the checkpoint lacks, a checkpoint parameter
this model has no place for) is refused before anything is restored, in one line naming the
parameter and both shapes. Buffers (e.g. router biases) are copied where the name and shape
match, fresh otherwise. A checkpoint of the other layer layout (`model.scan_layers`) is first
converted to this model's (`layer_scan.relayout`), so names and shapes compare as if it were
saved in it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax.train import checkpointing
from stmoe_jax.train import entry_points
from stmoe_jax.models import layer_scan
from stmoe_jax.train import trainable
from stmoe_jax.train.checkpointing import IncompatibleCheckpointError
from stmoe_jax.config import parse_init_from
from stmoe_jax.moe.experts import Mlp
from stmoe_jax.moe.layer import MoeLayer
from stmoe_jax.train.train_state import Placement, TrainState


@dataclasses.dataclass(frozen=True)
class Plan:
  """How each parameter of this model is initialised from the checkpoint.

  Attributes:
    source: `init_from`'s workdir and the Placement of its saved config (abstract, on this
      run's mesh).
    step: the checkpoint step asked for (None: the newest readable one).
    actions: {parameter name: ('copy' | 'experts', checkpoint parameter name) or ('fresh', '')}.
    upcycled: module paths of the MoE layers that start from a dense FFN.
  """
  workdir: str
  step: int | None
  source: Placement
  actions: dict[str, tuple[str, str]]
  upcycled: tuple[str, ...]


def _expert_axis(cfg) -> int:
  """The expert axis of a stacked expert weight: 1 behind the scanned 'layers' axis, else 0."""
  return 1 if cfg.scan_layers else 0


def _relayout(tree, source: Placement, target: Placement):
  """`source`'s params or buffers in `target`'s layer layout (`model.scan_layers`)."""
  return layer_scan.relayout(tree, source.model_cfg, target.model_cfg)


def _source_module(path: str, source: Placement) -> str:
  """The checkpoint's module that holds (unit 0 of) this model's module `path`: block i is
  layer i of either layout's first unit, block i % P of a scanned checkpoint's (in each stack)."""
  parts = path.split('/')
  if source.model_cfg.scan_layers and parts[0] in layer_scan.STACKS and len(parts) > 1:
    parts[1] = str(int(parts[1]) % source.model_cfg.layer_period())
  return '/'.join(parts)


def _shapes(params) -> dict[str, tuple[int, ...]]:
  return {trainable.path_name(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _modules(placement: Placement) -> dict[str, nnx.Module]:
  graphdef, params, buffers = placement.model.abstract()
  return {trainable.path_name(p): m for p, m in
          nnx.iter_graph(nnx.merge(graphdef, params, buffers)) if isinstance(m, nnx.Module)}


def _upcycled_layers(spec: str, source: Placement, target: Placement) -> tuple[str, ...]:
  """Module paths where this model has an MoE layer and the checkpoint a dense FFN; raises
  ConfigError when such a layer cannot be an exact copy of it."""
  before, after = _modules(source), _modules(target)
  paths = tuple(p for p, m in after.items() if isinstance(m, MoeLayer)
                and isinstance(before.get(_source_module(p, source)), Mlp))
  s_cfg, t_cfg = source.model_cfg, target.model_cfg
  if paths and s_cfg.activation != t_cfg.activation:
    raise IncompatibleCheckpointError(
        f'init_from={spec!r} cannot upcycle {paths[0]}: its dense FFN is '
        f'model.activation={s_cfg.activation!r} but the experts would be '
        f'{t_cfg.activation!r} (each expert must be an exact copy of the FFN)')
  if paths and t_cfg.moe.num_shared_experts:
    raise IncompatibleCheckpointError(
        f'init_from={spec!r} cannot upcycle {paths[0]} with moe.num_shared_experts='
        f'{t_cfg.moe.num_shared_experts}: shared experts would add to the copied FFN; set 0')
  return paths


def plan(spec: str, target: Placement) -> Plan:
  """Reads `init_from`'s saved config (not its arrays) and decides every parameter's source.

  Raises FileNotFoundError naming a missing workdir or config.json, and
  IncompatibleCheckpointError (a ConfigError) naming the first parameter that does not fit:
  '... parameter blocks/0/attn/w_q is float32[64, 2, 32] there but this model needs [32, 2, 16]'.
  """
  workdir, step = parse_init_from(spec)
  source = entry_points.workdir_placement(workdir, mesh=dict(target.config.mesh))
  entry_points.check_tokenizer(workdir, target.config.data.tokenizer, f'init_from={spec!r}')
  upcycled = _upcycled_layers(spec, source, target)
  try:
    have = _shapes(jax.eval_shape(lambda t: _relayout(t, source, target),
                                  source.abstract_state.params))
  except layer_scan.LayoutError as e:
    raise IncompatibleCheckpointError(f'init_from={spec!r}: {e}') from None
  need = _shapes(target.abstract_state.params)
  axis = _expert_axis(target.model_cfg)
  where = f'init_from={spec!r}'
  actions, used = {}, set()
  for name, shape in need.items():
    layer = next((p for p in upcycled if name.startswith(p + '/')), None)
    if name in have and layer is None:
      if have[name] != shape:
        raise IncompatibleCheckpointError(
            f'{where}: parameter {name} is {list(have[name])} there but this model needs '
            f'{list(shape)}')
      actions[name] = ('copy', name)
      used.add(name)
    elif layer is not None and name in (f'{layer}/router', f'{layer}/router_scale',
                                         f'{layer}/expert_scale'):
      actions[name] = ('fresh', '')
    elif layer is not None and name.startswith(f'{layer}/experts/'):
      dense = f'{layer}/{name.rsplit("/", 1)[1]}'
      if have.get(dense) != shape[:axis] + shape[axis + 1:]:
        raise IncompatibleCheckpointError(
            f'{where}: upcycling {layer} copies its dense FFN parameter {dense} '
            f'{list(have.get(dense, ()))} into every expert, but this model\'s {name} is '
            f'{list(shape)} (set moe.expert_d_ff to the dense FFN\'s width)')
      actions[name] = ('experts', dense)
      used.add(dense)
    else:
      raise IncompatibleCheckpointError(
          f'{where}: this model\'s parameter {name} {list(shape)} is not in that checkpoint')
  unused = [n for n in have if n not in used]
  if unused:
    raise IncompatibleCheckpointError(
        f'{where}: its parameter {unused[0]} {list(have[unused[0]])} has no place in this model'
        + (f' ({len(unused)} parameters have none)' if len(unused) > 1 else ''))
  return Plan(workdir=workdir, step=step, source=source, actions=actions, upcycled=upcycled)


def transfer(actions: dict[str, tuple[str, str]], source_params, target_params,
             expert_axis: int = 0):
  """The target params pytree with each entry replaced as `actions` says: copied from
  `source_params`, broadcast over the expert axis ('experts': [...] -> [E, ...], or
  [U, ...] -> [U, E, ...] with `expert_axis` 1 for scanned layers), or kept."""
  flat = {trainable.path_name(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(source_params)[0]}

  def pick(path, fresh):
    kind, name = actions[trainable.path_name(path)]
    if kind == 'copy':
      return flat[name]
    if kind == 'experts':
      return jnp.broadcast_to(jnp.expand_dims(flat[name], expert_axis), fresh.shape)
    return fresh

  return jax.tree_util.tree_map_with_path(pick, target_params)


def _matching_buffers(source_buffers, target_buffers):
  flat = {trainable.path_name(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(source_buffers)[0]}

  def pick(path, fresh):
    old = flat.get(trainable.path_name(path))
    return old if old is not None and old.shape == fresh.shape else fresh

  return jax.tree_util.tree_map_with_path(pick, target_buffers)


def init_from(placement: Placement, state: TrainState, spec: str,
              log: Callable[[str], None] = print) -> TrainState:
  """`state` (fresh, step 0) with its params and buffers taken from `init_from=spec` (see the
  module docstring); the optimizer state is re-initialised for them. Raises as `plan`, and
  FileNotFoundError / checkpointing.CheckpointError when the checkpoint is missing or damaged.
  """
  the_plan = plan(spec, placement)
  directory = os.path.join(os.path.abspath(the_plan.workdir), 'checkpoints')
  step, source, _ = checkpointing.read_checkpoint(directory, the_plan.source.abstract_state,
                                                  the_plan.step, warn=log)
  shardings = placement.state_shardings
  source_params = _relayout(source.params, the_plan.source, placement)
  source_buffers = _relayout(source.buffers, the_plan.source, placement)
  params = jax.device_put(transfer(the_plan.actions, source_params, state.params,
                                   _expert_axis(placement.model_cfg)), shardings.params)
  buffers = jax.device_put(_matching_buffers(source_buffers, state.buffers), shardings.buffers)
  opt_state = jax.jit(placement.tx.init, out_shardings=shardings.opt_state)(params)
  kinds = [k for k, _ in the_plan.actions.values()]
  log(f'Initialised from {os.path.join(directory, str(step))}: {kinds.count("copy")} '
      f'parameters copied' + (f', {len(the_plan.upcycled)} MoE layers upcycled from dense '
                              f'FFNs ({kinds.count("fresh")} fresh routers)'
                              if the_plan.upcycled else '') + '; optimizer and step fresh')
  return state.replace(params=params, buffers=buffers, opt_state=opt_state)
