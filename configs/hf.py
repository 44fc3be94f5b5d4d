r"""Open-model architectures (Hugging Face transformers' Llama, Mixtral, OLMoE, Qwen3-MoE):
`arch=llama|mixtral|olmoe|qwen3_moe`, `size=tiny` (default) or `size=real`.

  python train.py --config=configs/hf.py:arch=mixtral --workdir=/tmp/mixtral_tiny
  python train.py --config=configs/hf.py:arch=qwen3_moe --workdir=/tmp/qwen3_moe_tiny

Each architecture is a set of option values (docs/open_models.md): SwiGLU FFNs and experts, no
biases, RMSNorm with the model's epsilon, rotary in HF's half-split layout with the model's
theta, grouped-query attention, QK-norm where the model has one, an untied output head, and
the router as HF computes it: softmax over all experts, top-k, the k weights renormalised or
not, every choice routed (no capacity, no second-expert policy). `size=tiny` is a 2-layer,
width-32 model on the byte vocabulary, trained for seconds like configs/tiny.py (for tests).
`size=real` has the sizes of the released checkpoints Meta-Llama-3-8B, Mixtral-8x7B-v0.1,
OLMoE-1B-7B-0924 and Qwen3-30B-A3B (far beyond a CPU: for shapes and conversion):

| arch      | D    | L  | H  | G  | K   | E   | k | F     | vocab  | theta   | eps   | renorm |
|-----------|------|----|----|----|-----|-----|---|-------|--------|---------|-------|--------|
| llama     | 4096 | 32 | 32 | 8  | 128 | -   | - | 14336 | 128256 | 500000  | 1e-05 | -      |
| mixtral   | 4096 | 32 | 32 | 8  | 128 | 8   | 2 | 14336 | 32000  | 1000000 | 1e-05 | yes    |
| olmoe     | 2048 | 16 | 16 | 16 | 128 | 64  | 8 | 1024  | 50304  | 10000   | 1e-05 | no     |
| qwen3_moe | 2048 | 48 | 32 | 4  | 128 | 128 | 8 | 768   | 151936 | 1000000 | 1e-06 | yes    |

(from each checkpoint's config.json: hidden_size (D), num_hidden_layers (L),
num_attention_heads (H), num_key_value_heads (G), head_dim (K; else D / H), num_local_experts
or num_experts (E), num_experts_per_tok (k), intermediate_size or moe_intermediate_size (F),
vocab_size, rope_theta, rms_norm_eps, norm_topk_prob (renorm; Mixtral always renormalises: a
softmax over the top-k logits).
QK-norm: OLMoE over the whole projection ('full'), Qwen3 per head ('per_head'). None ties its
embeddings. Llama 3.1 and later add a rope_scaling these options do not express.)

Any field can still be overridden with --config.<field>=<value>.
"""

from configs import common
from configs import tiny

ARCHS = ('llama', 'mixtral', 'olmoe', 'qwen3_moe')
SIZES = ('tiny', 'real')

