"""Hugging Face checkpoints of Llama, Mixtral, OLMoE and Qwen3-MoE: their config.json as our
options, their tensors as our parameters, both ways (docs/open_models.md).

`config_from_hf(hf_config)` is the ml_collections config of the model an HF `config.json`
describes (the option values configs/hf.py sets per architecture), refusing in one line the
fields these options do not express (`rope_scaling`, OLMoE's `clip_qkv`, Qwen's
`mlp_only_layers`, sliding windows, biases, ...). `hf_config(config, arch)` is the reverse;
`arch_of(config)` names the HF architecture a config is, or refuses the first option HF cannot
express.

`to_hf_state_dict(params, cfg, arch)` maps our parameter tree (a pure dict, scanned or not) to
HF tensor names and layouts (torch Linear weights [out, in], experts one module each, as in the
released checkpoints); `from_hf_state_dict(tensors, cfg, arch)` is its inverse, reading either
per-expert tensors or the fused `experts.gate_up_proj` / `experts.down_proj` of newer
`transformers`. Both only reshape and transpose: a round trip reproduces every tensor bit for
bit. `read_safetensors(directory)` / `write_safetensors` read and write a checkpoint directory
(one file or a sharded index).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import ml_collections
import numpy as np
import safetensors.numpy

from stmoe_jax import config as config_lib
from stmoe_jax.config import ConfigError, ModelConfig
from stmoe_jax.models import layer_scan

ARCHS = ('llama', 'mixtral', 'olmoe', 'qwen3_moe')
CAUSAL_LM = {'llama': 'LlamaForCausalLM', 'mixtral': 'MixtralForCausalLM',
             'olmoe': 'OlmoeForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM'}
# Per architecture, as configs/hf.py: QK-norm kind, and the training losses HF configs imply
# (OLMoE was trained with a router z-loss its HF config does not record).
QK_NORM = {'olmoe': 'full', 'qwen3_moe': 'per_head'}
Z_LOSS = {'olmoe': 0.001}
# Options that change training or dispatch but not what a dropless forward pass computes: a
# config may set them freely and still be exported.
_FREE = {
    'model': {'dtype', 'param_dtype', 'remat', 'scan_layers', 'init_scale'},
    'attention': {'query_chunk', 'logit_z_loss_coef', 'block_size', 'window', 'stride',
                  'num_local_blocks', 'num_global_blocks', 'head_top_k', 'head_capacity_factor',
                  'head_aux_loss_coef', 'head_z_loss_coef'},
    'moe': {'aux_loss_coef', 'z_loss_coef', 'balance_scope', 'importance_loss_coef',
            'load_loss_coef', 'seq_aux_loss_coef', 'expert_dropout', 'group_size',
            'encoder_group_size', 'grouped_matmul', 'dispatch', 'train_capacity_factor',
            'eval_capacity_factor', 'min_capacity', 'capacity_scaled_by_k',
            'second_policy_train', 'second_policy_eval', 'batch_prioritized_routing',
            'router_jitter', 'relu_l1_init', 'relu_l1_step', 'quantile_balance_rate'},
}


def _refuse(field: str, value: Any, why: str) -> ConfigError:
  return ConfigError(f'Hugging Face config field {field}={value!r} is not supported: {why}')


def _check_supported(hf: dict) -> str:
  """The architecture of `hf` (a config.json dict); ConfigError naming the first field these
  options cannot express."""
  arch = hf.get('model_type')
  if arch not in ARCHS:
    raise _refuse('model_type', arch, f'expected one of {ARCHS}')
  rope = hf.get('rope_parameters') or {}  # transformers >= 5 keeps rope_theta in here.
  if rope.get('rope_type', 'default') != 'default':
    raise _refuse('rope_parameters.rope_type', rope['rope_type'], "only 'default' rotary")
  extra = sorted(set(rope) - {'rope_type', 'rope_theta'})
  if extra:
    raise _refuse(f'rope_parameters.{extra[0]}', rope[extra[0]], "only 'default' rotary")
  for field, ok, why in (
      ('rope_scaling', lambda v: v is None, 'only unscaled rotary (no YaRN, Llama 3.1 scaling)'),
      ('partial_rotary_factor', lambda v: v in (None, 1, 1.0), 'rotary on the whole head'),
      ('hidden_act', lambda v: v in (None, 'silu'), "SwiGLU's 'silu' only"),
      ('attention_bias', lambda v: not v, 'projections have no biases'),
      ('mlp_bias', lambda v: not v, 'FFNs have no biases'),
      ('clip_qkv', lambda v: v is None, 'no clipping of q, k, v'),
      ('mlp_only_layers', lambda v: not v, 'every layer is an MoE layer'),
      ('decoder_sparse_step', lambda v: v in (None, 1), 'every layer is an MoE layer'),
      ('use_sliding_window', lambda v: not v, 'full attention only'),
      ('sliding_window', lambda v: v is None or not hf.get('use_sliding_window', True),
       'full attention only'),
      ('layer_types', lambda v: not v or set(v) == {'full_attention'}, 'full attention only'),
      ('pretraining_tp', lambda v: v in (None, 1), 'no tensor-parallel slicing'),
      ('attention_dropout', lambda v: not v, 'no attention dropout'),
      ('router_jitter_noise', lambda v: not v, 'no router jitter'),
      ('shared_expert_intermediate_size', lambda v: not v, 'no shared experts'),
  ):
    if field in hf and not ok(hf[field]):
      raise _refuse(field, hf[field], why)
  return arch


def _get(hf: dict, field: str, default: Any = None) -> Any:
  if field in hf and hf[field] is not None:
    return hf[field]
  if default is None:
    raise ConfigError(f'Hugging Face config has no field {field}')
  return default


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """The config (declared defaults plus the model's options) of an HF config.json dict."""
  arch = _check_supported(hf)
  config = config_lib.defaults()
  heads = _get(hf, 'num_attention_heads')
  kv_heads = _get(hf, 'num_key_value_heads', heads)
  rope = hf.get('rope_parameters') or {}
  theta = hf.get('rope_theta') or rope.get('rope_theta') or 10_000.0
  config.model.update(
      d_model=_get(hf, 'hidden_size'), num_layers=_get(hf, 'num_hidden_layers'),
      num_heads=heads, head_dim=_get(hf, 'head_dim', _get(hf, 'hidden_size') // heads),
      vocab_size=_get(hf, 'vocab_size'), rope_max_wavelength=float(theta),
      norm_eps=float(_get(hf, 'rms_norm_eps')), activation='swiglu',
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)), d_ff=_get(hf, 'intermediate_size'))
  config.attention.update(num_kv_heads=0 if kv_heads == heads else kv_heads,
                          qk_norm=QK_NORM.get(arch, 'none'), rope_layout='half_split')
  if arch == 'llama':
    config.moe.every = 0
    return config
  # transformers >= 5 writes num_local_experts for every architecture (num_experts an alias).
  experts = hf.get('num_local_experts') or _get(hf, 'num_experts')
  d_ff = _get(hf, 'moe_intermediate_size' if arch == 'qwen3_moe' else 'intermediate_size')
  # HF routes every choice of every token: dropless, one softmax over all experts (Mixtral's
  # softmax over the top-k logits is the same renormalised weights).
  config.moe.update(
      every=1, num_experts=experts, top_k=_get(hf, 'num_experts_per_tok'), expert_d_ff=d_ff,
      dispatch='dropless', router='tokens_choose', score_fn='softmax',
      renormalize_gates=True if arch == 'mixtral' else bool(hf.get('norm_topk_prob', False)),
      second_policy_train='all', second_policy_eval='all', balance_scope='global',
      aux_loss_coef=float(hf.get('router_aux_loss_coef', 0.0)), z_loss_coef=Z_LOSS.get(arch, 0.0))
  return config


