"""Sparse attention against references written here: masked dense attention, per-token loops."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from configs import tiny
from stmoe_jax.nn import attention
from stmoe_jax.config import AttentionConfig
from stmoe_jax.moe.head_routing import HeadRoutedAttention
from stmoe_jax.nn.sparse_attention import (PatternAttention, attend_at_positions, key_block_table,
                                        sparse_attention)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Block 8 with a window of 11 and stride 5: neither lines up with the blocks.
ATT = AttentionConfig(block_size=8, window=11, stride=5, num_local_blocks=2, num_global_blocks=1)
KINDS = ('local', 'strided', 'block_sparse')


def reference_mask(kind, L, att=ATT):
  """bool [L, L] written from the pattern definitions, one (i, j) pair at a time."""
  mask = np.zeros((L, L), bool)
  for i in range(L):
    for j in range(i + 1):
      if kind == 'dense':
        mask[i, j] = True
      elif kind == 'local':
        mask[i, j] = i - j < att.window
      elif kind == 'strided':
        mask[i, j] = i - j < att.window or (i - j) % att.stride == 0
      elif kind == 'block_sparse':
        bi, bj = i // att.block_size, j // att.block_size
        mask[i, j] = bi - bj < att.num_local_blocks or bj < att.num_global_blocks
  return mask


def masked_dense_attention(q, k, v, mask):
  """The full [L, L] softmax with `mask`: the computation the sparse kinds must equal."""
  logits = jnp.einsum('blhk,bshk->bhls', q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask, logits, -jnp.inf)
  return jnp.einsum('bhls,bshk->blhk', jax.nn.softmax(logits, axis=-1), v)


def qkv(L, seed=0, B=2, H=3, K=4):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(key, (B, L, H, K)) for key in keys]


@pytest.mark.parametrize('kind', KINDS)
def test_pattern_equals_dense_attention_with_its_mask(kind):
  # 13 and 37 are not multiples of the block (8) or the stride (5); 32 is of the block.
  for L in (13, 32, 37):
    q, k, v = qkv(L)
    mask = reference_mask(kind, L)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    sparse = lambda q, k, v: jnp.sum(sparse_attention(q, k, v, kind, ATT)[0] * cotangent)
    dense = lambda q, k, v: jnp.sum(masked_dense_attention(q, k, v, mask) * cotangent)

    @jax.jit  # One compilation per length instead of one per primitive.
    def both(q, k, v):
      logits = jnp.einsum('blhk,bshk->blhs', q, k) / 2.0  # sqrt(K = 4)
      lse = jax.nn.logsumexp(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1)
      return (sparse_attention(q, k, v, kind, ATT), (masked_dense_attention(q, k, v, mask), lse),
              jax.grad(sparse, argnums=(0, 1, 2))(q, k, v),
              jax.grad(dense, argnums=(0, 1, 2))(q, k, v))

    (out, lse), (want_out, want_lse), grads, want_grads = both(q, k, v)
    np.testing.assert_allclose(out, want_out, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5)
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(got, want, atol=5e-6)


@pytest.mark.parametrize('kind', KINDS + ('dense',))
def test_decode_step_with_one_query_over_cached_keys(kind):
  # One query at position t over a cache of keys at explicit positions, as a decode step sees
  # them: equal to row t of the full computation. `local` keeps only its window, in ring-buffer
  # order with an empty slot (position -1).
  L, t = 37, 30
  q, k, v = qkv(L)
  full, _ = jax.jit(sparse_attention, static_argnums=(3, 4))(q, k, v, kind, ATT)
  if kind == 'local':
    slots = np.array([(t - ATT.window + 1 + s) for s in range(ATT.window)] + [-1])
    slots = np.roll(slots, 4)
  else:
    slots = np.arange(t + 1)[::-1]
  k_pos = jnp.broadcast_to(jnp.asarray(slots), (2, len(slots)))
  take = lambda x: jnp.where((k_pos >= 0)[..., None, None], x[:, np.maximum(slots, 0)], 0.0)
  q_pos = jnp.full((2, 1), t)
  out, _ = jax.jit(attend_at_positions, static_argnums=(5, 6))(
      q[:, t:t + 1], take(k), take(v), q_pos, k_pos, kind, ATT)
  np.testing.assert_allclose(out[:, 0], full[:, t], atol=2e-6)


def small_cfg(**att):
  return tiny_model_config(num_heads=4,
                           attention={**dataclasses.asdict(ATT), **att})


def test_pattern_kinds_share_grouped_kv_heads_as_dense_attention_does():
  """With 2 key/value heads for 4 query heads, the 'dense' pattern (PatternAttention's own
  computation over repeated heads) equals CausalSelfAttention (dot_product_attention's
  grouping, checked against HF's in tests/models/test_hf_arch.py) on the same parameters."""
  cfg = small_cfg(num_kv_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 13, 16))
  positions = jnp.broadcast_to(jnp.arange(13), (2, 13))
  run = nnx.jit(lambda layer, x: layer(x, positions)[0])
  dense = attention.CausalSelfAttention(cfg, rngs=nnx.Rngs(0))
  pattern = PatternAttention(cfg, 'dense', rngs=nnx.Rngs(0))
  assert dense.w_k.shape == pattern.w_k.shape == (16, 2, 8)
  np.testing.assert_allclose(run(pattern, x), run(dense, x), atol=2e-6)
  # `local` decodes over a ring of the 2 key/value heads (window 11 < 13 positions).
  local = PatternAttention(cfg, 'local', rngs=nnx.Rngs(0))

  @nnx.jit
  def decode(layer, x):
    out, cache = layer.decode(x[:, :9], attention.KVCache.zeros(2, ATT.window, cfg))
    step = lambda cache, x_B1D: layer.decode(x_B1D[:, None], cache)[::-1]
    cache, outs = jax.lax.scan(step, cache, jnp.swapaxes(x[:, 9:], 0, 1))
    assert cache.k.shape == (2, ATT.window, 2, 8)
    return jnp.concatenate([out, jnp.swapaxes(outs[:, :, 0], 0, 1)], axis=1)

  np.testing.assert_allclose(decode(local, x), run(local, x), atol=2e-6)


