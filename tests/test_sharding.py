"""Sharding and expert parallelism on 8 fake CPU devices (subprocess), plus rule parsing.

The multi-device checks live in tests/sharding_checks.py, run once in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must precede JAX start-up); it
compares each mesh and dispatch strategy against one device: loss within rtol 1e-5, gradients
within rtol 1e-4 / atol 1e-6 (float32, reductions split differently across shards).
"""

import json
import os
import subprocess
import sys

import pytest

from stmoe_jax import sharding
from stmoe_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(script: str, num_devices: int, *args: str, timeout: int = 900):
  """Runs a tests/ script with `num_devices` fake CPU devices; returns its last stdout line."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}"
  env = {**os.environ, 'XLA_FLAGS': flags.strip(),
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', script), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if result.returncode:
    raise AssertionError(f'{script} failed ({result.returncode}):\n{result.stderr[-4000:]}')
  return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope='module')
def checks():
  return json.loads(run_with_devices('sharding_checks.py', 8))


@pytest.mark.parametrize('name', [
    'scatter:data=8', 'scatter:expert=8', 'scatter:data=2,expert=4',
    'scatter:data=2,expert=2,model=2', 'einsum:expert=8', 'einsum:data=2,expert=2,model=2',
    'dropless:expert=8', 'dropless:data=2,expert=2,model=2'])
def test_mesh_matches_single_device(checks, name):
  """Loss and every gradient equal one device's (asserted in the script, which also checks
  parameter and Adam-moment shardings); all-to-all in the compiled step iff expert > 1."""
  result = checks[name]
  assert result['loss'] == pytest.approx(result['ref_loss'], rel=1e-5)
  assert result['max_grad_err'] < 1e-6
  if not name.startswith('dropless'):
    assert result['all_to_all'] == ('expert=' in name)
  if name.startswith('scatter'):
    assert result['dropped_fraction'] > 0  # Capacity 1.0: the drops must agree too.


@pytest.mark.parametrize('key, message', [
    ('num_experts', 'config.moe.num_experts=6 is invalid: expected a multiple of the mesh axis '
                    'expert=4'),
    ('batch_size', 'config.batch_size=4 is invalid: expected a multiple of the 8 batch shards'),
    ('mesh', 'needs 16 devices; 8 available'),
    ('logical_axis_rules', "unknown logical name 'exprt'"),
    ('groups', 'config.moe.group_size gives 4 routing groups per batch: expected a multiple of '
               'the 8 token shards'),
])
def test_bad_mesh_settings_fail_before_compiling(checks, key, message):
  assert message in checks['errors'][key]
  assert '\n' not in checks['errors'][key]


def test_rules_and_mesh_parsing():
  rules = sharding.check_rules([('batch', ['data', 'expert']), ('expert', 'expert'),
                                ('mlp', None)])
  assert rules == (('batch', ('data', 'expert')), ('expert', 'expert'), ('mlp', None))
  spec = sharding.logical_to_spec(('batch', None, 'mlp'), rules)
  assert spec == sharding.PartitionSpec(('data', 'expert'), None, None)
  with pytest.raises(ConfigError, match="unknown logical name 'heds'"):
    sharding.check_rules([('heds', 'model')])
  with pytest.raises(ConfigError, match='distinct mesh axes'):
    sharding.check_rules([('mlp', 'tensor')])
  with pytest.raises(ConfigError, match='no entry in config.logical_axis_rules'):
    sharding.logical_to_spec(('vocab',), rules)
  assert sharding.parse_mesh('data=2, expert=2') == {'data': 2, 'expert': 2, 'model': 1}
  with pytest.raises(ConfigError, match="--mesh entry 'experts=2'"):
    sharding.parse_mesh('experts=2')
  with pytest.raises(ConfigError, match='needs 2 devices; 1 available'):
    sharding.make_mesh({'data': 2}, devices=sharding.jax.devices()[:1])
