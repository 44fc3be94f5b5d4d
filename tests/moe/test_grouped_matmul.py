"""grouped_matmul: the blocked layout and every implementation against a numpy loop over groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe_jax.moe import grouped_matmul as gmm
from stmoe_jax.errors import ConfigError

SIZES = np.array([10, 0, 3, 20])  # 33 rows in groups (one empty), then 4 rows in none.


def loop_reference(x, w, sizes):
  """Row r of group e times w[e]; rows past the last group are zero."""
  out, start = np.zeros((x.shape[0], w.shape[-1])), 0
  for e, n in enumerate(sizes):
    out[start:start + n] = x[start:start + n].astype(np.float64) @ w[e]
    start += n
  return out


def test_block_layout_pads_each_group_to_whole_blocks():
  layout = gmm.block_layout(jnp.asarray(SIZES), num_rows=37, block=4)
  # Groups padded to 12, 0, 4, 20 rows: blocks 0-2 group 0, block 3 group 2, blocks 4-8 group 3.
  np.testing.assert_array_equal(layout.dest_X[:10], np.arange(10))
  np.testing.assert_array_equal(layout.dest_X[10:13], [12, 13, 14])
  np.testing.assert_array_equal(layout.dest_X[13:33], np.arange(16, 36))
  assert layout.group_N.shape == (-(-37 // 4) + 4,)  # ceil(X / B) + E blocks.
  np.testing.assert_array_equal(layout.dest_X[33:], 14 * 4)  # In no group: dropped.
  np.testing.assert_array_equal(layout.group_N[:9], [0, 0, 0, 2, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(layout.used_N, np.arange(14) < 9)


@pytest.mark.parametrize('impl, block', [('ragged_dot', None), ('blocked', 1), ('blocked', 4),
                                         ('blocked', 64),
                                         ('megablox', None),  # Pallas interpret mode off TPU.
                                         ('tokamax', None)])  # Its XLA fallback off GPU/TPU.
def test_grouped_matmul_matches_the_loop_in_outputs_and_gradients(impl, block):
  """Every backend (the CPU fallback of the accelerator kernels) against the loop."""
  assert impl in gmm.BACKENDS
  rng = np.random.RandomState(0)
  x, w = rng.randn(37, 5).astype(np.float32), rng.randn(4, 5, 7).astype(np.float32)
  cotangent = rng.randn(37, 7)
  f = jax.jit(lambda x, w: gmm.grouped_matmul(x, w, jnp.asarray(SIZES), impl=impl, block=block))
  np.testing.assert_allclose(f(x, w), loop_reference(x, w, SIZES), rtol=1e-5, atol=1e-5)
  dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), (0, 1))(x, w)
  # d/dx: row r of group e gets cotangent_r w[e]^T (zero past the last group);
  # d/dw[e] = x_e^T cotangent_e.
  dx_ref, dw_ref, start = np.zeros_like(dx), np.zeros_like(dw), 0
  for e, n in enumerate(SIZES):
    dx_ref[start:start + n] = cotangent[start:start + n] @ w[e].T
    dw_ref[e] = x[start:start + n].T @ cotangent[start:start + n]
    start += n
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_blocked_bfloat16_sums_gradients_in_float32():
  """bfloat16 in and out; dw summed over 20 one-row blocks in float32, so it matches the
  float64 loop to bfloat16 rounding of the result, not 20 roundings."""
  rng = np.random.RandomState(1)
  x, w = rng.randn(37, 5), rng.randn(4, 5, 7)
  cotangent = rng.randn(37, 7)
  as_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  f = lambda x, w: gmm.grouped_matmul(x, w, jnp.asarray(SIZES), impl='blocked', block=1)
  y, vjp = jax.vjp(f, as_bf16(x), as_bf16(w))
  dx, dw = vjp(as_bf16(cotangent))
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  x64, w64 = np.asarray(as_bf16(x), np.float64), np.asarray(as_bf16(w), np.float64)
  ct64 = np.asarray(as_bf16(cotangent), np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), loop_reference(x64, w64, SIZES),
                             rtol=1e-2, atol=1e-2)
  dw_ref = x64[13:33].T @ ct64[13:33]  # Group 3: rows 13..32.
  np.testing.assert_allclose(np.asarray(dw[3], np.float64), dw_ref, rtol=8e-3, atol=2e-2)


def test_bad_implementation_is_named():
  with pytest.raises(ConfigError, match="^moe.grouped_matmul='cutlass' is invalid: expected one "
                     "of \\('auto', 'ragged_dot', 'blocked', 'megablox', 'tokamax'\\)$"):
    gmm.resolve('cutlass')


def test_auto_picks_each_platforms_fastest_available_backend(monkeypatch):
  assert gmm.IMPLEMENTATIONS == ('auto', *gmm.BACKENDS)
  assert gmm.resolve('auto', 'cpu') == 'blocked'
  assert gmm.resolve('auto', 'gpu') == 'tokamax'
  assert gmm.resolve('auto', 'tpu') == 'megablox'
  # Under expert parallelism megablox (not typed for shard_map) gives way to tokamax.
  assert gmm.resolve('auto', 'tpu', in_shard_map=True) == 'tokamax'
  assert gmm.resolve('auto') == gmm.resolve('auto', gmm.platform())
  for name in gmm.IMPLEMENTATIONS[1:]:
    assert gmm.resolve(name, 'gpu') == name
  # Every auto choice is known-good on its platform.
  for on, order in gmm.AUTO_ORDER.items():
    assert on in gmm.BACKENDS[gmm.resolve('auto', on)].known_good
  # Without the tokamax package: auto falls back to XLA's ragged_dot on GPU, and asking for
  # tokamax by name fails in one line naming the package.
  monkeypatch.setattr(gmm, 'available', lambda package: package is None)
  assert gmm.resolve('auto', 'gpu') == 'ragged_dot'
  assert gmm.resolve('auto', 'tpu', in_shard_map=True) == 'ragged_dot'
  with pytest.raises(ConfigError, match="^moe.grouped_matmul needs the Python package 'tokamax', "
                     r"which is not installed \(pip install tokamax==[0-9.]+\)$"):
    gmm.grouped_matmul(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.asarray([2, 2]), impl='tokamax')


def test_megablox_is_refused_under_expert_parallelism():
  with pytest.raises(ConfigError, match="^moe.grouped_matmul='megablox' cannot run under expert "
                     r"parallelism .*: expected one of \('ragged_dot', 'blocked', 'tokamax'\)$"):
    gmm.resolve('megablox', in_shard_map=True)
