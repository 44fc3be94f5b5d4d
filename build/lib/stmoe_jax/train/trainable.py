"""Which parameters a fine-tuning run updates: `config.finetune.trainable` (ST-MoE Table 7).

  'all'        every parameter;
  'non_moe'    everything outside the MoE layers (ST-MoE's best: the experts and routers stay as
               pre-trained);
  'moe_only'   the MoE layers only (routers, experts and their shared experts);
  'attention'  the attention modules only (query/key/value/output projections, head routers).

Membership is by module, not by parameter name: a parameter belongs to an MoE layer when it
lies inside a `moe.MoeLayer`, to attention when it lies inside one of ATTENTION_MODULES, so any
model family built from these layers (an encoder-decoder too) gets the same split. Norms,
embeddings, dense FFNs and the output head are neither.

The optimizer applies this as `optax.multi_transform`: frozen parameters get `set_to_zero`
updates (no weight decay, no moments held for them), and gradient clipping measures the
trainable gradients only.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from stmoe_jax.nn.attention import CausalSelfAttention  # Also the base of PatternAttention.
from stmoe_jax.nn.attention import CrossAttention
from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option
from stmoe_jax.moe.head_routing import HeadRoutedAttention
from stmoe_jax.moe.layer import MoeLayer

# Self-attention of every kind (the encoder's bidirectional one subclasses the causal one) and
# the decoder's cross-attention.
ATTENTION_MODULES = (CausalSelfAttention, HeadRoutedAttention, CrossAttention)

# finetune.trainable -> (inside an MoE layer, inside attention) -> whether the optimizer updates.
SELECTORS = {
    'all': lambda in_moe, in_attention: True,
    'non_moe': lambda in_moe, in_attention: not in_moe,
    'moe_only': lambda in_moe, in_attention: in_moe,
    'attention': lambda in_moe, in_attention: in_attention,
}
options.declare(Option('finetune.trainable', str, 'all', 'Which parameters the optimizer '
                       'updates (ST-MoE Table 7).', OneOf(tuple(SELECTORS))),
                owner='train.trainable')


@options.add_check
def _check_trainable(config) -> None:
  moe = config.moe
  has_moe = moe.enabled and any(moe.every > 0 and i % moe.every == moe.every - 1
                                for i in range(config.model.num_layers))
  if config.finetune.trainable == 'moe_only' and not has_moe:
    raise options.ConfigError("config.finetune.trainable='moe_only' is invalid: expected "
                              'another setting for a model without MoE layers (nothing would '
                              'train).')


def path_name(path) -> str:
  """A pytree path (dict keys or nnx graph keys) as 'blocks/1/ffn/router'."""
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def module_paths(module: nnx.Module, types: tuple[type, ...]) -> list[str]:
  """Names of the submodules of `module` (abstract or not) that are instances of `types`."""
  return [path_name(p) for p, node in nnx.iter_graph(module) if isinstance(node, types)]


def _inside(name: str, prefixes: list[str]) -> bool:
  return any(name == p or name.startswith(p + '/') for p in prefixes)


def mask(module: nnx.Module, params, kind: str):
  """Pytree of bools shaped like `params` (the pure dict of `module`'s Params): True where
  `finetune.trainable=kind` trains the parameter."""
  moe, attention = module_paths(module, (MoeLayer,)), module_paths(module, ATTENTION_MODULES)
  select = SELECTORS[kind]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: select(_inside(path_name(path), moe), _inside(path_name(path), attention)),
      params)


def restrict(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
  """`tx` on the parameters where `trainable` (a bool pytree) is True, zero updates elsewhere."""
  labels = jax.tree.map(lambda t: 'trainable' if t else 'frozen', trainable)
  return optax.multi_transform({'trainable': tx, 'frozen': optax.set_to_zero()}, labels)
