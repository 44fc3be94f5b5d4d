"""Training: the train state, the optimizer, one pure train step, and the train/eval loop.

`train_step(state, batch, ...)` is a pure function of arrays, jitted once with explicit in/out
shardings and the state donated. The model lives as (graphdef, params): `nnx.merge` rebuilds it
inside the step, so nothing stateful crosses the jit boundary.
"""

from __future__ import annotations

import functools
import json
import math
import os
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
from stmoe_jax import flops
from stmoe_jax import sampling
from stmoe_jax import sharding
from stmoe_jax.config import (ConfigError, MoeConfig, ModelConfig, check_resumable, model_config,
                              validate)
from stmoe_jax.data import input_pipeline
from stmoe_jax.data import tokenizer
from stmoe_jax.metrics import MetricsWriter
from stmoe_jax.transformer import Transformer


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position.

  Attributes:
    step: int32 scalar, number of completed train steps.
    params: pure dict of float32 parameter arrays (`nnx.to_pure_dict` of the model's state).
    opt_state: optax state for `params`.
    rng: uint32 [2] base key; step s uses `fold_in(rng, s)`, so resuming replays the same noise.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


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


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graphdef and shape-only state, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def init_state(cfg: ModelConfig, tx, seed: int) -> TrainState:
  """Fresh parameters, optimizer state and RNG from `seed` (run under jit)."""
  params_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  model = Transformer(cfg, rngs=nnx.Rngs(params=params_key))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def compute_loss(params, graphdef, batch, rng, moe: MoeConfig):
  """Cross-entropy + aux_loss_coef * balance + z_loss_coef * z, averaged over target tokens.

  Balance and z-losses are summed over MoE layers (each layer is regularised on its own, as in
  Switch/ST-MoE). Returns (loss, metrics) with float32 scalars.
  """
  model = nnx.merge(graphdef, params)
  weights_BL = batch['weights']
  real_BL = batch['inputs'] != tokenizer.PAD_ID  # Padding never takes expert capacity.
  logits_BLV, moe_stats = model(batch['inputs'], train=True, rng=rng, mask_BL=real_BL)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch['targets'])
  num_tokens = jnp.maximum(jnp.sum(weights_BL), 1.0)
  ce = jnp.sum(ce_BL * weights_BL) / num_tokens
  balance = jnp.sum(moe_stats['balance_loss'])
  z = jnp.sum(moe_stats['z_loss'])
  loss = ce + moe.aux_loss_coef * balance + moe.z_loss_coef * z
  correct = jnp.argmax(logits_BLV, axis=-1) == batch['targets']
  metrics = {
      'loss': loss, 'cross_entropy': ce, 'balance_loss': balance, 'z_loss': z,
      'accuracy': jnp.sum(correct * weights_BL) / num_tokens,
      'dropped_fraction': jnp.mean(moe_stats['dropped_fraction']) if moe_stats[
          'dropped_fraction'].size else jnp.zeros(()),
      # max/mean expert load over the layers: 1.0 is perfect balance, E is total collapse.
      'max_expert_load': (jnp.max(moe_stats['expert_load']) * moe_stats['expert_load'].shape[-1]
                          if moe_stats['expert_load'].size else jnp.zeros(())),
      'expert_load': moe_stats['expert_load'],  # [M, E]
      'layer_dropped_fraction': moe_stats['dropped_fraction'],  # [M]
  }
  return loss, metrics


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, moe: MoeConfig):
  """One optimizer step: (state, batch) -> (new state, metrics dict of float32 scalars)."""
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (_, metrics), grads = grad_fn(state.params, graphdef, batch, rng, moe)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics.update(grad_norm=optax.global_norm(grads), update_norm=optax.global_norm(updates),
                 param_norm=optax.global_norm(params), learning_rate=schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


class Trainer:
  """Builds mesh, shardings, jitted functions and checkpointing for one config.

  Used by `train_and_evaluate`, `eval.py` and tests; all validation happens in `__init__`,
  before anything compiles.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate(config)
    self.config, self.workdir = config, workdir
    self.model_cfg = model_config(config)
    self.mesh = sharding.make_mesh(config.mesh)
    rules = config.logical_axis_rules
    self.batch_sharding = sharding.batch_sharding(self.mesh, rules)
    batch_shards = sharding.num_shards(self.mesh, self.batch_sharding.spec[0])
    if config.batch_size % max(batch_shards, jax.process_count()):
      raise ConfigError(f'config.batch_size={config.batch_size} is not divisible by the '
                        f'{batch_shards} batch shards of mesh {dict(self.mesh.shape)}')
    self.local_batch_size = config.batch_size // jax.process_count()
    self.tx, self.schedule = make_optimizer(config.opt, config.num_train_steps)
    self.graphdef, abstract_params = abstract_model(self.model_cfg)
    param_shardings = sharding.state_shardings(abstract_params, self.mesh, rules)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    abstract = jax.eval_shape(lambda: init_state(self.model_cfg, self.tx, config.seed))
    # Optimizer moments are sharded like the parameters they track; counters and Adafactor's
    # factored (lower-rank) moments are replicated.
    opt_shardings = optax.tree_map_params(
        self.tx, lambda leaf, p, s: s if leaf.shape == p.shape else replicated,
        abstract.opt_state, abstract.params, param_shardings,
        transform_non_params=lambda _: replicated)
    self.state_shardings = TrainState(step=replicated, params=param_shardings,
                                      opt_state=opt_shardings, rng=replicated)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_shardings)
    # init() -> TrainState: fresh state, created directly in its shardings.
    self.init = jax.jit(functools.partial(init_state, self.model_cfg, self.tx, config.seed),
                         out_shardings=self.state_shardings)
    step_fn = functools.partial(train_step, graphdef=self.graphdef, tx=self.tx,
                                schedule=self.schedule, moe=self.model_cfg.moe)
    self.train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, replicated),
                              donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(evaluation.eval_step, graphdef=self.graphdef),
                             in_shardings=(param_shardings, self.batch_sharding))

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

  def evaluate(self, params, max_batches: int | None = None) -> dict:
    """Validation metrics at the eval capacity factor (see `evaluation.evaluate`)."""
    batches = input_pipeline.make_eval_iterator(**self.data_kwargs(self.config.data.eval_split),
                                                max_batches=max_batches)
    return evaluation.evaluate(lambda b: self.eval_step(params, self.global_batch(b)), batches,
                               self.model_cfg)


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
  """Trains for `config.num_train_steps`, resuming from the newest checkpoint in `workdir`.

  Returns the last evaluation metrics (a dict; see `evaluation.evaluate`).
  """
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir)
  train_iter = trainer.train_iterator()
  # Resume order: check the config still fits the checkpoint, restore the arrays (params,
  # optimizer, RNG, step) onto this mesh's shardings, then move the data iterator to where that
  # step left it. config.json is rewritten only after that, so it always matches the checkpoints.
  latest = trainer.checkpointer.latest_step()
  if latest is not None:
    check_resumable(config, load_config(workdir), os.path.join(workdir, 'config.json'))
    state, data_state = trainer.checkpointer.restore(latest, trainer.abstract_state)
    train_iter.set_state(data_state)
    print(f'Resumed from {trainer.checkpointer.directory}/{latest}')
  else:
    state = trainer.init()
  save_config(config, workdir)
  writer = MetricsWriter(workdir)
  start, end = int(state.step), config.stop_at_step or config.num_train_steps
  tokens_per_step = config.batch_size * config.data.seq_len
  flops_per_token = flops.train_flops_per_token(trainer.model_cfg, config.data.seq_len)
  peak = (config.get('peak_flops_per_device') or
          flops.peak_flops_per_device(jax.devices()[0].device_kind))
  peak_flops = peak * jax.device_count() if peak else None
  sample_tokens, sampler = config.get('eval_sample_tokens', 64), None
  eval_metrics, pending = {}, None
  window, timed_steps = [], 0
  bar = tqdm.tqdm(range(start, end), initial=start,
                  total=config.num_train_steps, disable=jax.process_index() != 0,
                  dynamic_ncols=True, unit='step')
  t0 = time.perf_counter()
  for step in bar:
    state, metrics = trainer.train_step(state, trainer.global_batch(next(train_iter)))
    if step == start:  # Keep compilation out of the throughput numbers.
      jax.block_until_ready(metrics)
      t0 = time.perf_counter()
    else:
      timed_steps += 1
    # Fetch the previous step's metrics only now, so the host never stalls the device queue.
    if pending is not None:
      window.append(_check_finite(jax.device_get(pending), step - 1))
    pending, done = metrics, step + 1
    if done % config.log_every_steps == 0 or done == config.num_train_steps:
      window.append(_check_finite(jax.device_get(pending), step))
      pending = None
      elapsed = time.perf_counter() - t0
      summary = {k: np.mean(np.stack([m[k] for m in window]), axis=0) for k in window[0]}
      summary['tokens_per_sec'] = timed_steps * tokens_per_step / elapsed
      summary['model_flops_per_sec'] = summary['tokens_per_sec'] * flops_per_token
      mfu = flops.model_flops_utilization(summary['tokens_per_sec'], flops_per_token, peak_flops)
      if mfu is not None:
        summary['mfu'] = mfu
      writer.write(done, 'train', summary)
      bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_sec']:.0f}")
      window, timed_steps, t0 = [], 0, time.perf_counter()
    if done % config.eval_every_steps == 0 or done == config.num_train_steps:
      eval_metrics = trainer.evaluate(state.params, config.eval_batches or None)
      writer.write(done, 'eval', eval_metrics)
      bar.write(f"step {done}: eval loss {eval_metrics['loss']:.4f}, "
                f"{eval_metrics['bits_per_byte']:.3f} bits/byte")
      if sample_tokens:  # A text sample from the start of a file, for TensorBoard.
        sampler = sampler or sampling.Sampler(trainer.model_cfg, config.data.seq_len)
        prompt = config.get('eval_sample_prompt', 'def ')
        writer.write_text(done, 'eval/sample', prompt + sampler.generate_text(
            state.params, prompt, sample_tokens, seed=done))
      timed_steps, t0 = 0, time.perf_counter()
    if trainer.checkpointer.should_save(done) or done == end:
      trainer.checkpointer.save(done, state, train_iter.get_state(), force=True)
  trainer.checkpointer.wait()
  trainer.checkpointer.close()
  writer.close()
  return eval_metrics


def _check_finite(metrics: dict, step: int) -> dict:
  if not math.isfinite(float(metrics['loss'])):
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
    raise FloatingPointError(f'non-finite loss at step {step + 1}; non-finite terms: {bad}')
  return metrics
