"""Bad config values are refused with one message naming the field, before anything compiles."""

import json
import re

import ml_collections
import pytest

from configs import default, dense, tiny
from stmoe_jax.config import ConfigError, check_resumable, model_config, validate


def _refusal(field: str, value) -> str:
  """validate's one line for configs/default.py with `field` set to `value`, edited as plain
  JSON, as a config.json or a hand-written dict would be (a ConfigDict built in Python refuses a
  mistyped assignment itself)."""
  config = json.loads(default.get_config().to_json())
  *sections, key = field.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[key] = value
  with pytest.raises(ConfigError) as error:
    validate(ml_collections.ConfigDict(config))
  return str(error.value)


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
    ('model.remat', 'selective', "config.model.remat='selective'"),
    ('model.param_dtype', 'float16', "config.model.param_dtype='float16'"),
    ('moe.group_size', 100, 'config.moe.group_size=100'),
    ('moe.every', -1, 'config.moe.every=-1'),
    ('batch_size', 0, 'config.batch_size=0'),
    ('data.seq_len', 0, 'config.data.seq_len=0'),
    ('opt.name', 'sgd', "config.opt.name='sgd'"),
    ('opt.lr', 0.0, 'config.opt.lr=0.0'),
    ('moe.router', 'no_such', "config.moe.router='no_such'"),
    ('moe.router', 'expert_choice', "config.moe.router='expert_choice' is invalid: expected 'tokens_choose' or 'hierarchical' or 'hash' or 'relu' in this causal"),
    ('moe.batch_prioritized_routing', True, 'config.moe.batch_prioritized_routing=True is invalid: expected False in this causal'),
    ('moe.dispatch', 'sorted', "config.moe.dispatch='sorted'"),
    ('moe.second_expert_threshold', 1.5, 'config.moe.second_expert_threshold=1.5'),
    ('moe.bias_balancer_rate', -0.1, 'config.moe.bias_balancer_rate=-0.1'),
    ('moe.num_shared_experts', -1, 'config.moe.num_shared_experts=-1'),
    ('moe.expert_dropout', 1.0, 'config.moe.expert_dropout=1.0'),
    ('moe.extra_dense_ffn', 'middle', "config.moe.extra_dense_ffn='middle'"),
    # Types: an int field refuses floats, bools and strings; a float field accepts an int.
    ('moe.num_experts', 4.0, 'config.moe.num_experts=4.0 is invalid: expected an integer'),
    ('batch_size', True, 'config.batch_size=True is invalid: expected an integer'),
    ('opt.lr', '3e-3', "config.opt.lr='3e-3' is invalid: expected a number"),
    ('moe.enabled', 1, 'config.moe.enabled=1 is invalid: expected True or False'),
    ('model.activation', None, 'config.model.activation=None is invalid: expected a string'),
    ('data', 5, 'config.data=5 is invalid: expected a section'),
    ('mesh.data', 0, 'config.mesh.data=0 is invalid: expected a positive integer or -1'),
    ('logical_axis_rules', [('batch', 'data', 'x')],
     "config.logical_axis_rules=('batch', 'data', 'x') is invalid"),
    # Ranges and combinations that cannot work.
    ('model.vocab_size', 256, 'config.model.vocab_size=256 is invalid: expected at least 259'),
    ('stop_at_step', 9001, 'config.stop_at_step=9001 is invalid: expected at most num_train_steps'),
    ('moe.every', 5, 'config.moe.every=5 is invalid: expected at most model.num_layers=2'),
    ('on_nonfinite', 'ignore', "config.on_nonfinite='ignore' is invalid: expected one of 'skip'"),
    ('loss_spike_factor', 0.5, 'config.loss_spike_factor=0.5 is invalid'),
    ('debug.nan_at_step', 9001, 'config.debug.nan_at_step=9001 is invalid'),
    ('debug.nan_term', 'loss', "config.debug.nan_term='loss' is invalid: expected one of"),
    ('debug.step_sleep_s', -1.0, 'config.debug.step_sleep_s=-1.0 is invalid'),
    ('opt.warmup_steps', -1, 'config.opt.warmup_steps=-1'),
    ('opt.final_lr_fraction', 1.5, 'config.opt.final_lr_fraction=1.5'),
    ('opt.schedule', 'linear', "config.opt.schedule='linear'"),
    ('moe.dispatch', 'dense', "config.moe.dispatch='dense'"),
    ('moe.router_jitter', 1.0, 'config.moe.router_jitter=1.0'),
    ('eval_batches', -1, 'config.eval_batches=-1'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0'),
])
def test_bad_values_name_the_field(field, value, message):
  line = _refusal(field, value)
  assert line.startswith(message), line
  assert '\n' not in line


