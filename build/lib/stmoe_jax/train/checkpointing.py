"""Orbax checkpoints of the train state plus the data iterator's position.

Layout: `workdir/checkpoints/<step>/{state, data}`. Orbax writes each step into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only when every item is written, so a
process killed mid-save leaves the previous steps as they were (tests/test_reliability.py proves
it by killing a save half way). The data iterator state is saved as JSON beside the arrays so a
resumed run sees exactly the batches an uninterrupted run would have. With several processes
each reads its own documents, so every process's iterator state is gathered to process 0 (which
writes the JSON) and each restores its own.

Failures are reported by path: a save that fails (disk full) raises `CheckpointError` naming
the directory and the steps still intact; a step that cannot be read raises `CheckpointError`
naming its directory, and `restore_latest` then falls back to the next newest step; a step
whose arrays do not fit the model raises `IncompatibleCheckpointError` naming the array.

Silent corruption: every save also writes `checksums` (JSON): the CRC-32 of each array's bytes
and of the data state, computed on the host from what is being saved. Restoring recomputes them
and treats a mismatch, or a NaN/inf in any floating-point array, like unreadable files: the
step is damaged. Nothing non-finite is ever saved (`NonFiniteStateError`). Arrays sharded across
processes (multi-host, not fully addressable) are not checksummed: no one process holds their
bytes; Orbax/TensorStore's own checks are all they get. Steps saved before checksums existed
restore without the check.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import zlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from stmoe_jax import errors
from stmoe_jax.config import ConfigError


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read; the message names the path."""


class IncompatibleCheckpointError(ConfigError):
  """A readable checkpoint whose arrays do not fit the configured model or optimizer."""


class NonFiniteStateError(CheckpointError):
  """A state holding NaN or inf was not saved; the message names an array and the newest step."""


def _first_line(error: BaseException) -> str:
  """One readable line for a failure from Orbax/TensorStore: the innermost message, without
  pybind reprs, source locations or payloads (`[source locations=...]`, `[tensorstore_spec=...]`)."""
  chain = error
  while chain is not None:  # A full disk, wherever in the chain (TensorStore: RESOURCE_EXHAUSTED).
    if (isinstance(chain, OSError) and chain.errno == errno.ENOSPC or
        'RESOURCE_EXHAUSTED' in str(chain) or 'No space left on device' in str(chain)):
      return 'disk full'
    chain = chain.__cause__ or chain.__context__
  while error.__cause__ is not None:  # The innermost error says why (`raise ... from`).
    error = error.__cause__
  text = str(error).strip()
  lines = [l.strip() for l in text.splitlines() if l.strip()] or ['']
  line = lines[0]
  line = line.split(' [source locations=')[0].split(' [tensorstore_spec=')[0]
  line = line.rstrip(':').strip()
  return f'{type(error).__name__}: {line}'[:500]


