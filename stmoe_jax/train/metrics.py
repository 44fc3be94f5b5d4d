"""Metric sinks, written by process 0 only: `workdir/metrics.jsonl` and TensorBoard event files.

Every `write(step, kind, metrics)` appends one JSON line `{"step", "kind", "wall_time", ...}`
(arrays become nested lists) and the same values as TensorBoard summaries in the workdir
(tensorboardX: no TensorFlow needed), so `tensorboard --logdir runs/` shows every run:

  - a scalar becomes the scalar `<kind>/<name>`;
  - `expert_load` [M, E] (share of token-choices per expert in each of the M MoE layers)
    becomes, per layer m, a histogram `<kind>/expert_load/moe<m>` whose bucket e holds expert
    e's share, and the scalar `<kind>/max_over_mean_load/moe<m>` (1 = balanced, E = collapse);
  - any other vector [M] (e.g. `layer_dropped_fraction`) becomes scalars `<kind>/<name>/moe<m>`;
  - an encoder-decoder's per-stack `expert_load/<stack>` likewise becomes
    `<kind>/expert_load/<stack>/moe<m>` and `<kind>/max_over_mean_load/<stack>/moe<m>`;
  - eval's `moe_layers` list (see `evaluation.evaluate`) is read as the same two arrays, and
    its `experts_per_token` as scalars `<kind>/experts_per_token/moe<m>`.

`write_text(step, tag, text)` adds a text summary and a line to `workdir/samples.jsonl`.

Lines are appended whole or not at all, and a torn last line left by a killed run is repaired
before the first append (`stmoe_jax.train.records`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax
import numpy as np

from stmoe_jax.train.records import append_line, repair_torn_line


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch where torch is installed but not yet
  imported: tensorboardX imports it only to accept torch tensors (we pass numpy), and importing
  torch costs a train.py start-up more CPU time than importing JAX."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError: tensorboardX's numpy-only path.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


def to_python(value):
  """Arrays and numpy scalars -> floats/lists, so metrics serialise as plain JSON."""
  if isinstance(value, dict):
    return {k: to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if isinstance(value, str):
    return value
  array = np.asarray(value)
  if array.ndim:
    return to_python(array.tolist())
  item = array.item()
  return item if not isinstance(item, float) or math.isfinite(item) else str(item)


def tensorboard_values(metrics: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Splits a metrics dict into (scalars by tag suffix, expert-load histograms by tag suffix).

  See the module docstring for the tag names. Strings and other non-numeric values are skipped.
  """
  metrics = dict(metrics)
  if isinstance(metrics.get('moe_layers'), list):  # evaluation.evaluate's per-layer records.
    layers = metrics.pop('moe_layers')
    if layers:
      metrics['expert_load'] = np.array([layer['expert_load'] for layer in layers])
      metrics['layer_dropped_fraction'] = np.array([layer['dropped_fraction'] for layer in layers])
      if all('experts_per_token' in layer for layer in layers):
        metrics['experts_per_token'] = np.array([layer['experts_per_token'] for layer in layers])
  scalars, histograms = {}, {}
  for name, value in metrics.items():
    try:
      array = np.asarray(value, np.float64)
    except (TypeError, ValueError):
      continue
    if array.ndim == 0:
      scalars[name] = float(array)
    elif name.partition('/')[0] == 'expert_load' and array.ndim == 2:
      stack = name[len('expert_load'):]  # '/encoder' of an encoder-decoder's per-stack loads.
      for m, load_E in enumerate(array):
        histograms[f'{name}/moe{m}'] = load_E
        scalars[f'max_over_mean_load{stack}/moe{m}'] = float(load_E.max() /
                                                           max(load_E.mean(), 1e-12))
    elif array.ndim == 1:
      scalars.update({f'{name}/moe{m}': float(v) for m, v in enumerate(array)})
  return scalars, histograms


class MetricsWriter:
  """Writes metrics to `workdir/metrics.jsonl` and TensorBoard events in `workdir`.

  `kind` is 'train' or 'eval'. On processes other than 0 every call is a no-op, so a
  multi-host run writes each line once.

  Args:
    workdir: the run's directory (created if missing).
    tensorboard: also write TensorBoard event files.
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.active = jax.process_index() == 0
    self._summary = None
    if self.active:  # A resumed run first cuts off what a killed one left half written.
      for name in ('metrics.jsonl', 'samples.jsonl'):
        repair_torn_line(os.path.join(workdir, name))
    if self.active and tensorboard:
      os.makedirs(workdir, exist_ok=True)
      self._summary = _summary_writer_class()(logdir=workdir, flush_secs=30)

  def write(self, step: int, kind: str, metrics: dict) -> None:
    """Appends `metrics` (scalars and arrays) for `step` under `kind` to both sinks."""
    if not self.active:
      return
    record = {'step': int(step), 'kind': kind, 'wall_time': time.time(), **to_python(metrics)}
    append_line(self.path, json.dumps(record))
    if self._summary is None:
      return
    scalars, histograms = tensorboard_values(metrics)
    with self._naming_events_file():
      for name, value in scalars.items():
        self._summary.add_scalar(f'{kind}/{name}', value, int(step))
      for name, load_E in histograms.items():
        self._add_expert_histogram(f'{kind}/{name}', load_E, int(step))
      self._summary.flush()

  @contextlib.contextmanager
  def _naming_events_file(self):
    """An OSError of tensorboardX (a full disk) names its events file."""
    try:
      yield
    except OSError as e:
      if e.filename is None:
        e.filename = self._summary.file_writer.get_logdir() + '/events.out.tfevents.*'
      raise

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Records a text sample (e.g. generated text) as a TensorBoard text summary and a
    `{"step", "tag", "text"}` line in `workdir/samples.jsonl`."""
    if not self.active:
      return
    append_line(os.path.join(self.workdir, 'samples.jsonl'),
                json.dumps({'step': int(step), 'tag': tag, 'text': text}))
    if self._summary is not None:
      with self._naming_events_file():
        # TensorBoard renders text as markdown: a code block keeps generated code verbatim.
        self._summary.add_text(tag, '```\n' + text.replace('```', "'''") + '\n```', int(step))
        self._summary.flush()

  def close(self) -> None:
    if self._summary is not None:
      self._summary.close()
      self._summary = None

  def _add_expert_histogram(self, tag: str, load_E: np.ndarray, step: int) -> None:
    # Bucket e spans (e - 0.5, e + 0.5] and holds expert e's share: the histogram's x axis is
    # the expert index, its height the load.
    index_E = np.arange(len(load_E), dtype=np.float64)
    self._summary.add_histogram_raw(
        tag, min=0.0, max=float(len(load_E) - 1), num=float(load_E.sum()),
        sum=float(index_E @ load_E), sum_squares=float(index_E**2 @ load_E),
        bucket_limits=(index_E + 0.5).tolist(), bucket_counts=load_E.tolist(), global_step=step)
