"""Decoder-only transformer whose every `moe.every`-th FFN is a mixture of experts.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> FFN or MoE -> residual), rotary
positions, an output head of its own or tied to the embedding (`model.tie_embeddings`). Einsum
letters: B batch, L length, D model dim, V vocabulary, M MoE layers, E experts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stmoe_jax.models import layer_scan
from stmoe_jax.moe import layer_stats
from stmoe_jax.nn import layers
from stmoe_jax.nn import remat
from stmoe_jax.nn.attention import ATTENTION_KINDS, BidirectionalSelfAttention, KVCache
from stmoe_jax.config import ModelConfig
from stmoe_jax.moe.experts import Mlp
from stmoe_jax.moe.layer import MoeLayer


def make_attention(cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The attention module of `layer`, as `cfg.attention.layer_kind(layer)` says.

  Every kind (`nn.attention.ATTENTION_KINDS`) is called as `attn(x_BLD, positions_BL,
  mask_BL=...) -> ([B, L, D], stats)` and decodes as `attn.decode(x_BLD, cache)`.
  """
  return ATTENTION_KINDS[cfg.attention.layer_kind(layer)].make(cfg, rngs=rngs)


class Block(nnx.Module):
  """One pre-norm transformer layer; its FFN is dense or MoE as `cfg.ffn_kind(layer)` says.

  `causal=False` builds an encoder layer: bidirectional dense attention over the real tokens and
  MoE layers built non-causal (expert-choice and Batch Prioritized Routing allowed).
  """

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, causal: bool = True):
    dtype = jnp.dtype(cfg.dtype)
    self.attn_norm = layers.RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
    self.attn = (make_attention(cfg, layer, rngs=rngs) if causal
                 else BidirectionalSelfAttention(cfg, rngs=rngs))
    self.ffn_norm = layers.RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
    kind = cfg.ffn_kind(layer)
    if kind == 'moe':
      self.ffn = MoeLayer(cfg, causal=causal, rngs=rngs)
    else:
      # 'dense_matched' stands in for an MoE layer at equal active FLOPs: width k * expert width
      # (plus the shared experts, which every token also passes through).
      d_ff = (cfg.d_ff if kind == 'dense' else
              cfg.moe.top_k * cfg.moe.expert_d_ff + cfg.moe.num_shared_experts * cfg.moe.shared_d_ff)
      self.ffn = Mlp(cfg.d_model, d_ff, cfg.activation, cfg.init_scale, dtype, rngs=rngs)
    self.is_moe = kind == 'moe'
    # ST-MoE sparse-dense stacking: an extra dense FFN sublayer right before or after the MoE.
    self.extra_dense = cfg.moe.extra_dense_ffn if kind != 'dense' else 'none'
    if self.extra_dense != 'none':
      self.extra_norm = layers.RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
      self.extra_ffn = Mlp(cfg.d_model, cfg.d_ff, cfg.activation, cfg.init_scale, dtype, rngs=rngs)

  def __call__(self, x_BLD, positions_BL, *, train: bool, rng=None, mask_BL=None,
               token_ids_BL=None):
    """Returns ([B, L, D] output, {'moe': the MoE layer's stats or {} for a dense FFN,
    'attention': the attention's stats}), the report `layer_stats.stack` reads. `token_ids_BL`
    (int32 [B, L]) reach the MoE layer, for routers that read them (hash routing)."""
    h_BLD = self.attn_norm(x_BLD)
    a_BLD, attn_stats = self.attn(h_BLD, positions_BL, mask_BL=mask_BL)
    x_BLD = x_BLD + a_BLD.astype(x_BLD.dtype)
    x_BLD, stats = self.feed_forward(x_BLD, train=train, rng=rng, mask_BL=mask_BL,
                                     token_ids_BL=token_ids_BL)
    return x_BLD, {'moe': stats, 'attention': attn_stats}

  def feed_forward(self, x_BLD, *, train: bool, rng=None, mask_BL=None, token_ids_BL=None):
    """The FFN half of the layer on the residual stream [B, L, D] (with the sparse-dense
    stacking FFN, if any): -> ([B, L, D], the MoE layer's stats or {})."""
    if self.extra_dense == 'before':
      x_BLD = x_BLD + self.extra_ffn(self.extra_norm(x_BLD)).astype(x_BLD.dtype)
    h_BLD = self.ffn_norm(x_BLD)
    if self.is_moe:
      y_BLD, stats = self.ffn(h_BLD, train=train, rng=rng, mask_BL=mask_BL,
                              token_ids_BL=token_ids_BL)
    else:
      y_BLD, stats = self.ffn(h_BLD), {}
    x_BLD = x_BLD + y_BLD.astype(x_BLD.dtype)
    if self.extra_dense == 'after':
      x_BLD = x_BLD + self.extra_ffn(self.extra_norm(x_BLD)).astype(x_BLD.dtype)
    return x_BLD, stats

  def decode(self, x_BLD, cache: KVCache, token_ids_BL=None) -> tuple[jax.Array, KVCache]:
    """`__call__` at eval capacity for L new tokens after the cached ones (see `Transformer.decode`)."""
    attn_BLD, cache = self.attn.decode(self.attn_norm(x_BLD), cache)
    x_BLD = x_BLD + attn_BLD.astype(x_BLD.dtype)
    return self.feed_forward(x_BLD, train=False, token_ids_BL=token_ids_BL)[0], cache


