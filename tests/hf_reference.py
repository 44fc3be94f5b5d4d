"""Numpy transcriptions (float64) of Hugging Face transformers' Llama, Mixtral, OLMoE and
Qwen3-MoE forward passes, read from an HF-named state dict (tests/models/test_hf_arch.py)."""

import numpy as np


def rms_norm(x, weight, eps):
  """LlamaRMSNorm / OlmoeRMSNorm / Qwen3MoeRMSNorm."""
  return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_cos_sin(length, head_dim, theta):
  """LlamaRotaryEmbedding (rope_type 'default'): [L, K] cos and sin."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  freqs = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None]
  emb = np.concatenate([freqs, freqs], axis=-1)
  return np.cos(emb), np.sin(emb)


def repeat_kv(x_GLK, n_rep):
  """HF repeat_kv on [G, L, K]: each key/value head expanded n_rep times in place."""
  G, L, K = x_GLK.shape
  return np.broadcast_to(x_GLK[:, None], (G, n_rep, L, K)).reshape(G * n_rep, L, K)


def silu(x):
  return x / (1 + np.exp(-x))


def hf_attention(sd, prefix, x_LD, arch, hp):
  H, G, K = hp['heads'], hp['kv_heads'], hp['head_dim']
  L = x_LD.shape[0]
  linear = lambda name, x: x @ sd[f'{prefix}.{name}.weight'].T
  q, k, v = linear('q_proj', x_LD), linear('k_proj', x_LD), linear('v_proj', x_LD)
  if arch == 'olmoe':  # Over the whole projection, before the split into heads.
    q = rms_norm(q, sd[f'{prefix}.q_norm.weight'], hp['eps'])
    k = rms_norm(k, sd[f'{prefix}.k_norm.weight'], hp['eps'])
  q = q.reshape(L, H, K).transpose(1, 0, 2)
  k = k.reshape(L, G, K).transpose(1, 0, 2)
  v = v.reshape(L, G, K).transpose(1, 0, 2)
  if arch == 'qwen3_moe':  # Per head, on the head dim.
    q = rms_norm(q, sd[f'{prefix}.q_norm.weight'], hp['eps'])
    k = rms_norm(k, sd[f'{prefix}.k_norm.weight'], hp['eps'])
  cos, sin = rope_cos_sin(L, K, hp['theta'])
  q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
  k, v = repeat_kv(k, H // G), repeat_kv(v, H // G)
  scores = q @ k.transpose(0, 2, 1) / np.sqrt(K) + np.triu(np.full((L, L), -np.inf), 1)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ v).transpose(1, 0, 2).reshape(L, H * K)
  return linear('o_proj', out)


def hf_router(logits_TE, top_k, norm_topk_prob, mixtral=False):
  """(weights [T, k], experts [T, k]) as the HF sparse MoE blocks compute them."""
  if mixtral:  # Mixtral's original form: softmax over the k largest logits.
    experts = np.argsort(-logits_TE, axis=-1, kind='stable')[:, :top_k]
    top = np.take_along_axis(logits_TE, experts, -1)
    weights = np.exp(top - top.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True), experts
  probs = np.exp(logits_TE - logits_TE.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, axis=-1, kind='stable')[:, :top_k]
  weights = np.take_along_axis(probs, experts, -1)
  if norm_topk_prob:
    weights = weights / weights.sum(-1, keepdims=True)
  return weights, experts


def hf_mlp(sd, prefix, x, names=('gate_proj', 'up_proj', 'down_proj')):
  gate, up, down = (sd[f'{prefix}.{n}.weight'] for n in names)
  return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def hf_sparse_moe(sd, prefix, x_TD, arch, hp):
  """The per-token loop of MixtralSparseMoeBlock / OlmoeSparseMoeBlock / Qwen3MoeSparseMoeBlock."""
  weights, experts = hf_router(x_TD @ sd[f'{prefix}.gate.weight'].T, hp['top_k'],
                               hp['norm_topk_prob'], mixtral=arch == 'mixtral')
  names = ('w1', 'w3', 'w2') if arch == 'mixtral' else ('gate_proj', 'up_proj', 'down_proj')
  out = np.zeros_like(x_TD)
  for t in range(x_TD.shape[0]):
    for w, e in zip(weights[t], experts[t]):
      out[t] += w * hf_mlp(sd, f'{prefix}.experts.{e}', x_TD[t], names)
  return out


def hf_logits(sd, tokens_BL, arch, hp):
  """MixtralForCausalLM / OlmoeForCausalLM / Qwen3MoeForCausalLM / LlamaForCausalLM logits."""
  ffn = 'block_sparse_moe' if arch == 'mixtral' else 'mlp'
  out = []
  for tokens in tokens_BL:
    x = sd['model.embed_tokens.weight'][tokens]
    for i in range(hp['layers']):
      p = f'model.layers.{i}'
      x = x + hf_attention(sd, f'{p}.self_attn',
                           rms_norm(x, sd[f'{p}.input_layernorm.weight'], hp['eps']), arch, hp)
      h = rms_norm(x, sd[f'{p}.post_attention_layernorm.weight'], hp['eps'])
      x = x + (hf_mlp(sd, f'{p}.mlp', h) if arch == 'llama'
               else hf_sparse_moe(sd, f'{p}.{ffn}', h, arch, hp))
    x = rms_norm(x, sd['model.norm.weight'], hp['eps'])
    out.append(x @ sd.get('lm_head.weight', sd['model.embed_tokens.weight']).T)
  return np.stack(out)


def hyper(config) -> dict:
  m, moe, att = config.model, config.moe, config.attention
  return dict(layers=m.num_layers, heads=m.num_heads, kv_heads=att.num_kv_heads or m.num_heads,
              head_dim=m.head_dim, eps=m.norm_eps, theta=m.rope_max_wavelength,
              top_k=moe.top_k, norm_topk_prob=moe.renormalize_gates)


def write_model_tokenizer(directory, texts, vocab_size, tokenizer_config,
                          specials=('<unk>', '<s>', '</s>')):
  """A released model's tokenizer directory in miniature: a byte-level BPE `tokenizer.json`
  trained on `texts` with `specials` as its first ids (Llama 2 and Mixtral: <unk> 0, <s> 1,
  </s> 2) and `tokenizer_config` (a dict) as its tokenizer_config.json."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=list(specials), show_progress=False))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(tokenizer_config, f)
  return tok
