"""Metric sinks: `workdir/metrics.jsonl` (one JSON object per line), written by process 0 only."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


def to_python(value):
  """Arrays and numpy scalars -> floats/lists, so metrics serialise as plain JSON."""
  if isinstance(value, dict):
    return {k: to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  array = np.asarray(value)
  if array.ndim:
    return array.tolist()
  item = array.item()
  return item if not isinstance(item, float) or math.isfinite(item) else str(item)


class MetricsWriter:
  """Appends `{"step": s, "kind": k, **metrics}` lines to `workdir/metrics.jsonl`.

  `kind` is 'train' or 'eval'. On processes other than 0 every call is a no-op, so a
  multi-host run writes each line once.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.active = jax.process_index() == 0

  def write(self, step: int, kind: str, metrics: dict) -> None:
    if not self.active:
      return
    record = {'step': int(step), 'kind': kind, **to_python(metrics)}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