def embedding(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Param:
  """The token embedding [V, D]: N(0, 1), or N(0, 1/D) when tied to the output head, so that
  the tied head's initial logits over an RMS-normalised state have unit scale too."""
  std = cfg.d_model ** -0.5 if cfg.tie_embeddings else 1.0
  return layers.param(rngs, jax.nn.initializers.normal(std), (cfg.vocab_size, cfg.d_model),
                      ('vocab', 'embed'))


def output_head(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Param | None:
  """The output head [D, V] (Switch init), or None when tied to the embedding."""
  if cfg.tie_embeddings:
    return None
  return layers.param(rngs, layers.switch_init(cfg.init_scale), (cfg.d_model, cfg.vocab_size),
                      ('embed', 'vocab'))


def head_matrix(embed: jax.Array, lm_head: jax.Array | None) -> jax.Array:
  """The [D, V] matrix the logits come from: `lm_head`, or the embedding transposed (tied)."""
  return embed.T if lm_head is None else lm_head


def fsdp_gather(param: nnx.Param, mesh_rules) -> jax.Array:
  """`param`'s value constrained to its sharding without the 'embed' (FSDP) axes: gathered."""
  names = tuple(None if n == 'embed' else n for n in param.get_metadata()['out_sharding'])
  return mesh_rules.constrain(param.get_value(), names)


def fsdp_gathered(block: nnx.Module, mesh_rules) -> Callable:
  """`block`'s (any module's) call, its parameters all-gathered over the axes of 'embed' (FSDP).

  Parameters live split over 'fsdp' on their model dim; left to itself, XLA's sharding
  propagation may instead split the activations' model dim to match them and gather the batch,
  which replicates every activation over 'fsdp'. Constraining each weight to its sharding
  without the 'embed' axes where the block starts makes the gather explicit (ZeRO-3: one block's
  weights at a time; under remat the backward pass gathers again) and its transpose
  reduce-scatters the gradients. Buffers the block updates (the router bias) are written back.
  """
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)
  params = jax.tree.map(lambda v: v.replace(fsdp_gather(v, mesh_rules)), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  gathered = nnx.merge(graphdef, params, rest)

  def call(*args, **kwargs):
    out = gathered(*args, **kwargs)
    nnx.update(block, nnx.state(gathered, layers.Buffer))
    return out

  return call


class Transformer(nnx.Module):
  """Byte-level decoder-only language model: tokens [B, L] -> logits [B, L, V] (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.embed = embedding(cfg, rngs)
    # Unscanned: one Block per layer. Scanned (`layer_scan`): one per position in the repeating
    # unit, each stacked over the units.
    self.scan_layers = cfg.scan_layers
    self.blocks = layer_scan.make_stack(lambda i, rngs: Block(cfg, i, rngs=rngs), cfg.num_layers,
                                        cfg, rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
    self.lm_head = output_head(cfg, rngs)
    self.dtype = jnp.dtype(cfg.dtype)
    self.stat_dims = layer_stats.dims(cfg)
    self.mesh_rules = cfg.mesh_rules
    self.remat = cfg.remat
    layers.store_params_as(self, cfg.param_dtype)

  def constrain(self, x_BLD: jax.Array) -> jax.Array:
    """The residual stream [B, L, D] sharded by its logical names (batch, length, embed) on the
    Trainer's mesh, so that XLA keeps it data parallel between blocks; a no-op on one device."""
    if self.mesh_rules is None:
      return x_BLD
    return self.mesh_rules.constrain(x_BLD, ('batch', 'length', 'embed'))

  def fsdp(self) -> bool:
    """Whether parameters are split over an FSDP axis (their 'embed' dim is sharded)."""
    return self.mesh_rules is not None and self.mesh_rules.size('embed') > 1

  def table(self, param: nnx.Param | None) -> jax.Array | None:
    """The embedding or head matrix, gathered first under FSDP (see `fsdp_gathered`)."""
    if param is None:
      return None
    return fsdp_gather(param, self.mesh_rules) if self.fsdp() else param[...]

  def __call__(self, tokens_BL: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None,
               mask_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward pass.

    Args:
      tokens_BL: int32 token ids [B, L].
      train: training settings of the MoE layers (capacity factor, jitter, sampled
        second-expert policy, expert dropout, bias-balancer update) if True, eval otherwise.
      rng: PRNG key, needed in training when any of those random features is on.
      mask_BL: optional [B, L], nonzero for real tokens: padding is never routed to an expert
        and is left out of the routing stats.
    Returns:
      (logits_BLV in float32, stats): the layers' stats stacked by `layer_stats.stack`, e.g.
      `balance_loss` [M] and `expert_load` [M, E] over the M MoE layers (possibly 0),
      `attn_logit_z_loss` [num_layers], `attn_head_load` [A, H] over head-routed layers.
    """
    positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    x_BLD = self.constrain(jnp.take(self.table(self.embed), tokens_BL, axis=0).astype(self.dtype))

    def block_fn(block, x, pos, key, mask, ids):
      if self.fsdp():
        return fsdp_gathered(block, self.mesh_rules)(x, pos, train=train, rng=key, mask_BL=mask,
                                                     token_ids_BL=ids)
      return block(x, pos, train=train, rng=key, mask_BL=mask, token_ids_BL=ids)

    run_block = remat.wrap(block_fn, self.remat, in_scan=self.scan_layers)
    if self.scan_layers:
      x_BLD, stats = layer_scan.forward(self.blocks, run_block, x_BLD, positions_BL, rng, mask_BL,
                                        self.constrain, self.stat_dims, extra=(tokens_BL,))
    else:
      per_layer = []
      for i, block in enumerate(self.blocks):
        layer_rng = None if rng is None else jax.random.fold_in(rng, i)
        x_BLD, report = run_block(block, x_BLD, positions_BL, layer_rng, mask_BL, tokens_BL)
        x_BLD = self.constrain(x_BLD)
        per_layer.append(report)
      stats = layer_stats.stack(per_layer, self.stat_dims)
    # The head runs in float32: its logits feed a softmax (ST-MoE: exponentiate in float32).
    final_norm = (fsdp_gathered(self.final_norm, self.mesh_rules) if self.fsdp()
                  else self.final_norm)
    x_BLD = final_norm(x_BLD).astype(jnp.float32)
    head_DV = head_matrix(self.table(self.embed), self.table(self.lm_head))
    logits_BLV = layers.dense(x_BLD, head_DV)
    return logits_BLV, stats

  def decode(self, tokens_BL: jax.Array,
             caches: tuple[KVCache, ...]) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Incremental forward pass: logits [B, L, V] for L tokens that follow the cached ones.

    `caches` holds one `KVCache` per layer (`init_caches`, sized by each layer's attention kind;
    with `scan_layers`, one per position of the repeating unit, stacked over the units);
    call with the prompt first, then one token at a time. MoE layers route at eval capacity with
    this model's `moe.group_size`, which must fit [B, L] (sampling builds the model with
    group_size 1: dropless per-token routing).
    """
    x_BLD = jnp.take(self.embed[...], tokens_BL, axis=0).astype(self.dtype)
    if self.scan_layers:
      x_BLD, new_caches = layer_scan.decode(self.blocks, x_BLD, caches, token_ids_BL=tokens_BL)
    else:
      new_caches = []
      for block, cache in zip(self.blocks, caches):
        x_BLD, cache = block.decode(x_BLD, cache, tokens_BL)
        new_caches.append(cache)
    x_BLD = self.final_norm(x_BLD).astype(jnp.float32)
    head = head_matrix(self.embed[...], None if self.lm_head is None else self.lm_head[...])
    return layers.dense(x_BLD, head), tuple(new_caches)

  def unscanned(self) -> 'Transformer':
    """This model with one Block per layer (a copy if scanned, else itself): for tools that
    hook single layers (`specialization`, `plot`); same function and parameters."""
    if not self.scan_layers:
      return self
    model = nnx.clone(self)
    model.blocks = nnx.List(layer_scan.unstacked_blocks(self.blocks))
    model.scan_layers = False
    return model


def init_caches(cfg: ModelConfig, batch: int, length: int) -> tuple[KVCache, ...]:
  """Empty KV caches for `length` positions, one per layer, each sized by its attention kind.

  A `local` layer keeps only min(window, length) slots (a ring buffer: memory O(window) at any
  length); a head-routed layer one shared key/value head; every other layer `length` slots.
  With `cfg.scan_layers`, one cache per position in the repeating unit, stacked over the units
  ([U, B, T, H, K]), as `layer_scan.decode` takes them.
  """
  caches = []
  for layer in range(cfg.layer_period() if cfg.scan_layers else cfg.num_layers):
    kind = ATTENTION_KINDS[cfg.attention.layer_kind(layer)]
    caches.append(KVCache.zeros(batch, kind.cache_slots(cfg, length), cfg,
                                num_heads=kind.cache_heads(cfg)))
  if cfg.scan_layers:  # One cache per position in the unit, stacked over the units.
    units = cfg.num_layers // cfg.layer_period()
    return tuple(layer_scan.stack_over_units(c, units) for c in caches)
  return tuple(caches)

