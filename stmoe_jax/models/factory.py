"""The one place that turns a model config into a model family: module, loss, eval step, batch.

As nanodo's `model_factory.py`: the trainer, the loss and evaluation never import a model
class. `MODEL_FAMILIES` (selected by `model.architecture`) holds the decoder-only language model
and the span-corruption encoder-decoder; a new family is one `MODEL_FAMILIES.register(...)`
giving its `Model` (module constructor, loss, eval step, batch keys), its options and checks,
and what it can do (sample, count FLOPs), with no edit here (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from flax import nnx

from stmoe_jax.config import ModelConfig
from stmoe_jax.config import options
from stmoe_jax.config.options import Option, Range
from stmoe_jax.data import span_corruption
from stmoe_jax.data import tokenizer
from stmoe_jax.models import flops
from stmoe_jax.models import losses
from stmoe_jax.models import sampling
from stmoe_jax.models import seq2seq_losses
from stmoe_jax.models.encoder_decoder import EncoderDecoder
from stmoe_jax.models.transformer import Transformer
from stmoe_jax.moe import dispatch
from stmoe_jax.moe import routing
from stmoe_jax.nn import layers


@dataclasses.dataclass(frozen=True)
class Model:
  """A model family bound to its config.

  Attributes:
    cfg: the frozen model config.
    make: (*, rngs) -> the nnx module.
    loss_fn: (params, buffers, graphdef, batch, rng) -> (loss, (metrics, new buffers)), the
      train loss, differentiated with respect to `params`.
    eval_step: (params, buffers, batch, *, graphdef) -> sums and stats of one batch, reduced
      by `evaluation.evaluate`.
    batch_keys: the arrays each batch holds.
    task_format: how a prompt -> answer example becomes a row of those arrays (a key of
      `data.tasks.FORMATS`); its eval step must then also sum `num_exact` and `num_examples`.
  """
  cfg: ModelConfig
  make: Callable[[nnx.Rngs], nnx.Module]
  loss_fn: Callable
  eval_step: Callable
  batch_keys: tuple[str, ...]
  task_format: str = 'prefix_lm'

  def abstract(self) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The graphdef and shape-only (params, buffers) states, allocating nothing."""
    return nnx.split(nnx.eval_shape(lambda: self.make(rngs=nnx.Rngs(0))), *layers.STATE_FILTERS)

  def init(self, key: jax.Array) -> tuple[dict, dict]:
    """Fresh (params, buffers) as pure dicts, parameters drawn from `key`."""
    _, params, buffers = nnx.split(self.make(rngs=nnx.Rngs(params=key)), *layers.STATE_FILTERS)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelFamily(options.Entry):
  """One entry of `MODEL_FAMILIES`.

  Attributes:
    build: cfg -> its `Model`.
    objective: the `data.objective` its batches come from ('causal_lm': inputs, targets,
      weights; 'span_corruption': `span_corruption.BATCH_KEYS`).
    forward_flops_per_token: (cfg, data config, experts_per_token=None) -> forward FLOPs per
      input token (`flops.run_forward_flops_per_token`: the MFU metric counts
      `flops.TRAIN_PER_FORWARD` times it; eval.py reports it nominal and with the measured
      experts per token of each MoE layer); None = not counted (no MFU is logged).
    routing_groups: config -> the routing groups of one global batch in each stack.
    sampler: (cfg, data config) -> a text sampler (`sampling.Sampler`'s interface) for eval
      samples and sample.py; None = the family does not sample (`eval_sample_tokens` must be 0).
  """
  build: Callable[[ModelConfig], Model]
  routing_groups: Callable[[object], tuple[int, ...]]
  objective: str = 'causal_lm'
  forward_flops_per_token: Callable[..., int] | None = None
  sampler: Callable[[ModelConfig, object], object] | None = None


MODEL_FAMILIES = options.Registry('model family', 'model.architecture', 'decoder_only',
                                  'The model family (models/factory.py).')


def get_model(cfg: ModelConfig) -> Model:
  """The `Model` of `cfg.architecture`'s family."""
  return MODEL_FAMILIES[cfg.architecture].build(cfg)


