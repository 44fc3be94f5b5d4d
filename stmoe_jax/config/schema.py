"""The core options and the frozen configs the modules take.

`ModelConfig` (holding `MoeConfig` and `AttentionConfig`) is what every module reads: a frozen,
hashable record whose fields are the options declared for its section, each at its declared
default unless set. `config.model_config(config)` builds one from a run's ConfigDict; tests and
notebooks build them by hand (`MoeConfig(num_experts=4)`). `dataclasses.replace` and
`dataclasses.fields` work on them.

The options below are the core: read whatever router, dispatch path, attention kind or model
family is selected. Each extension's own options are declared with its registry entry.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option, Range, Satisfies

POSITIVE = Range(1)
NON_NEGATIVE = Range(0)
OFF_OR_MORE = Range(0, note='0 = off')
UNIT = Range(0, 1, high_open=True)


class Section:
  """Frozen record of one config section; fields are the options declared for `SECTION`.

  Unset fields take their declared defaults when built. Behaves as a frozen dataclass for
  `dataclasses.replace`/`fields`, `==` and `hash` (jit keys on it).
  """
  SECTION: typing.ClassVar[str] = ''
  NESTED: typing.ClassVar[dict[str, typing.Any]] = {}  # Non-option fields and their defaults.

  def __init__(self, **values):
    options.load_library()  # Every option of the section declared, whoever declares it.
    declared = options.section_options(self.SECTION)
    fields = {**{name: o.default for name, o in declared.items()}, **self._nested_defaults()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
      raise TypeError(f'{type(self).__name__} has no field {unknown[0]!r} (no option '
                      f'{self.SECTION}.{unknown[0]} is declared)')
    for name, value in values.items():  # A config.json stores tuples as lists.
      if isinstance(value, list) and name in declared and declared[name].type is tuple:
        values[name] = tuple(value)
    object.__setattr__(self, '_values', {**fields, **values})

  def _nested_defaults(self) -> dict:
    return {name: (make() if callable(make) else make) for name, make in self.NESTED.items()}

  def __getattr__(self, name):
    try:
      return self.__dict__['_values'][name]
    except KeyError:
      raise AttributeError(f'{type(self).__name__} has no field {name!r}') from None

  def __setattr__(self, name, value):
    raise dataclasses.FrozenInstanceError(f'cannot assign to field {name!r}')

  def __eq__(self, other):
    return type(other) is type(self) and other._values == self._values

  def __hash__(self):
    return hash((type(self).__name__, tuple(sorted(self._values.items()))))

  def __repr__(self):
    return f'{type(self).__name__}({", ".join(f"{k}={v!r}" for k, v in self._values.items())})'

  def __reduce__(self):
    return (_rebuild, (type(self), dict(self._values)))

  @property
  def __dataclass_fields__(self):  # So that dataclasses.replace and dataclasses.fields work.
    fields = {}
    for name in self._values:
      field = dataclasses.field()
      field.name, field._field_type = name, dataclasses._FIELD  # pylint: disable=protected-access
      fields[name] = field
    return fields


def _rebuild(cls, values):
  instance = object.__new__(cls)
  object.__setattr__(instance, '_values', values)
  return instance


class MoeConfig(Section):
  """The `moe` section: mixture-of-experts settings (docs/options.md)."""
  SECTION = 'moe'

  @property
  def shared_d_ff(self) -> int:
    """Hidden width of each shared expert (`shared_expert_d_ff`, 0 = `expert_d_ff`)."""
    return self.shared_expert_d_ff or self.expert_d_ff

  def is_moe_layer(self, layer: int) -> bool:
    """Whether FFN `layer` (0-based) is sparse: every `every`-th layer, counting from 1."""
    return self.every > 0 and layer % self.every == self.every - 1


class AttentionConfig(Section):
  """The `attention` section: the attention kind per layer and each kind's settings."""
  SECTION = 'attention'

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


class ModelConfig(Section):
  """The `model` section with its `moe` and `attention` sections: what the modules take.

  `mesh_rules` is no option: the Trainer sets a `sharding.MeshRules` there (None = one device).
  Nor is `pad_id`, the padding id that routing and attention skip: the tokenizer's
  (`data.tokenizer`; 256 for bytes), set with the mesh rules.
  """
  SECTION = 'model'
  NESTED = {'moe': MoeConfig, 'attention': AttentionConfig, 'mesh_rules': None, 'pad_id': 256}

  def ffn_kind(self, layer: int) -> str:
    """'moe' for a sparse layer, 'dense' otherwise; 'dense_matched' replaces MoE when disabled."""
    if not self.moe.is_moe_layer(layer):
      return 'dense'
    return 'moe' if self.moe.enabled else 'dense_matched'

  def layer_period(self) -> int:
    """Layers in the stack's repeating unit (see `layer_period`); `scan_layers` scans over units."""
    return layer_period(self.moe.every, self.attention.layer_kinds)

  @property
  def kv_heads(self) -> int:
    """Key/value heads of self-attention: `attention.num_kv_heads` (grouped-query attention),
    0 meaning `num_heads`."""
    return self.attention.num_kv_heads or self.num_heads

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


