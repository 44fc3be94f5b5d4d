"""What the entry points need from a train.py workdir: its config.json, and a checkpoint
restored for eval.py and sample.py.

The glue between the entry points and the library. Restoring needs no Trainer: the config's
`train_state.Placement` (mesh, model, abstract state; nothing compiled) and
`checkpointing.read_checkpoint`.

config.json is written here only, by `record_config` (train.py, after restoring): it holds the
config in force, and `config.<step>.json` keeps the config every run since `<step>` used,
written whenever a run starts fresh or resumes with changed fields; the changes are logged in
one line, old -> new. A config.json written before an option existed loads with that option's
declared default and one warning line naming it; a field that no longer exists is
refused by `config.validate`.

`vocabulary.json` records the vocabulary a run trained with (`data.tokenizer`'s content hash);
resuming, `init_from`, eval.py and sample.py refuse a tokenizer whose hash differs
(`check_tokenizer`). A workdir without it trained on bytes.

Readers (eval.py, sample.py) restore through `checkpointing.read_checkpoint`: they fall back
past damaged steps (reported on stderr) and create, rename or clean up nothing.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from stmoe_jax.train import checkpointing
from stmoe_jax import errors
from stmoe_jax.train import evaluation
from stmoe_jax.train import records
from stmoe_jax.data import tokenizer as tokenizer_lib
from stmoe_jax.models import factory as model_factory
from stmoe_jax.models import sampling
from stmoe_jax.train import train_state
from stmoe_jax.config import ConfigError, model_config, with_defaults  # pylint: disable=unused-import


def config_path(workdir: str) -> str:
  """The run's saved config: `<workdir>/config.json`."""
  return os.path.join(workdir, 'config.json')


def config_changes(old: Any, new: Any, prefix: str = '') -> list[str]:
  """['opt.lr: 0.01 -> 0.02', ...] for the leaves where two JSON configs differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    changes = []
    for key in [*old, *(k for k in new if k not in old)]:
      changes += config_changes(old.get(key, '<absent>'), new.get(key, '<absent>'),
                                f'{prefix}{key}.')
    return changes
  return [] if old == new else [f'{prefix[:-1]}: {old!r} -> {new!r}']


def config_history(workdir: str) -> list[int]:
  """The steps `s` of the workdir's `config.<s>.json` files, ascending."""
  steps = []
  for name in os.listdir(workdir):
    middle = name[len('config.'):-len('.json')]
    if name.startswith('config.') and name.endswith('.json') and middle.isdigit():
      steps.append(int(middle))
  return sorted(steps)


def record_config(config: ml_collections.ConfigDict, workdir: str, start_step: int = 0,
                  log: Callable[[str], None] | None = None) -> None:
  """Writes `workdir/config.json`, so eval.py and resumed runs need no --config, and keeps the
  history of configs (process 0 only).

  A fresh run (`start_step` 0) and a resumed run whose config differs from `config.json` also
  write `config.<start_step>.json`; so the steps after `s` ran with the newest
  `config.<s'>.json` with s' <= s. A resumed run logs its changes in one line, old -> new, to
  `log` (default: stderr).
  """
  if jax.process_index() != 0:
    return
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  path = config_path(workdir)
  text = config.to_json_best_effort(indent=2)
  old = _read_config_json(path) if start_step and os.path.exists(path) else None
  changes = config_changes(old, json.loads(text)) if old is not None else []
  history = config_history(workdir)
  if start_step and changes:
    if not history:  # A workdir from before config histories: keep what it had.
      os.replace(path, os.path.join(workdir, 'config.0.json'))
      history = [0]
    since = max((s for s in history if s <= start_step), default=history[0])
    log(f'warning: resuming at step {start_step} with a changed config (steps up to it ran '
        f'with config.{since}.json): ' + ', '.join(changes))
  if not start_step or changes:
    records.write_file_atomically(os.path.join(workdir, f'config.{start_step}.json'), text)
  records.write_file_atomically(path, text)


def tokenizer_path(workdir: str) -> str:
  """The tokenizer a run trained with: `<workdir>/vocabulary.json` ({spec, content_hash,
  vocab_size})."""
  return os.path.join(workdir, 'vocabulary.json')