def make_sampler(cfg: ModelConfig, data):
  """The text sampler of `cfg.architecture`'s family, sized by the training data config `data`
  (`config.data`: seq_len, and for span corruption noise_density, mean_noise_span_length)."""
  family = MODEL_FAMILIES[cfg.architecture]
  if family.sampler is None:
    raise options.ConfigError(f'model.architecture={cfg.architecture!r} cannot sample: that '
                              'family registers no sampler.')
  return family.sampler(cfg, data)


@options.add_check
def _check_sampling(config) -> None:
  family = MODEL_FAMILIES[config.model.architecture]
  if config.eval_sample_tokens and family.sampler is None:
    raise options.invalid('eval_sample_tokens', config.eval_sample_tokens,
                          f'0 with model.architecture={config.model.architecture!r} (that '
                          'family does not sample)')


def _decoder_only(cfg: ModelConfig) -> Model:
  return Model(cfg=cfg, make=functools.partial(Transformer, cfg),
               loss_fn=functools.partial(losses.compute_loss, cfg=cfg),
               eval_step=functools.partial(losses.eval_step, pad_id=cfg.pad_id),
               batch_keys=('inputs', 'targets', 'weights'))


def _encoder_decoder(cfg: ModelConfig) -> Model:
  return Model(cfg=cfg, make=functools.partial(EncoderDecoder, cfg),
               loss_fn=functools.partial(seq2seq_losses.compute_loss, cfg=cfg),
               eval_step=seq2seq_losses.eval_step, batch_keys=span_corruption.BATCH_KEYS,
               task_format='seq2seq')


def routing_groups_per_batch(config) -> tuple[int, ...]:
  """Routing groups of one global batch in each stack of the config's model family."""
  return MODEL_FAMILIES[config.model.architecture].routing_groups(config)


def _check_decoder(config, objective: str, seq_len: int, what: str) -> None:
  """The checks of a causal decoder: its objective, causal routing, routing groups that tile
  its sequences of `seq_len` tokens (`what` names that length)."""
  data, moe = config.data, config.moe
  if data.objective != objective:
    raise options.invalid('data.objective', data.objective,
                          f'{objective!r} with model.architecture={config.model.architecture!r}')
  # A router that ranks a group's tokens against each other would let a token's output depend
  # on later tokens (and leak them into next-token prediction).
  if not routing.ROUTERS[moe.router].causal:
    causal = ' or '.join(repr(n) for n, r in routing.ROUTERS.items() if r.causal)
    raise options.invalid('moe.router', moe.router,
                          f'{causal} in this causal decoder ({moe.router} sees later tokens of '
                          'the group; MoeLayer(causal=False) allows it for non-causal use)')
  if moe.batch_prioritized_routing:
    raise options.invalid('moe.batch_prioritized_routing', True,
                          'False in this causal decoder (it ranks tokens by confidence across '
                          'the whole group; MoeLayer(causal=False) allows it for non-causal use)')
  tokens = config.batch_size * seq_len
  if tokens % moe.group_size or (seq_len % moe.group_size and moe.group_size % seq_len):
    raise options.invalid('moe.group_size', moe.group_size,
                          f'a divisor or multiple of {what}={seq_len} dividing batch_size * '
                          f'{seq_len} = {tokens}')


def _encoder_len(data) -> int:
  return span_corruption.lengths(data.seq_len, data.noise_density,
                                 data.mean_noise_span_length).encoder_len


def _decoder_len(data) -> int:
  return span_corruption.lengths(data.seq_len, data.noise_density,
                                 data.mean_noise_span_length).decoder_len


