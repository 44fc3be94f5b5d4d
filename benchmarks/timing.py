"""Timing helpers shared by the benchmarks: interleaved repeats and a record header.

The CPUs the benchmarks run on are shared, so absolute times are noisy: compare programs by the
ratio of their medians over repeats taken in turn (A, B, A, B, ...), so that a slow spell of the
machine hits all of them alike.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax


def interleaved(programs: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, float]:
  """Median wall seconds of each `fn(*args)`, the programs run in turn `repeats` times.

  Each is called once first (compilation, first-touch allocation), outside the timings.
  """
  for fn, args in programs.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in programs}
  for _ in range(repeats):
    for name, (fn, args) in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def machine() -> dict:
  """Where and when a record was measured, and by which command."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                 cpu)
  except OSError:
    pass
  return {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'command': ' '.join(['python'] + sys.argv),
          'device': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
          'device_count': jax.device_count(), 'cpu': cpu, 'cpu_count': os.cpu_count(),
          'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', '')}