@pytest.mark.parametrize('edit,message', [
    (lambda c: c.moe.update(num_expertz=4),
     "config.moe.num_expertz is not a field stmoe_jax knows: expected one of ['aux_loss_coef',"),
    (lambda c: c.update(learning_rate=1e-3),
     'config.learning_rate is not a field stmoe_jax knows: expected one of ['),
    (lambda c: c.debug.update(nan_steps=3), 'config.debug.nan_steps is not a field'),
    (lambda c: c.opt.__delattr__('b2'),
     'config.opt.b2 is missing: every config needs it (see docs/options.md).'),
])
def test_unknown_and_missing_keys_name_the_field(edit, message):
  """A config file or dict with a key the library does not know (an unlocked ConfigDict or a
  config.json accepts anything) or without one it needs is refused by name."""
  config = default.get_config()
  edit(config)
  with pytest.raises(ConfigError) as error:
    validate(config)
  assert str(error.value).startswith(message), str(error.value)


def test_a_saved_config_json_validates():
  """config.json round trip (tuples become lists, ints stay ints) still passes."""
  config = ml_collections.ConfigDict(json.loads(tiny.get_config().to_json_best_effort()))
  validate(config)


def test_shipped_configs_are_valid():
  for module in (default, dense, tiny):
    model_config(module.get_config())


def test_mistyped_key_fails_on_a_locked_config():
  config = default.get_config()
  config.lock()
  with pytest.raises(AttributeError, match='num_expertz'):
    config.moe.num_expertz = 4


@pytest.mark.parametrize('field,value,message', [
    ('attention.kind', 'sparse', "config.attention.kind='sparse'"),
    ('attention.layer_kinds', 'local,global', "config.attention.layer_kinds='local,global'"),
    ('attention.window', 0, 'config.attention.window=0'),
    ('attention.block_size', -8, 'config.attention.block_size=-8'),
    ('attention.head_top_k', 5, 'config.attention.head_top_k=5'),  # Only 4 heads.
    ('attention.num_global_blocks', -1, 'config.attention.num_global_blocks=-1'),
    ('attention.logit_z_loss_coef', -1.0, 'config.attention.logit_z_loss_coef=-1.0'),
    ('attention.num_kv_heads', 3, r'config.attention.num_kv_heads=3 is invalid: expected a '
     r'divisor of model.num_heads=2'),
    ('attention.qk_norm', 'both', "config.attention.qk_norm='both'"),
    ('attention.rope_layout', 'gptj', "config.attention.rope_layout='gptj'"),
])
def test_bad_attention_values_name_the_field(field, value, message):
  config = default.get_config()
  section, _, key = field.rpartition('.')
  config[section][key] = value
  with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
    validate(config)


@pytest.mark.parametrize('field,value', [('num_kv_heads', 1), ('qk_norm', 'per_head')])
def test_head_routed_attention_refuses_kv_heads_and_qk_norm(field, value):
  config = default.get_config()
  config.attention.update(kind='head_routed', head_top_k=1, **{field: value})
  with pytest.raises(ConfigError, match=f"config.attention.{field}={value!r} is invalid: "
                     "expected .* with attention kind 'head_routed'"):
    validate(config)


def test_resume_allows_remat_and_compute_dtype_but_not_shapes():
  saved, config = tiny.get_config(), tiny.get_config()
  config.model.update(remat='full', dtype='bfloat16')  # How the step computes: resumable.
  check_resumable(config, saved, 'config.json')
  config.model.param_dtype = 'bfloat16'  # What the checkpoint holds: refused.
  with pytest.raises(ConfigError, match="^config.model.param_dtype='bfloat16' differs from "
                     "'float32' in the run saved at config.json"):
    check_resumable(config, saved, 'config.json')
  config = tiny.get_config()
  config.attention.num_kv_heads = 1  # Key/value projections of another shape.
  with pytest.raises(ConfigError, match='^config.attention.num_kv_heads=1 differs from 0'):
    check_resumable(config, saved, 'config.json')


@pytest.mark.parametrize('bad', [float('inf'), float('-inf'), float('nan')])
def test_every_float_option_refuses_non_finite_values(bad):
  """Derived from the declarations: no float option accepts inf or NaN (opt.lr=inf trained to
  NaN parameters; capacity factors overflowed), each refused in one line naming it."""
  from stmoe_jax.config import options  # pylint: disable=g-import-not-at-top
  floats = [o for o in options.all_options().values() if o.type is float]
  assert len(floats) > 20
  for option in floats:
    assert re.match(f'config.{re.escape(option.name)}=.* is invalid: expected a finite number',
                    _refusal(option.name, bad))


@pytest.mark.parametrize('field,value,domain', [
    ('opt.b1', -0.5, 'in [0, 1)'), ('opt.b2', 1.5, 'in [0, 1)'), ('opt.b2', 1.0, 'in [0, 1)'),
    ('seed', -1, 'in [0, 4294967295]'), ('seed', 2**40, 'in [0, 4294967295]'),
    ('model.rope_max_wavelength', -1.0, '>= 1'), ('moe.train_capacity_factor', 0.0, '> 0'),
    ('opt.decay_fraction', 0.0, 'in (0, 1]'), ('data.noise_density', 1.0, 'in (0, 1)'),
])
def test_numeric_options_are_checked_against_their_declared_domain(field, value, domain):
  assert _refusal(field, value) == f'config.{field}={value!r} is invalid: expected {domain}.'