def _validate_encoder_decoder(config) -> None:
  """The encoder's layers, routing groups and vocabulary; what the encoder-decoder lacks."""
  m, moe, data = config.model, config.moe, config.data
  _check_decoder(config, 'span_corruption', _decoder_len(data), 'decoder length')
  if m.num_encoder_layers <= 0:
    raise options.invalid('model.num_encoder_layers', m.num_encoder_layers,
                          "a positive integer with model.architecture='encoder_decoder'")
  if data.seq_len < 2:
    raise options.invalid('data.seq_len', data.seq_len, 'at least 2 for span corruption')
  # data.objective stays 'span_corruption' with a task: its fields set the decoder length of
  # the task's rows (`tasks.seq2seq_decoder_len`), but the rows hold no sentinel, so any
  # vocabulary of at least the bytes fits, such as a model's pre-trained at another seq_len.
  if data.task == 'lm':
    vocab = m.vocab_size - span_corruption.lengths(
        data.seq_len, data.noise_density, data.mean_noise_span_length).num_sentinels
    if vocab < tokenizer.VOCAB_SIZE:
      raise options.invalid('model.vocab_size', m.vocab_size,
                            f'at least {m.vocab_size - vocab + tokenizer.VOCAB_SIZE}: bytes, '
                            'pad/bos/eos and one sentinel per noise span '
                            '(span_corruption.lengths(...).num_sentinels)')
  if moe.encoder_router:
    if moe.encoder_router not in routing.ROUTERS:
      raise options.invalid('moe.encoder_router', moe.encoder_router,
                            "'' (= moe.router) or one of " + ', '.join(map(repr, routing.ROUTERS)))
    if (routing.ROUTERS[moe.encoder_router].fixed_load and
        not dispatch.DISPATCHES[moe.dispatch].uses_capacity):
      raise options.invalid('moe.encoder_router', moe.encoder_router,
                            f'a router with a dropless form for moe.dispatch={moe.dispatch!r}')
  tokens = config.batch_size * data.seq_len
  group = moe.encoder_group_size or moe.group_size
  if tokens % group or (data.seq_len % group and group % data.seq_len):
    raise options.invalid('moe.encoder_group_size', moe.encoder_group_size,
                          f'0 or a divisor or multiple of data.seq_len={data.seq_len} dividing '
                          f'batch_size * seq_len = {tokens} (0 takes moe.group_size='
                          f'{moe.group_size}, which does not)')
  att = config.attention
  if att.kind != 'dense' or att.layer_kinds:
    raise options.invalid('attention.kind', att.kind,
                          "'dense' (and attention.layer_kinds='') with "
                          "model.architecture='encoder_decoder'")
  if att.logit_z_loss_coef:
    raise options.invalid('attention.logit_z_loss_coef', att.logit_z_loss_coef,
                          "0 with model.architecture='encoder_decoder' (not implemented there)")


MODEL_FAMILIES.register(ModelFamily(
    name='decoder_only', build=_decoder_only, objective='causal_lm',
    sampler=lambda cfg, data: sampling.Sampler(cfg, data.seq_len,
                                               tokenizer.load(data.tokenizer)),
    validate=lambda config: _check_decoder(config, 'causal_lm', config.data.seq_len,
                                           'data.seq_len'),
    routing_groups=lambda config: (
        config.batch_size * config.data.seq_len // config.moe.group_size,),
    forward_flops_per_token=flops.run_forward_flops_per_token,
    doc='Decoder-only causal language model (models/transformer.py).'))
MODEL_FAMILIES.register(ModelFamily(
    name='encoder_decoder', build=_encoder_decoder, objective='span_corruption',
    sampler=lambda cfg, data: sampling.EncoderDecoderSampler(
        cfg, _encoder_len(data), _decoder_len(data)),
    routing_groups=lambda config: (
        config.batch_size * config.data.seq_len // (config.moe.encoder_group_size or
                                                    config.moe.group_size),
        config.batch_size * _decoder_len(config.data) // config.moe.group_size),
    forward_flops_per_token=flops.run_forward_flops_per_token, validate=_validate_encoder_decoder,
    options=(
        Option('model.num_encoder_layers', int, 0, 'Encoder layers (MoE at moe.every as in the '
               'decoder).', Range(0)),
        Option('moe.encoder_router', str, '', "The encoder's router ('' = moe.router); "
               'non-causal routers allowed.'),
        Option('moe.encoder_batch_prioritized_routing', bool, False, 'Batch Prioritized '
               'Routing in the (non-causal) encoder.'),
        Option('moe.encoder_group_size', int, 0, 'Encoder tokens per routing group; 0 = '
               'moe.group_size.', Range(0))),
    doc='T5-style span-corruption encoder-decoder, ST-MoE\'s setting '
        '(models/encoder_decoder.py).'))
