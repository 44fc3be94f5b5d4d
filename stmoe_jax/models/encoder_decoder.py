"""T5-style encoder-decoder (Switch Transformer's and ST-MoE's setting) on the decoder's blocks.

The encoder is `num_encoder_layers` bidirectional `transformer.Block`s (`causal=False`: their
MoE layers may use expert-choice or Batch Prioritized Routing, `ModelConfig.encoder_config`);
the decoder is `num_layers` causal blocks with cross-attention to the encoder output between
self-attention and FFN. Every `moe.every`-th FFN of either stack is an MoE layer. One byte
embedding (with the span-corruption sentinels) feeds both stacks; the output head is its own or
tied to the embedding (`model.tie_embeddings`), as in `transformer.Transformer`. As there,
`model.remat` rematerializes every block of both stacks (`remat.wrap`) and `model.scan_layers`
scans each stack over its repeating unit (`layer_scan`).

Einsum letters: B batch, T encoder length, L decoder length, D model dim, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax.models import layer_scan
from stmoe_jax.moe import layer_stats
from stmoe_jax.nn import layers
from stmoe_jax.nn import remat
from stmoe_jax.nn.attention import CrossAttention, CrossCache, KVCache
from stmoe_jax.config import ModelConfig
from stmoe_jax.models import transformer
from stmoe_jax.models.transformer import Block


class DecoderBlock(Block):
  """A causal `Block` with cross-attention (pre-norm, residual) after its self-attention."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, layer, rngs=rngs)
    self.cross_norm = layers.RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
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
    self.embed = transformer.embedding(cfg, rngs)
    make_encoder = lambda i, rngs: Block(encoder_cfg, i, rngs=rngs, causal=False)
    make_decoder = lambda i, rngs: DecoderBlock(cfg, i, rngs=rngs)
    # Unscanned: one block per layer. Scanned: one per position in the repeating unit (the same
    # period in both stacks), each stacked over its stack's units, as `Transformer`'s.
    self.scan_layers = cfg.scan_layers
    self.encoder_blocks = layer_scan.make_stack(make_encoder, cfg.num_encoder_layers, cfg, rngs)
    self.encoder_norm = layers.RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
    self.decoder_blocks = layer_scan.make_stack(make_decoder, cfg.num_layers, cfg, rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
    self.lm_head = transformer.output_head(cfg, rngs)
    self.dtype = jnp.dtype(cfg.dtype)
    self.encoder_stat_dims = layer_stats.dims(encoder_cfg)  # K differs with expert choice.
    self.decoder_stat_dims = layer_stats.dims(cfg)
    self.mesh_rules = cfg.mesh_rules
    self.remat = cfg.remat
    layers.store_params_as(self, cfg.param_dtype)

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
    run_block = lambda block, x, pos, key, mask: block(x, pos, train=train, rng=key, mask_BL=mask)
    x_BTD, stats = self._stack(self.encoder_blocks, run_block, x_BTD, positions_BT, rng, mask_BT,
                               self.encoder_stat_dims)
    return self.encoder_norm(x_BTD), stats

  def _stack(self, blocks, block_fn, x_BLD, positions_BL, rng, mask_BL, stat_dims, extra=()):
    """One stack's blocks over the residual stream [B, L, D] in layer order, each run by
    `block_fn(block, x, positions, key, mask, *extra)` under `model.remat`, layer i drawing
    `fold_in(rng, i)`; scanned or a loop (as `Transformer.__call__`). -> (x_BLD, stats
    stacked by `layer_stats.stack`)."""
    run_block = remat.wrap(block_fn, self.remat, in_scan=self.scan_layers)
    if self.scan_layers:
      return layer_scan.forward(blocks, run_block, x_BLD, positions_BL, rng, mask_BL,
                                self.constrain, stat_dims, extra)
    per_layer = []
    for i, block in enumerate(blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x_BLD, report = run_block(block, x_BLD, positions_BL, layer_rng, mask_BL, *extra)
      x_BLD = self.constrain(x_BLD)
      per_layer.append(report)
    return x_BLD, layer_stats.stack(per_layer, stat_dims)

  def cross_caches(self, encoded_BTD: jax.Array, mask_BT: jax.Array) -> tuple[CrossCache, ...]:
    """Every decoder layer's cross-attention keys and values of one encoder output: computed
    once per input, read by every decoding step. Scanned: one per position in the unit, each
    stacked over the units ([U, B, T, H, K]), as `decode` takes them."""
    kv = lambda block, encoded, mask: block.cross.kv(encoded, mask)
    if self.scan_layers:
      return layer_scan.per_unit(self.decoder_blocks, kv, encoded_BTD, mask_BT)
    return tuple(kv(block, encoded_BTD, mask_BT) for block in self.decoder_blocks)

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
    positions_BL = jnp.broadcast_to(jnp.arange(decoder_tokens_BL.shape[1]),
                                    decoder_tokens_BL.shape)
    x_BLD = self._embed(decoder_tokens_BL)

    # Each block projects the encoder output (the same for every layer) to its own keys and
    # values: inside the block, so that remat recomputes them and a scan stacks no caches.
    def block_fn(block, x, pos, key, mask, encoded_BTD, encoder_mask_BT):
      cross = block.cross.kv(encoded_BTD, encoder_mask_BT)
      return block(x, pos, cross, train=train, rng=key, mask_BL=mask)

    x_BLD, decoder_stats = self._stack(self.decoder_blocks, block_fn, x_BLD, positions_BL,
                                       decoder_rng, decoder_mask_BL, self.decoder_stat_dims,
                                       (encoded_BTD, encoder_mask_BT))
    stats = {**{layer_stats.key(k, 'encoder'): v for k, v in encoder_stats.items()},
             **{layer_stats.key(k, 'decoder'): v for k, v in decoder_stats.items()}}
    return self._logits(x_BLD), stats

  def _logits(self, x_BLD: jax.Array) -> jax.Array:
    # The head runs in float32: its logits feed a softmax (ST-MoE: exponentiate in float32).
    head = transformer.head_matrix(self.embed[...],
                                   None if self.lm_head is None else self.lm_head[...])
    return layers.dense(self.final_norm(x_BLD).astype(jnp.float32), head)

  def decode(self, tokens_BL: jax.Array, caches: tuple[KVCache, ...],
             crosses: tuple[CrossCache, ...]) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Incremental decoder pass: logits [B, L, V] for L tokens that follow the cached ones.

    `caches`: one self-attention `KVCache` per decoder layer (`init_caches`); `crosses`: the
    `cross_caches` of the encoded input (both, when scanned, one per position in the unit,
    stacked over the units). Call with the decoder prompt first, then one token at a time;
    MoE layers route as in `Transformer.decode`.
    """
    x_BLD = jnp.take(self.embed[...], tokens_BL, axis=0).astype(self.dtype)
    if self.scan_layers:
      x_BLD, new_caches = layer_scan.decode(self.decoder_blocks, x_BLD, caches, crosses)
      return self._logits(x_BLD), tuple(new_caches)
    new_caches = []
    for block, cache, cross in zip(self.decoder_blocks, caches, crosses):
      x_BLD, cache = block.decode(x_BLD, cache, cross)
      new_caches.append(cache)
    return self._logits(x_BLD), tuple(new_caches)

  def unscanned(self) -> 'EncoderDecoder':
    """This model with one block per layer in both stacks (a copy if scanned, else itself), as
    `Transformer.unscanned`: same function and parameters."""
    if not self.scan_layers:
      return self
    model = nnx.clone(self)
    model.encoder_blocks = nnx.List(layer_scan.unstacked_blocks(self.encoder_blocks))
    model.decoder_blocks = nnx.List(layer_scan.unstacked_blocks(self.decoder_blocks))
    model.scan_layers = False
    return model


def init_caches(cfg: ModelConfig, batch: int, length: int) -> tuple[KVCache, ...]:
  """Empty decoder self-attention caches for `length` positions, one per decoder layer; with
  `cfg.scan_layers`, one per position in the unit, stacked over the units ([U, B, T, H, K])."""
  if not cfg.scan_layers:
    return tuple(KVCache.zeros(batch, length, cfg) for _ in range(cfg.num_layers))
  period = cfg.layer_period()
  return (layer_scan.stack_over_units(KVCache.zeros(batch, length, cfg),
                                      cfg.num_layers // period),) * period
