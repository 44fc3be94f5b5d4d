"""Orbax checkpoints of the train state plus the data iterator's position.

Layout: `workdir/checkpoints/<step>/{state, data}`; Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never replaces the last good one.
The data iterator state is saved as JSON beside the arrays so a resumed run sees exactly the
batches an uninterrupted run would have.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `save_every` steps, keeps the newest `keep`, restores onto given shardings."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `step` falls on the save interval."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
    """Saves (asynchronously) if `step` is on the save interval or `force`; True if it saved."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` onto the shapes, dtypes and shardings of `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set, so the same
    checkpoint restores onto any mesh.
    """
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored['state'], restored['data']

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
