"""Config validation and the one factory from ConfigDict to frozen model configs.

Modules never read the ml_collections config: `model_config(config)` turns it into the frozen
`ModelConfig`/`MoeConfig` dataclasses they take. `validate(config)` checks every field the
library reads and raises `ConfigError` with one line naming the field, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections


class ConfigError(ValueError):
  """A config field has a value the library cannot use; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts settings; see configs/default.py for what each field means."""
  enabled: bool = True
  every: int = 2
  num_experts: int = 8
  top_k: int = 2
  expert_d_ff: int = 512
  group_size: int = 1024
  dispatch: str = 'scatter'
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  capacity_scaled_by_k: bool = True
  min_capacity: int = 4
  renormalize_gates: bool = True
  router_jitter: float = 0.0
  aux_loss_coef: float = 1e-2
  z_loss_coef: float = 1e-3

  def is_moe_layer(self, layer: int) -> bool:
    """Whether FFN `layer` (0-based) is sparse: every `every`-th layer, counting from 1."""
    return self.every > 0 and layer % self.every == self.every - 1


ATTENTION_KINDS = ('dense', 'local', 'strided', 'block_sparse', 'head_routed')


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Attention kind per layer and each kind's settings; see configs/default.py `attention`."""
  kind: str = 'dense'
  layer_kinds: str = ''
  block_size: int = 64
  window: int = 256
  stride: int = 64
  num_local_blocks: int = 3
  num_global_blocks: int = 1
  head_top_k: int = 2
  head_capacity_factor: float = 2.0
  head_aux_loss_coef: float = 1e-2
  head_z_loss_coef: float = 1e-3
  logit_z_loss_coef: float = 0.0

  def layer_kind(self, layer: int) -> str:
    """The attention kind of `layer` (0-based): `layer_kinds` cycled over layers, else `kind`."""
    if not self.layer_kinds:
      return self.kind
    kinds = [k.strip() for k in self.layer_kinds.split(',')]
    return kinds[layer % len(kinds)]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer settings; see configs/default.py for what each field means."""
  vocab_size: int = 259
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 64
  d_ff: int = 1024
  activation: str = 'geglu'
  rope_max_wavelength: float = 10_000
  init_scale: float = 0.1
  dtype: str = 'float32'
  moe: MoeConfig = MoeConfig()
  attention: AttentionConfig = AttentionConfig()

  def ffn_kind(self, layer: int) -> str:
    """'moe' for a sparse layer, 'dense' otherwise; 'dense_matched' replaces MoE when disabled."""
    if not self.moe.is_moe_layer(layer):
      return 'dense'
    return 'moe' if self.moe.enabled else 'dense_matched'

  @property
  def num_moe_layers(self) -> int:
    return sum(self.ffn_kind(i) == 'moe' for i in range(self.num_layers))

  @property
  def head_routed_layers(self) -> list[int]:
    """Indices of the layers whose attention is head-routed."""
    return [i for i in range(self.num_layers) if self.attention.layer_kind(i) == 'head_routed']


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Builds the frozen ModelConfig from `config.model`, `config.moe` and `config.attention`
  (validated first; a config saved before `attention` existed means dense attention)."""
  validate(config)
  moe = MoeConfig(**{f.name: config.moe[f.name] for f in dataclasses.fields(MoeConfig)})
  attention = AttentionConfig()
  if 'attention' in config:
    attention = AttentionConfig(**{f.name: config.attention[f.name]
                                   for f in dataclasses.fields(AttentionConfig)})
  fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ('moe', 'attention')]
  return ModelConfig(**{name: config.model[name] for name in fields}, moe=moe,
                     attention=attention)


def _check(ok: bool, field: str, value, expected: str):
  if not ok:
    raise ConfigError(f'config.{field}={value!r} is invalid: expected {expected}.')


