"""The one place that turns a model config into a model family: module, loss, eval step, batch.

As nanodo's `model_factory.py`: the trainer, the loss and evaluation never import a model
class. A second family (an encoder-decoder) is one more branch in `get_model`, giving its module
constructor, its loss and eval step, and the batch keys its input pipeline must provide.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from flax import nnx

from stmoe_jax.nn import layers
from stmoe_jax.models import losses
from stmoe_jax.models import seq2seq_losses
from stmoe_jax.config import ModelConfig
from stmoe_jax.data import span_corruption
from stmoe_jax.models.encoder_decoder import EncoderDecoder
from stmoe_jax.models.transformer import Transformer


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


def get_model(cfg: ModelConfig) -> Model:
  """The model family of `cfg.architecture`: the decoder-only `Transformer` language model, or
  the span-corruption `EncoderDecoder` (batches of `span_corruption.to_batch`, or a task's
  'seq2seq' rows of the same shapes)."""
  if cfg.architecture == 'encoder_decoder':
    return Model(cfg=cfg, make=functools.partial(EncoderDecoder, cfg),
                 loss_fn=functools.partial(seq2seq_losses.compute_loss, cfg=cfg),
                 eval_step=seq2seq_losses.eval_step, batch_keys=span_corruption.BATCH_KEYS,
                 task_format='seq2seq')
  return Model(cfg=cfg, make=functools.partial(Transformer, cfg),
               loss_fn=functools.partial(losses.compute_loss, cfg=cfg),
               eval_step=losses.eval_step, batch_keys=('inputs', 'targets', 'weights'))
