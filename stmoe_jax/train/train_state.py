"""The train state and where it lives: optimizer, `TrainState`, and the `Placement` of one config
(mesh, model, shardings, abstract state) that training, evaluation and restoring share.

`place(config)` validates the config and builds everything a jitted step or a checkpoint
restore needs, compiling nothing: the Trainer adds its steps and checkpointer to it, and
`entry_points.restore_workdir` restores a checkpoint onto it without a Trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from stmoe_jax.config import options
from stmoe_jax.config.options import Option, Range
from stmoe_jax.data import tokenizer
from stmoe_jax.moe import expert_parallel
from stmoe_jax.models import factory as model_factory
from stmoe_jax.nn import sharding
from stmoe_jax.train import trainable as trainable_lib
from stmoe_jax.config import (ConfigError, ModelConfig, model_config,
                              validate)


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  Attributes:
    step: int32 scalar, number of completed train steps.
    params: pure dict of float32 parameter arrays (`nnx.to_pure_dict` of the model's Params).
    buffers: pure dict of the model's non-trainable state (`layers.Buffer`s, e.g. each MoE
      layer's router bias), updated by the forward pass, never by the optimizer.
    opt_state: optax state for `params`.
    rng: uint32 [2] base key; step s uses `fold_in(rng, s)`, so resuming replays the same noise.
    skipped_steps: int32 scalar, updates dropped for a non-finite loss or gradient (skip mode).
    halted_at: int32 scalar, the 1-based step whose loss or gradient went non-finite in stop
      mode, 0 while training is healthy; while set, `train_step` leaves the state unchanged.
  """
  step: jax.Array
  params: Any
  buffers: Any
  opt_state: Any
  rng: jax.Array
  skipped_steps: jax.Array
  halted_at: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule(options.Entry):
  """One entry of `SCHEDULES`: `decay(opt, num_train_steps)` -> the schedule after warmup, a
  function of the steps since warmup ended."""
  decay: Callable[[ml_collections.ConfigDict, int], Callable]


SCHEDULES = options.Registry('schedule', 'opt.schedule', 'wsd',
                             'The learning-rate schedule after linear warmup.')
_FINAL_LR = Option('opt.final_lr_fraction', float, 0.0, "The last step's lr as a fraction of "
                   'lr.', Range(0, 1))


def _cosine(opt, num_train_steps):
  return optax.cosine_decay_schedule(opt.lr, max(num_train_steps - opt.warmup_steps, 1),
                                     alpha=opt.final_lr_fraction)


def _wsd(opt, num_train_steps):
  decay_steps = max(round(opt.decay_fraction * num_train_steps), 1)
  stable_steps = max(num_train_steps - decay_steps - opt.warmup_steps, 0)
  return optax.join_schedules(
      [optax.constant_schedule(opt.lr),
       optax.linear_schedule(opt.lr, opt.final_lr_fraction * opt.lr, decay_steps)],
      [stable_steps])


SCHEDULES.register(Schedule(name='cosine', decay=_cosine, options=(_FINAL_LR,),
                            doc='Cosine decay to final_lr_fraction * lr.'))
SCHEDULES.register(Schedule(
    name='rsqrt', decay=lambda opt, n: lambda s: opt.lr * jax.lax.rsqrt(
        1.0 + s / max(opt.warmup_steps, 1)), doc='Inverse square root (T5).'))
SCHEDULES.register(Schedule(
    name='wsd', decay=_wsd, doc='Warmup-stable-decay (MiniCPM): constant lr, then linear to '
    'final_lr_fraction * lr over the last decay_fraction of the run.',
    options=(_FINAL_LR, Option('opt.decay_fraction', float, 0.2, "wsd: the decay's share of "
                               'the run; a run of N steps branches off a longer one at '
                               '(1 - it) N.', Range(0, 1, low_open=True)))))


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_train_steps: int):
  """Linear warmup to `opt.lr`, then `SCHEDULES[opt.schedule]`.

  WSD (MiniCPM, Hu et al. 2024) holds `lr` until the last `decay_fraction` of the run, then
  decays linearly to `final_lr_fraction * lr`. Its stable part does not depend on the run's
  length, so the run of N steps is the first 0.8 N steps of any longer run plus its own decay:
  complete schedules of several lengths cost one long run and a few short decays.
  """
  # Step s of the warmup uses lr * (s + 1) / warmup_steps, so even the first step learns.
  warmup = lambda s: opt.lr * jnp.minimum(1.0, (s + 1.0) / max(opt.warmup_steps, 1))
  decay = SCHEDULES[opt.schedule].decay(opt, num_train_steps)
  return optax.join_schedules([warmup, decay], [opt.warmup_steps])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimizer(options.Entry):
  """One entry of `OPTIMIZERS`: `make(opt, schedule, decay_mask)` -> the optax transformation
  (before clipping and freezing), with weight decay on the True leaves of `decay_mask`."""
  make: Callable[..., optax.GradientTransformation]


