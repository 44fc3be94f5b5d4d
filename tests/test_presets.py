"""Preset configs (configs/stmoe.py, configs/switch.py) and their string argument."""

import re

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import common, default, stmoe, switch
from stmoe_jax.models import flops
from stmoe_jax.config import model_config, validate
from stmoe_jax.models.transformer import Transformer


def load_via_flag(*argv):
  """Loads a config the way train.py does: --config=<file>:<arg>, locked."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config.', flag_values=values,
                                  lock_config=True)
  values(['train.py', *argv])
  return values.config


def test_command_line_preset():
  config = load_via_flag('--config=configs/stmoe.py:size=tiny')
  assert config.model.d_model == 32 and config.moe.num_experts == 4 and config.num_train_steps == 40
  with pytest.raises(AttributeError):  # Locked, as train.py loads it: a typo fails.
    config.moe.num_expertz = 8
  config = load_via_flag('--config=configs/switch.py:size=base,runlocal')
  assert config.moe.top_k == 1 and config.model.d_model == 512 and config.num_train_steps == 10


@pytest.mark.parametrize('module', [stmoe, switch])
def test_every_size_is_valid_and_grows(module):
  per_token = []
  for size in stmoe.SIZES:
    for runlocal in ('', ',runlocal'):
      config = module.get_config(f'size={size}{runlocal}')
      validate(config)
      cfg = model_config(config)
      nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # Builds (shapes only).
    per_token.append(flops.forward_flops_per_token(cfg, config.data.seq_len))
  assert per_token == sorted(per_token) and len(set(per_token)) == len(stmoe.SIZES)
  # Docstring commands name this file and every size they use exists.
  commands = re.findall(r'python train.py --config=(\S+?):size=(\w+)', module.__doc__)
  assert commands and all(path == f'configs/{module.__name__.split(".")[-1]}.py' and
                          size in stmoe.SIZES for path, size in commands)


def test_small_is_the_default_config_and_switch_is_top1():
  assert stmoe.get_config('size=small').to_dict() == default.get_config().to_dict()
  assert stmoe.get_config().to_dict() == default.get_config().to_dict()
  config = switch.get_config('size=tiny')
  assert config.moe.top_k == 1 and config.moe.train_capacity_factor == 1.0
  assert config.moe.z_loss_coef == 0.0 and config.model.d_model == 32


@pytest.mark.parametrize('arg,message', [
    ('size=huge', "size='huge' is invalid: expected one of ('tiny', 'small', 'base', '1b')"),
    ('sise=tiny', "config argument 'sise' is unknown"),
    ('size=tiny,runlocal=maybe', "runlocal='maybe' is invalid: expected true or false"),
])
def test_bad_argument_names_the_key(arg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    stmoe.get_config(arg)


def test_parse_arg_types():
  arg = common.parse_arg('steps=30,lr=0.5,runlocal,name=x', steps=10, lr=1.0, runlocal=False,
                         name='y')
  assert arg.to_dict() == {'steps': 30, 'lr': 0.5, 'runlocal': True, 'name': 'x'}
  with pytest.raises(ValueError, match="steps='ten' is invalid: expected a int"):
    common.parse_arg('steps=ten', steps=10)
