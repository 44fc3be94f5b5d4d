"""Logical-axis rules and meshes: rule parsing, and bad mesh settings refused before compiling
(on 8 fake CPU devices: the `sharding_checks` fixture of conftest.py, shared with
tests/test_expert_parallel.py, which compares each mesh against one device).
"""

import pytest

from stmoe_jax.nn import sharding
from stmoe_jax.config import ConfigError


@pytest.mark.parametrize('key, message', [
    ('batch_size', 'config.batch_size=4 is invalid: expected a multiple of the 8 batch shards'),
    ('mesh', 'needs 16 devices; 8 available'),
    ('logical_axis_rules', "unknown logical name 'exprt'"),
])
def test_bad_mesh_settings_fail_before_compiling(sharding_checks, key, message):
  assert message in sharding_checks['errors'][key]
  assert '\n' not in sharding_checks['errors'][key]


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
  # A mesh axis shards one dim per array, the first that asks (FSDP: parameters split their
  # model dim over 'fsdp'; activations, whose batch already takes 'fsdp', keep it whole).
  fsdp = sharding.check_rules([('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'model')])
  assert sharding.logical_to_spec(('batch', None, 'embed'), fsdp) == sharding.PartitionSpec(
      ('data', 'fsdp'), None, None)
  assert sharding.logical_to_spec(('embed', 'mlp'), fsdp) == sharding.PartitionSpec('fsdp', 'model')
  assert sharding.parse_mesh('data=2, expert=2') == {'data': 2, 'fsdp': 1, 'expert': 2, 'model': 1}
  with pytest.raises(ConfigError, match="--mesh entry 'experts=2'"):
    sharding.parse_mesh('experts=2')
  with pytest.raises(ConfigError, match='needs 2 devices; 1 available'):
    sharding.make_mesh({'data': 2}, devices=sharding.jax.devices()[:1])
