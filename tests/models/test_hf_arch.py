"""The open-model pieces (configs/hf.py) against numpy transcriptions of Hugging Face
transformers' Llama, Mixtral, OLMoE and Qwen3-MoE: the router, SwiGLU experts under every
dispatch path, grouped-query attention with QK-norm, Qwen3-MoE's tied forward pass and its KV
cache, and the released models' parameter counts. (Each architecture's whole forward pass
against transformers itself: tests/train/test_convert_transformers.py.)

`hf_state_dict` is the parameter mapping (our tree -> HF tensor names and layouts, torch
Linear weights [out, in], experts one module each as in the released checkpoints); the numpy
forward reads only that dict, so a wrong layout, rotary pairing, norm or router shows.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import hf
from stmoe_jax.config import model_config, validate
from stmoe_jax.models.transformer import Transformer, init_caches
from stmoe_jax.moe import routing
from stmoe_jax.moe.experts import Experts, Mlp
from stmoe_jax.moe.layer import MoeLayer
from stmoe_jax.nn.attention import CausalSelfAttention
from conftest import tiny_model_config
from hf_reference import hf_attention, hf_logits, hf_mlp, hf_router, hf_sparse_moe, hyper, silu


# ---- our parameter tree -> HF names ----

def hf_state_dict(model: Transformer, arch: str) -> dict[str, np.ndarray]:
  """HF tensor name -> float64 array in HF layout, from an unscanned `Transformer`."""
  flat = {'.'.join(map(str, path)): np.asarray(v.get_value(), np.float64)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  sd = {'model.embed_tokens.weight': flat.pop('embed'),
        'model.norm.weight': flat.pop('final_norm.scale')}
  if 'lm_head' in flat:
    sd['lm_head.weight'] = flat.pop('lm_head').T
  ffn = 'block_sparse_moe' if arch == 'mixtral' else 'mlp'
  for name, w in flat.items():
    i, rest = re.fullmatch(r'blocks\.(\d+)\.(.+)', name).groups()
    p = f'model.layers.{i}'
    if rest in ('attn.w_q', 'attn.w_k', 'attn.w_v'):  # [D, H, K] -> [H*K, D]
      sd[f'{p}.self_attn.{rest[-1]}_proj.weight'] = w.reshape(w.shape[0], -1).T
    elif rest == 'attn.w_o':  # [H, K, D] -> [D, H*K]
      sd[f'{p}.self_attn.o_proj.weight'] = w.reshape(-1, w.shape[-1]).T
    elif rest in ('attn.q_norm.scale', 'attn.k_norm.scale'):  # [K] or [H, K] -> [K] or [H*K]
      sd[f'{p}.self_attn.{rest[5]}_norm.weight'] = w.reshape(-1)
    elif rest == 'attn_norm.scale':
      sd[f'{p}.input_layernorm.weight'] = w
    elif rest == 'ffn_norm.scale':
      sd[f'{p}.post_attention_layernorm.weight'] = w
    elif rest in ('ffn.w_gate', 'ffn.w_up', 'ffn.w_down'):  # Llama MLP: [in, out] -> [out, in]
      sd[f'{p}.mlp.{rest[4:].replace("w_", "")}_proj.weight'] = w.T
    elif rest == 'ffn.router':  # [D, E] -> [E, D]
      sd[f'{p}.{ffn}.gate.weight'] = w.T
    elif rest.startswith('ffn.experts.'):  # [E, D, F] / [E, F, D] -> per expert [out, in]
      kind = rest.rsplit('.', 1)[1]
      hf_name = ({'w_gate': 'w1', 'w_up': 'w3', 'w_down': 'w2'} if arch == 'mixtral' else
                 {'w_gate': 'gate_proj', 'w_up': 'up_proj', 'w_down': 'down_proj'})[kind]
      for e in range(w.shape[0]):
        sd[f'{p}.{ffn}.experts.{e}.{hf_name}.weight'] = w[e].T
    else:
      raise AssertionError(f'no HF name for {name}')
  return sd


def randomize(model: nnx.Module, seed: int = 0) -> None:
  """Every parameter redrawn so that attention, routing and every norm matter: norm scales
  around 1, matrices of O(1) outputs, embeddings of root mean square 3e-3, so that the first
  norm's epsilon (1e-5 or 1e-6) changes its output."""
  rng = np.random.default_rng(seed)
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = v.get_value().shape
    if path[-1] == 'scale':
      value = 1 + 0.3 * rng.standard_normal(shape)
    elif path[-1] == 'embed':
      value = 3e-3 * rng.standard_normal(shape)
    else:  # Each output O(1): divide by the root of the contracted input dims.
      fan_in = (shape[0] * shape[1] if path[-1] == 'w_o' else
                shape[1] if 'experts' in path else shape[0])
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    v.set_value(jnp.asarray(value, jnp.float32))


