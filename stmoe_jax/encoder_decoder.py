"""T5-style encoder-decoder (Switch Transformer's and ST-MoE's setting) on the decoder's blocks.

The encoder is `num_encoder_layers` bidirectional `transformer.Block`s (`causal=False`: their
MoE layers may use expert-choice or Batch Prioritized Routing, `ModelConfig.encoder_config`);
the decoder is `num_layers` causal blocks with cross-attention to the encoder output between
self-attention and FFN. Every `moe.every`-th FFN of either stack is an MoE layer. One byte
embedding (with the span-corruption sentinels) feeds both stacks; the output head is untied, as
in `transformer.Transformer`.

Einsum letters: B batch, T encoder length, L decoder length, D model dim, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax import layer_stats
from stmoe_jax import layers
from stmoe_jax.attention import CrossAttention, CrossCache, KVCache
from stmoe_jax.config import ModelConfig
from stmoe_jax.transformer import Block


class DecoderBlock(Block):
  """A causal `Block` with cross-attention (pre-norm, residual) after its self-attention."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, layer, rngs=rngs)
    self.cross_norm = layers.RMSNorm(cfg.d_model, rngs=rngs)
    self.cross = CrossAttention(cfg, rngs=rngs)

  def __call__(self, x_BLD, positions_BL, cross: CrossCache, *, train: bool, rng=None,
               mask_BL=None):
    """Returns ([B, L, D] output, the block's report as `Block.__call__`)."""
    a_BLD, attn_stats = self.attn(self.attn_norm(x_BLD), positions_BL, mask_BL=mask_BL)
    x_BLD = x_BLD + a_BLD.astype(x_BLD.dtype)
    x_BLD = x_BLD + self.cross(self.cross_norm(x_BLD), cross).astype(x_BLD.dtype)
    x_BLD, stats = self.feed_forward(x_BLD, train=train, rng=rng, mask_BL=mask_BL)
    return x_BLD, {'moe': stats, 'attention': attn_stats}

  def decode(self, x_BLD, cache: KVCache, cross: CrossCache) -> tuple[jax.Array, KVCache]:
    """`__call__` at eval capacity for L new tokens after the cached ones."""
    a_BLD, cache = self.attn.decode(self.attn_norm(x_BLD), cache)
    x_BLD = x_BLD + a_BLD.astype(x_BLD.dtype)
    x_BLD = x_BLD + self.cross(self.cross_norm(x_BLD), cross).astype(x_BLD.dtype)
    return self.feed_forward(x_BLD, train=False)[0], cache


