"""Bad config values are refused with one message naming the field, before anything compiles."""

import pytest

from configs import default, dense, tiny
from stmoe_jax.config import ConfigError, model_config, validate


@pytest.mark.parametrize('field,value,message', [
    ('moe.num_experts', 1, 'config.moe.num_experts=1'),  # Fewer experts than top_k=2.
    ('moe.top_k', 0, 'config.moe.top_k=0'),
    ('moe.train_capacity_factor', 0.0, 'config.moe.train_capacity_factor=0.0'),
    ('moe.eval_capacity_factor', -1.0, 'config.moe.eval_capacity_factor=-1.0'),
    ('model.d_model', 0, 'config.model.d_model=0'),
    ('model.num_layers', -2, 'config.model.num_layers=-2'),
    ('model.head_dim', 7, 'config.model.head_dim=7'),
    ('model.activation', 'relu', "config.model.activation='relu'"),
    ('model.dtype', 'float16', "config.model.dtype='float16'"),
    ('moe.group_size', 100, 'config.moe.group_size=100'),
    ('moe.every', -1, 'config.moe.every=-1'),
    ('batch_size', 0, 'config.batch_size=0'),
    ('data.seq_len', 0, 'config.data.seq_len=0'),
    ('opt.name', 'sgd', "config.opt.name='sgd'"),
    ('opt.lr', 0.0, 'config.opt.lr=0.0'),
    ('moe.router', 'hash', "config.moe.router='hash'"),
    ('moe.router', 'expert_choice', "config.moe.router='expert_choice'.*causal"),
    ('moe.batch_prioritized_routing', True, 'config.moe.batch_prioritized_routing=True.*causal'),
    ('moe.dispatch', 'sorted', "config.moe.dispatch='sorted'"),
    ('moe.second_expert_threshold', 1.5, 'config.moe.second_expert_threshold=1.5'),
    ('moe.bias_balancer_rate', -0.1, 'config.moe.bias_balancer_rate=-0.1'),
    ('moe.num_shared_experts', -1, 'config.moe.num_shared_experts=-1'),
    ('moe.expert_dropout', 1.0, 'config.moe.expert_dropout=1.0'),
    ('moe.extra_dense_ffn', 'middle', "config.moe.extra_dense_ffn='middle'"),
])
def test_bad_values_name_the_field(field, value, message):
  config = default.get_config()
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  pattern = message.replace('(', r'\(').replace('.', r'\.').replace(r'\.*', '.*')
  with pytest.raises(ConfigError, match=pattern):
    validate(config)


def test_shipped_configs_are_valid():
  for module in (default, dense, tiny):
    model_config(module.get_config())


def test_mistyped_key_fails_on_a_locked_config():
  config = default.get_config()
  config.lock()
  with pytest.raises(AttributeError, match='num_expertz'):
    config.moe.num_expertz = 4