def test_grouped_query_decoding_caches_the_kv_heads_and_matches_the_forward_pass():
  """Qwen3-MoE's tiny preset (one key/value head for four query heads: multi-query), its
  embeddings tied to the output head as in HF's tie_word_embeddings."""
  config = hf.get_config('arch=qwen3_moe')
  config.model.tie_embeddings = True
  config.moe.group_size = 1  # Dropless routing: one token per group changes nothing.
  cfg = model_config(config)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  randomize(model)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 259, (2, 8)))
  caches = init_caches(cfg, 2, 8)
  assert caches[0].k.shape == (2, 8, 1, config.model.head_dim)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(tokens, caches):
    model = nnx.merge(graphdef, state)
    prompt, caches = model.decode(tokens[:, :5], caches)  # The prompt, then token by token.
    step = lambda caches, t: model.decode(t[:, None], caches)[::-1]
    _, steps = jax.lax.scan(step, caches, tokens[:, 5:].T)
    forward, _ = model(tokens, train=False)
    return jnp.concatenate([prompt, jnp.moveaxis(steps[:, :, 0], 0, 1)], axis=1), forward

  decoded, forward = run(tokens, caches)
  sd = hf_state_dict(model, 'qwen3_moe')
  assert 'lm_head.weight' not in sd  # Tied: the head is the embedding.
  np.testing.assert_allclose(forward, hf_logits(sd, np.asarray(tokens), 'qwen3_moe',
                                                hyper(config)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(decoded, forward, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('qk_norm,kv_heads', [('full', 2)])
def test_attention_with_grouped_kv_heads_and_qk_norm_is_hfs(qk_norm, kv_heads):
  """OLMoE's whole-projection norm with grouped kv heads (its preset has none; Qwen3's per-head
  norm with one kv head is the qwen3_moe preset's)."""
  cfg = tiny_model_config(num_heads=4, head_dim=4, norm_eps=1e-5, rope_max_wavelength=50.0,
                          attention=dict(num_kv_heads=kv_heads, qk_norm=qk_norm))
  attn = CausalSelfAttention(cfg, rngs=nnx.Rngs(0))
  randomize(attn)
  x = np.random.default_rng(3).standard_normal((1, 6, 16))
  y, _ = nnx.jit(lambda a, x: a(x, jnp.arange(6)[None]))(attn, jnp.asarray(x, jnp.float32))
  sd = {}
  for name in ('q', 'k', 'v'):
    w = np.asarray(getattr(attn, f'w_{name}')[...], np.float64)
    sd[f'a.{name}_proj.weight'] = w.reshape(16, -1).T
  sd['a.o_proj.weight'] = np.asarray(attn.w_o[...], np.float64).reshape(-1, 16).T
  for name in ('q', 'k'):
    sd[f'a.{name}_norm.weight'] = np.asarray(getattr(attn, f'{name}_norm').scale[...],
                                             np.float64).reshape(-1)
  hp = dict(heads=4, kv_heads=kv_heads, head_dim=4, eps=1e-5, theta=50.0)
  want = hf_attention(sd, 'a', x[0], 'olmoe' if qk_norm == 'full' else 'qwen3_moe', hp)
  np.testing.assert_allclose(y[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('renormalize', [True, False])
def test_the_router_is_hfs_softmax_top_k(renormalize):
  logits = np.random.default_rng(4).standard_normal((1, 32, 8)) * 2
  route = routing.tokens_choose_top_k(jnp.asarray(logits, jnp.float32), top_k=3, capacity=32,
                                      renormalize=renormalize, later_policy='all')
  weights, experts = hf_router(logits[0], 3, renormalize)
  np.testing.assert_array_equal(route.expert_index[0], experts)
  np.testing.assert_allclose(route.gate[0], weights, rtol=1e-5)
  assert bool(route.kept.all())
  if renormalize:  # Mixtral's softmax over the top-k logits is the same weights.
    np.testing.assert_allclose(hf_router(logits[0], 3, True, mixtral=True)[0], weights,
                               rtol=1e-12)


def test_swiglu_experts_and_ffn_are_silu_gated():
  """The dense FFN, the batched experts and both grouped-matmul layouts (dropless)."""
  rng = np.random.default_rng(5)
  ffn = lambda x, g, u, d: (silu(x @ g) * (x @ u)) @ d
  mlp = Mlp(8, 12, 'swiglu', 1.0, jnp.float32, rngs=nnx.Rngs(0))
  experts = Experts(3, 8, 12, 'swiglu', 1.0, jnp.float32, rngs=nnx.Rngs(1))
  assert mlp.mult_bias is None and experts.mult_bias is None
  x_TD, x_ECD = rng.standard_normal((5, 8)), rng.standard_normal((3, 4, 8))

  @nnx.jit
  def run(mlp, experts, x_TD, x_ECD):
    rows = x_ECD.reshape(12, 8)  # Expert e owns rows 4e..4e+3.
    grouped = lambda impl: experts.grouped(rows, jnp.array([4, 4, 4], jnp.int32), impl=impl)
    return mlp(x_TD), experts(x_ECD), grouped('ragged_dot'), grouped('blocked')

  dense, batched, ragged, blocked = run(mlp, experts, jnp.asarray(x_TD, jnp.float32),
                                        jnp.asarray(x_ECD, jnp.float32))
  w = lambda m, n: np.asarray(getattr(m, n)[...], np.float64)
  np.testing.assert_allclose(dense, ffn(x_TD, w(mlp, 'w_gate'), w(mlp, 'w_up'), w(mlp, 'w_down')),
                             rtol=1e-4, atol=1e-6)
  want = np.stack([ffn(x_ECD[e], w(experts, 'w_gate')[e], w(experts, 'w_up')[e],
                       w(experts, 'w_down')[e]) for e in range(3)])
  np.testing.assert_allclose(batched, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(ragged, want.reshape(12, 8), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(blocked, want.reshape(12, 8), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('dispatch', ['einsum', 'scatter', 'dropless'])
def test_every_dispatch_path_runs_hfs_swiglu_moe_block(dispatch):
  """Mixtral's block with a shared SwiGLU expert added, at a capacity that drops nothing."""
  capacity = dict(train_capacity_factor=8.0, eval_capacity_factor=8.0, min_capacity=32)
  cfg = tiny_model_config(activation='swiglu', moe=dict(
      dispatch=dispatch, num_experts=4, top_k=2, group_size=16, second_policy_eval='all',
      num_shared_experts=1, **(capacity if dispatch != 'dropless' else {})))
  layer = MoeLayer(cfg, rngs=nnx.Rngs(0))
  randomize(layer)
  x = np.random.default_rng(6).standard_normal((2, 16, 16))
  y, _ = nnx.jit(lambda m, x: m(x, train=False))(layer, jnp.asarray(x, jnp.float32))
  w = lambda m, n: np.asarray(getattr(m, n)[...], np.float64)
  sd = {'moe.gate.weight': w(layer, 'router').T}
  for e in range(4):
    for ours, theirs in (('w_gate', 'w1'), ('w_up', 'w3'), ('w_down', 'w2')):
      sd[f'moe.experts.{e}.{theirs}.weight'] = w(layer.experts, ours)[e].T
  shared = {f's.{n}.weight': w(layer.shared, f'w_{n[:-5]}').T
            for n in ('gate_proj', 'up_proj', 'down_proj')}
  x_TD = x.reshape(-1, 16)
  want = (hf_sparse_moe(sd, 'moe', x_TD, 'mixtral', dict(top_k=2, norm_topk_prob=True)) +
          hf_mlp(shared, 's', x_TD))
  np.testing.assert_allclose(y.reshape(-1, 16), want, rtol=1e-4, atol=1e-5)


def test_real_sizes_have_the_released_parameter_counts():
  """size=real builds (shapes only) with the parameters of the released checkpoints: Mixtral
  8x7B 46.7B, Llama 3 8B 8.03B, OLMoE 6.92B, Qwen3-30B-A3B 30.5B (HF model cards)."""
  counts = {}
  for arch in hf.ARCHS:
    config = hf.get_config(f'arch={arch},size=real')
    config.model.scan_layers = True  # Traces one layer per unit: the same shapes, faster.
    validate(config)
    cfg = model_config(config)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    counts[arch] = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert counts == {'llama': 8_030_261_248, 'mixtral': 46_702_792_704,
                    'olmoe': 6_919_161_856, 'qwen3_moe': 30_532_122_624}


def test_the_docstring_table_is_the_real_sizes():
  rows = [line.split('|')[1:-1] for line in hf.__doc__.splitlines()
          if line.startswith('| ') and not line.startswith('| arch')]
  table = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}
  assert set(table) == set(hf.ARCHS)
  for arch, cells in table.items():
    real = hf.REAL[arch]
    number = lambda v: '-' if not v else f'{v:g}' if isinstance(v, float) and v < 1 else str(
        int(v))
    want = [number(real[k]) for k in ('d_model', 'num_layers', 'num_heads', 'num_kv_heads',
                                       'head_dim', 'num_experts', 'top_k', 'd_ff',
                                       'vocab_size', 'rope_max_wavelength', 'norm_eps')]
    renorm = hf.RENORMALIZE.get(arch)
    want.append('-' if renorm is None else 'yes' if renorm else 'no')
    assert cells == want, arch


def test_arch_and_size_arguments_are_checked():
  with pytest.raises(ValueError, match="arch='gpt2' is invalid"):
    hf.get_config('arch=gpt2')
  with pytest.raises(ValueError, match="size='huge' is invalid"):
    hf.get_config('arch=olmoe,size=huge')
