"""`validate(config)`: every check of a config's values, before anything compiles.

First structure (unknown, missing or mistyped fields against `config_schema.schema()`), then
ranges, divisibility and combinations; each failure raises `ConfigError` with one line naming
the field. Also the allowed values of the string fields, and the two quantities derived the
way the checks derive them (`routing_groups_per_batch`, `parse_init_from`).
"""

from __future__ import annotations

import math

import ml_collections

from stmoe_jax.moe import dispatch
from stmoe_jax.moe import gating
from stmoe_jax.nn import remat
from stmoe_jax.moe import routing
from stmoe_jax.config import schema as config_schema
from stmoe_jax.config.schema import ATTENTION_KINDS, TYPE_NAMES, layer_period, type_ok
from stmoe_jax.data import span_corruption
from stmoe_jax.data import tokenizer
from stmoe_jax.errors import ConfigError

ACTIVATIONS = ('gelu', 'geglu', 'geglu_mult_bias')
ARCHITECTURES = ('decoder_only', 'encoder_decoder')
GROUPED_MATMULS = ('auto', 'ragged_dot', 'blocked', 'megablox')  # In stmoe_jax.moe.grouped_matmul.
EXTRA_DENSE_FFN = ('none', 'before', 'after')
# data.task -> the dataset it reads ('' = any text dataset); stmoe_jax.data.tasks formats them.
TASKS = {'lm': '', 'func_name': 'stdlib_func_name'}
# finetune.trainable: which parameters the optimizer updates (ST-MoE Table 7); the selectors
# live in stmoe_jax.train.trainable.
TRAINABLE = ('all', 'non_moe', 'moe_only', 'attention')
# Terms the non-finite guard reports, and that `debug.nan_term` can poison.
NONFINITE_TERMS = ('cross_entropy', 'balance_loss', 'z_loss', 'grad_norm')


def _one_of(options) -> str:
  return 'one of ' + ', '.join(repr(o) for o in options)


def _check(ok: bool, field: str, value, expected: str):
  if not ok:
    raise ConfigError(f'config.{field}={value!r} is invalid: expected {expected}.')


def _positive_ints(section, prefix, names):
  for name in names:
    value = section[name]
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f'{prefix}{name}', value, 'a positive integer')