def record_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `tokenizer_path(workdir)` for `config.data.tokenizer` (process 0)."""
  if jax.process_index() != 0:
    return
  tok = tokenizer_lib.load(config.data.tokenizer)
  records.write_file_atomically(tokenizer_path(workdir), json.dumps(
      {'spec': tok.spec, 'content_hash': tok.content_hash, 'vocab_size': tok.vocab_size},
      indent=2))


def trained_tokenizer_hash(workdir: str) -> str:
  """The content hash of the tokenizer `workdir` trained with ('bytes' for a workdir from
  before tokenizers were recorded)."""
  path = tokenizer_path(workdir)
  if not os.path.exists(path):
    return tokenizer_lib.BYTES
  with open(path, encoding='utf-8') as f:
    return json.load(f)['content_hash']


def check_tokenizer(workdir: str, spec: str, what: str) -> None:
  """ConfigError in one line naming both hashes if the tokenizer of `data.tokenizer=spec` is not
  the one `workdir` trained with; `what` says who asks ('resuming', 'init_from=...')."""
  have, trained = tokenizer_lib.load(spec).content_hash, trained_tokenizer_hash(workdir)
  if have != trained:
    raise ConfigError(f'{what}: {workdir} was trained with tokenizer {trained}, but '
                      f'data.tokenizer={spec!r} is {have}; use the vocabulary it was trained '
                      'with')


def _read_config_json(path: str) -> dict:
  """The JSON object in a saved config file; ConfigError naming the file if it is not one."""
  try:
    with open(path, 'rb') as f:
      saved = json.loads(f.read())
  except ValueError as e:  # Also UnicodeDecodeError.
    saved, why = None, f'{type(e).__name__}: {e}'
  else:
    why = f'it holds a JSON {type(saved).__name__}, not an object'
  if isinstance(saved, dict):
    return saved
  history = [s for s in config_history(os.path.dirname(path) or '.')]
  hint = (f', e.g. from config.{history[-1]}.json (the newest of its history)' if history
          else '')
  raise ConfigError(f'{path} is not a readable saved config ({why}): restore it{hint}')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir (FileNotFoundError naming the path if absent).

  Options the file predates get their declared defaults, named in one warning line on stderr.
  """
  path = config_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a train.py workdir?')
  try:
    saved = ml_collections.ConfigDict(_read_config_json(path))
  except (TypeError, ValueError, AttributeError) as e:  # Keys ConfigDict refuses.
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f'{path} is not a readable saved config ({errors.one_line(e)})') from None
  config, added = with_defaults(saved)
  if added:
    print(f'warning: {path} predates fields {", ".join(added)}: using their defaults '
          '(docs/options.md)', file=sys.stderr, flush=True)
  return config


def checkpointer(config: ml_collections.ConfigDict, workdir: str) -> checkpointing.Checkpointer:
  """The Checkpointer of `workdir/checkpoints` for training (creates the directory)."""
  return checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
      save_every=config.checkpoint_every_steps)


def workdir_placement(workdir: str, mesh: dict[str, int] | None = None
                      ) -> train_state.Placement:
  """The `train_state.Placement` of a train.py workdir's saved config, on its mesh or on `mesh`
  (axis sizes) instead; restores and creates nothing. FileNotFoundError naming the path when
  the workdir or its config is missing."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'workdir {workdir!r} ' + (
        'is not a directory' if os.path.exists(workdir) else 'does not exist'))
  config = load_config(workdir)
  if mesh is not None:
    config.mesh = dict(mesh)
  return train_state.place(config)


def restore_workdir(workdir: str, step: int | None = None,
                    mesh: dict[str, int] | None = None
                    ) -> tuple[train_state.Placement, int, train_state.TrainState]:
  """(placement, step, state): checkpoint `step` (default: the newest readable one, falling back
  past damaged newer steps, reported on stderr) of a train.py workdir, restored onto its
  config's mesh, or onto `mesh` (axis sizes) instead. Creates nothing.

  Raises FileNotFoundError naming the path when the workdir, its config or the checkpoint is
  missing, checkpointing.CheckpointError when no checkpoint is readable.
  """
  placement = workdir_placement(workdir, mesh)
  check_tokenizer(workdir, placement.config.data.tokenizer, f'restoring {workdir}')
  step, state, _ = checkpointing.read_checkpoint(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), placement.abstract_state, step)
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
  them and `capacity_sweep` lists, per factor, loss, bits_per_byte, dropped fractions
  (overall and per choice slot), each MoE layer's experts per token and the forward FLOPs per
  token spent: ST-MoE treats the eval capacity factor as a free lever. Writes
  `workdir/eval_<step>.json` (process 0) and returns the metrics with `step` added. `mesh`
  (axis sizes) replaces the saved `config.mesh`: checkpoints restore onto any mesh the model
  fits. Raises as `restore_workdir`.
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
          'dropped_fraction_per_slot': [l['dropped_fraction_per_slot'] for l in m['moe_layers']],
          'experts_per_token': [l['experts_per_token'] for l in m['moe_layers']],
          **{k: v for k, v in m.items() if k == 'spent_forward_flops_per_token'}})
  if jax.process_index() == 0:
    records.write_file_atomically(os.path.join(workdir, f'eval_{step}.json'),
                                  json.dumps(metrics, indent=2))
  return metrics


def sample_workdir(workdir: str, prompt: str, max_new_tokens: int, *, step: int | None = None,
                   **kwargs) -> str:
  """sample.py: restores a workdir's checkpoint and returns `prompt` followed by its
  continuation (kwargs as `sampling.Sampler.generate_tokens`). A bad sampling argument is
  named (ValueError) before anything is restored."""
  sampling.check_sampling_args(max_new_tokens, kwargs.get('temperature', 0.8),
                               kwargs.get('top_p', 0.95))
  placement, _, state = restore_workdir(workdir, step)
  sampler = model_factory.make_sampler(placement.model_cfg, placement.config.data)
  return prompt + sampler.generate_text(state.params, prompt, max_new_tokens,
                                        buffers=state.buffers, **kwargs)
