"""Training: the train state, the optimizer, one pure train step, and the train/eval loop.

`train_step(state, batch, ...)` is a pure function of arrays, jitted once with explicit in/out
shardings and the state donated. The model lives as (graphdef, params): `nnx.merge` rebuilds it
inside the step, so nothing stateful crosses the jit boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from stmoe_jax import checkpointing
from stmoe_jax import evaluation
from stmoe_jax import expert_parallel
from stmoe_jax import flops
from stmoe_jax import guards
from stmoe_jax import sampling
from stmoe_jax import sharding
from stmoe_jax import workdir as workdir_lib
from stmoe_jax.config import (NONFINITE_TERMS, ConfigError, ModelConfig,
                              check_resumable, model_config, validate)
from stmoe_jax.data import input_pipeline
from stmoe_jax.metrics import MetricsWriter
from stmoe_jax.losses import compute_loss
from stmoe_jax.moe import RouterBias
from stmoe_jax.transformer import Transformer


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  Attributes:
    step: int32 scalar, number of completed train steps.
    params: pure dict of float32 parameter arrays (`nnx.to_pure_dict` of the model's Params).
    buffers: pure dict of the model's non-trainable state (each MoE layer's `RouterBias`),
      updated by the forward pass, never by the optimizer.
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


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_train_steps: int):
  """Linear warmup to `opt.lr`, then cosine decay to `final_lr_fraction * lr` or rsqrt decay."""
  # Step s of the warmup uses lr * (s + 1) / warmup_steps, so even the first step learns.
  warmup = lambda s: opt.lr * jnp.minimum(1.0, (s + 1.0) / max(opt.warmup_steps, 1))
  if opt.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(opt.lr, max(num_train_steps - opt.warmup_steps, 1),
                                        alpha=opt.final_lr_fraction)
  else:
    decay = lambda s: opt.lr * jax.lax.rsqrt(1.0 + s / max(opt.warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [opt.warmup_steps])


def make_optimizer(opt: ml_collections.ConfigDict, num_train_steps: int):
  """Global-norm clipping, then AdamW (decay on matrices only) or Adafactor."""
  schedule = learning_rate_schedule(opt, num_train_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  if opt.name == 'adamw':
    base = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                       mask=decay_mask)
  else:
    # optax adds Adafactor's decay after the learning-rate scaling: scale it by the schedule,
    # as AdamW does, or weight_decay=0.1 would shrink every matrix by 10% per step.
    decay = (lambda step: opt.weight_decay * schedule(step)) if opt.weight_decay else None
    base = optax.adafactor(schedule, weight_decay_rate=decay, weight_decay_mask=decay_mask)
  clip = optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm else optax.identity()
  return optax.chain(clip, base), schedule


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """The model's graphdef and shape-only (params, buffers) states, allocating nothing."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)


def init_state(cfg: ModelConfig, tx, seed: int) -> TrainState:
  """Fresh parameters, optimizer state and RNG from `seed` (run under jit)."""
  params_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  model = Transformer(cfg, rngs=nnx.Rngs(params=params_key))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  buffers = nnx.to_pure_dict(nnx.state(model, RouterBias))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                    opt_state=tx.init(params), rng=rng, skipped_steps=jnp.zeros((), jnp.int32),
                    halted_at=jnp.zeros((), jnp.int32))


