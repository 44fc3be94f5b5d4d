"""Head-routed attention against a per-token loop over its chosen heads."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import tiny_model_config
from stmoe_jax.moe import routing
from stmoe_jax.moe.head_routing import HeadRoutedAttention


def small_cfg(**att):
  # Attention blocks of 8 (the dense pattern over the shared keys is computed block by block).
  return tiny_model_config(num_heads=4, attention=dict(block_size=8, window=11, stride=5,
                                                       num_local_blocks=2, num_global_blocks=1,
                                                       **att))


def rotary(x_LK, positions, max_wavelength):
  half = x_LK.shape[-1] // 2
  angle = positions[:, None] * max_wavelength ** (-np.arange(half) / half)
  x1, x2 = x_LK[:, :half], x_LK[:, half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def test_head_routed_equals_a_per_token_loop_over_its_chosen_heads():
  # 4 heads, top-2, capacity ceil(0.75 * 2 * 12 / 4) = 5 < the 6 choices a head gets on
  # average: some choices are dropped, which the loop decides on its own, first come first
  # served in token order.
  cfg = small_cfg(head_top_k=2, head_capacity_factor=0.75)
  layer = HeadRoutedAttention(cfg, rngs=nnx.Rngs(0))
  B, L, H, R, K = 2, 12, 4, 2, 8
  x = jax.random.normal(jax.random.PRNGKey(3), (B, L, 16))
  graphdef, state = nnx.split(layer)
  y, stats = jax.jit(lambda x: nnx.merge(graphdef, state)(
      x, jnp.broadcast_to(jnp.arange(L), (B, L))))(x)
  p = {name: np.asarray(getattr(layer, name)[...], np.float64)
       for name in ('router', 'w_q', 'w_k', 'w_v', 'w_o')}
  xs, capacity, wl = np.asarray(x, np.float64), 5, cfg.rope_max_wavelength
  assert layer.capacity(L) == capacity
  want, load, dropped = np.zeros((B, L, 16)), np.zeros(H), 0
  for b in range(B):
    logits = xs[b] @ p['router']
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keys = rotary(xs[b] @ p['w_k'], np.arange(L), wl)
    values = xs[b] @ p['w_v']
    arrived = np.zeros(H, int)
    for t in range(L):
      chosen = np.argsort(-probs[t])[:R]
      gates = probs[t, chosen] / probs[t, chosen].sum()
      for h, gate in zip(chosen, gates):
        load[h] += 1
        arrived[h] += 1
        if arrived[h] > capacity:
          dropped += 1
          continue
        q = rotary((xs[b, t] @ p['w_q'][h])[None], np.array([t]), wl)[0]
        scores = keys[:t + 1] @ q / np.sqrt(K)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        want[b, t] += gate * ((weights @ values[:t + 1]) @ p['w_o'][h])
  assert dropped > 0
  np.testing.assert_allclose(y, want, atol=1e-5)
  np.testing.assert_allclose(stats['head_load'], load / load.sum(), atol=1e-6)
  np.testing.assert_allclose(stats['dropped_fraction'], dropped / (B * L * R), atol=1e-6)
  route = layer.route(x)
  np.testing.assert_allclose(stats['balance_loss'],
                             routing.load_balancing_loss(route.probs, route.expert_index))