OPTIMIZERS = options.Registry('optimizer', 'opt.name', 'adamw', 'The optimizer.')


def _adafactor(opt, schedule, decay_mask):
  # optax adds Adafactor's decay after the learning-rate scaling: scale it by the schedule,
  # as AdamW does, or weight_decay=0.1 would shrink every matrix by 10% per step.
  decay = (lambda step: opt.weight_decay * schedule(step)) if opt.weight_decay else None
  return optax.adafactor(schedule, weight_decay_rate=decay, weight_decay_mask=decay_mask)


def _validate_adafactor(config) -> None:
  # Adafactor's parameter scale and update clipping take an RMS over the whole array: over all
  # stacked layers of a scanned stack at once, a different optimizer from the unscanned one.
  if config.model.scan_layers:
    raise options.ConfigError("config.opt.name='adafactor' is invalid with "
                              "model.scan_layers=True: expected 'adamw' (Adafactor's RMS "
                              'statistics would span all stacked layers).')


OPTIMIZERS.register(Optimizer(
    name='adamw', doc='AdamW (decoupled weight decay).',
    make=lambda opt, schedule, mask: optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                                                 weight_decay=opt.weight_decay, mask=mask),
    options=(Option('opt.b1', float, 0.9, 'AdamW first-moment decay.', Range(0, 1,
                                                                          high_open=True)),
             Option('opt.b2', float, 0.98, 'AdamW second-moment decay.', Range(0, 1,
                                                                            high_open=True)))))
OPTIMIZERS.register(Optimizer(name='adafactor', make=_adafactor, validate=_validate_adafactor,
                              doc='Adafactor (T5, ST-MoE): factored second moments.'))


def decay_mask(abstract_params: nnx.State) -> dict:
  """Which parameters weight decay shrinks, as a bool dict like the params: the matrices, i.e.
  parameters with at least two dims besides the stacked 'layers' dim of `model.scan_layers`
  (read from their logical axis names, so a scanned [U, D] norm scale is not one), except
  GEGLU's multiplicative bias b ([F], or [E, F] per expert), which starts at 1."""
  flags = {}
  for path, variable in nnx.to_flat_state(abstract_params):
    names = variable.get_metadata().get('out_sharding') or ()
    dims = len(variable.shape) - sum(name == 'layers' for name in names)
    flags[trainable_lib.path_name(path)] = dims >= 2 and path[-1] != 'mult_bias'
  return jax.tree_util.tree_map_with_path(lambda path, _: flags[trainable_lib.path_name(path)],
                                          nnx.to_pure_dict(abstract_params))