def _poison(metrics: dict, grads, now: jax.Array, term: str):
  """`debug.nan_at_step`: NaN in `term` (and so in the loss) and in every gradient when `now`,
  as a real overflow would give; 'grad_norm' poisons the gradients only."""
  nan = jnp.where(now, jnp.nan, 0.0).astype(jnp.float32)
  if term != 'grad_norm':
    metrics = {**metrics, term: metrics[term] + nan, 'loss': metrics['loss'] + nan}
  return metrics, jax.tree.map(lambda g: g + nan.astype(g.dtype), grads)


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, cfg: ModelConfig,
               on_nonfinite: str = 'stop', nan_at_step: int = 0,
               nan_term: str = 'cross_entropy'):
  """One optimizer step: (state, batch) -> (new state, metrics dict of float32 arrays).

  Non-finite guard, on device (no host sync): if the loss, a loss term or the gradient norm is
  not finite, params/opt_state stay as they were. `on_nonfinite='skip'` still advances the step
  (the batch is consumed) and counts it in `skipped_steps`; 'stop' keeps the whole state and sets
  `halted_at`, after which every step is a no-op, so the host, which reads metrics a step late,
  still holds the last good state to checkpoint. metrics['nonfinite'] is 1.0 for such a step.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (_, (metrics, buffers)), grads = grad_fn(state.params, state.buffers, graphdef, batch, rng,
                                           cfg)
  if nan_at_step:
    metrics, grads = _poison(metrics, grads, state.step + 1 == nan_at_step, nan_term)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update(grad_norm=optax.global_norm(grads), update_norm=optax.global_norm(updates),
                 param_norm=optax.global_norm(params), learning_rate=schedule(state.step))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(metrics[k]))
                              for k in ('loss', *NONFINITE_TERMS) if k in metrics]))
  updated = state.replace(step=state.step + 1, params=params, buffers=buffers,
                          opt_state=opt_state)
  if on_nonfinite == 'skip':
    ok = finite
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, state)
    new_state = new_state.replace(step=state.step + 1,
                                  skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  else:
    ok = finite & (state.halted_at == 0)
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, state)
    new_state = new_state.replace(halted_at=jnp.where(
        (state.halted_at == 0) & ~finite, state.step + 1, state.halted_at))
  metrics.update(nonfinite=(~finite).astype(jnp.float32),
                 skipped_steps=new_state.skipped_steps.astype(jnp.float32))
  return new_state, metrics


class Trainer:
  """Builds mesh, shardings, jitted functions and checkpointing for one config.

  Used by `train_and_evaluate`, `eval.py` and tests; all validation happens in `__init__`,
  before anything compiles.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate(config)
    self.config, self.workdir = config, workdir
    rules = sharding.check_rules(config.logical_axis_rules)
    self.mesh = sharding.make_mesh(config.mesh)
    # The MoE layers read mesh and rules from the model config (expert parallelism).
    self.mesh_rules = sharding.MeshRules(self.mesh, rules)
    self.model_cfg = dataclasses.replace(model_config(config), mesh_rules=self.mesh_rules)
    self.batch_sharding = sharding.batch_sharding(self.mesh, rules)
    batch_shards = sharding.num_shards(self.mesh, self.batch_sharding.spec[0])
    shards = max(batch_shards, jax.process_count())
    if config.batch_size % shards:
      raise ConfigError(f'config.batch_size={config.batch_size} is invalid: expected a multiple '
                        f'of the {shards} batch shards of mesh {dict(self.mesh.shape)} '
                        f'and {jax.process_count()} processes')
    if self.model_cfg.num_moe_layers:
      num_groups = config.batch_size * config.data.seq_len // config.moe.group_size
      expert_parallel.check(self.mesh_rules, config.moe.num_experts, num_groups)
    self.local_batch_size = config.batch_size // jax.process_count()
    self.tx, self.schedule = make_optimizer(config.opt, config.num_train_steps)
    self.graphdef, abstract_params, abstract_buffers = abstract_model(self.model_cfg)
    param_shardings = sharding.state_shardings(abstract_params, self.mesh, rules)
    buffer_shardings = sharding.state_shardings(abstract_buffers, self.mesh, rules)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    abstract = jax.eval_shape(lambda: init_state(self.model_cfg, self.tx, config.seed))
    # Optimizer moments are sharded like the parameters they track; counters and Adafactor's
    # factored (lower-rank) moments are replicated.
    opt_shardings = optax.tree_map_params(
        self.tx, lambda leaf, p, s: s if leaf.shape == p.shape else replicated,
        abstract.opt_state, abstract.params, param_shardings,
        transform_non_params=lambda _: replicated)
    self.state_shardings = TrainState(step=replicated, params=param_shardings,
                                      buffers=buffer_shardings, opt_state=opt_shardings,
                                      rng=replicated, skipped_steps=replicated,
                                      halted_at=replicated)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_shardings)
    # init() -> TrainState: fresh state, created directly in its shardings.
    self.init = jax.jit(functools.partial(init_state, self.model_cfg, self.tx, config.seed),
                         out_shardings=self.state_shardings)
    step_fn = functools.partial(train_step, graphdef=self.graphdef, tx=self.tx,
                                schedule=self.schedule, cfg=self.model_cfg,
                                on_nonfinite=config.on_nonfinite,
                                nan_at_step=config.debug.nan_at_step,
                                nan_term=config.debug.nan_term)
    self.train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, replicated),
                              donate_argnums=0)
    self.eval_step_in_shardings = (param_shardings, buffer_shardings, self.batch_sharding)
    self.eval_step = jax.jit(functools.partial(evaluation.eval_step, graphdef=self.graphdef),
                             in_shardings=self.eval_step_in_shardings)

  @functools.cached_property
  def checkpointer(self) -> checkpointing.Checkpointer:
    """Created on first use, so a run refused before that leaves no directory behind."""
    return checkpointing.Checkpointer(
        os.path.join(self.workdir, 'checkpoints'), keep=self.config.keep_checkpoints,
        save_every=self.config.checkpoint_every_steps)

  def global_batch(self, local_batch: dict) -> dict:
    """This process's numpy batch -> global jax arrays sharded over the batch axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def data_kwargs(self, split: str) -> dict:
    data = self.config.data
    return dict(name=data.name, split=split, data_dir=data.data_dir or None,
                feature_key=data.feature_key, seq_len=data.seq_len,
                batch_size=self.local_batch_size, process_index=jax.process_index(),
                process_count=jax.process_count())

  def train_iterator(self):
    return input_pipeline.make_train_iterator(**self.data_kwargs(self.config.data.train_split),
                                              seed=self.config.seed)

  def evaluate(self, state: TrainState, max_batches: int | None = None,
               model_cfg: ModelConfig | None = None) -> dict:
    """Validation metrics at the eval capacity factor (see `evaluation.evaluate`).

    `model_cfg` evaluates the same parameters under other routing settings (e.g. another eval
    capacity factor or dropless dispatch; parameter shapes must not change): it is compiled anew.
    """
    batches = input_pipeline.make_eval_iterator(**self.data_kwargs(self.config.data.eval_split),
                                                max_batches=max_batches)
    eval_step = self.eval_step
    if model_cfg is not None:
      graphdef = abstract_model(model_cfg)[0]
      eval_step = jax.jit(functools.partial(evaluation.eval_step, graphdef=graphdef),
                          in_shardings=self.eval_step_in_shardings)
    run_step = lambda b: eval_step(state.params, state.buffers, self.global_batch(b))
    return evaluation.evaluate(run_step, batches, model_cfg or self.model_cfg)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` so eval.py and resumed runs need no --config."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir (FileNotFoundError naming the path if absent)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a train.py workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))




def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains for `config.num_train_steps`, resuming from the newest good checkpoint in `workdir`.

  Returns the last evaluation metrics (a dict; see `evaluation.evaluate`). On SIGTERM it saves
  a checkpoint at the current step and returns. Raises `guards.NonFiniteError` (stop mode, after
  saving the last good state), `checkpointing.CheckpointError` (no readable checkpoint to resume,
  or a failed save), ConfigError (a config that does not fit the saved run) and
  `workdir_lib.WorkdirError` (a workdir that is not writable or that a live run holds).
  """
  trainer = Trainer(config, workdir)
  log = lambda line: tqdm.tqdm.write(line, file=sys.stderr)
  workdir_lib.prepare(workdir)
  with workdir_lib.WorkdirLock(workdir, warn=log):
    return _train(trainer, config, workdir, log)


