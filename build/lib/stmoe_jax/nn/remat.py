"""Rematerialization (gradient checkpointing) of the transformer blocks: `model.remat`.

Without remat, the backward pass keeps every intermediate of every block alive from the forward
pass; with it, each block keeps only what its policy saves and recomputes the rest while
differentiating. The policies (`jax.checkpoint` policies, applied per block by `nnx.remat`):

  'none'                no rematerialization: fastest, most memory.
  'full'                save only the block's inputs; recompute the whole block (MaxText 'full').
  'save_dots'           save every matmul output, recompute the elementwise ops between them.
  'moe_save_dispatched' save the router logits and the experts' dispatched inputs and outputs
                        (the tensors an expert-parallel step exchanges all-to-all), recompute the
                        rest: the backward pass never repeats routing or the exchange, only the
                        expert hidden units (k * expert_d_ff wide per token) and attention.

The MoE layer tags those tensors with `jax.ad_checkpoint.checkpoint_name` (the names below);
outside remat a name is the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option

# Names `checkpoint_name` gives inside the MoE layer (moe.py, experts.py).
ROUTER_LOGITS = 'router_logits'
EXPERT_INPUTS = 'expert_inputs'
EXPERT_OUTPUTS = 'expert_outputs'

REMAT_POLICIES: dict[str, Callable | None] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_saveable,
    'moe_save_dispatched': jax.checkpoint_policies.save_only_these_names(
        ROUTER_LOGITS, EXPERT_INPUTS, EXPERT_OUTPUTS),
}
options.declare(Option('model.remat', str, 'none', 'Recompute per block in the backward pass: '
                       "'full', 'save_dots', 'moe_save_dispatched'.",
                       OneOf(tuple(REMAT_POLICIES))), owner='nn.remat')


def name(x: jax.Array, tag: str) -> jax.Array:
  """`x` tagged for the remat policies (identity unless a policy saves `tag`)."""
  return checkpoint_name(x, tag)


def wrap(block_fn: Callable, remat: str, *, in_scan: bool = False) -> Callable:
  """`block_fn(block, *args)` rematerialized under the `remat` policy (unchanged for 'none').

  `block_fn` takes the nnx block first; `nnx.remat` carries its state (e.g. a router bias the
  forward pass updates) in and out of the `jax.checkpoint`. `in_scan`: the block runs inside a
  scan over layers, whose loop already keeps XLA from merging the recomputation with the
  forward pass, so the CSE barriers (costly on GPU) are left out, as `jax.checkpoint` advises.
  """
  if remat == 'none':
    return block_fn
  return nnx.remat(block_fn, policy=REMAT_POLICIES[remat], prevent_cse=not in_scan)