def _check_fields(node, schema: dict, prefix: str) -> None:
  """Unknown keys, missing keys and wrong types, in schema order (one line per error)."""
  keys = list(node.keys())
  for key in keys:
    if key not in schema:
      raise ConfigError(f'config.{prefix}{key} is not a field stmoe_jax knows: expected one of '
                        f'{sorted(schema)}.')
  for key, expected in schema.items():
    if key not in keys:
      raise ConfigError(f'config.{prefix}{key} is missing: every config needs it (see '
                        'configs/default.py).')
    value = node[key]
    if isinstance(expected, dict):
      _check(type_ok(value, dict), f'{prefix}{key}', value, 'a section (ConfigDict)')
      _check_fields(value, expected, f'{prefix}{key}.')
    else:
      _check(type_ok(value, expected), f'{prefix}{key}', value, TYPE_NAMES[expected])


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field whose value cannot work.

  First structure (unknown, missing or mistyped fields), then ranges, divisibility and
  combinations. Only checks that need no devices or data; batch-vs-mesh checks happen when the
  mesh is built.
  """
  _check_fields(config, config_schema.schema(), '')
  for axis, size in config.mesh.items():
    _check(type_ok(size, int) and (size > 0 or size == -1), f'mesh.{axis}', size,
           'a positive integer or -1 (all remaining devices)')
  for rule in config.logical_axis_rules:
    _check(isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str) and
           (rule[1] is None or isinstance(rule[1], str) or
            isinstance(rule[1], (list, tuple)) and all(isinstance(a, str) for a in rule[1])),
           'logical_axis_rules', rule,
           '(logical name, mesh axis, tuple of mesh axes or None) pairs')
  m, moe, opt = config.model, config.moe, config.opt
  _check(m.vocab_size >= tokenizer.VOCAB_SIZE, 'model.vocab_size', m.vocab_size,
         f'at least {tokenizer.VOCAB_SIZE} (bytes + pad/bos/eos; smaller would clip token ids)')
  _positive_ints(m, 'model.', ['vocab_size', 'd_model', 'num_layers', 'num_heads', 'head_dim',
                              'd_ff'])
  _check(m.head_dim % 2 == 0, 'model.head_dim', m.head_dim, 'an even number (rotary pairs)')
  _check(m.activation in ACTIVATIONS, 'model.activation', m.activation, _one_of(ACTIVATIONS))
  _check(m.dtype in ('float32', 'bfloat16'), 'model.dtype', m.dtype, "'float32' or 'bfloat16'")
  _check(m.param_dtype in ('float32', 'bfloat16'), 'model.param_dtype', m.param_dtype,
         "'float32' (master weights for bfloat16 compute) or 'bfloat16'")
  _check(m.remat in remat.REMAT_POLICIES, 'model.remat', m.remat, _one_of(remat.REMAT_POLICIES))
  _check(m.init_scale > 0, 'model.init_scale', m.init_scale, 'a positive number')
  _positive_ints(moe, 'moe.', ['num_experts', 'top_k', 'expert_d_ff', 'group_size', 'min_capacity'])
  _check(isinstance(moe.every, int) and moe.every >= 0, 'moe.every', moe.every,
         'an integer >= 0 (0 = no MoE layers)')
  _check(isinstance(m.scan_layers, bool), 'model.scan_layers', m.scan_layers, 'True or False')
  if m.scan_layers:
    period = layer_period(moe.every, config.attention.layer_kinds)
    _check(m.num_layers % period == 0, 'model.num_layers', m.num_layers,
           f'a multiple of {period} with model.scan_layers=True (the stack scans over units of '
           f'lcm(moe.every={moe.every}, len(attention.layer_kinds))={period} layers)')
    if m.architecture == 'encoder_decoder':  # The encoder scans over units of the same period.
      _check(m.num_encoder_layers % period == 0, 'model.num_encoder_layers', m.num_encoder_layers,
             f'a multiple of {period} with model.scan_layers=True (the encoder scans over units '
             f'of lcm(moe.every={moe.every}, len(attention.layer_kinds))={period} layers)')
  _check(moe.num_experts >= moe.top_k, 'moe.num_experts', moe.num_experts,
         f'at least moe.top_k={moe.top_k}')
  _check(moe.router in routing.ROUTERS, 'moe.router', moe.router, _one_of(routing.ROUTERS))
  _check(moe.dispatch in dispatch.DISPATCHES, 'moe.dispatch', moe.dispatch,
         _one_of(dispatch.DISPATCHES))
  _check(moe.grouped_matmul in GROUPED_MATMULS, 'moe.grouped_matmul', moe.grouped_matmul,
         _one_of(GROUPED_MATMULS))
  # The decoder is causal: a router that ranks a group's tokens against each other would let a
  # token's output depend on later tokens (and leak them into next-token prediction).
  causal_routers = ' or '.join(repr(n) for n, r in routing.ROUTERS.items() if r.causal)
  _check(routing.ROUTERS[moe.router].causal, 'moe.router', moe.router,
         f'{causal_routers} in this causal decoder ({moe.router} sees later tokens of the group; '
         'MoeLayer(causal=False) allows it for non-causal use)')
  _check(not moe.batch_prioritized_routing, 'moe.batch_prioritized_routing',
         moe.batch_prioritized_routing,
         'False in this causal decoder (it ranks tokens by confidence across the whole group; '
         'MoeLayer(causal=False) allows it for non-causal use)')
  _validate_encoder_decoder(config)
  _check(0 <= moe.second_expert_threshold < 1, 'moe.second_expert_threshold',
         moe.second_expert_threshold, 'in [0, 1) (0 = always route all k choices; ST-MoE: 0.2)')
  _check(moe.bias_balancer_rate >= 0, 'moe.bias_balancer_rate', moe.bias_balancer_rate,
         'a number >= 0 (0 = off; DeepSeek-V3: 1e-3)')
  _check(0 <= moe.expert_dropout < 1, 'moe.expert_dropout', moe.expert_dropout, 'in [0, 1)')
  for name in ('num_shared_experts', 'shared_expert_d_ff'):
    _check(isinstance(moe[name], int) and not isinstance(moe[name], bool) and moe[name] >= 0,
           f'moe.{name}', moe[name], 'an integer >= 0')
  _check(moe.extra_dense_ffn in EXTRA_DENSE_FFN, 'moe.extra_dense_ffn', moe.extra_dense_ffn,
         _one_of(EXTRA_DENSE_FFN))
  for name in ('train_capacity_factor', 'eval_capacity_factor'):
    _check(moe[name] > 0, f'moe.{name}', moe[name], 'a number > 0')
  _check(0 <= moe.router_jitter < 1, 'moe.router_jitter', moe.router_jitter, 'in [0, 1)')
  for name in ('aux_loss_coef', 'z_loss_coef'):
    _check(moe[name] >= 0, f'moe.{name}', moe[name], 'a number >= 0')
  _validate_router_options(moe)
  _positive_ints(config, '', ['batch_size', 'num_train_steps', 'log_every_steps',
                                    'eval_every_steps', 'checkpoint_every_steps',
                                    'keep_checkpoints'])
  _positive_ints(config.data, 'data.', ['seq_len'])
  _validate_finetune(config)
  _check(config.eval_sample_tokens >= 0, 'eval_sample_tokens', config.eval_sample_tokens,
         'an integer >= 0 (0 = no text sample at eval)')
  _check(config.peak_flops_per_device >= 0, 'peak_flops_per_device', config.peak_flops_per_device,
         'a number >= 0 (0 = the datasheet peak of the device, if known)')
  _check(isinstance(config.stop_at_step, int) and config.stop_at_step >= 0, 'stop_at_step',
         config.stop_at_step, 'an integer >= 0 (0 = run to num_train_steps)')
  _check(config.eval_batches >= 0, 'eval_batches', config.eval_batches, 'an integer >= 0')
  tokens, seq_len = config.batch_size * config.data.seq_len, config.data.seq_len
  if m.architecture == 'encoder_decoder':  # moe.group_size routes the decoder's tokens.
    encoder_group = moe.encoder_group_size or moe.group_size
    _check(tokens % encoder_group == 0 and (seq_len % encoder_group == 0 or
                                            encoder_group % seq_len == 0),
           'moe.encoder_group_size', moe.encoder_group_size,
           f'0 or a divisor or multiple of data.seq_len={seq_len} dividing batch_size * seq_len '
           f'= {tokens} (0 takes moe.group_size={moe.group_size}, which does not)')
    seq_len = _span_lengths(config.data).decoder_len
    tokens = config.batch_size * seq_len
  name = 'decoder length' if m.architecture == 'encoder_decoder' else 'data.seq_len'
  _check(tokens % moe.group_size == 0 and (seq_len % moe.group_size == 0 or
                                           moe.group_size % seq_len == 0),
         'moe.group_size', moe.group_size,
         f'a divisor or multiple of {name}={seq_len} dividing batch_size * {seq_len} = {tokens}')
  _validate_attention(config.attention, m.num_heads)
  _check(opt.name in ('adamw', 'adafactor'), 'opt.name', opt.name, "'adamw' or 'adafactor'")
  # Adafactor's parameter scale and update clipping take an RMS over the whole array: over all
  # stacked layers of a scanned stack at once, a different optimizer from the unscanned one.
  _check(opt.name == 'adamw' or not config.model.scan_layers, 'opt.name', opt.name,
         "'adamw' with model.scan_layers=True (Adafactor's RMS statistics would span all "
         'stacked layers)')
  _check(opt.lr > 0, 'opt.lr', opt.lr, 'a number > 0')
  _check(opt.schedule in ('cosine', 'rsqrt', 'wsd'), 'opt.schedule', opt.schedule,
         "'cosine', 'rsqrt' or 'wsd'")
  _check(0 < opt.decay_fraction <= 1, 'opt.decay_fraction', opt.decay_fraction, 'in (0, 1]')
  _check(opt.warmup_steps >= 0, 'opt.warmup_steps', opt.warmup_steps, 'an integer >= 0')
  _check(0 <= opt.final_lr_fraction <= 1, 'opt.final_lr_fraction', opt.final_lr_fraction,
         'in [0, 1]')
  _check(opt.grad_clip_norm >= 0, 'opt.grad_clip_norm', opt.grad_clip_norm, 'a number >= 0')
  _check(math.isfinite(opt.weight_decay) and opt.weight_decay >= 0, 'opt.weight_decay',
         opt.weight_decay, 'a number >= 0')
  _check(config.stop_at_step <= config.num_train_steps, 'stop_at_step', config.stop_at_step,
         f'at most num_train_steps={config.num_train_steps}')
  _check(moe.every <= m.num_layers or not moe.enabled, 'moe.every', moe.every,
         f'at most model.num_layers={m.num_layers} while moe.enabled=True (no layer would be '
         'MoE; set moe.enabled=False for a dense model)')
  _check(config.on_nonfinite in ('skip', 'stop'), 'on_nonfinite', config.on_nonfinite,
         "'skip' (drop the update) or 'stop' (checkpoint the last good state and exit)")
  _check(config.loss_spike_factor == 0 or config.loss_spike_factor > 1, 'loss_spike_factor',
         config.loss_spike_factor, 'a number > 1, or 0 = off')
  debug = config.debug
  _check(0 <= debug.nan_at_step <= config.num_train_steps, 'debug.nan_at_step',
         debug.nan_at_step, f'a step in [1, num_train_steps={config.num_train_steps}], or 0 = off')
  _check(debug.step_sleep_s >= 0, 'debug.step_sleep_s', debug.step_sleep_s, 'a number >= 0')
  _check(debug.nan_term in NONFINITE_TERMS, 'debug.nan_term', debug.nan_term,
         f'one of {list(NONFINITE_TERMS)}')


def _span_lengths(data) -> span_corruption.Lengths:
  return span_corruption.lengths(data.seq_len, data.noise_density, data.mean_noise_span_length)


def _validate_encoder_decoder(config: ml_collections.ConfigDict) -> None:
  """The `validate` checks of the objective, the architecture and the encoder's fields."""
  m, moe, data = config.model, config.moe, config.data
  _check(data.objective in span_corruption.OBJECTIVES, 'data.objective', data.objective,
         _one_of(span_corruption.OBJECTIVES))
  _check(0 < data.noise_density < 1, 'data.noise_density', data.noise_density,
         'in (0, 1) (T5: 0.15)')
  _check(data.mean_noise_span_length >= 1, 'data.mean_noise_span_length',
         data.mean_noise_span_length, 'a number >= 1 (T5: 3)')
  _check(m.architecture in ARCHITECTURES, 'model.architecture', m.architecture,
         _one_of(ARCHITECTURES))
  _check(isinstance(m.num_encoder_layers, int) and m.num_encoder_layers >= 0,
         'model.num_encoder_layers', m.num_encoder_layers, 'an integer >= 0')
  encoder_decoder = m.architecture == 'encoder_decoder'
  wanted = 'span_corruption' if encoder_decoder else 'causal_lm'
  _check(data.objective == wanted, 'data.objective', data.objective,
         f'{wanted!r} with model.architecture={m.architecture!r}')
  if not encoder_decoder:
    for name, default in (('model.num_encoder_layers', 0), ('moe.encoder_router', ''),
                          ('moe.encoder_batch_prioritized_routing', False),
                          ('moe.encoder_group_size', 0)):
      section, field = name.split('.')
      _check(config[section][field] == default, name, config[section][field],
             f"{default!r} with model.architecture='decoder_only' (no encoder)")
    return
  _check(m.num_encoder_layers > 0, 'model.num_encoder_layers', m.num_encoder_layers,
         "a positive integer with model.architecture='encoder_decoder'")
  _check(data.seq_len >= 2, 'data.seq_len', data.seq_len, 'at least 2 for span corruption')
  # data.objective stays 'span_corruption' with a task: its fields set the decoder length of
  # the task's rows (`tasks.seq2seq_decoder_len`), but the rows hold no sentinel, so any
  # vocabulary of at least the bytes fits (checked above), such as a model's pre-trained at
  # another data.seq_len.
  if data.task == 'lm':
    vocab = tokenizer.VOCAB_SIZE + _span_lengths(data).num_sentinels
    _check(m.vocab_size >= vocab, 'model.vocab_size', m.vocab_size,
           f'at least {vocab}: bytes, pad/bos/eos and one sentinel per noise span '
           '(span_corruption.lengths(...).num_sentinels)')
  _check(moe.encoder_router == '' or moe.encoder_router in routing.ROUTERS, 'moe.encoder_router',
         moe.encoder_router, "'' (= moe.router) or " + _one_of(routing.ROUTERS))
  router = routing.ROUTERS[moe.encoder_router or moe.router]
  _check(not router.fixed_load or dispatch.DISPATCHES[moe.dispatch].uses_capacity,
         'moe.encoder_router', moe.encoder_router,
         f'a router with a dropless form for moe.dispatch={moe.dispatch!r}')
  _check(isinstance(moe.encoder_group_size, int) and moe.encoder_group_size >= 0,
         'moe.encoder_group_size', moe.encoder_group_size, 'an integer >= 0 (0 = moe.group_size)')
  att = config.attention
  _check(att.kind == 'dense' and not att.layer_kinds, 'attention.kind', att.kind,
         "'dense' (and attention.layer_kinds='') with model.architecture='encoder_decoder'")
  _check(att.logit_z_loss_coef == 0, 'attention.logit_z_loss_coef', att.logit_z_loss_coef,
         "0 with model.architecture='encoder_decoder' (not implemented there)")