class EncoderDecoder(nnx.Module):
  """Byte-level encoder-decoder: encoder tokens [B, T] and decoder tokens [B, L] -> logits
  [B, L, V] (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    encoder_cfg = cfg.encoder_config()
    self.embed = layers.param(rngs, jax.nn.initializers.normal(1.0),
                              (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'))
    self.encoder_blocks = nnx.List([Block(encoder_cfg, i, rngs=rngs, causal=False)
                                    for i in range(cfg.num_encoder_layers)])
    self.encoder_norm = layers.RMSNorm(cfg.d_model, rngs=rngs)
    self.decoder_blocks = nnx.List([DecoderBlock(cfg, i, rngs=rngs)
                                    for i in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, rngs=rngs)
    self.lm_head = layers.param(rngs, layers.switch_init(cfg.init_scale),
                                (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'))
    self.dtype = jnp.dtype(cfg.dtype)
    self.encoder_stat_dims = layer_stats.dims(encoder_cfg)  # K differs with expert choice.
    self.decoder_stat_dims = layer_stats.dims(cfg)
    self.mesh_rules = cfg.mesh_rules

  def constrain(self, x_BLD: jax.Array) -> jax.Array:
    """A residual stream [B, L, D] sharded by its logical names (batch, length, embed) on the
    Trainer's mesh (as `Transformer.constrain`); a no-op on one device."""
    if self.mesh_rules is None:
      return x_BLD
    return self.mesh_rules.constrain(x_BLD, ('batch', 'length', 'embed'))

  def _embed(self, tokens_BL: jax.Array) -> jax.Array:
    return self.constrain(jnp.take(self.embed[...], tokens_BL, axis=0).astype(self.dtype))

  def encode(self, tokens_BT: jax.Array, mask_BT: jax.Array, *, train: bool = False,
             rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The encoder: int32 tokens [B, T] with mask [B, T] (nonzero = real) -> (normed output
    [B, T, D], its stats stacked by `layer_stats.stack`)."""
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    x_BTD = self._embed(tokens_BT)
    per_layer = []
    for i, block in enumerate(self.encoder_blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x_BTD, report = block(x_BTD, positions_BT, train=train, rng=layer_rng, mask_BL=mask_BT)
      x_BTD = self.constrain(x_BTD)
      per_layer.append(report)
    return self.encoder_norm(x_BTD), layer_stats.stack(per_layer, self.encoder_stat_dims)

  def cross_caches(self, encoded_BTD: jax.Array, mask_BT: jax.Array) -> tuple[CrossCache, ...]:
    """Every decoder layer's cross-attention keys and values of one encoder output: computed
    once per input, read by every decoding step."""
    return tuple(block.cross.kv(encoded_BTD, mask_BT) for block in self.decoder_blocks)

  def __call__(self, encoder_tokens_BT: jax.Array, decoder_tokens_BL: jax.Array, *,
               train: bool = False, rng: jax.Array | None = None,
               encoder_mask_BT: jax.Array | None = None,
               decoder_mask_BL: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward pass (teacher forcing).

    Args:
      encoder_tokens_BT, decoder_tokens_BL: int32 token ids.
      train, rng: as `Transformer.__call__`.
      encoder_mask_BT: nonzero for real encoder tokens (default all): padding is hidden from
        attention and never routed. decoder_mask_BL: the same for decoder routing.
    Returns:
      (logits_BLV in float32, stats): each stack's `layer_stats.stack` stats under
      `layer_stats.key(name, 'encoder')` and `layer_stats.key(name, 'decoder')`.
    """
    if encoder_mask_BT is None:
      encoder_mask_BT = jnp.ones(encoder_tokens_BT.shape, bool)
    encoder_rng, decoder_rng = (None, None) if rng is None else jax.random.split(rng)
    encoded_BTD, encoder_stats = self.encode(encoder_tokens_BT, encoder_mask_BT, train=train,
                                             rng=encoder_rng)
    crosses = self.cross_caches(encoded_BTD, encoder_mask_BT)
    positions_BL = jnp.broadcast_to(jnp.arange(decoder_tokens_BL.shape[1]),
                                    decoder_tokens_BL.shape)
    x_BLD = self._embed(decoder_tokens_BL)
    per_layer = []
    for i, (block, cross) in enumerate(zip(self.decoder_blocks, crosses)):
      layer_rng = None if decoder_rng is None else jax.random.fold_in(decoder_rng, i)
      x_BLD, report = block(x_BLD, positions_BL, cross, train=train, rng=layer_rng,
                            mask_BL=decoder_mask_BL)
      x_BLD = self.constrain(x_BLD)
      per_layer.append(report)
    decoder_stats = layer_stats.stack(per_layer, self.decoder_stat_dims)
    stats = {**{layer_stats.key(k, 'encoder'): v for k, v in encoder_stats.items()},
             **{layer_stats.key(k, 'decoder'): v for k, v in decoder_stats.items()}}
    return self._logits(x_BLD), stats

  def _logits(self, x_BLD: jax.Array) -> jax.Array:
    # The head runs in float32: its logits feed a softmax (ST-MoE: exponentiate in float32).
    return layers.dense(self.final_norm(x_BLD).astype(jnp.float32), self.lm_head[...])

  def decode(self, tokens_BL: jax.Array, caches: tuple[KVCache, ...],
             crosses: tuple[CrossCache, ...]) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Incremental decoder pass: logits [B, L, V] for L tokens that follow the cached ones.

    `caches`: one self-attention `KVCache` per decoder layer (`init_caches`); `crosses`: the
    `cross_caches` of the encoded input. Call with the decoder prompt first, then one token
    at a time; MoE layers route as in `Transformer.decode`.
    """
    x_BLD = jnp.take(self.embed[...], tokens_BL, axis=0).astype(self.dtype)
    new_caches = []
    for block, cache, cross in zip(self.decoder_blocks, caches, crosses):
      x_BLD, cache = block.decode(x_BLD, cache, cross)
      new_caches.append(cache)
    return self._logits(x_BLD), tuple(new_caches)


def init_caches(cfg: ModelConfig, batch: int, length: int) -> tuple[KVCache, ...]:
  """Empty decoder self-attention caches for `length` positions, one per decoder layer."""
  return tuple(KVCache.zeros(batch, length, cfg) for _ in range(cfg.num_layers))