@pytest.mark.parametrize('kind', KINDS + ('head_routed',))
def test_changing_a_later_token_never_changes_earlier_outputs(kind):
  cfg = small_cfg(head_capacity_factor=0.75)  # Head-routed: capacity drops happen, causally.
  layer = (HeadRoutedAttention(cfg, rngs=nnx.Rngs(0)) if kind == 'head_routed'
           else PatternAttention(cfg, kind, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(layer)
  positions = jnp.broadcast_to(jnp.arange(29), (2, 29))
  run = jax.jit(lambda x: nnx.merge(graphdef, state)(x, positions)[0])
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 29, 16))
  y = run(x)
  for t in (3, 17, 25):
    y_changed = run(x.at[:, t].add(1.0))
    np.testing.assert_array_equal(y[:, :t], y_changed[:, :t])
    # Not y[:, t] alone: a head-routed token whose choices were all dropped outputs zero.
    assert not np.allclose(y[:, t:], y_changed[:, t:])


def test_local_flops_grow_linearly_and_are_a_fraction_of_dense():
  # Work not done, measured: XLA's own FLOP count of the compiled functions.
  att = AttentionConfig(block_size=64, window=256)

  def flops(kind, L):
    q = jax.ShapeDtypeStruct((1, L, 2, 16), jnp.float32)
    compiled = jax.jit(lambda q, k, v: sparse_attention(q, k, v, kind, att)[0]).lower(
        q, q, q).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']

  local_2k, local_4k, dense_4k = flops('local', 2048), flops('local', 4096), flops('dense', 4096)
  # Local sees 5 blocks of 64 (window 256 + the query's own block) = 320 keys per query.
  assert 1.9 < local_4k / local_2k < 2.1
  assert local_4k < dense_4k / 5


def test_key_block_tables():
  att = AttentionConfig(block_size=4, window=6, num_local_blocks=2, num_global_blocks=1)
  # Window 6 reaches back ceil(5 / 4) = 2 blocks.
  np.testing.assert_array_equal(key_block_table('local', att, 4),
                                [[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [1, 2, 3]])
  # The global block 0 in its own column, used only where it is not also local.
  np.testing.assert_array_equal(key_block_table('block_sparse', att, 5),
                                [[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4]])


def test_train_py_trains_a_sparse_attention_config(stdlib_data_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), '--config=configs/tiny.py',
       f'--workdir={tmp_path}', f'--config.data.data_dir={stdlib_data_dir}',
       "--config.attention.layer_kinds=local,head_routed", '--config.attention.block_size=8',
       '--config.attention.window=12', '--config.attention.logit_z_loss_coef=1e-4',
       '--config.attention.head_top_k=1',
       '--config.num_train_steps=8', '--config.log_every_steps=2', '--config.eval_batches=1',
       '--config.eval_every_steps=8', '--config.checkpoint_every_steps=8'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    train = [r for r in map(json.loads, f) if r['kind'] == 'train']
  assert [r['step'] for r in train] == [2, 4, 6, 8]
  losses = [r['loss'] for r in train]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses
  # The head-routed layer (tiny: top-1 of 2 heads) reports its balance loss, >= 1 with 1.0 for
  # a uniform router, and its busiest head's load relative to the mean, in [1, 2].
  assert all(1.0 <= r['attn_balance_loss'] < 2.0 and r['attn_logit_z_loss'] > 0 for r in train)
  assert all(1.0 <= r['max_head_load'] <= 2.0 for r in train)


def test_benchmark_quick_prints_json_lines():
  result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'attention.py'),
                           '--quick', '--kinds=dense,local,head_routed'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  assert [(r['kind'], r['seq_len']) for r in rows] == [
      ('dense', 128), ('local', 128), ('head_routed', 128)]
  for r in rows:
    assert r['seq_len'] > 0 and r['fwd_bwd_ms'] > 0 and r['peak_bytes'] > 0
