"""`model.remat`: every policy gives the loss and gradients of no remat, and keeps for the
backward pass what it says it keeps (the residuals of the loss's VJP, traced shape-only)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from stmoe_jax.nn import layers
from stmoe_jax.models import losses
from stmoe_jax.nn import remat
from stmoe_jax.models.transformer import Transformer

B, L = 2, 16
# One MoE block (remat wraps each block alike), with router jitter, so the recomputed forward
# must redraw the same noise. Sizes all distinct, so that shapes name tensors: D 16, F 24, E 4,
# C = ceil(1.25 * 2 * 32 / 4) = 20.
CFG = tiny_model_config(num_layers=1, moe=dict(every=1, router_jitter=0.1, expert_d_ff=24))
LOGITS_GSE, EXPERT_IO_ECD, HIDDEN_ECF = (1, 32, 4), (4, 20, 16), (4, 20, 24)


def _loss_fn(policy: str):
  cfg = dataclasses.replace(CFG, remat=policy)
  graphdef, params, buffers = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), *layers.STATE_FILTERS)
  tokens = np.random.default_rng(0).integers(0, 256, (B, L + 1), dtype=np.int32)
  batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
           'weights': jnp.ones((B, L), jnp.float32)}
  buffers = nnx.to_pure_dict(buffers)
  fn = lambda p: losses.compute_loss(p, buffers, graphdef, batch, jax.random.PRNGKey(1), cfg)[0]
  return fn, nnx.to_pure_dict(params)


def residual_shapes(policy: str) -> set[tuple[int, ...]]:
  """Shapes of the arrays the forward pass keeps for the backward pass (the VJP closure's
  leaves), traced without running anything."""
  fn, params = _loss_fn(policy)
  return {tuple(r.shape) for r in jax.tree.leaves(jax.eval_shape(lambda p: jax.vjp(fn, p)[1],
                                                                 params))}


@pytest.fixture(scope='module')
def no_remat():
  fn, params = _loss_fn('none')
  return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.parametrize('policy', [p for p in remat.REMAT_POLICIES if p != 'none'])
def test_remat_policy_matches_no_remat(no_remat, policy):
  fn, params = _loss_fn(policy)
  loss, grads = jax.jit(jax.value_and_grad(fn))(params)
  ref_loss, ref_grads = no_remat
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7),
               grads, ref_grads)


def test_policies_keep_what_they_say():
  none, full = residual_shapes('none'), residual_shapes('full')
  moe, dots = residual_shapes('moe_save_dispatched'), residual_shapes('save_dots')
  # Without remat the expert hidden units [E, C, F] are kept; every policy recomputes them
  # except save_dots (they are matmul outputs).
  assert HIDDEN_ECF in none and HIDDEN_ECF in dots
  assert HIDDEN_ECF not in full and HIDDEN_ECF not in moe
  # The MoE policy keeps the router logits and the dispatched expert inputs/outputs; 'full'
  # keeps neither.
  assert {LOGITS_GSE, EXPERT_IO_ECD} <= moe
  assert not {LOGITS_GSE, EXPERT_IO_ECD} & full