def make_optimizer(opt: ml_collections.ConfigDict, num_train_steps: int, trainable=None,
                   decay=None):
  """Global-norm clipping, then AdamW or Adafactor with weight decay on the True parameters of
  `decay` (a bool pytree like the params, `decay_mask`; default: those with ndim >= 2); with
  `trainable` (likewise, `trainable.mask`) on the True parameters only, the others frozen
  (`trainable.restrict`)."""
  schedule = learning_rate_schedule(opt, num_train_steps)
  decay_mask = decay if decay is not None else (
      lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  base = OPTIMIZERS[opt.name].make(opt, schedule, decay_mask)
  clip = optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity()
  tx = optax.chain(clip, base)
  if trainable is not None and not all(jax.tree.leaves(trainable)):
    tx = trainable_lib.restrict(tx, trainable)
  return tx, schedule


def init_state(model: model_factory.Model, tx, seed: int) -> TrainState:
  """Fresh parameters, buffers, optimizer state and RNG from `seed` (run under jit)."""
  params_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  params, buffers = model.init(params_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                    opt_state=tx.init(params), rng=rng, skipped_steps=jnp.zeros((), jnp.int32),
                    halted_at=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Placement:
  """One config's model and train state on its mesh (built by `place`).

  Attributes:
    config: the validated ConfigDict.
    mesh, mesh_rules: the device mesh and the logical-axis rules on it.
    model: the `model_factory.Model`; its `cfg` carries `mesh_rules` (expert parallelism).
    batch_sharding: NamedSharding of a global batch.
    local_batch_size: sequences per process and batch.
    tx, schedule: the optimizer and its learning-rate schedule.
    graphdef: the model's graph definition (`nnx.merge(graphdef, params, buffers)`).
    state_shardings: a `TrainState` of NamedShardings.
    abstract_state: a `TrainState` of ShapeDtypeStructs carrying those shardings (restore target).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  mesh_rules: sharding.MeshRules
  model: model_factory.Model
  batch_sharding: jax.sharding.NamedSharding
  local_batch_size: int
  tx: Any
  schedule: Any
  graphdef: nnx.GraphDef
  state_shardings: TrainState
  abstract_state: TrainState

  @property
  def model_cfg(self) -> ModelConfig:
    """The frozen model config (with this mesh's rules)."""
    return self.model.cfg

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    """The sharding of a value every device holds whole (step, RNG, scalars)."""
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  def global_batch(self, local_batch: dict) -> dict:
    """This process's numpy batch -> global jax arrays sharded over the batch axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding,
                                                      np.asarray(local_batch[k]))
            for k in self.model.batch_keys}

  def data_kwargs(self, split: str) -> dict:
    """The input pipeline's arguments for `split` on this process."""
    data = self.config.data
    return dict(name=data.name, split=split, data_dir=data.data_dir or None,
                feature_key=data.feature_key, seq_len=data.seq_len,
                batch_size=self.local_batch_size, process_index=jax.process_index(),
                process_count=jax.process_count(), objective=data.objective,
                noise_density=data.noise_density,
                mean_noise_span_length=data.mean_noise_span_length, tokenizer=data.tokenizer)


def _moment_shardings(opt_state, params, param_shardings, replicated):
  """Optimizer moments are sharded like the parameters they track; counters and Adafactor's
  factored (lower-rank) moments are replicated. A moment is found by its path ending in a
  parameter's dict keys with that parameter's shape: unlike `optax.tree_map_params`, this also
  reads the states of `optax.multi_transform` (frozen parameters, `trainable.restrict`)."""
  by_name = {path: (p.shape, s) for (path, p), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings))}

  def sharding_of(path, leaf):
    keys = []
    for key in reversed(path):  # The trailing dict keys: the tracked parameter's path.
      if not isinstance(key, jax.tree_util.DictKey):
        break
      keys.insert(0, key)
    shape, sharding = by_name.get(tuple(keys), (None, replicated))
    return sharding if getattr(leaf, 'shape', None) == shape else replicated

  return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


def place(config: ml_collections.ConfigDict) -> Placement:
  """Validates `config` and lays out its model and train state on its mesh; compiles nothing.

  Raises ConfigError when the config, or the batch and experts on this mesh, cannot work.
  """
  validate(config)
  if jax.process_count() > 1 and config.data.objective == 'span_corruption':
    raise ConfigError(f"config.data.objective='span_corruption' is invalid with "
                      f'{jax.process_count()} processes: its evaluation runs on one process '
                      '(train on one host, or evaluate its checkpoints with eval.py on one).')
  rules = sharding.check_rules(config.logical_axis_rules)
  mesh = sharding.make_mesh(config.mesh)
  # The MoE layers read mesh and rules from the model config (expert parallelism).
  mesh_rules = sharding.MeshRules(mesh, rules)
  model = model_factory.get_model(dataclasses.replace(
      model_config(config), mesh_rules=mesh_rules,
      pad_id=tokenizer.load(config.data.tokenizer).pad_id))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  batch_shards = sharding.num_shards(mesh, batch_sharding.spec[0])
  shards = max(batch_shards, jax.process_count())
  if config.batch_size % shards:
    raise ConfigError(f'config.batch_size={config.batch_size} is invalid: expected a multiple '
                      f'of the {shards} batch shards of mesh {dict(mesh.shape)} '
                      f'and {jax.process_count()} processes')
  if model.cfg.num_moe_layers:
    for num_groups in model_factory.routing_groups_per_batch(config):
      expert_parallel.check(mesh_rules, config.moe.num_experts, num_groups,
                            config.moe.grouped_matmul if config.moe.dispatch == 'dropless'
                            else None)
  graphdef, abstract_params, abstract_buffers = model.abstract()
  trainable = trainable_lib.mask(nnx.merge(graphdef, abstract_params, abstract_buffers),
                                 nnx.to_pure_dict(abstract_params), config.finetune.trainable)
  tx, schedule = make_optimizer(config.opt, config.num_train_steps, trainable,
                                decay_mask(abstract_params))
  param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
  buffer_shardings = sharding.state_shardings(abstract_buffers, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.eval_shape(lambda: init_state(model, tx, config.seed))
  opt_shardings = _moment_shardings(abstract.opt_state, abstract.params, param_shardings,
                                    replicated)
  state_shardings = TrainState(step=replicated, params=param_shardings,
                               buffers=buffer_shardings, opt_state=opt_shardings,
                               rng=replicated, skipped_steps=replicated, halted_at=replicated)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
  return Placement(config=config, mesh=mesh, mesh_rules=mesh_rules, model=model,
                   batch_sharding=batch_sharding,
                   local_batch_size=config.batch_size // jax.process_count(), tx=tx,
                   schedule=schedule, graphdef=graphdef, state_shardings=state_shardings,
                   abstract_state=abstract_state)
