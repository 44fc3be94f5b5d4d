"""What the entry points need from a train.py workdir: its config.json, and a checkpoint
restored for eval.py and sample.py.

The glue between the entry points and the library. Restoring needs no Trainer: the config's
`train_state.Placement` (mesh, model, abstract state; nothing compiled) and a Checkpointer.

A config.json written before a field existed loads with that field's value from
configs/default.py and one warning line naming it; a field that no longer exists is refused by
`config.validate`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections

from configs import default as default_config
from stmoe_jax import checkpointing
from stmoe_jax import evaluation
from stmoe_jax import sampling
from stmoe_jax import train_state
from stmoe_jax.config import model_config, with_defaults


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` so eval.py and resumed runs need no --config."""
  if jax.process_index() == 0:
    with open(config_path(workdir), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir (FileNotFoundError naming the path if absent).

  Fields the file predates get their configs/default.py values, named in one warning line on
  stderr.
  """
  path = config_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a train.py workdir?')
  with open(path) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  config, added = with_defaults(saved, default_config.get_config())
  if added:
    print(f'warning: {path} predates fields {", ".join(added)}: using their defaults from '
          'configs/default.py', file=sys.stderr, flush=True)
  return config


def checkpointer(config: ml_collections.ConfigDict, workdir: str) -> checkpointing.Checkpointer:
  """The Checkpointer of `workdir/checkpoints` (creates the directory)."""
  return checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
      save_every=config.checkpoint_every_steps)


def restore_workdir(workdir: str, step: int | None = None,
                    mesh: dict[str, int] | None = None
                    ) -> tuple[train_state.Placement, int, train_state.TrainState]:
  """(placement, step, state): checkpoint `step` (default: the newest readable one) of a
  train.py workdir, restored onto its config's mesh, or onto `mesh` (axis sizes) instead.

  Raises FileNotFoundError naming the path when the workdir, its config or the checkpoint is
  missing (checked before anything is created).
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir!r} does not exist')
  config = load_config(workdir)
  if mesh is not None:
    config.mesh = dict(mesh)
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
    raise FileNotFoundError(f'no checkpoint in {ckpt_dir}: train first with train.py')
  placement = train_state.place(config)
  ckpt = checkpointer(config, workdir)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f'no complete checkpoint in {ckpt_dir}: train first with train.py')
    if step is None:  # The newest readable step; a damaged newer one is reported on stderr.
      step, state, _ = ckpt.restore_latest(placement.abstract_state)
    elif step not in steps:
      raise FileNotFoundError(f'no checkpoint for step {step} in {ckpt_dir}; have '
                              f'{sorted(steps)}')
    else:
      state, _ = ckpt.restore(step, placement.abstract_state)
  finally:
    ckpt.close()
  return placement, step, state


def load_checkpoint(workdir: str, step: int | None = None):
  """(config, TrainState) of a train.py workdir's checkpoint `step` (default: the latest)."""
  placement, _, state = restore_workdir(workdir, step)
  return placement.config, state


def evaluate_workdir(workdir: str, step: int | None = None, max_batches: int | None = None,
                     capacity_factors: Sequence[float | str] = (),
                     mesh: dict[str, int] | None = None) -> dict:
  """eval.py: restores `step` (default: the latest) of a workdir and evaluates it.

  With `capacity_factors` (numbers or 'dropless') the checkpoint is also evaluated at each of
  them and `capacity_sweep` lists, per factor, loss, bits_per_byte and dropped fractions
  (overall and per choice slot): ST-MoE treats the eval capacity factor as a free lever. Writes
  `workdir/eval_<step>.json` (process 0) and returns the metrics with `step` added. `mesh`
  (axis sizes) replaces the saved `config.mesh`: checkpoints restore onto any mesh the model
  fits. Raises FileNotFoundError as `restore_workdir`.
  """
  placement, step, state = restore_workdir(workdir, step, mesh)
  evaluate = lambda model_cfg=None: evaluation.evaluate_split(
      placement, state, evaluation.make_eval_step(placement, model_cfg), max_batches, model_cfg)
  metrics = {'step': step, **evaluate()}
  if capacity_factors:
    metrics['capacity_sweep'] = []
    for factor in capacity_factors:
      m = evaluate(evaluation.with_eval_capacity(placement.model_cfg, factor))
      metrics['capacity_sweep'].append({
          'eval_capacity_factor': factor, 'loss': m['loss'],
          'bits_per_byte': m['bits_per_byte'], 'dropped_fraction': m['dropped_fraction'],
          'dropped_fraction_per_slot': [l['dropped_fraction_per_slot'] for l in m['moe_layers']]})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{step}.json'), 'w') as f:
      json.dump(metrics, f, indent=2)
  return metrics


def sample_workdir(workdir: str, prompt: str, max_new_tokens: int, *, step: int | None = None,
                   **kwargs) -> str:
  """sample.py: restores a workdir's checkpoint and returns `prompt` followed by its
  continuation (kwargs as `sampling.Sampler.generate_tokens`)."""
  config, state = load_checkpoint(workdir, step)
  sampler = sampling.Sampler(model_config(config), config.data.seq_len)
  return prompt + sampler.generate_text(state.params, prompt, max_new_tokens,
                                        buffers=state.buffers, **kwargs)
