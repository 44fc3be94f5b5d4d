"""Host side of the training guards: non-finite steps, loss spikes, and preemption (SIGTERM, Ctrl-C).

The device side is in `train_lib.train_step`: a non-finite step never changes the parameters.
Here the loop's one-step-late metrics are read: a skipped update or a loss spike is logged, a
non-finite step in stop mode raises `NonFiniteError`, and `sigterm_flag` turns the preemption
signal into a flag the loop checks after each step.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
from typing import Callable, Iterator

import numpy as np

from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option, Range

# Terms the non-finite guard reports, and that `debug.nan_term` can poison.
NONFINITE_TERMS = ('cross_entropy', 'balance_loss', 'z_loss', 'grad_norm')
options.declare(
    Option('on_nonfinite', str, 'stop', "Non-finite loss or gradients: 'skip' drops that update "
           "(counted, logged); 'stop' saves the last good state and exits non-zero.",
           OneOf(('skip', 'stop'))),
    Option('debug.nan_at_step', int, 0, "Poison step n's (1-based) debug.nan_term with NaN, to "
           'test the guard.', Range(0, note='0 = off')),
    Option('debug.nan_term', str, 'cross_entropy', 'The term debug.nan_at_step poisons.',
           OneOf(NONFINITE_TERMS)),
    owner='train.guards')


class NonFiniteError(FloatingPointError):
  """Stop mode met a non-finite loss or gradient; the message names the step and the terms."""


def nonfinite_terms(metrics: dict) -> list[str]:
  """Names of the NONFINITE_TERMS (or 'loss' when only the total is bad) holding a NaN/inf.

  Values may be scalars or arrays (per-layer telemetry): any non-finite entry counts.
  """
  bad = [k for k in NONFINITE_TERMS if k in metrics and not np.all(np.isfinite(metrics[k]))]
  return bad or ['loss']


def is_spike(loss: float, recent: list[float], factor: float) -> bool:
  """Whether `loss` exceeds `factor` x the median of `recent` (a full window of past losses)."""
  return bool(factor) and bool(recent) and loss > factor * float(np.median(recent))


class StepMonitor:
  """Reads each step's fetched metrics: logs skips and spikes, raises in stop mode, averages.

  `observe(metrics, step)` takes one step's metrics (numpy, any shapes) with its 1-based step;
  `summary()` returns the mean of the healthy steps since the last summary (arrays averaged
  elementwise; `max_*` metrics take the window's maximum, so a one-step excursion shows) plus
  the run's `skipped_steps` and `loss_spikes` counts, or None if none.
  """

  SPIKE_WINDOW = 32

  def __init__(self, on_nonfinite: str, spike_factor: float, log: Callable[[str], None]):
    self.on_nonfinite, self.spike_factor, self.log = on_nonfinite, spike_factor, log
    self.recent = collections.deque(maxlen=self.SPIKE_WINDOW)
    self.window: list[dict] = []
    self.skipped_steps = self.loss_spikes = 0

  def observe(self, metrics: dict, step: int) -> None:
    """Records one step's metrics: counts a skipped update, notes a loss spike."""
    if float(metrics['nonfinite']):
      terms = ', '.join(nonfinite_terms(metrics))
      if self.on_nonfinite == 'stop':
        raise NonFiniteError(f'non-finite {terms} at step {step} (config.on_nonfinite=stop)')
      self.skipped_steps = int(metrics['skipped_steps'])
      self.log(f'warning: non-finite {terms} at step {step}: update skipped '
               f'({self.skipped_steps} skipped so far)')
      return
    loss = float(metrics['loss'])
    if len(self.recent) == self.recent.maxlen and is_spike(loss, list(self.recent),
                                                           self.spike_factor):
      self.loss_spikes += 1
      self.log(f'warning: loss spike at step {step}: {loss:.4f} > {self.spike_factor} x median '
               f'{np.median(self.recent):.4f} of the previous {len(self.recent)} steps')
    self.recent.append(loss)
    self.window.append(metrics)

  def summary(self) -> dict | None:
    """The metrics averaged (maxima for `max_*`) since the last summary, with the skip and spike
    counts; None if no step was observed. Starts a new window."""
    if not self.window:
      return None
    summary = {}
    for key in self.window[0]:
      if key in ('nonfinite', 'skipped_steps'):
        continue
      reduce = np.max if key.startswith('max_') else np.mean
      value = reduce(np.stack([np.asarray(m[key], np.float64) for m in self.window]), axis=0)
      summary[key] = float(value) if value.ndim == 0 else value
    summary.update(skipped_steps=self.skipped_steps, loss_spikes=self.loss_spikes)
    self.window = []
    return summary


class Preemption(threading.Event):
  """Set by SIGTERM or a first SIGINT (Ctrl-C); `name` says which arrived first."""

  name = ''


@contextlib.contextmanager
def sigterm_flag() -> Iterator[Preemption]:
  """While active, SIGTERM (what cloud/TPU preemption sends) and a first SIGINT (Ctrl-C) set
  the yielded event instead of killing the process, so the loop saves the step in flight and
  stops; a second SIGINT raises KeyboardInterrupt at once. The previous handlers are restored
  on exit. Outside the main thread (where signals cannot be caught) the event is never set."""
  flag = Preemption()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handle(signum, frame):
    del frame
    if signum == signal.SIGINT and flag.is_set():
      raise KeyboardInterrupt
    if not flag.is_set():
      flag.name = signal.Signals(signum).name
    flag.set()

  previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
