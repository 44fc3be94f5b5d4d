"""The statistics a forward pass reports per layer: names, shapes, empty values, and how they
stack over layers. The model, the loss, evaluation, the train metrics and the plots read them
from here.

Shape letters: E experts, K choices per token (`routing.Router.num_choices`), K+1 the counts
0..K of a token's kept choices, H heads.

A block reports {'moe': its MoE layer's stats ({} for a dense FFN), 'attention': its attention's
stats}; `stack` turns the blocks' reports into the model's one flat dict of arrays:
  - the `MOE` stats stacked over the M MoE layers, `name` [M, ...] (M may be 0);
  - the `ATTENTION` stats over all layers, `attn_name` [num_layers], 0 where a kind does not
    compute them (plain dense attention computes none);
  - the `HEAD_ROUTING` stats over the A head-routed layers, `attn_name` [A, ...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stmoe_jax.moe import routing
from stmoe_jax.config import ModelConfig

# One MoE layer: `routing.routing_stats` plus `moe.sequence_balance_loss`, Shazeer's CV^2
# `importance_loss` and `load_loss` (`cv_balance.cv_stats`) and the layer's aux-loss-free
# `router_bias`.
MOE = {'balance_loss': (), 'z_loss': (), 'seq_balance_loss': (), 'importance_loss': (),
       'load_loss': (), 'expert_load': ('E',),
       'max_load_ratio': (), 'dropped_fraction': (), 'dropped_fraction_per_slot': ('K',),
       'tokens_left_behind': (), 'router_entropy': (), 'router_confidence': (),
       'null_choice_fraction': (), 'experts_per_token': (), 'experts_per_token_hist': ('K+1',),
       'max_router_logit': (), 'router_bias': ('E',)}
# Every attention layer (`logit_z_loss`: mean logsumexp(attention logits)^2 over real tokens).
ATTENTION = {'logit_z_loss': ()}
# A head-routed attention layer: its router's `routing.routing_stats` with `head_load` for
# `expert_load` (`head_routing.HeadRoutedAttention`).
HEAD_ROUTING = {'balance_loss': (), 'z_loss': (), 'dropped_fraction': (), 'head_load': ('H',)}
ATTENTION_PREFIX = 'attn_'


def key(name: str, stack: str) -> str:
  """The name of stat `name` of one stack of layers (`ModelConfig.moe_stacks`): `name` itself
  for the decoder-only model's one stack (''), else '<name>/<stack>' ('expert_load/encoder')."""
  return f'{name}/{stack}' if stack else name


def dims(cfg: ModelConfig) -> tuple[tuple[str, int], ...]:
  """The sizes of the shape letters for `cfg`, as ((letter, size), ...)."""
  moe = cfg.moe
  K = routing.ROUTERS[moe.router].num_choices(moe)
  return (('E', moe.num_experts), ('K', K), ('K+1', K + 1), ('H', cfg.num_heads))


def _stack(reports: list[dict], spec: dict, sizes: dict, prefix: str = '') -> dict:
  """spec's stats stacked over `reports` (each must hold them), or their empty [0, ...]."""
  out = {}
  for name, shape in spec.items():
    out[prefix + name] = (jnp.stack([r[name] for r in reports]) if reports
                          else jnp.zeros((0, *(sizes[d] for d in shape))))
  return out


def stack(per_layer: list[dict], layer_dims: tuple[tuple[str, int], ...]
          ) -> dict[str, jax.Array]:
  """The model's stats from its blocks' reports, in layer order (see the module docstring)."""
  sizes = dict(layer_dims)
  attention = [r['attention'] for r in per_layer]
  stats = _stack([r['moe'] for r in per_layer if r['moe']], MOE, sizes)
  for name in ATTENTION:
    stats[ATTENTION_PREFIX + name] = jnp.stack([a.get(name, jnp.zeros(())) for a in attention])
  routed = [a for a in attention if 'head_load' in a]
  stats.update(_stack(routed, HEAD_ROUTING, sizes, ATTENTION_PREFIX))
  return stats
