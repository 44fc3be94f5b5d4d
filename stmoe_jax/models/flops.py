"""Model FLOPs per token, for the model FLOPs utilisation (MFU) estimate.

Counts the FLOPs a token actually uses (2 per multiply-add): attention projections and scores,
dense FFNs, the router and the top_k experts a token is sent to (not all E), and the output
head; the embedding lookup is free. Training costs 3x the forward pass (forward + backward with
respect to activations and weights), i.e. the "6 x active parameters" rule plus attention.
Attention scores count the full window for every token, as PaLM's MFU does (appendix B), so
numbers compare with published MFUs; causal masking means about half of that work is real.
Capacity drops and padding are ignored: MFU measures the model, not the dispatch.

Given the measured mean experts per token of each MoE layer (`experts_per_token`, the layer stat
of that name: eval.py reports both), the expert FLOPs are those a token really spent instead:
fewer than top_k with capacity drops or null experts, varying by token with ReLU routing. (A
capacity-based dispatch still runs its padded [E, C] buffers; this counts the useful work.)
"""

from __future__ import annotations

from collections.abc import Mapping

from stmoe_jax.config import ModelConfig
from stmoe_jax.data import span_corruption
from stmoe_jax.moe import routing

TRAIN_PER_FORWARD = 3  # Forward + backward with respect to activations and weights.

# Peak dense bfloat16 FLOP/s per device (vendor datasheets), matched against
# `jax.Device.device_kind` as lower-case substrings, first match wins.
PEAK_BF16_FLOPS = (
    ('h100', 989e12), ('h200', 989e12), ('a100', 312e12),
    ('v6 lite', 918e12), ('v6e', 918e12), ('v5p', 459e12), ('v5 lite', 197e12),
    ('v5e', 197e12), ('v4', 275e12),
)


def _ffn_flops(d_model: int, d_ff: int, activation: str) -> int:
  """Forward FLOPs of one FFN for one token: up (and gate for GEGLU) and down projections."""
  matrices = 2 if activation == 'gelu' else 3  # GEGLU and SwiGLU have a gate matrix too.
  return 2 * matrices * d_model * d_ff


def _ffn_layer_flops(cfg: ModelConfig, layer: int, experts: float | None = None) -> float:
  """Forward FLOPs of FFN `layer` (dense, MoE or its dense twin) for one token; an MoE layer
  runs `experts` experts per token (None: the nominal top_k)."""
  D, moe = cfg.d_model, cfg.moe
  kind = cfg.ffn_kind(layer)
  if kind == 'moe':
    total = 2 * D * routing.ROUTERS[moe.router].num_logits(moe)  # Router.
    total += (moe.top_k if experts is None else experts) * _ffn_flops(D, moe.expert_d_ff,
                                                                      cfg.activation)
  elif kind == 'dense_matched':
    total = _ffn_flops(D, moe.top_k * moe.expert_d_ff, cfg.activation)
  else:
    total = _ffn_flops(D, cfg.d_ff, cfg.activation)
  if kind != 'dense':  # Shared experts and the sparse-dense stacking FFN run for every token.
    total += _ffn_flops(D, moe.num_shared_experts * moe.shared_d_ff, cfg.activation)
    if moe.extra_dense_ffn != 'none':
      total += _ffn_flops(D, cfg.d_ff, cfg.activation)
  return total


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, decoder_len: int | None = None,
                            experts_per_token: Mapping[tuple[str, int], float] | None = None
                            ) -> int:
  """Forward-pass FLOPs for one token of a `seq_len` window (see the module docstring).

  For the encoder-decoder, per encoder input token of a `seq_len` input whose target has
  `decoder_len` tokens: the encoder, the cross-attention keys and values, and decoder_len /
  seq_len of a decoder token's FLOPs (self-attention, cross-attention over seq_len positions,
  FFN, output head).

  `experts_per_token` maps (stack, layer) of an MoE layer (stack '' for the decoder-only model,
  'encoder' or 'decoder'; `ModelConfig.moe_stacks`) to the experts a token of it really used on
  average; MoE layers not in it count the nominal top_k.
  """
  D, HK, GK = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  # q and o, k and v (G key/value heads under grouped-query attention); scores, values.
  attention = lambda keys: 2 * 2 * D * (HK + GK) + 2 * 2 * HK * keys
  used = experts_per_token or {}
  ffn = lambda stack, i: _ffn_layer_flops(cfg, i, used.get((stack, i)))
  if cfg.architecture == 'encoder_decoder':
    if decoder_len is None:
      raise ValueError('decoder_len is needed for the FLOPs of an encoder-decoder')
    encoder = sum(attention(seq_len) + ffn('encoder', i) for i in range(cfg.num_encoder_layers))
    cross_kv = cfg.num_layers * 2 * 2 * D * GK
    decoder = 2 * D * cfg.vocab_size + sum(
        attention(decoder_len) + 2 * 2 * D * HK + 2 * 2 * HK * seq_len + ffn('decoder', i)
        for i in range(cfg.num_layers))
    return round(encoder + cross_kv + decoder * decoder_len / seq_len)
  total = 2 * D * cfg.vocab_size  # Output head.
  for layer in range(cfg.num_layers):
    total += attention(seq_len) + ffn('', layer)
  return round(total)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, decoder_len: int | None = None) -> int:
  """Training FLOPs per token: 3x the forward pass (backward costs twice the forward)."""
  return TRAIN_PER_FORWARD * forward_flops_per_token(cfg, seq_len, decoder_len)


def run_forward_flops_per_token(cfg: ModelConfig, data,
                                experts_per_token: Mapping[tuple[str, int], float] | None = None
                                ) -> int:
  """`forward_flops_per_token` per input token of a run's data config `config.data` (seq_len,
  and for span corruption the decoder length it implies)."""
  decoder_len = None
  if data.objective == 'span_corruption':
    decoder_len = span_corruption.lengths(data.seq_len, data.noise_density,
                                          data.mean_noise_span_length).decoder_len
  return forward_flops_per_token(cfg, data.seq_len, decoder_len, experts_per_token)


def run_train_flops_per_token(cfg: ModelConfig, data) -> int:
  """`train_flops_per_token` per input token of a run's data config `config.data`."""
  return TRAIN_PER_FORWARD * run_forward_flops_per_token(cfg, data)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Peak dense bfloat16 FLOP/s of a device kind (e.g. 'NVIDIA H100 80GB HBM3', 'TPU v4'),
  or None when unknown (CPUs among them: their peak depends on the machine)."""
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def model_flops_utilization(tokens_per_sec: float, flops_per_token: float,
                            peak_flops: float | None) -> float | None:
  """Achieved model FLOP/s over the peak of all devices; None when the peak is unknown."""
  if not peak_flops:
    return None
  return tokens_per_sec * flops_per_token / peak_flops
