"""Mixed precision: `model.dtype` is the compute dtype, `model.param_dtype` the storage dtype of
parameters and optimizer state. Under bfloat16 compute the master weights and Adam moments stay
float32, the blocks' matmuls run in bfloat16, the router and output head in float32, and a
short training run follows float32's loss curve."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from stmoe_jax.nn import layers
from stmoe_jax.models import losses
from stmoe_jax.train import train_state
from stmoe_jax.config import model_config
from stmoe_jax.models.transformer import Transformer

STEPS = 12
# Largest |bf16 loss - f32 loss| allowed at any of the first STEPS steps, in nats per byte: the
# bf16 run rounds activations to 8 mantissa bits (relative 2^-9 ~ 0.2%); its loss starts ~5.6
# and over 12 steps the two runs drift apart by far less than the 1.3 nats the loss falls
# (measured: at most 0.009, 2026-11-30).
LOSS_TOLERANCE = 0.05


def _config(dtype: str, param_dtype: str = 'float32'):
  config = tiny.get_config()
  config.model.update(dtype=dtype, param_dtype=param_dtype)
  config.num_train_steps = STEPS
  return config


@pytest.mark.parametrize('param_dtype', ['float32', 'bfloat16'])
def test_params_and_optimizer_state_in_param_dtype(param_dtype):
  state = train_state.place(_config('bfloat16', param_dtype)).abstract_state  # Compiles nothing.
  adam = state.opt_state[1][0]
  for tree in (state.params, adam.mu, adam.nu):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(param_dtype)}
  assert adam.count.dtype == jnp.int32


def _matmul_dtypes(param_dtype: str) -> dict[str, set[int]]:
  """{output dtype of each dot_general in the train forward pass: the set of their last dims},
  on [16, 8] tokens: last dims 4 = experts, 259 = vocabulary, 8 = keys (attention logits),
  32 = d_model or expert width, 64 = d_ff."""
  cfg = model_config(_config('bfloat16', param_dtype))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((16, 8), jnp.int32)
  jaxpr = str(jax.make_jaxpr(lambda t: model(t, train=True, rng=jax.random.PRNGKey(0)))(tokens))
  found = {}
  for dtype, shape in re.findall(r':(\w+)\[([\d,]*)\] = dot_general', jaxpr):
    found.setdefault(dtype, set()).add(int(shape.split(',')[-1]))
  return found


@pytest.mark.parametrize('param_dtype', ['float32', 'bfloat16'])
def test_blocks_compute_in_bfloat16_router_and_head_in_float32(param_dtype):
  found = _matmul_dtypes(param_dtype)
  # float32: the router logits and its load statistics [.., E], the head [.., V] and the
  # attention logits [.., keys] (the softmax's input); nothing of width d_model, d_ff or expert.
  assert found['f32'] == {4, 259, 8}, found
  # bfloat16: the attention and FFN projections and the experts.
  assert {32, 64} <= found['bf16'], found


def _loss_curve(dtype: str) -> np.ndarray:
  """Per-step train losses of STEPS AdamW steps (the config's optimizer, float32 state) of a
  one-block tiny model on consecutive windows of a source file, in compute dtype `dtype`."""
  config = _config(dtype)
  config.model.num_layers = config.moe.every = 1  # One MoE block: half the compile.
  cfg = model_config(config)
  graphdef, params, buffers = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)),
                                        *layers.STATE_FILTERS)
  params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
  tx, _ = train_state.make_optimizer(config.opt, STEPS)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(losses.compute_loss, has_aux=True)(
        params, buffers, graphdef, batch, jax.random.PRNGKey(0), cfg)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  text = np.frombuffer(open(losses.__file__, 'rb').read(), np.uint8).astype(np.int32)
  B, L = config.batch_size, config.data.seq_len
  opt_state, curve = tx.init(params), []
  for i in range(STEPS):
    tokens = text[i * B * L:][:B * (L + 1)].reshape(B, L + 1)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
             'weights': np.ones((B, L), np.float32)}
    params, opt_state, loss = step(params, opt_state, batch)
    curve.append(float(loss))
  return np.array(curve)


def test_bfloat16_loss_curve_tracks_float32():
  f32, bf16 = _loss_curve('float32'), _loss_curve('bfloat16')
  assert f32[-3:].mean() < f32[:3].mean() - 0.5, f32  # The curve falls: there is a curve to track.
  np.testing.assert_array_less(np.abs(bf16 - f32), LOSS_TOLERANCE, err_msg=f'{f32}\n{bf16}')
  assert np.any(bf16 != f32)  # And bfloat16 really ran.
