"""`validate(config)`: every check of a config's values, before anything compiles.

In order: the structure and each option's type and domain (from its declaration,
`options.check_structure`); per registry, options of unselected entries left at their defaults
and each selected entry's own checks (`options.check_entries`); the checks across options that
modules registered (`options.add_check`); then the few core checks below. Each failure raises
`ConfigError` with one line naming the field. Checks that need devices or data (batch vs mesh,
a dataset's splits) happen when those are built.
"""

from __future__ import annotations

import ml_collections

from stmoe_jax.config import options
from stmoe_jax.config.schema import layer_period


def _check(ok: bool, field: str, value, expected: str):
  if not ok:
    raise options.invalid(field, value, expected)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value cannot work."""
  options.check_structure(config)
  _check_core(config)
  options.check_entries(config)
  for check in options.checks():
    check(config)


def _check_core(config: ml_collections.ConfigDict) -> None:
  """The mesh, the axis rules, and the combinations of core options."""
  for axis, size in config.mesh.items():
    _check(options.type_ok(size, int) and (size > 0 or size == -1), f'mesh.{axis}', size,
           'a positive integer or -1 (all remaining devices)')
  for rule in config.logical_axis_rules:
    _check(isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str) and
           (rule[1] is None or isinstance(rule[1], str) or
            isinstance(rule[1], (list, tuple)) and all(isinstance(a, str) for a in rule[1])),
           'logical_axis_rules', rule,
           '(logical name, mesh axis, tuple of mesh axes or None) pairs')
  m, moe = config.model, config.moe
  if m.scan_layers:
    period = layer_period(moe.every, config.attention.layer_kinds)
    for name in ('num_layers', 'num_encoder_layers') if 'num_encoder_layers' in m else ():
      _check(m[name] % period == 0, f'model.{name}', m[name],
             f'a multiple of {period} with model.scan_layers=True (each stack scans over units '
             f'of lcm(moe.every={moe.every}, len(attention.layer_kinds))={period} layers)')
  _check(moe.num_experts >= moe.top_k, 'moe.num_experts', moe.num_experts,
         f'at least moe.top_k={moe.top_k}')
  _check(moe.num_shared_experts or not moe.shared_expert_d_ff, 'moe.shared_expert_d_ff',
         moe.shared_expert_d_ff, '0 while moe.num_shared_experts=0 (no shared expert to size)')
  _check(moe.every <= m.num_layers or not moe.enabled, 'moe.every', moe.every,
         f'at most model.num_layers={m.num_layers} while moe.enabled=True (no layer would be '
         'MoE; set moe.enabled=False for a dense model)')
  _check(config.stop_at_step <= config.num_train_steps, 'stop_at_step', config.stop_at_step,
         f'at most num_train_steps={config.num_train_steps}')
  _check(config.debug.nan_at_step <= config.num_train_steps, 'debug.nan_at_step',
         config.debug.nan_at_step,
         f'a step in [1, num_train_steps={config.num_train_steps}], or 0 = off')
  if config.init_from:
    workdir, step = parse_init_from(config.init_from)
    _check(bool(workdir) and step != -1, 'init_from', config.init_from,
           "'<workdir>' or '<workdir>:<step>' with an integer step >= 0 ('' = train from scratch)")


def parse_init_from(spec: str) -> tuple[str, int | None]:
  """'<workdir>[:<step>]' -> (workdir, step or None = its newest step); step -1 when the text
  after the last ':' is not a step (a workdir path may not contain ':')."""
  workdir, colon, step = spec.rpartition(':')
  if not colon:
    return spec, None
  return workdir, int(step) if step.isdigit() else -1