def _positive_ints(section, prefix, names):
  for name in names:
    value = section[name]
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f'{prefix}.{name}', value, 'a positive integer')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value cannot work.

  Only checks that need no devices or data; batch-vs-mesh checks happen when the mesh is built.
  """
  m, moe, opt = config.model, config.moe, config.opt
  _positive_ints(m, 'model', ['vocab_size', 'd_model', 'num_layers', 'num_heads', 'head_dim',
                              'd_ff'])
  _check(m.head_dim % 2 == 0, 'model.head_dim', m.head_dim, 'an even number (rotary pairs)')
  _check(m.activation in ('gelu', 'geglu'), 'model.activation', m.activation, "'gelu' or 'geglu'")
  _check(m.dtype in ('float32', 'bfloat16'), 'model.dtype', m.dtype, "'float32' or 'bfloat16'")
  _check(m.init_scale > 0, 'model.init_scale', m.init_scale, 'a positive number')
  _positive_ints(moe, 'moe', ['num_experts', 'top_k', 'expert_d_ff', 'group_size', 'min_capacity'])
  _check(isinstance(moe.every, int) and moe.every >= 0, 'moe.every', moe.every,
         'an integer >= 0 (0 = no MoE layers)')
  _check(moe.num_experts >= moe.top_k, 'moe.num_experts', moe.num_experts,
         f'at least moe.top_k={moe.top_k}')
  _check(moe.dispatch in ('einsum', 'scatter'), 'moe.dispatch', moe.dispatch,
         "'einsum' or 'scatter'")
  for name in ('train_capacity_factor', 'eval_capacity_factor'):
    _check(moe[name] > 0, f'moe.{name}', moe[name], 'a number > 0')
  _check(0 <= moe.router_jitter < 1, 'moe.router_jitter', moe.router_jitter, 'in [0, 1)')
  for name in ('aux_loss_coef', 'z_loss_coef'):
    _check(moe[name] >= 0, f'moe.{name}', moe[name], 'a number >= 0')
  _positive_ints(config, 'config', ['batch_size', 'num_train_steps', 'log_every_steps',
                                    'eval_every_steps', 'checkpoint_every_steps',
                                    'keep_checkpoints'])
  _positive_ints(config.data, 'data', ['seq_len'])
  _check(isinstance(config.stop_at_step, int) and config.stop_at_step >= 0, 'stop_at_step',
         config.stop_at_step, 'an integer >= 0 (0 = run to num_train_steps)')
  _check(config.eval_batches >= 0, 'eval_batches', config.eval_batches, 'an integer >= 0')
  tokens, seq_len = config.batch_size * config.data.seq_len, config.data.seq_len
  _check(tokens % moe.group_size == 0 and (seq_len % moe.group_size == 0 or
                                           moe.group_size % seq_len == 0),
         'moe.group_size', moe.group_size,
         f'a divisor or multiple of data.seq_len={seq_len} dividing batch_size * seq_len = {tokens}')
  if 'attention' in config:
    _validate_attention(config.attention, m.num_heads)
  _check(opt.name in ('adamw', 'adafactor'), 'opt.name', opt.name, "'adamw' or 'adafactor'")
  _check(opt.lr > 0, 'opt.lr', opt.lr, 'a number > 0')
  _check(opt.schedule in ('cosine', 'rsqrt'), 'opt.schedule', opt.schedule, "'cosine' or 'rsqrt'")
  _check(opt.warmup_steps >= 0, 'opt.warmup_steps', opt.warmup_steps, 'an integer >= 0')
  _check(0 <= opt.final_lr_fraction <= 1, 'opt.final_lr_fraction', opt.final_lr_fraction,
         'in [0, 1]')
  _check(opt.grad_clip_norm >= 0, 'opt.grad_clip_norm', opt.grad_clip_norm, 'a number >= 0')
  _check(math.isfinite(opt.weight_decay) and opt.weight_decay >= 0, 'opt.weight_decay',
         opt.weight_decay, 'a number >= 0')


def _validate_attention(att: ml_collections.ConfigDict, num_heads: int) -> None:
  """The `config.attention` checks of `validate`."""
  expected_kind = ' or '.join(repr(k) for k in ATTENTION_KINDS)
  _check(att.kind in ATTENTION_KINDS, 'attention.kind', att.kind, expected_kind)
  _check(isinstance(att.layer_kinds, str), 'attention.layer_kinds', att.layer_kinds,
         'a comma-separated string of kinds')
  if att.layer_kinds:
    for kind in att.layer_kinds.split(','):
      _check(kind.strip() in ATTENTION_KINDS, 'attention.layer_kinds', att.layer_kinds,
             f'comma-separated kinds, each {expected_kind}')
  _positive_ints(att, 'attention', ['block_size', 'window', 'stride', 'num_local_blocks',
                                    'head_top_k'])
  _check(isinstance(att.num_global_blocks, int) and att.num_global_blocks >= 0,
         'attention.num_global_blocks', att.num_global_blocks, 'an integer >= 0')
  _check(att.head_top_k <= num_heads, 'attention.head_top_k', att.head_top_k,
         f'at most model.num_heads={num_heads}')
  _check(att.head_capacity_factor > 0, 'attention.head_capacity_factor',
         att.head_capacity_factor, 'a number > 0')
  for name in ('head_aux_loss_coef', 'head_z_loss_coef', 'logit_z_loss_coef'):
    _check(att[name] >= 0, f'attention.{name}', att[name], 'a number >= 0')


# Fields a resumed run must share with the run that wrote the checkpoint: they fix parameter
# shapes, optimizer state structure or the data stream. Everything else (steps, capacity
# factors, learning rate, logging) may change between restarts.
RESUME_FIELDS = ('model', 'moe.enabled', 'moe.every', 'moe.num_experts', 'moe.expert_d_ff',
                 'opt.name', 'seed', 'data.name', 'data.feature_key', 'data.seq_len',
                 'data.train_split', 'attention.kind', 'attention.layer_kinds')


def check_resumable(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                    where: str) -> None:
  """Raises ConfigError naming the first RESUME_FIELDS entry where `config` differs from the
  config `saved` with the checkpoints at `where`."""
  def flat(node, prefix):
    if isinstance(node, (dict, ml_collections.ConfigDict)):
      for key in node.keys():
        yield from flat(node[key], f'{prefix}.{key}')
    else:
      yield prefix, node

  for field in RESUME_FIELDS:
    section, _, key = field.partition('.')
    if section not in config or section not in saved:  # A run saved before the section existed.
      continue
    now = config[section][key] if key else config[section]
    then = saved[section][key] if key else saved[section]
    for (name, a), (_, b) in zip(flat(now, field), flat(then, field)):
      if a != b:
        raise ConfigError(f'config.{name}={a!r} differs from {b!r} in the run saved at {where}; '
                          'use a new --workdir to train a different model')
