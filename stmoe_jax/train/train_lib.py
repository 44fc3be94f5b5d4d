"""Training: one pure train step, the Trainer that jits it, and the train/eval loop.

`train_step(state, batch, ...)` is a pure function of arrays, jitted once with explicit in/out
shardings and the state donated. The model lives as (graphdef, params, buffers): `nnx.merge`
rebuilds it inside the step, so nothing stateful crosses the jit boundary. The model family
(module, loss, eval step) comes from `model_factory`; the state and its shardings from
`train_state.place`.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm

from stmoe_jax.train import checkpointing
from stmoe_jax import errors
from stmoe_jax.train import evaluation
from stmoe_jax.train import finetune
from stmoe_jax.models import factory as model_factory
from stmoe_jax.models import flops
from stmoe_jax.train import guards
from stmoe_jax.train import train_state
from stmoe_jax.train import entry_points
from stmoe_jax.train import workdir as workdir_lib
from stmoe_jax.config import ModelConfig, check_resumable
from stmoe_jax.train.guards import NONFINITE_TERMS
from stmoe_jax.data import tasks
from stmoe_jax.train.metrics import MetricsWriter
from stmoe_jax.train.train_state import TrainState


def _poison(metrics: dict, grads, now: jax.Array, term: str):
  """`debug.nan_at_step`: NaN in `term` (and so in the loss) and in every gradient when `now`,
  as a real overflow would give; 'grad_norm' poisons the gradients only."""
  nan = jnp.where(now, jnp.nan, 0.0).astype(jnp.float32)
  if term != 'grad_norm':
    metrics = {**metrics, term: metrics[term] + nan, 'loss': metrics['loss'] + nan}
  return metrics, jax.tree.map(lambda g: g + nan.astype(g.dtype), grads)


def train_step(state: TrainState, batch, *, loss_fn, graphdef, tx, schedule,
               on_nonfinite: str = 'stop', nan_at_step: int = 0,
               nan_term: str = 'cross_entropy'):
  """One optimizer step: (state, batch) -> (new state, metrics dict of float32 arrays).

  `loss_fn` is the model family's (`model_factory.Model.loss_fn`), differentiated with respect
  to the params; it returns the metrics and the buffers as the forward pass left them.

  Non-finite guard, on device (no host sync): if the loss, a loss term or the gradient norm is
  not finite, params/opt_state stay as they were. `on_nonfinite='skip'` still advances the step
  (the batch is consumed) and counts it in `skipped_steps`; 'stop' keeps the whole state and sets
  `halted_at`, after which every step is a no-op, so the host, which reads metrics a step late,
  still holds the last good state to checkpoint. metrics['nonfinite'] is 1.0 for such a step.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (metrics, buffers)), grads = grad_fn(state.params, state.buffers, graphdef, batch, rng)
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
  """A config's `train_state.Placement` plus what training adds: the jitted init, train and
  eval steps, the checkpointer and the data iterators.

  Used by `train_and_evaluate` and tests; all validation happens in `__init__`, before anything
  compiles. (Restoring for eval.py and sample.py needs only the placement:
  `entry_points.restore_workdir`.)
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.placement = p = train_state.place(config)
    self.config, self.workdir = config, workdir
    self.mesh, self.model_cfg, self.graphdef = p.mesh, p.model_cfg, p.graphdef
    self.tx, self.schedule = p.tx, p.schedule
    self.batch_sharding, self.global_batch, self.data_kwargs = (
        p.batch_sharding, p.global_batch, p.data_kwargs)
    self.state_shardings, self.abstract_state = p.state_shardings, p.abstract_state
    # init() -> TrainState: fresh state, created directly in its shardings.
    self.init = jax.jit(functools.partial(train_state.init_state, p.model, p.tx, config.seed),
                        out_shardings=p.state_shardings)
    step_fn = functools.partial(train_step, loss_fn=p.model.loss_fn, graphdef=p.graphdef,
                                tx=p.tx, schedule=p.schedule, on_nonfinite=config.on_nonfinite,
                                nan_at_step=config.debug.nan_at_step,
                                nan_term=config.debug.nan_term)
    self.train_step = jax.jit(step_fn, in_shardings=(p.state_shardings, p.batch_sharding),
                              out_shardings=(p.state_shardings, p.replicated),
                              donate_argnums=0)
    self.eval_step = evaluation.make_eval_step(p)

  @functools.cached_property
  def checkpointer(self) -> checkpointing.Checkpointer:
    """Created on first use, so a run refused before that leaves no directory behind."""
    return entry_points.checkpointer(self.config, self.workdir)

  def train_iterator(self):
    """A fresh training batch iterator (grain; checkpointable state) of config.data.task."""
    return tasks.train_iterator(self.config.data.task, self.placement.model.task_format,
                                **self.data_kwargs(self.config.data.train_split),
                                seed=self.config.seed)

  def evaluate(self, state: TrainState, max_batches: int | None = None,
               model_cfg: ModelConfig | None = None) -> dict:
    """Validation metrics at the eval capacity factor (see `evaluation.evaluate`).

    `model_cfg` evaluates the same parameters under other routing settings (e.g. another eval
    capacity factor or dropless dispatch; parameter shapes must not change): it is compiled anew.
    """
    eval_step = (self.eval_step if model_cfg is None
                 else evaluation.make_eval_step(self.placement, model_cfg))
    return evaluation.evaluate_split(self.placement, state, eval_step, max_batches, model_cfg)


def restore_or_init(trainer: Trainer, train_iter, log) -> TrainState:
  """The newest good checkpoint of the trainer's workdir, or a fresh state.

  A fresh run with `config.init_from` takes its parameters from that checkpoint (`finetune`).
  Resume order: check the config still fits the checkpoints, restore the newest readable step
  (arrays: params, buffers, optimizer, RNG, step, guard counters) onto this mesh's shardings,
  setting damaged newer steps aside, then move the data iterator to where that step left it.
  """
  ckpt, workdir = trainer.checkpointer, trainer.workdir
  if not ckpt.all_steps():
    if trainer.config.init_from:  # Only here: a fine-tuning run resumes from its own steps.
      return finetune.init_from(trainer.placement, trainer.init(), trainer.config.init_from, log)
    return trainer.init()
  check_resumable(trainer.config, entry_points.load_config(workdir),
                  entry_points.config_path(workdir))
  entry_points.check_tokenizer(workdir, trainer.config.data.tokenizer, 'resuming')
  restored, state, data_state = ckpt.restore_latest(trainer.abstract_state,
                                                    set_aside_damaged=True, warn=log)
  if data_state or restored:  # A converted checkpoint (step 0) starts the data at its beginning.
    train_iter.set_state(data_state)
  print(f'Resumed from {ckpt.step_path(restored)}', flush=True)
  return state


class _TrainLoop:
  """The loop of `train_and_evaluate`: steps, metrics one step late, logs, evals, checkpoints."""

  def __init__(self, trainer: Trainer, train_iter, state: TrainState, log):
    config = self.config = trainer.config
    self.trainer, self.train_iter, self.state, self.log = trainer, train_iter, state, log
    self.ckpt = trainer.checkpointer
    self.writer = MetricsWriter(trainer.workdir)
    self.monitor = guards.StepMonitor(config.on_nonfinite, config.loss_spike_factor, log)
    self.monitor.skipped_steps = int(state.skipped_steps)
    self.start, self.end = int(state.step), config.stop_at_step or config.num_train_steps
    self.tokens_per_step = config.batch_size * config.data.seq_len
    family = model_factory.MODEL_FAMILIES[config.model.architecture]
    self.flops_per_token = (flops.TRAIN_PER_FORWARD *
                            family.forward_flops_per_token(trainer.model_cfg, config.data)
                            if family.forward_flops_per_token else None)
    peak = (config.peak_flops_per_device or
            flops.peak_flops_per_device(jax.devices()[0].device_kind))
    self.peak_flops = peak * jax.device_count() if peak else None
    self.sampler = None
    self.eval_metrics, self.pending = {}, None
    # Stop mode checkpoints the state before the bad step, so it needs the data position there.
    self.data_before: dict[int, dict] = {}
    self.timed_steps, self.t0 = 0, time.perf_counter()

  def flush(self) -> None:
    """Reads the pending step's metrics; in stop mode a bad step saves the last good state."""
    if self.pending is None:
      return
    metrics, step = self.pending
    self.pending = None
    try:
      self.monitor.observe(jax.device_get(metrics), step)
    except guards.NonFiniteError as e:
      ckpt, state = self.ckpt, self.state
      good = int(state.step)  # Halted: the state after step `good`, untouched since.
      try:
        if good and good not in ckpt.all_steps():
          ckpt.save(good, state.replace(halted_at=jnp.zeros((), jnp.int32)),
                    self.data_before[good], force=True)
        ckpt.wait()
      except checkpointing.NonFiniteStateError as bad:  # Finite loss, non-finite parameters.
        ckpt.close()
        raise guards.NonFiniteError(f'{e}; {bad}') from None
      ckpt.close()
      where = ckpt.step_path(good) if good else 'nowhere (no good step yet)'
      raise guards.NonFiniteError(f'{e}; the last good state is checkpoint {where}') from None

  def log_train(self, done: int, bar) -> None:
    """Writes the train metrics averaged since the last log at step `done` and updates `bar`."""
    self.flush()
    summary = self.monitor.summary() or {'skipped_steps': self.monitor.skipped_steps}
    summary['tokens_per_sec'] = (self.timed_steps * self.tokens_per_step /
                                 (time.perf_counter() - self.t0))
    if self.flops_per_token:  # The family counts its FLOPs.
      summary['model_flops_per_sec'] = summary['tokens_per_sec'] * self.flops_per_token
      mfu = flops.model_flops_utilization(summary['tokens_per_sec'], self.flops_per_token,
                                          self.peak_flops)
      if mfu is not None:
        summary['mfu'] = mfu
    self.writer.write(done, 'train', summary)
    if 'loss' in summary:
      bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_sec']:.0f}")
    self.timed_steps, self.t0 = 0, time.perf_counter()

  def eval_and_log(self, done: int, bar) -> None:
    """Evaluates the state at step `done` on eval_batches and writes the eval metrics."""
    config, state = self.config, self.state
    self.flush()
    self.eval_metrics = self.trainer.evaluate(state, config.eval_batches or None)
    self.writer.write(done, 'eval', self.eval_metrics)
    exact = self.eval_metrics.get('exact_match')
    bar.write(f"step {done}: eval loss {self.eval_metrics['loss']:.4f}, "
              f"{self.eval_metrics['bits_per_byte']:.3f} bits/byte" +
              ('' if exact is None else f', exact match {exact:.4f}'))
    if config.eval_sample_tokens:  # A text sample from the start of a file, for TensorBoard.
      self.sampler = self.sampler or model_factory.make_sampler(self.trainer.model_cfg, config.data)
      prompt = config.eval_sample_prompt
      self.writer.write_text(done, 'eval/sample', prompt + self.sampler.generate_text(
          state.params, prompt, config.eval_sample_tokens, seed=done, buffers=state.buffers))
    self.timed_steps, self.t0 = 0, time.perf_counter()

  def run(self) -> dict:
    """Trains from `start` to `end`; returns the last evaluation metrics."""
    try:
      return self._run()
    except Exception:
      # Settle a save still in flight before the error is reported: it commits, or its
      # failure and its background errors are drained now, not printed during shutdown.
      try:
        self.ckpt.close()
      except Exception:  # pylint: disable=broad-except
        pass  # The error being raised says what matters.
      errors.drain_background_errors()
      raise

  def _run(self) -> dict:
    config, trainer, ckpt = self.config, self.trainer, self.ckpt
    bar = tqdm.tqdm(range(self.start, self.end), initial=self.start,
                    total=config.num_train_steps, disable=jax.process_index() != 0,
                    dynamic_ncols=True, unit='step')
    with guards.sigterm_flag() as preempted:
      self.t0 = time.perf_counter()
      for step in bar:
        if config.on_nonfinite == 'stop':
          self.data_before = {step: self.train_iter.get_state(),
                              **{k: v for k, v in self.data_before.items() if k == step - 1}}
        self.state, metrics = trainer.train_step(
            self.state, trainer.global_batch(next(self.train_iter)))
        if step == self.start:  # Keep compilation out of the throughput numbers.
          jax.block_until_ready(metrics)
          self.t0 = time.perf_counter()
        else:
          self.timed_steps += 1
        # Read the previous step's metrics only now, so the host never stalls the device queue.
        self.flush()
        self.pending, done = (metrics, step + 1), step + 1
        if done % config.log_every_steps == 0 or done == config.num_train_steps:
          self.log_train(done, bar)
        if done % config.eval_every_steps == 0 or done == config.num_train_steps:
          self.eval_and_log(done, bar)
        if config.debug.step_sleep_s:
          time.sleep(config.debug.step_sleep_s)
        # SIGTERM/SIGINT may arrive at any point of the step, so the check reads the flag once.
        stop_now = preempted.is_set()
        if ckpt.should_save(done) or done == self.end or stop_now:
          self.flush()  # Never checkpoint a halted state under a later step's number.
          ckpt.save(done, self.state, self.train_iter.get_state(), force=True)
        if stop_now:
          ckpt.wait()
          self.log(f'{preempted.name}: saved checkpoint {ckpt.step_path(done)} and stopped; '
                   'rerun the same command to continue.')
          break
    self.flush()
    ckpt.wait()
    ckpt.close()
    self.writer.close()
    return self.eval_metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains for `config.num_train_steps`, resuming from the newest good checkpoint in `workdir`.

  Returns the last evaluation metrics (a dict; see `evaluation.evaluate`). On SIGTERM or a
  first Ctrl-C (SIGINT) it saves a checkpoint at the current step and returns; a second Ctrl-C
  raises KeyboardInterrupt at once. Raises `guards.NonFiniteError` (stop mode, after
  saving the last good state), `checkpointing.CheckpointError` (no readable checkpoint to resume,
  or a failed save), ConfigError (a config that does not fit the saved run) and
  `workdir_lib.WorkdirError` (a workdir that is not writable or that a live run holds).
  """
  trainer = Trainer(config, workdir)
  log = lambda line: tqdm.tqdm.write(line, file=sys.stderr)
  if config.init_from and not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    finetune.plan(config.init_from, trainer.placement)  # A misfit is refused before any I/O.
  workdir_lib.prepare(workdir)  # Only now: a config refused above leaves no directory behind.
  with workdir_lib.WorkdirLock(workdir, warn=log):
    train_iter = trainer.train_iterator()  # Bad data fails here, before a checkpoint dir exists.
    # So does an eval split or feature that cannot be read: found now, not after training.
    tasks.check_split(config.data.task, **trainer.data_kwargs(config.data.eval_split))
    state = restore_or_init(trainer, train_iter, log)
    end, step = config.stop_at_step or config.num_train_steps, int(state.step)
    if step and step >= end:  # Nothing to train: say so, change nothing.
      field = 'stop_at_step' if config.stop_at_step else 'num_train_steps'
      log(f'nothing to do: {workdir} is at step {step}, at or past {field}={end}; raise '
          f'--config.{field} to train further')
      trainer.checkpointer.close()
      return {}
    # Recorded only after the restore, so config.json always matches the checkpoints.
    entry_points.record_config(config, workdir, int(state.step), log)
    entry_points.record_tokenizer(config, workdir)
    return _TrainLoop(trainer, train_iter, state, log).run()