def arch_of(config: ml_collections.ConfigDict) -> str:
  """The HF architecture whose options `config` has; ConfigError naming the first option (of
  the forward pass) with no HF equivalent."""
  if config.model.architecture != 'decoder_only':
    raise ConfigError(f'config.model.architecture={config.model.architecture!r} has no Hugging '
                      "Face equivalent here: expected 'decoder_only'")
  dense = not config.moe.every
  arch = ('llama' if dense else {'full': 'olmoe', 'per_head': 'qwen3_moe'}.get(
      config.attention.qk_norm, 'mixtral'))
  want = config_from_hf(hf_config(config, arch))
  sections = ('model', 'attention') if dense else ('model', 'attention', 'moe')
  for section in sections:
    for name in sorted(config[section]):
      if name in _FREE[section] or (section, name, dense) == ('model', 'd_ff', False):
        continue  # (model.d_ff: read by no layer while every FFN is an MoE layer.)
      ours, theirs = config[section][name], want[section][name]
      if ours != theirs and not (isinstance(ours, (tuple, list)) and
                                 tuple(ours) == tuple(theirs)):
        raise ConfigError(f'config.{section}.{name}={ours!r} has no Hugging Face {arch} '
                          f'equivalent: expected {theirs!r}')
  return arch


def hf_config(config: ml_collections.ConfigDict, arch: str, base: dict | None = None) -> dict:
  """The HF config.json dict of `config` as architecture `arch`: `base` (the config.json a
  converted checkpoint came with, so fields we do not model survive) with our fields set."""
  m, moe, att = config.model, config.moe, config.attention
  hf = dict(base or {})
  hf.update(
      model_type=arch, architectures=[CAUSAL_LM[arch]], hidden_size=m.d_model,
      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=att.num_kv_heads or m.num_heads, head_dim=m.head_dim,
      vocab_size=m.vocab_size, rms_norm_eps=m.norm_eps, hidden_act='silu',
      tie_word_embeddings=m.tie_embeddings, attention_bias=False, rope_scaling=None)
  if hf.get('rope_parameters'):  # transformers >= 5 keeps rope_theta in here.
    hf['rope_parameters'] = {**hf['rope_parameters'], 'rope_type': 'default',
                             'rope_theta': m.rope_max_wavelength}
  else:
    hf['rope_theta'] = m.rope_max_wavelength
  if 'head_dim' in (base or {}) and base['head_dim'] is None and (
      m.head_dim == m.d_model // m.num_heads):
    hf['head_dim'] = None  # As transformers writes it (Mixtral): the default, D / H.
  hf.setdefault('max_position_embeddings', 4096)
  hf['dtype' if 'dtype' in hf else 'torch_dtype'] = 'float32'  # What write_safetensors gets.
  if arch == 'llama':
    hf.update(intermediate_size=m.d_ff, mlp_bias=False)
    return hf
  hf.update(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef)
  for field in {'num_local_experts' if arch == 'mixtral' else 'num_experts'} | (
      {'num_local_experts', 'num_experts'} & set(hf)):
    hf[field] = moe.num_experts
  if arch == 'mixtral':
    hf.update(intermediate_size=moe.expert_d_ff, sliding_window=None, router_jitter_noise=0.0)
  else:
    hf.update(norm_topk_prob=moe.renormalize_gates)
  if arch == 'olmoe':
    hf.update(intermediate_size=moe.expert_d_ff, clip_qkv=None)
  if arch == 'qwen3_moe':
    hf.update(moe_intermediate_size=moe.expert_d_ff, decoder_sparse_step=1, mlp_only_layers=[],
              use_sliding_window=False)
    hf.setdefault('intermediate_size', m.d_ff)  # The dense MLP of mlp_only_layers (none).
  return hf


# ---- tensors ----

def _ffn_prefix(arch: str) -> str:
  return 'block_sparse_moe' if arch == 'mixtral' else 'mlp'


def _expert_names(arch: str) -> dict[str, str]:
  return ({'w_gate': 'w1', 'w_up': 'w3', 'w_down': 'w2'} if arch == 'mixtral' else
          {'w_gate': 'gate_proj', 'w_up': 'up_proj', 'w_down': 'down_proj'})


def _unscanned(params: dict, cfg: ModelConfig) -> dict:
  return layer_scan.relayout(params, cfg, dataclasses.replace(cfg, scan_layers=False))


def _block_rules(arch: str):
  """(our name within a block, HF name within `model.layers.i`, ours -> HF, HF -> ours given our
  shape) for every tensor but the experts."""
  ffn = _ffn_prefix(arch)
  t = lambda w: w.T
  flat_t = lambda w: w.reshape(w.shape[0], -1).T  # [D, H, K] -> [H*K, D]
  rules = [
      ('attn_norm.scale', 'input_layernorm.weight', None, None),
      ('ffn_norm.scale', 'post_attention_layernorm.weight', None, None),
      ('attn.w_q', 'self_attn.q_proj.weight', flat_t, lambda w, s: w.T.reshape(s)),
      ('attn.w_k', 'self_attn.k_proj.weight', flat_t, lambda w, s: w.T.reshape(s)),
      ('attn.w_v', 'self_attn.v_proj.weight', flat_t, lambda w, s: w.T.reshape(s)),
      # [H, K, D] -> [D, H*K]
      ('attn.w_o', 'self_attn.o_proj.weight', lambda w: w.reshape(-1, w.shape[-1]).T,
       lambda w, s: w.T.reshape(s)),
      # [K] (per head) or [H, K] (whole projection) -> [K] or [H*K]
      ('attn.q_norm.scale', 'self_attn.q_norm.weight', lambda w: w.reshape(-1),
       lambda w, s: w.reshape(s)),
      ('attn.k_norm.scale', 'self_attn.k_norm.weight', lambda w: w.reshape(-1),
       lambda w, s: w.reshape(s)),
      ('ffn.w_gate', 'mlp.gate_proj.weight', t, lambda w, s: w.T),
      ('ffn.w_up', 'mlp.up_proj.weight', t, lambda w, s: w.T),
      ('ffn.w_down', 'mlp.down_proj.weight', t, lambda w, s: w.T),
      ('ffn.router', f'{ffn}.gate.weight', t, lambda w, s: w.T),  # [D, E] <-> [E, D]
  ]
  return {ours: (theirs, fwd, back) for ours, theirs, fwd, back in rules}


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def to_hf_state_dict(params: dict, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array in HF layout (the dtype of `params`), from our params (a pure
  dict, scanned or not)."""
  flat = {k: np.asarray(v) for k, v in _flatten(_unscanned(params, cfg)).items()}
  sd = {'model.embed_tokens.weight': flat.pop('embed'),
        'model.norm.weight': flat.pop('final_norm.scale')}
  if 'lm_head' in flat:
    sd['lm_head.weight'] = flat.pop('lm_head').T
  rules, experts = _block_rules(arch), _expert_names(arch)
  for name, w in flat.items():
    found = re.fullmatch(r'blocks\.(\d+)\.(.+)', name)
    if not found:
      raise ConfigError(f'parameter {name} has no Hugging Face {arch} equivalent')
    i, rest = found.groups()
    p = f'model.layers.{i}'
    if rest in rules:
      theirs, fwd, _ = rules[rest]
      sd[f'{p}.{theirs}'] = fwd(w) if fwd else w
    elif rest.startswith('ffn.experts.') and rest[len('ffn.experts.'):] in experts:
      kind = rest[len('ffn.experts.'):]
      for e in range(w.shape[0]):  # [E, D, F] / [E, F, D] -> per expert [out, in]
        sd[f'{p}.{_ffn_prefix(arch)}.experts.{e}.{experts[kind]}.weight'] = w[e].T
    else:
      raise ConfigError(f'parameter {name} has no Hugging Face {arch} equivalent')
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def from_hf_state_dict(tensors: dict[str, np.ndarray], abstract_params: dict, cfg: ModelConfig,
                       arch: str) -> dict:
  """Our params (a pure dict in the layout of `abstract_params`, anything with `.shape` and
  `.dtype` as leaves) from HF tensors. ConfigError naming a missing, misshapen or unused
  tensor."""
  tensors = {k: v for k, v in tensors.items() if not k.endswith('rotary_emb.inv_freq')}
  used = set()
  unscanned_cfg = dataclasses.replace(cfg, scan_layers=False)
  shapes = _unscanned_shapes(abstract_params, cfg)
  rules, experts, ffn = _block_rules(arch), _expert_names(arch), _ffn_prefix(arch)

  def take(name: str) -> np.ndarray:
    if name not in tensors:
      raise ConfigError(f'the Hugging Face checkpoint has no tensor {name}, which this '
                        f'{arch} config needs')
    used.add(name)
    return np.asarray(tensors[name])

  def convert(ours: str, shape: tuple[int, ...]) -> np.ndarray:
    if ours == 'embed':
      return take('model.embed_tokens.weight')
    if ours == 'final_norm.scale':
      return take('model.norm.weight')
    if ours == 'lm_head':
      return take('lm_head.weight').T
    i, rest = re.fullmatch(r'blocks\.(\d+)\.(.+)', ours).groups()
    p = f'model.layers.{i}'
    if rest in rules:
      theirs, fwd, back = rules[rest]
      w = take(f'{p}.{theirs}')
      want = fwd(np.empty(shape, np.int8)).shape if fwd else shape
      if tuple(w.shape) != tuple(want):
        raise ConfigError(f'Hugging Face tensor {p}.{theirs} has shape {list(w.shape)}; this '
                          f'config needs {list(want)} (for {ours} {list(shape)})')
      return back(w, shape) if back else w
    kind = rest[len('ffn.experts.'):]
    fused = [f'{p}.{prefix}.experts.{"down_proj" if kind == "w_down" else "gate_up_proj"}'
             for prefix in (ffn, 'mlp')]
    fused = [name for name in fused if name in tensors]
    if fused:  # transformers >= 5: gate_up_proj [E, 2F, D] (gate rows first), down [E, D, F].
      w = take(fused[0])
      if kind == 'w_down':
        return np.swapaxes(w, 1, 2)
      half = w.shape[1] // 2
      return np.swapaxes(w[:, :half] if kind == 'w_gate' else w[:, half:], 1, 2)
    return np.stack([take(f'{p}.{ffn}.experts.{e}.{experts[kind]}.weight').T
                     for e in range(shape[0])])

  flat = {}
  for ours, (shape, dtype) in shapes.items():
    w = convert(ours, shape)
    if tuple(w.shape) != tuple(shape):
      raise ConfigError(f'Hugging Face tensor for {ours} has shape {list(w.shape)}; this '
                        f'config needs {list(shape)}')
    flat[ours] = np.ascontiguousarray(w.astype(dtype, copy=False))
  unused = sorted(set(tensors) - used)
  if unused:
    raise ConfigError(f'the Hugging Face checkpoint has tensor {unused[0]}, which this {arch} '
                      f'config has no parameter for ({len(unused)} unused)')
  tree = _unflatten(flat)
  return layer_scan.relayout(tree, unscanned_cfg, cfg)


def _unscanned_shapes(abstract_params: dict, cfg: ModelConfig) -> dict[str, tuple]:
  """{'blocks.0.attn.w_q': (shape, dtype), ...} of the unscanned layout."""
  flat = _flatten(abstract_params)
  if not cfg.scan_layers:
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}
  zeros = _unflatten({k: np.zeros(v.shape, v.dtype) for k, v in flat.items()})
  return {k: (v.shape, v.dtype) for k, v in _flatten(_unscanned(zeros, cfg)).items()}


def _unflatten(flat: dict[str, Any]) -> dict:
  tree = {}
  for name, value in flat.items():
    node, parts = tree, name.split('.')
    for part in parts[:-1]:
      node = node.setdefault(int(part) if part.isdigit() else part, {})
    node[parts[-1]] = value
  return tree


# ---- files ----

INDEX = 'model.safetensors.index.json'


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of an HF checkpoint directory: `model.safetensors`, or the shards its
  `model.safetensors.index.json` names, or else every `*.safetensors` file."""
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = sorted(n for n in os.listdir(directory) if n.endswith('.safetensors'))
  if not files:
    raise FileNotFoundError(f'no *.safetensors in {directory}')
  tensors = {}
  for name in files:
    tensors.update(safetensors.numpy.load_file(os.path.join(directory, name)))
  return tensors


def write_safetensors(directory: str, tensors: dict[str, np.ndarray]) -> str:
  """Writes `directory/model.safetensors` (HF's metadata {'format': 'pt'}); returns its path."""
  path = os.path.join(directory, 'model.safetensors')
  safetensors.numpy.save_file(tensors, path, metadata={'format': 'pt'})
  return path
