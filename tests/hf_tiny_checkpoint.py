r"""Tiny random `transformers` checkpoints (no download): `build(arch, **sizes)` is the model,
`write(arch, out, **sizes)` saves it. tests/train/test_convert_transformers.py uses them; as a
script it writes one for `python -m stmoe_jax.convert --check`, at sizes the tests do not use:

  python tests/hf_tiny_checkpoint.py mixtral /tmp/mixtral_hf
  python -m stmoe_jax.convert --from_hf=/tmp/mixtral_hf --workdir=/tmp/mixtral_w --check
  python -m stmoe_jax.convert --to_hf --workdir=/tmp/mixtral_w --out=/tmp/mixtral_out --check

Weights are redrawn at O(1) scale (norm scales around 1, projections of unit output variance,
small embeddings unless they are also the output head) so that the logits are O(1) and a wrong
mapping shows.
"""
import sys

import torch
import transformers

# The script's sizes: 5 heads of 8 (Qwen3: of 12), 3 layers, 320 tokens.
COMMON = dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=5, vocab_size=320,
              max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
EXTRA = {
    'llama': dict(num_key_value_heads=1, intermediate_size=56, rope_theta=300000.0),
    'mixtral': dict(num_key_value_heads=5, intermediate_size=24, num_local_experts=5,
                    num_experts_per_tok=2, rope_theta=1e6),
    'olmoe': dict(num_key_value_heads=5, intermediate_size=16, num_experts=7,
                  num_experts_per_tok=3, norm_topk_prob=False, rope_theta=10000.0),
    'qwen3_moe': dict(num_key_value_heads=1, head_dim=12, intermediate_size=64,
                      moe_intermediate_size=14, num_experts=6, num_experts_per_tok=3,
                      norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6),
}


# The reference loops (as `convert.check`): torch's grouped matmul refuses (on CPU) experts whose
# width is no multiple of 16 bytes.
EAGER = dict(attn_implementation='eager', experts_implementation='eager')


def build(arch: str, seed: int = 0, **sizes) -> transformers.PreTrainedModel:
  """A float32 `<Arch>ForCausalLM` of the script's sizes overridden by `sizes` (config fields),
  in eval mode with eager attention and expert loops, its weights redrawn at O(1) scale."""
  cfg = transformers.AutoConfig.for_model(arch, **{**COMMON, **EXTRA[arch], **sizes})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **EAGER)
  tied = cfg.tie_word_embeddings
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif 'embed' in name:
        p.copy_((1.0 if tied else 3e-3) * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  return model.eval()


def write(arch: str, out: str, seed: int = 0, max_shard_size: str | None = None, **sizes
          ) -> transformers.PreTrainedModel:
  """`build(arch, seed, **sizes)` saved to `out` (`save_pretrained`, safetensors, shards of
  `max_shard_size` if given); returns the model."""
  model = build(arch, seed, **sizes)
  kwargs = {'max_shard_size': max_shard_size} if max_shard_size else {}
  model.save_pretrained(out, **kwargs)
  return model


if __name__ == '__main__':
  write(sys.argv[1], sys.argv[2])
  print(f'wrote a {sys.argv[1]} checkpoint to {sys.argv[2]}')