# The defaults of `model`, `moe` and `attention` describe a mid-size reference model for
# building modules by hand; configs/default.py sizes the embedded run down from them.
options.declare(
    Option('seed', int, 0, 'Parameter init, data order, router noise; a run is reproducible '
           'from it.', Range(0, 2**32 - 1)),
    # data
    Option('data.name', str, 'stdlib_py', "TFDS dataset, optionally 'name:version'; "
           "'stdlib_py' is built locally from the Python stdlib."),
    Option('data.data_dir', str, '', "TFDS data dir; '' = the TFDS default "
           '(~/tensorflow_datasets).'),
    Option('data.feature_key', str, 'text', 'Which string feature of each example to train on.'),
    Option('data.train_split', str, 'train', 'TFDS split to train on.'),
    Option('data.eval_split', str, 'validation', 'TFDS split of the periodic eval and eval.py.'),
    Option('data.seq_len', int, 64, 'Tokens (bytes by default) per training sequence (the encoder input '
           'under span corruption).', POSITIVE),
    # model
    Option('model.vocab_size', int, 259, 'Embedded ids: 256 bytes + pad/bos/eos, or with '
           'data.tokenizer its vocabulary + 3 (data/tokenizer.py).',
           POSITIVE),
    Option('model.d_model', int, 256, 'Width of the residual stream.', POSITIVE),
    Option('model.num_layers', int, 4, "Transformer blocks (the decoder's, for "
           'encoder_decoder).', POSITIVE),
    Option('model.num_heads', int, 4, 'Attention heads per layer.', POSITIVE),
    Option('model.head_dim', int, 64, "Width of each head's queries, keys and values (even: "
           'rotary pairs).', Satisfies(lambda d: d > 0 and d % 2 == 0,
                                       'a positive even number (rotary pairs)')),
    Option('model.d_ff', int, 1024, 'Hidden width of the dense FFN layers.', POSITIVE),
    Option('model.activation', str, 'geglu', 'FFN and expert activation (ST-MoE: '
           "geglu_mult_bias; Llama, Mixtral, OLMoE, Qwen: swiglu).",
           OneOf(('gelu', 'geglu', 'geglu_mult_bias', 'swiglu'))),
    Option('model.norm_eps', float, 1e-6, 'Epsilon of every RMSNorm (T5: 1e-6; Llama, Mixtral, '
           'OLMoE: 1e-5).', Range(0, low_open=True)),
    Option('model.tie_embeddings', bool, False, 'Output head = the input embedding, transposed '
           '(T5, some HF checkpoints); False: its own matrix.'),
    Option('model.rope_max_wavelength', float, 10_000.0, 'Longest rotary wavelength, in '
           'positions (RoFormer).', Range(1)),
    Option('model.init_scale', float, 0.1, 'Switch Transformer init: truncated normal, std '
           'sqrt(init_scale / fan_in).', Range(0, low_open=True)),
    Option('model.dtype', str, 'float32', 'Activation/compute dtype; the router computes in '
           'float32.', OneOf(('float32', 'bfloat16'))),
    Option('model.param_dtype', str, 'float32', "Storage of parameters and optimizer state; "
           "'bfloat16' halves them.", OneOf(('float32', 'bfloat16'))),
    Option('model.scan_layers', bool, False, 'Scan over the repeating unit of layers: compile '
           'time flat in depth.'),
    # moe
    Option('moe.enabled', bool, True, 'False: every MoE layer becomes a dense FFN of width '
           'top_k * expert_d_ff (the equal-active-FLOPs twin).'),
    Option('moe.every', int, 2, 'Layer i is MoE when i % every == every - 1 (every=2: layers 1, '
           '3, ...).', Range(0, note='0 = no MoE layers')),
    Option('moe.num_experts', int, 8, 'Experts per MoE layer (a multiple of mesh.expert).',
           POSITIVE),
    Option('moe.top_k', int, 2, 'Choices per token: 1 = Switch, 2 = ST-MoE/GShard, 8 of 64 '
           'narrow experts = fine-grained.', POSITIVE),
    Option('moe.expert_d_ff', int, 512, 'Hidden width of each expert.', POSITIVE),
    Option('moe.group_size', int, 1024, 'Tokens per routing group: capacity and balance are '
           'computed per group.', POSITIVE),
    Option('moe.renormalize_gates', bool, True, 'Combine weights renormalised over the chosen k '
           '(no effect at k=1).'),
    Option('moe.batch_prioritized_routing', bool, False, 'Capacity to the most confident tokens '
           'first (V-MoE); non-causal, so for encoders only.'),
    Option('moe.router_jitter', float, 0.0, 'Multiplicative uniform jitter on router inputs in '
           'training (Switch).', Range(0, 1, high_open=True, note='0 = off')),
    Option('moe.bias_balancer_rate', float, 0.0, 'DeepSeek-V3 aux-loss-free balancing bias step '
           '(1e-3).', OFF_OR_MORE),
    Option('moe.num_shared_experts', int, 0, 'Experts every token passes through, added to the '
           'routed output (DeepSeekMoE).', NON_NEGATIVE),
    Option('moe.shared_expert_d_ff', int, 0, 'Hidden width of each shared expert; 0 = '
           'expert_d_ff.', NON_NEGATIVE),
    Option('moe.expert_dropout', float, 0.0, 'Dropout on expert hidden units in training '
           '(Switch fine-tuning: 0.4).', UNIT),
    Option('moe.extra_dense_ffn', str, 'none', 'ST-MoE sparse-dense stacking: a dense FFN '
           "'before' or 'after' each MoE FFN.", OneOf(('none', 'before', 'after'))),
    Option('moe.aux_loss_coef', float, 1e-2, 'Switch load-balancing loss weight.', OFF_OR_MORE),
    Option('moe.z_loss_coef', float, 1e-3, 'ST-MoE router z-loss weight.', OFF_OR_MORE),
    # attention
    Option('attention.logit_z_loss_coef', float, 0.0, 'mean logsumexp(attention logits)^2, '
           'every layer (ST-MoE).', OFF_OR_MORE),
    Option('attention.query_chunk', int, 256, 'Dense, encoder and cross-attention in chunks of '
           'this many queries above it (memory O(L)).', Range(0, note='0 = unchunked')),
    # opt
    Option('opt.lr', float, 3e-3, 'Peak learning rate.', Range(0, low_open=True)),
    Option('opt.warmup_steps', int, 100, 'Linear warmup from 0 to lr.', NON_NEGATIVE),
    Option('opt.weight_decay', float, 0.1, 'Decoupled; applied to matrices only, not norms.',
           NON_NEGATIVE),
    Option('opt.grad_clip_norm', float, 1.0, 'Global-norm clipping.', OFF_OR_MORE),
    # The mesh and the one table from logical axis names to mesh axes.
    Option('mesh', dict, {'data': -1, 'fsdp': 1, 'expert': 1, 'model': 1}, 'Mesh axis sizes '
           '(-1 = all remaining devices); docs/scaling.md.'),
    Option('logical_axis_rules', list,
           [('batch', ('data', 'fsdp', 'expert')), ('expert', 'expert'), ('mlp', 'model'),
            ('heads', 'model'), ('vocab', 'model'), ('embed', 'fsdp'), ('kv', None),
            ('length', None), ('layers', None)],
           'Logical axis name -> mesh axis, tuple of axes, or None = replicated.'),
    # the run
    Option('batch_size', int, 64, 'Global batch, in sequences.', POSITIVE),
    Option('num_train_steps', int, 1000, 'Length of the learning-rate schedule and of the run.',
           POSITIVE),
    Option('stop_at_step', int, 0, 'Exit early (after a checkpoint) at this step, e.g. for job '
           'slices.', Range(0, note='0 = off')),
    Option('log_every_steps', int, 50, 'Train metrics to metrics.jsonl/TensorBoard, averaged '
           'over this many steps.', POSITIVE),
    Option('eval_every_steps', int, 500, 'Periodic eval on eval_batches (and always at the last '
           'step).', POSITIVE),
    Option('eval_batches', int, 40, 'Validation batches per periodic eval.',
           Range(0, note='0 = the whole split')),
    Option('checkpoint_every_steps', int, 500, 'Orbax checkpoint interval (and at the last '
           'step).', POSITIVE),
    Option('keep_checkpoints', int, 3, 'Newest checkpoints kept; older ones are deleted.',
           POSITIVE),
    Option('eval_sample_tokens', int, 64, 'Tokens generated at each eval (TensorBoard text).',
           Range(0, note='0 = off')),
    Option('eval_sample_prompt', str, 'def ', 'Prompt of those samples.'),
    Option('peak_flops_per_device', float, 0.0, 'For the MFU metric.',
           Range(0, note='0 = the datasheet peak of the device, if known')),
    Option('loss_spike_factor', float, 2.0, 'Log a loss above this x the median of the last 32 '
           'steps.', Satisfies(lambda f: f == 0 or (math.isfinite(f) and f > 1),
                               'a number > 1, or 0 = off')),
    Option('init_from', str, '', "Start from another run's parameters, '<workdir>[:<step>]'; a "
           'dense checkpoint into an MoE model upcycles (docs/finetuning.md).'),
    Option('debug.step_sleep_s', float, 0.0, 'Host sleep after each step, so tests can kill a '
           'run at a chosen step.', NON_NEGATIVE),
)
