"""Nothing accepted and ignored: every model, MoE and attention option, under each model family
and dispatch path, is either refused before compiling (one line naming it) or changes the
program the model family builds: the jaxprs, with their constants, of parameter init, the train
loss and the eval step."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from stmoe_jax.config import ConfigError, model_config, options, validate
from stmoe_jax.models import factory
from stmoe_jax.data import span_corruption

# The selectors choose entries (their entries' options are walked instead).
SELECTORS = {r.selector for r in options.registries()} | {'attention.layer_kinds'}
# Values that exercise an option at the tiny sizes (a window longer than the sequence, say,
# computes the same program; a value the domain allows but these sizes make trivial).
VALUES = {'attention.query_chunk': 8, 'attention.window': 4, 'attention.stride': 4,
          'attention.block_size': 8, 'attention.num_local_blocks': 1,
          'attention.num_global_blocks': 2, 'attention.head_top_k': 1,
          'moe.group_size': 16, 'moe.encoder_group_size': 32, 'moe.encoder_router':
          'expert_choice', 'moe.threshold_train': (0.3,), 'moe.threshold_eval': (0.3,),
          'moe.n_groups': 2, 'moe.hierarchy': (1, 4), 'moe.hierarchy_outer_k': 2,
          'moe.num_shared_experts': 1, 'moe.min_capacity': 24, 'moe.every': 1,
          'moe.eval_capacity_factor': 0.5, 'attention.head_capacity_factor': 0.5,
          'moe.shared_expert_d_ff': 8, 'model.num_encoder_layers': 1,
          'moe.second_expert_threshold': 0.5, 'moe.router_noise': 'gumbel'}
# Options that only mean something next to another setting, given here with it.
WITH = {'moe.load_loss_coef': {'moe.router_noise': 'noisy_top_k'},
        # Later-choice policies differ only where a threshold can drop a choice.
        'moe.second_policy_train': {'moe.second_expert_threshold': 0.2},
        'moe.second_policy_eval': {'moe.second_expert_threshold': 0.2},
        'moe.shared_expert_d_ff': {'moe.num_shared_experts': 1},
        'moe.importance_loss_coef': {}, 'attention.block_size': {'attention.kind': 'local'},
        'moe.topk_groups': {'moe.n_groups': 2},
        'moe.relu_l1_init': {'moe.dispatch': 'dropless'},  # ReLU routing is dropless only.
        'moe.relu_l1_step': {'moe.dispatch': 'dropless'},
        'moe.hierarchy_outer_k': {'moe.router': 'hierarchical', 'moe.hierarchy': (2, 2)},
        'moe.hierarchy': {'moe.router': 'hierarchical', 'moe.hierarchy': (2, 2)}}
# The entry selections under which each entry's options are walked.
SELECT = {'router': lambda name: {'moe.router': name} if name != 'expert_choice' else None,
          'dispatch': lambda name: {'moe.dispatch': name},
          'attention': lambda name: {'attention.kind': name},
          'model family': lambda name: {'model.architecture': name}}


def other_value(option: options.Option):
  """A value of `option` other than its default, inside its domain where one is easy to name."""
  if option.name in VALUES:
    return VALUES[option.name]
  default, domain = option.default, option.domain
  if option.type is bool:
    return not default
  if isinstance(domain, options.OneOf):
    return next(v for v in domain.allowed() if v != default)
  if option.type is int:
    return default + 1
  if option.type is float:
    if isinstance(domain, options.Range) and domain.high is not None:
      return (default + domain.high) / 2 if domain.high_open else domain.high
    return default * 2 + 0.5
  return pytest.fail(f'no other value known for {option.name}: add one to VALUES')


def base_config(architecture: str):
  config = tiny.get_config()
  config.batch_size, config.data.seq_len = 2, 16
  config.model.update(d_model=16, num_heads=2, head_dim=8, d_ff=32, num_layers=2)
  config.moe.update(num_experts=4, expert_d_ff=16, group_size=32)
  if architecture == 'encoder_decoder':
    config.model.update(architecture='encoder_decoder', num_encoder_layers=2)
    config.data.objective = 'span_corruption'
    config.model.vocab_size = 300
    config.moe.group_size = 2 * span_corruption.lengths(16, 0.15, 3.0).decoder_len
  return config


def fingerprint(config) -> str:
  """A hash of the init, train-loss and eval-step jaxprs (text and constants) of `config`."""
  model = factory.get_model(model_config(config))
  data = config.data
  if data.objective == 'span_corruption':
    shape = span_corruption.lengths(data.seq_len, data.noise_density, data.mean_noise_span_length)
    lengths = {'encoder_inputs': shape.encoder_len, 'decoder_inputs': shape.decoder_len,
               'targets': shape.decoder_len, 'weights': shape.decoder_len}
  else:
    lengths = {k: data.seq_len for k in model.batch_keys}
  batch = {k: jnp.ones((config.batch_size, n), jnp.float32 if k == 'weights' else jnp.int32)
           for k, n in lengths.items()}
  graphdef, _, _ = model.abstract()

  def program(key, batch):
    params, buffers = model.init(key)
    loss, _ = model.loss_fn(params, buffers, graphdef, batch, key)
    return loss, model.eval_step(params, buffers, batch, graphdef=graphdef)

  closed = jax.make_jaxpr(program)(jax.random.PRNGKey(0), batch)
  digest = hashlib.sha256(str(closed.jaxpr).encode())
  for const in closed.consts:
    digest.update(np.asarray(const).tobytes())
  return digest.hexdigest()


def cases():
  """(option, base family, selections that make the option's entry the selected one)."""
  owners = {}
  for registry in options.registries():
    for name, entry in registry.items():
      for option in entry.options:
        owners.setdefault(option.name, []).append((registry.kind, name))
  for option in options.all_options().values():
    if option.section not in ('model', 'moe', 'attention') or option.name in SELECTORS:
      continue
    selections = [SELECT[kind](name) for kind, name in owners.get(option.name, [])] or [{}]
    for selection in selections:
      if selection is None:
        continue
      families = ([selection['model.architecture']] if 'model.architecture' in selection
                  else ['decoder_only', 'encoder_decoder'] if option.section == 'model'
                  else ['decoder_only'])
      for family in families:
        yield option.name, family, {k: v for k, v in selection.items()
                                    if k != 'model.architecture'}


def _set(config, name, value):
  section, _, field = name.rpartition('.')
  (config[section] if section else config)[field] = value


@pytest.mark.parametrize('name,family,selection', list(cases()))
def test_an_option_changes_the_program_or_is_refused(name, family, selection):
  option = options.all_options()[name]
  config = base_config(family)
  for key, value in {**selection, **WITH.get(name, {})}.items():
    _set(config, key, value)
  validate(config)
  before = fingerprint(config)
  _set(config, name, other_value(option))
  try:
    validate(config)
  except ConfigError as e:
    assert f'config.{name}=' in str(e), f'{name}: refused, but the line names another: {e}'
    return
  assert fingerprint(config) != before, f'{name}={other_value(option)!r} changed nothing'
