"""Autoregressive text generation with a KV cache (sample.py's logic:
`entry_points.sample_workdir`).

Einsum letters: B batch, L length, V vocabulary.

Decoding runs `Transformer.decode`: the prompt in one call, then one token per call, each
attending over the cached keys/values. MoE layers route every token in its own group of one
(`decoding_config`), so capacity is never short and nothing is dropped: a token's output is what
a dropless forward pass gives, whatever else is in the batch. The cache holds the model's
training context (`data.seq_len`, a `local` attention layer only its last `window` positions);
when the text outgrows the context, the newest half of it is prefilled into fresh caches, so no
position is ever past those seen in training.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmoe_jax.models import encoder_decoder
from stmoe_jax.config import ModelConfig
from stmoe_jax.data import span_corruption
from stmoe_jax.data import tokenizer
from stmoe_jax.models.transformer import Transformer, init_caches
from stmoe_jax.nn import layers


def decoding_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with MoE routing groups of one token: dropless, valid for any [B, L] decode call.

  A group of one token gets capacity min(group_size, ...) = 1 per expert, and a token's k
  choices go to k different experts, so every choice is kept.
  """
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, group_size=1))


def check_sampling_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
  """Raises ValueError naming the first argument out of range."""
  for name, value, ok, expected in (
      ('max_new_tokens', max_new_tokens, max_new_tokens >= 0, 'an integer >= 0'),
      ('temperature', temperature, 0 <= temperature < math.inf,
       'a finite number >= 0 (0 = greedy)'),
      ('top_p', top_p, 0 < top_p <= 1, 'in (0, 1] (1 = off)')):
    if not ok:
      raise ValueError(f'{name}={value} is invalid: expected {expected}')


