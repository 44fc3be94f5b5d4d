r"""Writes a tiny random `transformers` checkpoint (no download) for `python -m stmoe_jax.convert
--check`, at sizes tests/train/test_convert.py does not use; needs torch and transformers.

  python tests/hf_tiny_checkpoint.py mixtral /tmp/mixtral_hf
  python -m stmoe_jax.convert --from_hf=/tmp/mixtral_hf --workdir=/tmp/mixtral_w --check
  python -m stmoe_jax.convert --to_hf --workdir=/tmp/mixtral_w --out=/tmp/mixtral_out --check

Weights are redrawn at O(1) scale (norm scales around 1, projections of unit output variance,
small embeddings) so that the logits are O(1) and a wrong mapping shows.
"""
import sys

import torch
import transformers

arch, out = sys.argv[1], sys.argv[2]
common = dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=5, vocab_size=320,
              max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
extra = {
  'llama': dict(num_key_value_heads=1, intermediate_size=56, rope_theta=300000.0),
  'mixtral': dict(num_key_value_heads=5, intermediate_size=24, num_local_experts=5,
                  num_experts_per_tok=2, rope_theta=1e6),
  'olmoe': dict(num_key_value_heads=5, intermediate_size=16, num_experts=7, num_experts_per_tok=3,
                norm_topk_prob=False, rope_theta=10000.0),
  'qwen3_moe': dict(num_key_value_heads=1, head_dim=12, intermediate_size=64,
                    moe_intermediate_size=14, num_experts=6, num_experts_per_tok=3,
                    norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6),
}[arch]
cfg = transformers.AutoConfig.for_model(arch, **{**common, **extra})
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
with torch.no_grad():
  for name, p in model.named_parameters():
    if p.ndim == 1:
      p.copy_(1 + 0.3 * torch.randn_like(p))
    elif 'embed' in name:
      p.copy_(3e-3 * torch.randn_like(p))
    else:
      p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
model.save_pretrained(out)
print(f"wrote a {arch} checkpoint to {out}")
