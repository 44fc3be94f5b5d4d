"""The fields of a config and their types.

`model`, `moe` and `attention` are the frozen dataclasses the modules take (`ModelConfig` holds
`MoeConfig` and `AttentionConfig`; `config.model_config` builds them); every other section is
listed in `_FIELDS`. `schema()` joins both into the one table that `config_validation` checks a
config against and `config.with_defaults` fills an old config.json from.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import ml_collections


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts settings; see configs/default.py for what each field means."""
  enabled: bool = True
  every: int = 2
  num_experts: int = 8
  top_k: int = 2
  expert_d_ff: int = 512
  group_size: int = 1024
  router: str = 'tokens_choose'
  dispatch: str = 'scatter'
  grouped_matmul: str = 'auto'
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  capacity_scaled_by_k: bool = True
  min_capacity: int = 4
  renormalize_gates: bool = True
  second_expert_threshold: float = 0.0
  batch_prioritized_routing: bool = False
  router_jitter: float = 0.0
  bias_balancer_rate: float = 0.0
  num_shared_experts: int = 0
  shared_expert_d_ff: int = 0
  expert_dropout: float = 0.0
  extra_dense_ffn: str = 'none'
  aux_loss_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  encoder_router: str = ''
  encoder_batch_prioritized_routing: bool = False
  encoder_group_size: int = 0
  score_fn: str = 'softmax'
  routed_scaling_factor: float = 1.0
  n_groups: int = 1
  topk_groups: int = 1
  seq_aux_loss_coef: float = 0.0
  router_noise: str = 'none'
  importance_loss_coef: float = 0.0
  load_loss_coef: float = 0.0
  second_policy_train: str = 'random'
  second_policy_eval: str = 'threshold'
  threshold_train: tuple = ()
  threshold_eval: tuple = ()
  hierarchy: tuple = ()
  hierarchy_outer_k: int = 1

  @property
  def shared_d_ff(self) -> int:
    """Hidden width of each shared expert (`shared_expert_d_ff`, 0 = `expert_d_ff`)."""
    return self.shared_expert_d_ff or self.expert_d_ff

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
  query_chunk: int = 256

  def layer_kind(self, layer: int) -> str:
    """The attention kind of `layer` (0-based): `layer_kinds` cycled over layers, else `kind`."""
    if not self.layer_kinds:
      return self.kind
    kinds = [k.strip() for k in self.layer_kinds.split(',')]
    return kinds[layer % len(kinds)]


def layer_period(moe_every: int, attention_layer_kinds: str) -> int:
  """The least common multiple of `moe.every` and the length of `attention.layer_kinds`: the
  number of layers after which the stack's pattern of FFN and attention kinds repeats."""
  kinds = len(attention_layer_kinds.split(',')) if attention_layer_kinds else 1
  return math.lcm(moe_every or 1, kinds)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer settings; see configs/default.py for what each field means.

  The field defaults describe a mid-size reference model for building modules by hand (the
  benchmarks and tests do), not configs/default.py's values: a run's ModelConfig comes from its
  ConfigDict through `config.model_config`."""
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
  architecture: str = 'decoder_only'
  num_encoder_layers: int = 0
  param_dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = False
  moe: MoeConfig = MoeConfig()
  attention: AttentionConfig = AttentionConfig()
  # Not a config field: the Trainer sets a `sharding.MeshRules` here (None = one device).
  mesh_rules: typing.Any = None

  def ffn_kind(self, layer: int) -> str:
    """'moe' for a sparse layer, 'dense' otherwise; 'dense_matched' replaces MoE when disabled."""
    if not self.moe.is_moe_layer(layer):
      return 'dense'
    return 'moe' if self.moe.enabled else 'dense_matched'

  def layer_period(self) -> int:
    """Layers in the stack's repeating unit (see `layer_period`); `scan_layers` scans over units."""
    return layer_period(self.moe.every, self.attention.layer_kinds)

  @property
  def num_moe_layers(self) -> int:
    """M: the MoE layers of all stacks (0 for a dense model)."""
    return sum(len(layers) for _, layers in self.moe_stacks())

  def moe_stacks(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """((stack, MoE layer indices in it), ...): ('', decoder-only layers) or, for the
    encoder-decoder, ('encoder', ...) then ('decoder', ...); `layer_stats.key` names each
    stack's stats."""
    moe_layers = lambda n: tuple(i for i in range(n) if self.ffn_kind(i) == 'moe')
    if self.architecture != 'encoder_decoder':
      return (('', moe_layers(self.num_layers)),)
    return (('encoder', moe_layers(self.num_encoder_layers)),
            ('decoder', moe_layers(self.num_layers)))

  def encoder_config(self) -> 'ModelConfig':
    """The config the encoder stack is built from: `moe.encoder_*` in place of the router,
    Batch Prioritized Routing and group size (its MoE layers are non-causal)."""
    moe = self.moe
    return dataclasses.replace(self, moe=dataclasses.replace(
        moe, router=moe.encoder_router or moe.router,
        batch_prioritized_routing=moe.encoder_batch_prioritized_routing,
        group_size=moe.encoder_group_size or moe.group_size))


# Every field outside `model`/`moe`/`attention` (those are the dataclasses above) and its type;
# `validate` refuses unknown, missing and mistyped fields. A new config field must be added here.
_FIELDS = {
    'seed': int,
    'data': {'name': str, 'data_dir': str, 'feature_key': str, 'train_split': str,
             'eval_split': str, 'seq_len': int, 'objective': str, 'noise_density': float,
             'mean_noise_span_length': float, 'task': str},
    'opt': {'name': str, 'lr': float, 'warmup_steps': int, 'schedule': str,
            'final_lr_fraction': float, 'decay_fraction': float, 'b1': float, 'b2': float, 'weight_decay': float,
            'grad_clip_norm': float},
    'mesh': dict, 'logical_axis_rules': list,
    'batch_size': int, 'num_train_steps': int, 'stop_at_step': int, 'log_every_steps': int,
    'eval_every_steps': int, 'eval_batches': int, 'checkpoint_every_steps': int,
    'keep_checkpoints': int, 'on_nonfinite': str, 'loss_spike_factor': float,
    'eval_sample_tokens': int, 'eval_sample_prompt': str, 'peak_flops_per_device': float,
    'debug': {'nan_at_step': int, 'nan_term': str, 'step_sleep_s': float},
    'init_from': str, 'finetune': {'trainable': str},
}
TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a string', bool: 'True or False',
              dict: 'a dict', list: 'a list', tuple: 'a tuple'}


def schema() -> dict:
  """{field: type, or section: {field: type}} of every config field, in check order."""
  sections = {'model': ModelConfig, 'moe': MoeConfig, 'attention': AttentionConfig}
  dataclass_fields = {name: {f: t for f, t in typing.get_type_hints(cls).items()
                             if f not in ('moe', 'attention', 'mesh_rules')}
                      for name, cls in sections.items()}
  return {**_FIELDS, **dataclass_fields}


def type_ok(value, expected: type) -> bool:
  """Whether `value` is a config value of type `expected` (a `schema()` leaf)."""
  if expected is float:  # An int is a fine float (lr=1); a bool is neither.
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if expected is dict:
    return isinstance(value, (dict, ml_collections.ConfigDict))
  if expected in (list, tuple):
    return isinstance(value, (list, tuple))
  return isinstance(value, expected)