def _train(trainer: Trainer, config: ml_collections.ConfigDict, workdir: str, log) -> dict:
  """`train_and_evaluate` inside the workdir lock."""
  train_iter = trainer.train_iterator()  # Bad data fails here, before a checkpoint dir exists.
  # So does an eval split or feature that cannot be read: found now, not after training.
  input_pipeline.check_split(**trainer.data_kwargs(config.data.eval_split))
  ckpt = trainer.checkpointer
  # Resume order: check the config still fits the checkpoints, restore the newest readable step
  # (arrays: params, optimizer, RNG, step, guard counters) onto this mesh's shardings, setting
  # damaged newer steps aside, then move the data iterator to where that step left it.
  # config.json is rewritten only after that, so it always matches the checkpoints.
  if ckpt.all_steps():
    check_resumable(config, load_config(workdir), os.path.join(workdir, 'config.json'))
    restored, state, data_state = ckpt.restore_latest(trainer.abstract_state,
                                                      set_aside_damaged=True, warn=log)
    train_iter.set_state(data_state)
    print(f'Resumed from {ckpt.step_path(restored)}', flush=True)
  else:
    state = trainer.init()
  workdir_lib.record_config(config, workdir, int(state.step), log)
  writer = MetricsWriter(workdir)
  monitor = guards.StepMonitor(config.on_nonfinite, config.loss_spike_factor, log)
  monitor.skipped_steps = int(state.skipped_steps)
  start, end = int(state.step), config.stop_at_step or config.num_train_steps
  tokens_per_step = config.batch_size * config.data.seq_len
  flops_per_token = flops.train_flops_per_token(trainer.model_cfg, config.data.seq_len)
  peak = (config.peak_flops_per_device or
          flops.peak_flops_per_device(jax.devices()[0].device_kind))
  peak_flops = peak * jax.device_count() if peak else None
  sample_tokens, sampler = config.eval_sample_tokens, None
  eval_metrics, pending = {}, None
  # Stop mode checkpoints the state before the bad step, so it needs the data position there.
  data_before: dict[int, dict] = {}
  timed_steps = 0
  bar = tqdm.tqdm(range(start, end), initial=start,
                  total=config.num_train_steps, disable=jax.process_index() != 0,
                  dynamic_ncols=True, unit='step')

  def flush():
    """Reads the pending step's metrics; in stop mode a bad step saves the last good state."""
    nonlocal pending
    if pending is None:
      return
    metrics, step = pending
    pending = None
    try:
      monitor.observe(jax.device_get(metrics), step)
    except guards.NonFiniteError as e:
      good = int(state.step)  # Halted: the state after step `good`, untouched since.
      try:
        if good and good not in ckpt.all_steps():
          ckpt.save(good, state.replace(halted_at=jnp.zeros((), jnp.int32)), data_before[good],
                    force=True)
        ckpt.wait()
      except checkpointing.NonFiniteStateError as bad:  # Finite loss, non-finite parameters.
        ckpt.close()
        raise guards.NonFiniteError(f'{e}; {bad}') from None
      ckpt.close()
      where = ckpt.step_path(good) if good else 'nowhere (no good step yet)'
      raise guards.NonFiniteError(f'{e}; the last good state is checkpoint {where}') from None

  with guards.sigterm_flag() as preempted:
    t0 = time.perf_counter()
    for step in bar:
      if config.on_nonfinite == 'stop':
        data_before = {step: train_iter.get_state(), **{k: v for k, v in data_before.items()
                                                        if k == step - 1}}
      state, metrics = trainer.train_step(state, trainer.global_batch(next(train_iter)))
      if step == start:  # Keep compilation out of the throughput numbers.
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
      else:
        timed_steps += 1
      # Read the previous step's metrics only now, so the host never stalls the device queue.
      flush()
      pending, done = (metrics, step + 1), step + 1
      if done % config.log_every_steps == 0 or done == config.num_train_steps:
        flush()
        summary = monitor.summary() or {'skipped_steps': monitor.skipped_steps}
        summary['tokens_per_sec'] = timed_steps * tokens_per_step / (time.perf_counter() - t0)
        summary['model_flops_per_sec'] = summary['tokens_per_sec'] * flops_per_token
        mfu = flops.model_flops_utilization(summary['tokens_per_sec'], flops_per_token,
                                            peak_flops)
        if mfu is not None:
          summary['mfu'] = mfu
        writer.write(done, 'train', summary)
        if 'loss' in summary:
          bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_sec']:.0f}")
        timed_steps, t0 = 0, time.perf_counter()
      if done % config.eval_every_steps == 0 or done == config.num_train_steps:
        flush()
        eval_metrics = trainer.evaluate(state, config.eval_batches or None)
        writer.write(done, 'eval', eval_metrics)
        bar.write(f"step {done}: eval loss {eval_metrics['loss']:.4f}, "
                  f"{eval_metrics['bits_per_byte']:.3f} bits/byte")
        if sample_tokens:  # A text sample from the start of a file, for TensorBoard.
          sampler = sampler or sampling.Sampler(trainer.model_cfg, config.data.seq_len)
          prompt = config.eval_sample_prompt
          writer.write_text(done, 'eval/sample', prompt + sampler.generate_text(
              state.params, prompt, sample_tokens, seed=done, buffers=state.buffers))
        timed_steps, t0 = 0, time.perf_counter()
      if config.debug.step_sleep_s:
        time.sleep(config.debug.step_sleep_s)
      # SIGTERM may arrive at any point of the step, so the check reads the flag only once.
      stop_now = preempted.is_set()
      if ckpt.should_save(done) or done == end or stop_now:
        flush()  # Never checkpoint a halted state under a later step's number.
        ckpt.save(done, state, train_iter.get_state(), force=True)
      if stop_now:
        ckpt.wait()
        log(f'SIGTERM: saved checkpoint {ckpt.step_path(done)} and stopped; rerun the same '
            'command to continue.')
        break
  flush()
  ckpt.wait()
  ckpt.close()
  writer.close()
  return eval_metrics
