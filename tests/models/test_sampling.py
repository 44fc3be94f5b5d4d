"""KV-cache decoding against full forward passes, and the nucleus sampler against numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model_config
from stmoe_jax.nn import layers
from stmoe_jax.models import sampling
from stmoe_jax.config import AttentionConfig, MoeConfig
from stmoe_jax.data import tokenizer
from stmoe_jax.models.transformer import Transformer, init_caches

# Eval capacity factor = E / k gives capacity = the whole group: the full forward drops nothing.
CFG = tiny_model_config(moe=dict(group_size=24, eval_capacity_factor=2.0))


@pytest.fixture(scope='module')
def model_and_params():
  model = Transformer(CFG, rngs=nnx.Rngs(3))
  # Larger router weights than the init, so that tokens disagree on their experts.
  model.blocks[1].ffn.router[...] *= 30.0
  return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))  # No router biases: all zero.


def test_cached_decoding_matches_full_forward(model_and_params):
  model, params = model_and_params
  graphdef = nnx.graphdef(model)
  buffers = nnx.to_pure_dict(nnx.split(model, *layers.STATE_FILTERS)[2])
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p, buffers)(t, train=False))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 256)
  full_logits, stats = forward(params, tokens)
  assert abs(float(jnp.max(stats['dropped_fraction']))) < 1e-6
  assert np.all(np.asarray(stats['expert_load']).max(-1) < 0.9)  # Experts really differ.
  decode_graphdef = sampling.Sampler(CFG, 16).graphdef  # Groups of one token.
  buffers = nnx.to_pure_dict(nnx.split(model, *layers.STATE_FILTERS)[2])
  decode = jax.jit(lambda p, t, c: nnx.merge(decode_graphdef, p, buffers).decode(t, c))
  caches = init_caches(CFG, 2, 16)
  prefix_logits, caches = decode(params, tokens[:, :5], caches)  # Prompt in one call...
  step_logits = [prefix_logits]
  for t in range(5, 12):  # ...then one token per call.
    logits, caches = decode(params, tokens[:, t:t + 1], caches)
    step_logits.append(logits)
  assert int(caches[0].end) == 12
  np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full_logits,
                             atol=2e-5, rtol=2e-5)
  # Groups of one token drop nothing for any batch shape, even at a tiny capacity factor.
  cfg = sampling.decoding_config(dataclasses.replace(
      CFG, moe=dataclasses.replace(CFG.moe, eval_capacity_factor=0.1)))
  _, stats = Transformer(cfg, rngs=nnx.Rngs(0))(jnp.zeros((3, 5), jnp.int32), train=False)
  assert abs(float(jnp.max(stats['dropped_fraction']))) < 1e-6


def test_greedy_generation_equals_argmax_of_full_forward(model_and_params):
  params = model_and_params[1]
  prompt = [tokenizer.BOS_ID, *tokenizer.encode('def ').tolist()]
  sampler = sampling.Sampler(CFG, 32)
  generated = sampler.generate_tokens(params, prompt, 10, temperature=0.0, stop_at_eos=False)
  # Reference: a full forward pass over the whole context for every new token. The context is
  # padded to 16 (one compilation); the model is causal, so padding after it changes nothing.
  graphdef = sampler.graphdef  # Groups of one token fit any length and drop nothing.
  buffers = sampler._zero_buffers  # The fixture model's router biases: all zero.
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p, buffers)(t, train=False)[0])
  context = list(prompt)
  for _ in range(10):
    logits = forward(params, jnp.array([context + [0] * (16 - len(context))]))
    last = np.array(logits[0, len(context) - 1])
    last[[tokenizer.PAD_ID, tokenizer.BOS_ID]] = -np.inf
    context.append(int(np.argmax(last)))
  assert generated.tolist() == context[len(prompt):]
  # Past the 32-slot cache the sampler restarts from the newest half and keeps going.
  long = sampler.generate_tokens(params, prompt, 70, temperature=0.0, stop_at_eos=False)
  assert long[:10].tolist() == generated.tolist() and len(long) == 70


def test_nucleus_sampling_draws_only_from_the_nucleus():
  probs = np.array([0.05, 0.4, 0.02, 0.3, 0.2, 0.03] + [0.0] * 253)
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  draws = np.array([int(sampling.sample_token(logits, jax.random.PRNGKey(i), jnp.float32(1.0),
                                              jnp.float32(0.65))[0]) for i in range(200)])
  # numpy reference: sorted 0.4, 0.3, ... -> 0.4 < 0.65, 0.4 + 0.3 >= 0.65: nucleus {1, 3}.
  order = np.argsort(-probs)
  nucleus = set(order[:np.searchsorted(np.cumsum(probs[order]), 0.65) + 1].tolist())
  assert nucleus == {1, 3} and set(draws.tolist()) == nucleus
  # Renormalised: token 1 with probability 0.4 / 0.7.
  assert abs(np.mean(draws == 1) - 0.4 / 0.7) < 0.1
  greedy = sampling.sample_token(logits, jax.random.PRNGKey(0), jnp.float32(0.0),
                                 jnp.float32(0.65))
  assert int(greedy[0]) == 1


def test_pad_and_bos_are_never_sampled():
  logits = jnp.zeros((1, 259)).at[0, tokenizer.BOS_ID].set(50.0).at[0, tokenizer.PAD_ID].set(50.0)
  token = sampling.sample_token(logits, jax.random.PRNGKey(0), jnp.float32(0.0), jnp.float32(1.0))
  assert int(token[0]) < tokenizer.PAD_ID


def test_bad_sampling_arguments_are_refused(model_and_params):
  with pytest.raises(ValueError, match='top_p=1.5'):
    sampling.Sampler(CFG, 8).generate_tokens(model_and_params[1], [1], 4, top_p=1.5)


# Block 4 and window 5: the 13-token text is not a multiple of the block and wraps the ring.
# 4 heads, top-2, capacity factor 2: head capacity = L, so the full forward drops nothing.
DECODE_ATT = AttentionConfig(block_size=4, window=5, stride=3, num_local_blocks=2,
                             num_global_blocks=1, head_top_k=2, head_capacity_factor=2.0)


# Two models cover every kind (fewer compilations than one model per kind); with the logit
# z-loss on, 'dense' is PatternAttention's (plain dense: the test above). The second also has
# grouped-query attention (2 key/value heads of 4: its caches hold 2), OLMoE's QK-norm and the
# interleaved rotary layout, which head-routed attention does not take.
@pytest.mark.parametrize('layer_kinds,z_loss,extra', [
    ('local,head_routed', 0.0, {}),
    ('strided,block_sparse,dense', 1e-3,
     dict(num_kv_heads=2, qk_norm='full', rope_layout='interleaved'))])
def test_every_attention_kind_decodes_like_the_full_forward(layer_kinds, z_loss, extra):
  kinds = layer_kinds.split(',')
  att = dataclasses.replace(DECODE_ATT, layer_kinds=layer_kinds, logit_z_loss_coef=z_loss,
                            **extra)
  cfg = dataclasses.replace(tiny_model_config(num_layers=len(kinds), num_heads=4),
                            moe=MoeConfig(enabled=False), attention=att)
  model = Transformer(cfg, rngs=nnx.Rngs(5))
  for block, kind in zip(model.blocks, kinds):
    if kind == 'head_routed':  # Larger router weights, so that tokens disagree on their heads.
      block.attn.router[...] *= 30.0
  graphdef, params, buffers = nnx.split(model, *layers.STATE_FILTERS)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, 256)
  forward = jax.jit(lambda t: nnx.merge(graphdef, params, buffers)(t))
  full_logits, stats = forward(tokens)
  if 'head_routed' in kinds:
    assert float(jnp.max(stats['attn_dropped_fraction'])) == 0.0
    assert np.all(np.asarray(stats['attn_head_load']).max(-1) < 0.45)  # Heads really differ.
  decode = jax.jit(lambda t, c: nnx.merge(graphdef, params, buffers).decode(t, c))
  caches = init_caches(cfg, 2, 16)
  # A 7-token prompt (longer than the window), a 2-token call over a full ring, then 1 by 1.
  chunks = [(0, 7), (7, 9)] + [(t, t + 1) for t in range(9, 13)]
  step_logits = []
  for start, stop in chunks:
    logits, caches = decode(tokens[:, start:stop], caches)
    step_logits.append(logits)
  np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full_logits, atol=2e-5,
                             rtol=2e-5)
  for cache, kind in zip(caches, kinds):
    slots, heads = 5 if kind == 'local' else 16, 1 if kind == 'head_routed' else cfg.kv_heads
    assert cache.k.shape == cache.v.shape == (2, slots, heads, 8), kind
    assert int(cache.end) == 13
    if kind == 'local':  # The newest 5 positions, position p in slot p % 5.
      assert np.asarray(cache.slot_positions()).tolist() == [10, 11, 12, 8, 9]
  if 'local' not in kinds:
    return
  # The sampler over window-sized rings: 10 greedy tokens after a 3-token prompt are the argmax
  # of the full forward pass over prompt + generated (13 tokens: the shape compiled above).
  sampler = sampling.Sampler(cfg, 16)
  prompt = tokens[0, :3].tolist()
  generated = sampler.generate_tokens(params, prompt, 10, temperature=0.0, stop_at_eos=False)
  text = jnp.array([prompt + generated.tolist()] * 2)
  logits = np.array(forward(text)[0][0])
  logits[:, [tokenizer.PAD_ID, tokenizer.BOS_ID]] = -np.inf
  assert generated.tolist() == np.argmax(logits[2:12], axis=-1).tolist()
  # Past the 16-position context it restarts from the newest 8 tokens and keeps going.
  long = sampler.generate_tokens(params, prompt, 20, temperature=0.0, stop_at_eos=False)
  assert long[:10].tolist() == generated.tolist() and len(long) == 20