def routing_groups_per_batch(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Routing groups of one global batch in each stack: (decoder,) for the decoder-only model,
  (encoder, decoder) for the encoder-decoder, whose decoder routes its target tokens."""
  moe, data, batch = config.moe, config.data, config.batch_size
  if config.model.architecture != 'encoder_decoder':
    return (batch * data.seq_len // moe.group_size,)
  return (batch * data.seq_len // (moe.encoder_group_size or moe.group_size),
          batch * _span_lengths(data).decoder_len // moe.group_size)


def _validate_finetune(config: ml_collections.ConfigDict) -> None:
  """The `data.task`, `init_from` and `finetune` checks of `validate`."""
  task = config.data.task
  _check(task in TASKS, 'data.task', task, _one_of(TASKS))
  _check(not TASKS[task] or config.data.name == TASKS[task], 'data.name', config.data.name,
         f'{TASKS[task]!r} with data.task={task!r}')
  trainable = config.finetune.trainable
  _check(trainable in TRAINABLE, 'finetune.trainable', trainable, _one_of(TRAINABLE))
  has_moe = config.moe.enabled and any(config.moe.every > 0 and i % config.moe.every ==
                                       config.moe.every - 1
                                       for i in range(config.model.num_layers))
  _check(trainable != 'moe_only' or has_moe, 'finetune.trainable', trainable,
         "not 'moe_only' for a model without MoE layers (nothing would train)")
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


def _validate_router_options(moe: ml_collections.ConfigDict) -> None:
  """The `validate` checks of the gating options (`stmoe_jax.moe.gating`) and their combinations."""
  E, k = moe.num_experts, moe.top_k
  _check(moe.score_fn in gating.SCORE_FNS, 'moe.score_fn', moe.score_fn, _one_of(gating.SCORE_FNS))
  _check(moe.routed_scaling_factor > 0, 'moe.routed_scaling_factor', moe.routed_scaling_factor,
         'a number > 0 (DeepSeek-V3: 2.5)')
  _positive_ints(moe, 'moe.', ['n_groups', 'topk_groups', 'hierarchy_outer_k'])
  _check(E % moe.n_groups == 0, 'moe.n_groups', moe.n_groups,
         f'a divisor of moe.num_experts={E}')
  _check(moe.topk_groups <= moe.n_groups, 'moe.topk_groups', moe.topk_groups,
         f'at most moe.n_groups={moe.n_groups}')
  _check(moe.topk_groups * (E // moe.n_groups) >= k, 'moe.topk_groups', moe.topk_groups,
         f'enough groups of moe.n_groups={moe.n_groups} to hold moe.top_k={k} experts')
  _check(moe.seq_aux_loss_coef >= 0, 'moe.seq_aux_loss_coef', moe.seq_aux_loss_coef,
         'a number >= 0 (DeepSeek-V3: 1e-4)')
  _check(moe.router_noise in gating.ROUTER_NOISES, 'moe.router_noise', moe.router_noise,
         _one_of(gating.ROUTER_NOISES))
  for name in ('importance_loss_coef', 'load_loss_coef'):
    _check(moe[name] >= 0, f'moe.{name}', moe[name], 'a number >= 0 (0 = off)')
  if moe.load_loss_coef > 0:  # Shazeer's load estimator is the probability under his noise.
    _check(moe.router_noise == 'noisy_top_k', 'moe.load_loss_coef', moe.load_loss_coef,
           f"0 unless moe.router_noise='noisy_top_k' (it is {moe.router_noise!r}: the smooth "
           'load estimator needs the learned noise scale)')
    _check(moe.router == 'tokens_choose' and moe.encoder_router in ('', 'tokens_choose')
           and k < E, 'moe.load_loss_coef', moe.load_loss_coef,
           "0 unless every MoE layer routes with moe.router='tokens_choose' and "
           f'moe.top_k < moe.num_experts={E} (the load estimator is of a flat top-k)')
  for when in ('train', 'eval'):
    policy, thresholds = moe[f'second_policy_{when}'], moe[f'threshold_{when}']
    _check(policy in gating.LATER_CHOICE_POLICIES, f'moe.second_policy_{when}', policy,
           _one_of(gating.LATER_CHOICE_POLICIES))
    _check(len(thresholds) in (0, k - 1) and all(
        type_ok(t, float) and 0 <= t < 1 for t in thresholds), f'moe.threshold_{when}',
           thresholds, f'() or moe.top_k - 1 = {k - 1} thresholds in [0, 1), for choices 2..k')
  if moe.router == 'hierarchical':
    _check(len(moe.hierarchy) == 2 and all(type_ok(n, int) and n > 0 for n in moe.hierarchy)
           and moe.hierarchy[0] * moe.hierarchy[1] == E, 'moe.hierarchy', moe.hierarchy,
           f'(outer groups, experts per group) whose product is moe.num_experts={E}')
    outer, inner = moe.hierarchy
    _check(moe.hierarchy_outer_k <= outer and k % moe.hierarchy_outer_k == 0 and
           k // moe.hierarchy_outer_k <= inner, 'moe.hierarchy_outer_k', moe.hierarchy_outer_k,
           f'at most {outer} outer groups, dividing moe.top_k={k} into at most {inner} '
           'experts per group')
    for name, off in (('score_fn', 'softmax'), ('n_groups', 1), ('bias_balancer_rate', 0.0),
                      ('second_expert_threshold', 0.0), ('second_policy_train', 'random'),
                      ('second_policy_eval', 'threshold'), ('threshold_train', ()),
                      ('threshold_eval', ()), ('routed_scaling_factor', 1.0)):
      value = tuple(moe[name]) if isinstance(moe[name], (list, tuple)) else moe[name]
      _check(value == off, f'moe.{name}', moe[name],
             f"{off!r} with moe.router='hierarchical' (its two levels do not use it)")
  else:
    _check(not moe.hierarchy, 'moe.hierarchy', moe.hierarchy,
           "() unless moe.router='hierarchical'")


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
  _positive_ints(att, 'attention.', ['block_size', 'window', 'stride', 'num_local_blocks',
                                    'head_top_k'])
  _check(isinstance(att.query_chunk, int) and att.query_chunk >= 0, 'attention.query_chunk',
         att.query_chunk, 'an integer >= 0 (0 = unchunked)')
  _check(isinstance(att.num_global_blocks, int) and att.num_global_blocks >= 0,
         'attention.num_global_blocks', att.num_global_blocks, 'an integer >= 0')
  _check(att.head_top_k <= num_heads, 'attention.head_top_k', att.head_top_k,
         f'at most model.num_heads={num_heads}')
  _check(att.head_capacity_factor > 0, 'attention.head_capacity_factor',
         att.head_capacity_factor, 'a number > 0')
  for name in ('head_aux_loss_coef', 'head_z_loss_coef', 'logit_z_loss_coef'):
    _check(att[name] >= 0, f'attention.{name}', att[name], 'a number >= 0')
