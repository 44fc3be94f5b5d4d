"""The host side of the guards: loss spikes, skip and stop lines, the window's summary."""

import numpy as np
import pytest

from stmoe_jax.train import guards


def test_step_monitor_logs_spikes_skips_and_stops():
  """Deliver 4 on the host: spikes against the median of the last 32 losses, skip lines,
  stop errors, elementwise means of per-layer arrays, maxima of max_* metrics."""
  lines = []
  monitor = guards.StepMonitor('skip', 2.0, lines.append)
  rng = np.random.default_rng(0)
  series = list(3 + 0.1 * rng.standard_normal(40))
  series[35] = 7.0  # > 2 x median (about 3).
  series[36] = 5.0  # < 2 x median: not a spike.
  for step, loss in enumerate(series, 1):
    monitor.observe({'loss': loss, 'nonfinite': 0.0, 'skipped_steps': 0.0,
                     'load': np.array([step, 2 * step]), 'max_logit': 10.0 - step}, step)
  assert lines == [f'warning: loss spike at step 36: 7.0000 > 2.0 x median '
                   f'{np.median(series[3:35]):.4f} of the previous 32 steps']
  summary = monitor.summary()
  assert summary['loss_spikes'] == 1 and summary['skipped_steps'] == 0
  np.testing.assert_allclose(summary['loss'], np.mean(series))
  np.testing.assert_allclose(summary['load'], [20.5, 41.0])
  assert summary['max_logit'] == 9.0  # max_* metrics: the window's maximum, not its mean.
  assert 'nonfinite' not in summary
  monitor.observe({'loss': np.nan, 'cross_entropy': np.nan, 'z_loss': np.array([0.0, np.inf]),
                   'grad_norm': 1.0, 'nonfinite': 1.0, 'skipped_steps': 3.0}, 41)
  assert lines[-1] == ('warning: non-finite cross_entropy, z_loss at step 41: update skipped '
                       '(3 skipped so far)')
  assert monitor.summary() is None  # A skipped step is not averaged in.
  with pytest.raises(guards.NonFiniteError, match='non-finite grad_norm at step 7'):
    guards.StepMonitor('stop', 0, lines.append).observe(
        {'loss': 1.0, 'grad_norm': np.inf, 'nonfinite': 1.0, 'skipped_steps': 0.0}, 7)