# Per architecture: the released checkpoint's sizes (the docstring's table, which a test reads
# back) and what differs between the HF implementations.
REAL = {
    'llama': dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                  num_experts=0, top_k=0, d_ff=14336, vocab_size=128256,
                  rope_max_wavelength=500_000.0, norm_eps=1e-5),
    'mixtral': dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                    num_experts=8, top_k=2, d_ff=14336, vocab_size=32000,
                    rope_max_wavelength=1_000_000.0, norm_eps=1e-5),
    'olmoe': dict(d_model=2048, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128,
                  num_experts=64, top_k=8, d_ff=1024, vocab_size=50304,
                  rope_max_wavelength=10_000.0, norm_eps=1e-5),
    'qwen3_moe': dict(d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
                      num_experts=128, top_k=8, d_ff=768, vocab_size=151936,
                      rope_max_wavelength=1_000_000.0, norm_eps=1e-6),
}
# The same shapes at test size: 4 heads of 8 (kv heads in the same ratio where the model groups
# them), experts few and narrow; top-k renormalisation, QK-norm and balance losses as released.
TINY = {
    'llama': dict(num_kv_heads=2, num_experts=0, top_k=0, d_ff=64),
    'mixtral': dict(num_kv_heads=2, num_experts=4, top_k=2, d_ff=32),
    'olmoe': dict(num_kv_heads=4, num_experts=8, top_k=4, d_ff=16),
    'qwen3_moe': dict(num_kv_heads=1, num_experts=8, top_k=4, d_ff=16),
}
RENORMALIZE = {'mixtral': True, 'olmoe': False, 'qwen3_moe': True}  # HF norm_topk_prob.
QK_NORM = {'olmoe': 'full', 'qwen3_moe': 'per_head'}
# HF router_aux_loss_coef of the released configs; OLMoE also trains with a router z-loss.
AUX_LOSS = {'mixtral': 0.02, 'olmoe': 0.01, 'qwen3_moe': 0.001}
Z_LOSS = {'olmoe': 0.001}


def get_config(arg: str | None = None):
  """Returns the config of `arg` = 'arch=<llama|mixtral|olmoe|qwen3_moe>[,size=<tiny|real>]'."""
  arg = common.parse_arg(arg, arch='mixtral', size='tiny')
  if arg.arch not in ARCHS:
    raise ValueError(f'config argument arch={arg.arch!r} is invalid: expected one of {ARCHS}')
  if arg.size not in SIZES:
    raise ValueError(f'config argument size={arg.size!r} is invalid: expected one of {SIZES}')
  sizes = dict(REAL[arg.arch])
  if arg.size == 'tiny':
    sizes.update(d_model=32, num_layers=2, num_heads=4, head_dim=8, vocab_size=259,
                 **TINY[arg.arch])
  config = tiny.get_config()
  model, moe, attention = config.model, config.moe, config.attention
  model.update(d_model=sizes['d_model'], num_layers=sizes['num_layers'],
               num_heads=sizes['num_heads'], head_dim=sizes['head_dim'],
               vocab_size=sizes['vocab_size'], rope_max_wavelength=sizes['rope_max_wavelength'],
               norm_eps=sizes['norm_eps'], activation='swiglu', tie_embeddings=False)
  kv_heads = sizes['num_kv_heads']
  attention.update(num_kv_heads=0 if kv_heads == sizes['num_heads'] else kv_heads,
                   qk_norm=QK_NORM.get(arg.arch, 'none'), rope_layout='half_split')
  if not sizes['num_experts']:  # Dense: every FFN is one.
    model.d_ff = sizes['d_ff']
    moe.every = 0
    return config
  model.d_ff = sizes['d_ff']  # Read by nothing while every FFN is an MoE layer.
  route_as_hf(config, arg.arch, sizes['num_experts'], sizes['top_k'], sizes['d_ff'])
  return config


def route_as_hf(config, arch: str, num_experts: int, top_k: int, expert_d_ff: int) -> None:
  """Makes every FFN of `config` an MoE layer of `num_experts` experts of width `expert_d_ff`
  (the model's activation), routed as HF's `arch` (mixtral, olmoe or qwen3_moe) routes: every
  choice of every token (dropless, no later-choice policy), one softmax over all experts, its
  top-k renormalisation or not, its balance loss over the whole batch and coefficients."""
  config.moe.update(every=1, num_experts=num_experts, top_k=top_k, expert_d_ff=expert_d_ff,
                    dispatch='dropless', router='tokens_choose', score_fn='softmax',
                    renormalize_gates=RENORMALIZE[arch], second_policy_train='all',
                    second_policy_eval='all', balance_scope='global',
                    aux_loss_coef=AUX_LOSS[arch], z_loss_coef=Z_LOSS.get(arch, 0.0))