def _leaves_with_names(tree: Any) -> list[tuple[str, Any]]:
  """[('params/embed', leaf), ...] in flatten order, named as `_flat_shapes` names them."""
  return [('/'.join(_key_name(k) for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_float(leaf: Any) -> bool:
  return hasattr(leaf, 'dtype') and jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)


@jax.jit
def _finite_flags(leaves: list) -> list:
  return [jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves]


def nonfinite_arrays(tree: Any) -> list[str]:
  """Names of the floating-point arrays of `tree` holding a NaN or inf (one jitted reduction;
  a collective on multi-process runs, so every process must call it)."""
  named = [(n, leaf) for n, leaf in _leaves_with_names(tree) if _is_float(leaf)]
  flags = jax.device_get(_finite_flags([leaf for _, leaf in named])) if named else []
  return [n for (n, _), ok in zip(named, flags) if not ok]


def _host_value(leaf: Any) -> np.ndarray | None:
  """The whole of `leaf` as numpy, or None when this process holds only part of it."""
  if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
    return np.asarray(leaf)
  if leaf.is_fully_replicated:  # Multi-host: every process holds a full copy.
    return np.asarray(leaf.addressable_data(0))
  return None


def _crc32(value: np.ndarray) -> str:
  data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
  return f'{zlib.crc32(data):08x}'


def checksums(tree: Any, data_state: Any) -> dict:
  """{'arrays': {name: crc32 hex}, 'data': crc32 hex} of what a save writes. Arrays that no
  single process holds whole (sharded across processes) are left out."""
  values = [(n, _host_value(leaf)) for n, leaf in _leaves_with_names(tree)]
  arrays = {n: _crc32(value) for n, value in values if value is not None}
  data = json.dumps(data_state, sort_keys=True).encode()
  return {'arrays': arrays, 'data': f'{zlib.crc32(data):08x}'}


def verify(tree: Any, data_state: Any, saved: dict) -> str | None:
  """What is wrong with a restored (tree, data_state) against its saved checksums, or None."""
  now = checksums(tree, data_state)
  for name, crc in saved.get('arrays', {}).items():
    if name in now['arrays'] and now['arrays'][name] != crc:
      return f'array {name} does not match its checksum (crc32 {now["arrays"][name]}, saved {crc})'
  if 'data' in saved and now['data'] != saved['data']:
    return 'the data iterator state does not match its checksum'
  bad = nonfinite_arrays(tree)
  if bad:
    return f'array {bad[0]} holds NaN or inf' + (f' ({len(bad)} arrays do)' if len(bad) > 1 else '')
  return None


def _key_name(key) -> str:
  """A pytree path entry as a name: dict key, dataclass field or sequence index."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """Pytree of arrays / ShapeDtypeStructs / Orbax ArrayMetadata -> {'params/embed/...': (shape,
  dtype)}. Keys drop the pytree node kinds, so a dataclass field and a dict key of the same name
  (what Orbax's metadata records for it) read the same."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {'/'.join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in leaves if hasattr(leaf, 'shape')}


def _gather_data_states(data_state: dict) -> dict:
  """Collective: {'per_process': [state of process 0, 1, ...]} on every process; as is on one."""
  if jax.process_count() == 1:
    return data_state
  blob = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded))  # [processes, longest]
  return {'per_process': [json.loads(row[:n].tobytes().decode())
                          for row, n in zip(rows, sizes.reshape(-1))]}


def _damaged_step_metadata(directory: str) -> list[tuple[int, str]]:
  """(step, why) for each step directory whose `_CHECKPOINT_METADATA` is JSON but not an
  object: Orbax refuses to open a directory holding one (an unparsable one it ignores)."""
  damaged = []
  names = os.listdir(directory) if os.path.isdir(directory) else []
  for name in sorted((n for n in names if n.isdigit()), key=int):
    path = os.path.join(directory, name, '_CHECKPOINT_METADATA')
    try:
      with open(path, 'rb') as f:
        value = json.loads(f.read())
    except (OSError, ValueError):
      continue
    if value is not None and not isinstance(value, dict):
      damaged.append((int(name), f'_CHECKPOINT_METADATA holds a JSON {type(value).__name__}, '
                      'not an object'))
  return damaged


def _checksums_ok(saved: Any) -> bool:
  """Whether a restored `checksums` item has the shape `checksums` writes."""
  return (isinstance(saved, dict) and isinstance(saved.get('arrays', {}), dict) and
          all(isinstance(v, str) for v in saved.get('arrays', {}).values()) and
          isinstance(saved.get('data', ''), str))


def _own_data_state(data: dict, path: str) -> dict:
  """This process's entry of a gathered data state (see `_gather_data_states`)."""
  if 'per_process' not in data:
    return data
  states = data['per_process']
  if len(states) != jax.process_count():
    raise IncompatibleCheckpointError(
        f'checkpoint {path} holds the data positions of {len(states)} processes; this run has '
        f'{jax.process_count()}: resume with as many')
  return states[jax.process_index()]


class Checkpointer:
  """Saves every `save_every` steps, keeps the newest `keep`, restores onto given shardings."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    # cleanup_tmp_directories: a save interrupted by a kill leaves `<step>.orbax-checkpoint-tmp`;
    # it was never a checkpoint, and removing it lets that step be saved again. A reader
    # (`read_only`: eval.py, sample.py) creates, cleans and deletes nothing.
    # (Not Orbax's own read_only option: it logs three warnings on every use.)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=not read_only,
        cleanup_tmp_directories=not read_only)
    self.read_only = read_only
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f'{self.directory} is a file, not a checkpoint directory: move it '
                            'away')
    # Orbax reads every step's _CHECKPOINT_METADATA when it opens the directory, and a damaged
    # one fails the whole manager: such a step is set aside by a trainer, named by a reader.
    for step, why in _damaged_step_metadata(self.directory):
      if read_only:
        raise CheckpointError(f'checkpoint {self.step_path(step)} is unreadable: {why}; train.py '
                              'sets it aside when it resumes, or move it away')
      target = self._set_aside_path(step)
      print(f'warning: checkpoint {self.step_path(step)} is unreadable: {why}; set aside as '
            f'{target}', file=sys.stderr, flush=True)
    # Handlers named up front (not inferred from the first save) so a fresh manager can read a
    # step's metadata before restoring it.
    try:
      self.manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={'state': ocp.StandardCheckpointHandler(),
                         'data': ocp.JsonCheckpointHandler(),
                         'checksums': ocp.JsonCheckpointHandler()})
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'checkpoints in {self.directory} cannot be opened: '
                            f'{_first_line(e)}') from e

    self._saving = None  # The step of the newest save, perhaps still being written.

  def step_path(self, step: int) -> str:
    """The directory of checkpoint `step`."""
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    """The newest saved step, None if there is none."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, oldest first."""
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `step` falls on the save interval."""
    return self.manager.should_save(step)

  def _save_failed(self, step: int | str, error: Exception) -> CheckpointError:
    """The error to raise for a failed save; closes the manager (its background threads would
    otherwise print tracebacks at exit)."""
    why, chain = _first_line(error), error
    while chain is not None:  # The failed step is named in the path of its temporary dir.
      found = re.search(re.escape(self.directory) + r'/(\d+)\.orbax-checkpoint-tmp', str(chain))
      if found:
        step = found.group(1)
        break
      chain = chain.__cause__ or chain.__context__
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      pass  # The same failure again.
    errors.drain_background_errors()
    intact = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    return CheckpointError(
        f'saving checkpoint step {step} to {self.directory} failed ({why}); the steps saved '
        f'before it are intact: {intact}')

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
    """Saves (asynchronously) if `step` is on the save interval or `force`; True if it saved.

    Raises CheckpointError if this or the previous asynchronous save failed (e.g. disk full),
    NonFiniteStateError (saving nothing) if a floating-point array of `state` holds NaN or inf.
    """
    if self.read_only:
      raise CheckpointError(f'{self.directory} was opened read-only: not saving step {step}')
    if not (force or self.manager.should_save(step)):
      return False
    bad = nonfinite_arrays(state)
    if bad:
      newest = self.latest_step()
      raise NonFiniteStateError(
          f'not saving checkpoint step {step}: array {bad[0]} holds NaN or inf' +
          (f' ({len(bad)} arrays do)' if len(bad) > 1 else '') + '; the last good state is '
          f'checkpoint {self.step_path(newest) if newest is not None else "nowhere (none saved)"}')
    data = _gather_data_states(data_state or {})
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                              checksums=ocp.args.JsonSave(checksums(state, data)))
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      # Orbax re-raises a failed earlier async save here (OSError, or TensorStore's
      # RESOURCE_EXHAUSTED ValueError when the disk is full).
      raise self._save_failed(f'{self._saving} or {step}', e) from e
    if saved:
      self._saving = step
    return saved

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed; CheckpointError if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(self._saving, e) from e

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises IncompatibleCheckpointError naming the first array of `abstract_state` that
    `step` lacks or stores with another shape or dtype; CheckpointError if its metadata is
    unreadable."""
    path = self.step_path(step)
    try:
      metadata = self.manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'checkpoint {path} is unreadable: {_first_line(e)}') from e
    if metadata is None or getattr(metadata, 'tree', None) is None:
      raise CheckpointError(f'checkpoint {path} is unreadable: state/_METADATA (the list of '
                            'its arrays) is missing or empty')
    saved = _flat_shapes(metadata.tree)
    for name, (shape, dtype) in _flat_shapes(abstract_state).items():
      if name not in saved:
        raise IncompatibleCheckpointError(
            f'checkpoint {path} has no array {name}, which this config\'s model needs')
      if saved[name] != (shape, dtype):
        raise IncompatibleCheckpointError(
            f'checkpoint {path} stores {name} as {saved[name][1]}{list(saved[name][0])} but this '
            f'config needs {dtype}{list(shape)}')

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` onto the shapes, dtypes and shardings of `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set, so the same
    checkpoint restores onto any mesh. Raises IncompatibleCheckpointError (the arrays do not fit)
    or CheckpointError (missing or damaged files), both naming the step's directory.
    """
    self.check_compatible(step, abstract_state)
    path = self.step_path(step)
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if os.path.isdir(os.path.join(path, 'checksums')):  # Absent in steps saved before them.
      items['checksums'] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      errors.drain_background_errors()
      raise CheckpointError(f'checkpoint {path} is unreadable: {_first_line(e)}') from e
    if not isinstance(restored['data'], dict):
      raise CheckpointError(f'checkpoint {path} has no data iterator state')
    saved = restored.get('checksums') if 'checksums' in items else {}
    if not _checksums_ok(saved):
      raise CheckpointError(f'checkpoint {path} is unreadable: its checksums are unreadable')
    damage = verify(restored['state'], restored['data'], saved)
    if damage:
      raise CheckpointError(f'checkpoint {path} is damaged: {damage}')
    return restored['state'], _own_data_state(restored['data'], path)

  def restore_latest(self, abstract_state: Any, *, set_aside_damaged: bool = False,
                     warn: Callable[[str], None] | None = None) -> tuple[int, Any, dict]:
    """Restores the newest readable step: (step, state, data_state).

    Steps are tried newest to oldest; each unreadable one is reported through `warn` (default:
    stderr) with its path and, if `set_aside_damaged`, renamed to `<step>.corrupt` (kept for
    inspection, no longer a step) once an older good step is found, so training can save that
    step again. An incompatible
    checkpoint is not skipped: older steps of the same run would not fit either. Raises
    CheckpointError listing every failure when no step is readable.
    """
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    failures, damaged = [], []
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
      except CheckpointError as e:
        failures.append(str(e))
        damaged.append(step)
        warn(f'warning: {e}; falling back to an older checkpoint')
        continue
      # Only once a good step is found: with none, the run must fail, not start over.
      for bad in damaged if set_aside_damaged else []:
        self._set_aside(bad)
      return step, state, data_state
    raise CheckpointError(f'no readable checkpoint in {self.directory}: ' + '; '.join(failures)
                          if failures else f'no checkpoint in {self.directory}')

  def _set_aside_path(self, step: int) -> str:
    """Renames step `step` to `<step>.corrupt` (process 0); returns the new path."""
    path = self.step_path(step)
    target = f'{path}.corrupt'
    suffix = 1
    while os.path.exists(target):
      target, suffix = f'{path}.corrupt{suffix}', suffix + 1
    if jax.process_index() == 0:
      os.rename(path, target)
    return target

  def _set_aside(self, step: int) -> None:
    self._set_aside_path(step)
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()


def read_checkpoint(directory: str, abstract_state: Any, step: int | None = None,
                    warn: Callable[[str], None] | None = None) -> tuple[int, Any, dict]:
  """(step, state, data_state) of checkpoint `step` in `directory`, for readers (eval.py,
  sample.py): nothing is created, renamed or cleaned up. With `step` None the newest readable
  step, falling back past damaged ones as `restore_latest` does. Raises FileNotFoundError naming
  the path when there is no checkpoint (or no such step), CheckpointError when none is readable.
  """
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise FileNotFoundError(f'no checkpoint in {directory}: train first with train.py')
  ckpt = Checkpointer(directory, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f'no complete checkpoint in {directory}: train first with train.py')
    if step is None:
      return ckpt.restore_latest(abstract_state, warn=warn)
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint for step {step} in {directory}; have {steps}')
    return (step, *ckpt.restore(step, abstract_state))
  finally:
    ckpt.close()
