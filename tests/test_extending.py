"""Extensions registered from this file alone (no library file edited) are validated, train and
evaluate through the normal entry points: a router with its own option, an attention kind with
its own option and a model family (docs/extending.md walks through the same)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from stmoe_jax.config import ConfigError, ModelConfig, options, validate
from stmoe_jax.models import factory
from stmoe_jax.models import losses
from stmoe_jax.models.transformer import Transformer
from stmoe_jax.moe import layer_stats
from stmoe_jax.moe import routing
from stmoe_jax.nn import layers
from stmoe_jax.nn.attention import ATTENTION_KINDS, AttentionKind, CausalSelfAttention
from stmoe_jax.train import train_lib


# A router: tokens-choose top-k over logits divided by a temperature, its own option.
def route_tempered(logits_GSE, moe, *, capacity, mask_GS=None, bias_E=None, train=False,
                   rng=None):
  del bias_E, train, rng
  return routing.tokens_choose_top_k(logits_GSE / moe.toy_temperature, top_k=moe.top_k,
                                     capacity=capacity, mask_GS=mask_GS)


TEMPERED = routing.Router(
    name='tempered', route=route_tempered, causal=True, fixed_load=False,
    num_choices=lambda moe: moe.top_k,
    options=(options.Option('moe.toy_temperature', float, 1.0, 'Router softmax temperature.',
                            options.Range(0, low_open=True)),))


# An attention kind: dense causal attention with its output scaled by its own option.
class ScaledAttention(CausalSelfAttention):

  def __call__(self, x_BLD, positions_BL, *, mask_BL=None):
    y_BLD, stats = super().__call__(x_BLD, positions_BL, mask_BL=mask_BL)
    return y_BLD * self.scale, stats

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.scale = cfg.attention.toy_output_scale


SCALED = AttentionKind(
    name='scaled', make=ScaledAttention,
    options=(options.Option('attention.toy_output_scale', float, 1.0, 'Attention output scale.',
                            options.Range(0, low_open=True)),))


# A model family: a bigram language model (logits from the current token only).
class Bigram(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.table = layers.param(rngs, nnx.initializers.normal(0.02),
                              (cfg.vocab_size, cfg.vocab_size), ('vocab', 'embed'))

  def __call__(self, tokens_BL):
    return self.table[...][tokens_BL]


def bigram_model(cfg: ModelConfig) -> factory.Model:
  sizes = dict(layer_stats.dims(cfg))  # No MoE layers: each routing stat is [0, ...].
  no_moe_stats = {name: jnp.zeros((0, *(sizes[d] for d in shape)))
                  for name, shape in layer_stats.MOE.items()}

  def loss_fn(params, buffers, graphdef, batch, rng):
    del rng
    logits = nnx.merge(graphdef, params, buffers)(batch['inputs'])
    sums = losses.token_sums(logits, batch['targets'], batch['weights'])
    loss = sums['ce_sum'] / jnp.maximum(sums['num_tokens'], 1.0)
    metrics = {'loss': loss, 'cross_entropy': loss,
               'accuracy': sums['num_correct'] / jnp.maximum(sums['num_tokens'], 1.0)}
    return loss, (metrics, buffers)

  def eval_step(params, buffers, batch, *, graphdef):
    logits = nnx.merge(graphdef, params, buffers)(batch['inputs'])
    return {**losses.token_sums(logits, batch['targets'], batch['weights']),
            'num_routed': jnp.sum(batch['weights']), **no_moe_stats}

  return factory.Model(cfg=cfg, make=lambda rngs: Bigram(cfg, rngs=rngs), loss_fn=loss_fn,
                       eval_step=eval_step, batch_keys=('inputs', 'targets', 'weights'))


BIGRAM = factory.ModelFamily(name='bigram', build=bigram_model, routing_groups=lambda c: (1,))


@pytest.fixture
def registered(monkeypatch):
  """The three entries registered for one test; the tables are restored afterwards."""
  options.load_library()
  monkeypatch.setattr(options, '_OPTIONS', dict(options._OPTIONS))  # pylint: disable=protected-access
  for registry in (routing.ROUTERS, ATTENTION_KINDS, factory.MODEL_FAMILIES):
    monkeypatch.setattr(registry, '_entries', dict(registry._entries))  # pylint: disable=protected-access
  routing.ROUTERS.register(TEMPERED)
  ATTENTION_KINDS.register(SCALED)
  factory.MODEL_FAMILIES.register(BIGRAM)


def _config(**overrides) -> ml_collections.ConfigDict:
  config = tiny.get_config()  # Built on `options.defaults()`: the registered options are in.
  for name, value in overrides.items():
    section, _, field = name.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


def test_extensions_are_validated_with_their_own_options(registered):
  del registered
  validate(_config(**{'moe.router': 'tempered', 'moe.toy_temperature': 2.0}))
  with pytest.raises(ConfigError, match=r'^config.moe.toy_temperature=-1.0 is invalid: '
                     r'expected > 0'):
    validate(_config(**{'moe.router': 'tempered', 'moe.toy_temperature': -1.0}))
  # An entry's option is refused while another entry is selected: it would be ignored.
  with pytest.raises(ConfigError, match=r"^config.moe.toy_temperature=2.0 is read only with "
                     r"moe.router='tempered'"):
    validate(_config(**{'moe.toy_temperature': 2.0}))
  with pytest.raises(ConfigError, match=r"^config.attention.toy_output_scale=0.5 is read only "
                     r"with attention.kind='scaled'"):
    validate(_config(**{'attention.toy_output_scale': 0.5}))
  with pytest.raises(ConfigError, match=r"^config.model.architecture='trigram' is invalid: "
                     r"expected one of .*'bigram'"):
    validate(_config(**{'model.architecture': 'trigram'}))
  # The family cannot sample, so eval samples are refused before anything compiles.
  with pytest.raises(ConfigError, match=r'^config.eval_sample_tokens=8 is invalid'):
    validate(_config(**{'model.architecture': 'bigram', 'eval_sample_tokens': 8}))
  assert '`moe.toy_temperature`' in options.reference_markdown()


def test_the_new_options_change_the_model(registered, tiny_model_cfg):
  del registered
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, 259)

  def logits(**changes):
    cfg = tiny_model_cfg(moe=dict(router='tempered', toy_temperature=changes.get('t', 1.0)),
                         attention=dict(kind='scaled', toy_output_scale=changes.get('s', 1.0)))
    return Transformer(cfg, rngs=nnx.Rngs(0))(tokens, train=False)[0]

  base = logits()
  assert not np.allclose(base, logits(t=0.1), atol=1e-5)
  assert not np.allclose(base, logits(s=3.0), atol=1e-5)


def test_extensions_train_and_evaluate_through_the_entry_points(registered, tmp_path,
                                                                stdlib_data_dir):
  del registered
  sparse = _config(**{'moe.router': 'tempered', 'moe.toy_temperature': 0.5,
                      'attention.kind': 'scaled', 'attention.toy_output_scale': 0.5,
                      'data.data_dir': stdlib_data_dir})
  metrics = train_lib.train_and_evaluate(sparse, str(tmp_path / 'sparse'))
  assert np.isfinite(metrics['loss'])
  bigram = _config(**{'model.architecture': 'bigram', 'moe.enabled': False,
                     'data.data_dir': stdlib_data_dir})
  metrics = train_lib.train_and_evaluate(bigram, str(tmp_path / 'bigram'))
  # Eight steps from a near-uniform table: the loss is still close to log(259) but below it.
  assert 3.0 < metrics['loss'] < np.log(259)