def sample_token(logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array,
                 top_p: jax.Array,
                 banned_ids: tuple[int, ...] = (tokenizer.PAD_ID, tokenizer.BOS_ID)) -> jax.Array:
  """Draws one token per row from float32 logits [B, V] -> int32 [B].

  temperature 0 is greedy (argmax). Otherwise nucleus sampling (Holtzman et al. 2020): keep the
  most probable tokens until their probability reaches `top_p` (always at least one), renormalise,
  sample at `temperature`. `banned_ids`, the tokenizer's PAD and BOS, are never drawn: they do
  not occur inside a text.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  logits_BV = logits_BV.at[:, jnp.array(banned_ids)].set(-jnp.inf)
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  probs_BV = jax.nn.softmax(scaled_BV, axis=-1)
  sorted_BV = -jnp.sort(-probs_BV, axis=-1)
  # A token is in the nucleus if the tokens more probable than it sum to less than top_p.
  in_nucleus_BV = jnp.cumsum(sorted_BV, axis=-1) - sorted_BV < top_p
  threshold_B = jnp.min(jnp.where(in_nucleus_BV, sorted_BV, jnp.inf), axis=-1)
  nucleus_BV = jnp.where(probs_BV >= threshold_B[:, None], scaled_BV, -jnp.inf)
  sampled_B = jax.random.categorical(rng, nucleus_BV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


def _abstract(make):
  """The graphdef and shape-only (params, buffers) states of the module `make()` builds."""
  return nnx.split(nnx.eval_shape(make), *layers.STATE_FILTERS)


class Sampler:
  """Generates text from a model's parameters; jitted functions are built once and reused.

  Args:
    cfg: the model's config (routing is switched to dropless groups of one token).
    context_len: positions kept before a restart, normally the training `data.seq_len`: the KV
      cache length of every layer but `local` ones, whose ring buffers hold `window` slots.
    tok: the `tokenizer.Tokenizer` the model was trained with (default: bytes).
  """

  def __init__(self, cfg: ModelConfig, context_len: int,
               tok: tokenizer.Tokenizer | None = None):
    if context_len < 2:
      raise ValueError(f'context_len={context_len} is invalid: expected at least 2')
    self.tok = tok or tokenizer.load()
    self.cfg = decoding_config(cfg)
    self.context_len = context_len
    self.graphdef, _, buffers = _abstract(lambda: Transformer(self.cfg, rngs=nnx.Rngs(0)))
    # Non-trainable state (router biases) for callers that pass parameters alone: zeros, what
    # a model trained without the aux-loss-free balancer has.
    self._zero_buffers = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                      nnx.to_pure_dict(buffers))
    self._forward = jax.jit(functools.partial(_last_logits, self.graphdef))
    self._sample = jax.jit(functools.partial(
        sample_token, banned_ids=(self.tok.pad_id, self.tok.bos_id)))

  def generate_tokens(self, params, prompt_ids, max_new_tokens: int, *, temperature: float = 0.8,
                      top_p: float = 0.95, seed: int = 0, stop_at_eos: bool = True,
                      buffers=None) -> np.ndarray:
    """Continues `prompt_ids` (int [P], special tokens allowed) by up to `max_new_tokens`.

    `params` is the model's parameter dict (`TrainState.params`); `buffers` its non-trainable
    state (`TrainState.buffers`: router biases), needed when the aux-loss-free balancer was on.

    Returns the new token ids, int32 [N] with N <= max_new_tokens (fewer if EOS came first;
    the EOS is not included).
    """
    check_sampling_args(max_new_tokens, temperature, top_p)
    context = [int(t) for t in prompt_ids] or [self.tok.bos_id]
    variables = (params, self._zero_buffers if buffers is None else buffers)
    # Counted in text, not cache slots: a `local` layer's ring never fills, the others would.
    context_len, keep = self.context_len, self.context_len // 2
    if len(context) >= context_len:
      context = context[-keep:]
    logits_BV, caches = self._prefill(variables, context)
    rng = jax.random.PRNGKey(seed)
    temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
    new_tokens = []
    for i in range(max_new_tokens):
      token = int(self._sample(logits_BV, jax.random.fold_in(rng, i), temperature, top_p)[0])
      if stop_at_eos and token == self.tok.eos_id:
        break
      new_tokens.append(token)
      context.append(token)
      if len(context) > context_len:  # Context full: restart from the newest half of the text.
        context = context[-keep:]
        logits_BV, caches = self._prefill(variables, context)
      else:
        logits_BV, caches = self._forward(variables, jnp.array([[token]], jnp.int32), caches)
    return np.asarray(new_tokens, np.int32)

  def generate_text(self, params, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """The generated continuation of `prompt` (read as the start of a file: BOS first), decoded
    with the tokenizer (invalid utf-8 becomes U+FFFD). kwargs as `generate_tokens`."""
    prompt_ids = [self.tok.bos_id, *self.tok.encode(prompt).tolist()]
    return self.tok.decode(self.generate_tokens(params, prompt_ids, max_new_tokens, **kwargs))

  def _prefill(self, variables, context: list[int]):
    caches = init_caches(self.cfg, 1, self.context_len)
    return self._forward(variables, jnp.array([context], jnp.int32), caches)


def _last_logits(graphdef, variables, tokens_BL, caches):
  """Runs `Transformer.decode` and keeps the logits of the last position: [B, V]."""
  params, buffers = variables
  logits_BLV, caches = nnx.merge(graphdef, params, buffers).decode(tokens_BL, caches)
  return logits_BLV[:, -1], caches


class EncoderDecoderSampler:
  """Text generation with the span-corruption encoder-decoder: the text so far goes to the
  encoder, followed by sentinel 0, and the decoder fills that span.

  The decoder starts from [BOS, sentinel 0], as its training targets begin, and runs with a KV
  cache for self-attention and the cross-attention keys/values computed once per encoding
  (`EncoderDecoder.cross_caches`); its MoE layers route per token (`decoding_config`), the
  encoder routes the one padded input as one group. A span ends at EOS or another sentinel, or
  when the decoder reaches its training length; the extended text is then encoded anew (its
  last `encoder_len - 1` tokens) and the next span requested, until `max_new_tokens` or an
  empty span.

  Args:
    cfg: the model's config.
    encoder_len, decoder_len: the training input and target lengths
      (`span_corruption.lengths`).
  """

  def __init__(self, cfg: ModelConfig, encoder_len: int, decoder_len: int):
    if decoder_len < 3:
      raise ValueError(f'decoder_len={decoder_len} is invalid: expected at least 3')
    moe = dataclasses.replace(cfg.moe, group_size=1, encoder_group_size=encoder_len)
    self.cfg = dataclasses.replace(cfg, moe=moe)
    self.encoder_len, self.decoder_len = encoder_len, decoder_len
    self.graphdef, _, buffers = _abstract(
        lambda: encoder_decoder.EncoderDecoder(self.cfg, rngs=nnx.Rngs(0)))
    self._zero_buffers = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                      nnx.to_pure_dict(buffers))
    self._encode = jax.jit(functools.partial(_encode, self.graphdef))
    self._decode = jax.jit(functools.partial(_decode_last, self.graphdef))
    self._sample = jax.jit(sample_token)

  def generate_tokens(self, params, prompt_ids, max_new_tokens: int, *, temperature: float = 0.8,
                      top_p: float = 0.95, seed: int = 0, stop_at_eos: bool = True,
                      buffers=None) -> np.ndarray:
    """The tokens that follow `prompt_ids` (int [P]), int32 [N <= max_new_tokens], bytes and
    specials as generated (sentinels and span-ending EOS left out). Arguments as
    `Sampler.generate_tokens`; generation always stops at an empty span, whatever
    `stop_at_eos`."""
    del stop_at_eos  # A span ends at EOS; an empty one ends generation.
    check_sampling_args(max_new_tokens, temperature, top_p)
    variables = (params, self._zero_buffers if buffers is None else buffers)
    context = [int(t) for t in prompt_ids] or [tokenizer.BOS_ID]
    rng, draws = jax.random.PRNGKey(seed), 0
    temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
    sentinel = span_corruption.sentinel(0)
    new_tokens = []
    while len(new_tokens) < max_new_tokens:
      encoder = context[-(self.encoder_len - 1):] + [sentinel]
      encoder += [tokenizer.PAD_ID] * (self.encoder_len - len(encoder))
      crosses = self._encode(variables, jnp.array([encoder], jnp.int32))
      caches = encoder_decoder.init_caches(self.cfg, 1, self.decoder_len)
      logits_BV, caches = self._decode(variables, jnp.array([[tokenizer.BOS_ID, sentinel]]),
                                       caches, crosses)
      span = []
      for _ in range(self.decoder_len - 2):
        token = int(self._sample(logits_BV, jax.random.fold_in(rng, draws), temperature,
                                 top_p)[0])
        draws += 1
        if token == tokenizer.EOS_ID or token >= tokenizer.VOCAB_SIZE:
          break
        span.append(token)
        if len(new_tokens) + len(span) == max_new_tokens:
          break
        logits_BV, caches = self._decode(variables, jnp.array([[token]], jnp.int32), caches,
                                         crosses)
      if not span:
        break
      new_tokens += span
      context += span
    return np.asarray(new_tokens, np.int32)

  def generate_text(self, params, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """As `Sampler.generate_text`: the utf-8 continuation of `prompt` read as a file's start."""
    prompt_ids = [tokenizer.BOS_ID, *tokenizer.encode(prompt).tolist()]
    return tokenizer.decode(self.generate_tokens(params, prompt_ids, max_new_tokens, **kwargs))


def _encode(graphdef, variables, tokens_BT):
  """The encoder output's cross-attention caches for every decoder layer, padding masked."""
  model = nnx.merge(graphdef, *variables)
  mask_BT = tokens_BT != tokenizer.PAD_ID
  return model.cross_caches(model.encode(tokens_BT, mask_BT)[0], mask_BT)


def _decode_last(graphdef, variables, tokens_BL, caches, crosses):
  """`EncoderDecoder.decode` keeping the logits of the last position: [B, V]."""
  logits_BLV, caches = nnx.merge(graphdef, *variables).decode(tokens_BL, caches, crosses)
  return logits_BLV[:, -1], caches
