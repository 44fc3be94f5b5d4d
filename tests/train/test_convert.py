"""Hugging Face checkpoint conversion (stmoe_jax/train/convert.py, stmoe_jax/models/hf.py)
without torch: tiny random checkpoints written with safetensors from numpy, under HF's tensor
names and an HF-style config.json written here by hand (as transformers 4 wrote them), for what
transformers' own models do not check: refused fields and options, missing tensors, the fused
expert layout, scanned stacks, and converted workdirs in eval and train. Logits and round trips
against transformers: test_convert_transformers.py.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
import safetensors.numpy

from configs import hf as hf_presets
from stmoe_jax.config import ConfigError
from stmoe_jax.models import hf
from stmoe_jax.train import convert
from stmoe_jax.train import entry_points
from stmoe_jax.train import records
from stmoe_jax.train import train_lib

# Sizes no other test uses: 4 query heads of 6 (Qwen3: of 8, wider than D / H), 300 tokens.
COMMON = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
              hidden_act='silu', max_position_embeddings=64, initializer_range=0.02,
              bos_token_id=1, eos_token_id=2, use_cache=True, torch_dtype='float32')
HF_CONFIGS = {
    'llama': dict(COMMON, model_type='llama', architectures=['LlamaForCausalLM'],
                  num_key_value_heads=2, intermediate_size=40, rms_norm_eps=1e-5,
                  rope_theta=500000.0, rope_scaling=None, attention_bias=False, mlp_bias=False,
                  tie_word_embeddings=True, pretraining_tp=1),
    'mixtral': dict(COMMON, model_type='mixtral', architectures=['MixtralForCausalLM'],
                    num_key_value_heads=2, intermediate_size=20, num_local_experts=3,
                    num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
                    sliding_window=None, router_aux_loss_coef=0.02, router_jitter_noise=0.0,
                    output_router_logits=False, tie_word_embeddings=False),
    'olmoe': dict(COMMON, model_type='olmoe', architectures=['OlmoeForCausalLM'],
                  num_key_value_heads=4, intermediate_size=12, num_experts=6,
                  num_experts_per_tok=3, norm_topk_prob=False, rms_norm_eps=1e-5,
                  rope_theta=10000.0, rope_scaling=None, clip_qkv=None,
                  router_aux_loss_coef=0.01, tie_word_embeddings=False),
    # As transformers >= 5 writes it: rope_parameters, dtype, num_local_experts.
    'qwen3_moe': dict({k: v for k, v in COMMON.items() if k != 'torch_dtype'},
                      model_type='qwen3_moe', architectures=['Qwen3MoeForCausalLM'],
                      dtype='float32', num_key_value_heads=1, head_dim=8, intermediate_size=48,
                      moe_intermediate_size=10, num_local_experts=5, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                      use_sliding_window=False, sliding_window=None, rms_norm_eps=1e-6,
                      rope_parameters={'rope_type': 'default', 'rope_theta': 1e6},
                      router_aux_loss_coef=0.001, tie_word_embeddings=False),
}


def random_hf_tensors(c: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """float32 tensors under HF's names, scaled as test_hf_arch.randomize: norm scales around 1,
  O(1) projections, small embeddings (so that the norms' epsilon shows) unless they are also
  the output head."""
  rng = np.random.default_rng(seed)
  arch, D, V = c['model_type'], c['hidden_size'], c['vocab_size']
  H, G = c['num_attention_heads'], c['num_key_value_heads']
  K = c.get('head_dim', D // H)
  linear = lambda out, inp: rng.standard_normal((out, inp)) / np.sqrt(inp)
  norm = lambda n: 1 + 0.3 * rng.standard_normal(n)
  tied = c['tie_word_embeddings']
  sd = {'model.embed_tokens.weight': (1 if tied else 3e-3) * rng.standard_normal((V, D)),
        'model.norm.weight': norm(D)}
  if not tied:
    sd['lm_head.weight'] = linear(V, D)
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}'
    sd.update({f'{p}.input_layernorm.weight': norm(D),
               f'{p}.post_attention_layernorm.weight': norm(D),
               f'{p}.self_attn.q_proj.weight': linear(H * K, D),
               f'{p}.self_attn.k_proj.weight': linear(G * K, D),
               f'{p}.self_attn.v_proj.weight': linear(G * K, D),
               f'{p}.self_attn.o_proj.weight': linear(D, H * K)})
    if arch == 'olmoe':
      sd[f'{p}.self_attn.q_norm.weight'], sd[f'{p}.self_attn.k_norm.weight'] = (
          norm(H * K), norm(G * K))
    if arch == 'qwen3_moe':
      sd[f'{p}.self_attn.q_norm.weight'], sd[f'{p}.self_attn.k_norm.weight'] = norm(K), norm(K)
    if arch == 'llama':
      F = c['intermediate_size']
      sd.update({f'{p}.mlp.gate_proj.weight': linear(F, D), f'{p}.mlp.up_proj.weight':
                 linear(F, D), f'{p}.mlp.down_proj.weight': linear(D, F)})
      continue
    ffn = 'block_sparse_moe' if arch == 'mixtral' else 'mlp'
    E = c.get('num_local_experts') or c['num_experts']
    F = c['moe_intermediate_size'] if arch == 'qwen3_moe' else c['intermediate_size']
    names = ('w1', 'w3', 'w2') if arch == 'mixtral' else ('gate_proj', 'up_proj', 'down_proj')
    sd[f'{p}.{ffn}.gate.weight'] = linear(E, D)
    for e in range(E):
      sd.update({f'{p}.{ffn}.experts.{e}.{names[0]}.weight': linear(F, D),
                 f'{p}.{ffn}.experts.{e}.{names[1]}.weight': linear(F, D),
                 f'{p}.{ffn}.experts.{e}.{names[2]}.weight': linear(D, F)})
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def write_hf_checkpoint(directory: str, c: dict, tensors: dict, shards: int = 1) -> None:
  """config.json and model.safetensors, or `shards` files and HF's index of them."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(c, f)
  if shards == 1:
    safetensors.numpy.save_file(tensors, os.path.join(directory, 'model.safetensors'))
    return
  names, weight_map = sorted(tensors), {}
  for s in range(shards):
    file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
    part = {n: tensors[n] for n in names[s::shards]}
    safetensors.numpy.save_file(part, os.path.join(directory, file))
    weight_map.update({n: file for n in part})
  with open(os.path.join(directory, hf.INDEX), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)


def hyper_of(c: dict) -> dict:
  """tests/hf_reference.py's hyperparameters, read from the HF config alone."""
  return dict(layers=c['num_hidden_layers'], heads=c['num_attention_heads'],
              kv_heads=c['num_key_value_heads'],
              head_dim=c.get('head_dim', c['hidden_size'] // c['num_attention_heads']),
              eps=c['rms_norm_eps'],
              theta=c.get('rope_theta') or c['rope_parameters']['rope_theta'],
              top_k=c.get('num_experts_per_tok'), norm_topk_prob=c.get('norm_topk_prob'))


def test_the_presets_are_what_their_hf_configs_convert_to():
  """configs/hf.py's tiny presets -> HF config.json -> options: the same model."""
  for arch in hf.ARCHS:
    preset = hf_presets.get_config(f'arch={arch}')
    assert hf.arch_of(preset) == arch
    back = hf.config_from_hf(hf.hf_config(preset, arch))
    for section in ('model', 'attention') + (('moe',) if arch != 'llama' else ()):
      for name, value in back[section].items():
        if name not in hf._FREE[section] and not (section, name) == ('model', 'd_ff'):
          assert preset[section][name] == value, (arch, section, name)


@pytest.mark.parametrize('arch,field,value', [
    ('llama', 'rope_scaling', {'rope_type': 'llama3', 'factor': 8.0}),
    ('olmoe', 'clip_qkv', 8.0),
    ('qwen3_moe', 'mlp_only_layers', [0]),
    ('qwen3_moe', 'use_sliding_window', True),
    ('mixtral', 'sliding_window', 4096),
    ('llama', 'attention_bias', True),
    ('llama', 'hidden_act', 'gelu'),
    ('mixtral', 'model_type', 'gpt2'),
    ('llama', 'rope_parameters', {'rope_type': 'yarn', 'factor': 4.0}),
])
def test_unsupported_fields_are_refused_by_name(arch, field, value):
  c = dict(HF_CONFIGS[arch], **{field: value})
  with pytest.raises(ConfigError, match=f'field {field}[.a-z_]*=') as e:
    hf.config_from_hf(c)
  assert '\n' not in str(e.value)


def test_options_hf_cannot_express_are_refused_by_name():
  preset = hf_presets.get_config('arch=mixtral')
  preset.model.activation = 'geglu'
  with pytest.raises(ConfigError, match=r"config.model.activation='geglu' has no Hugging Face "
                                        r"mixtral equivalent: expected 'swiglu'"):
    hf.arch_of(preset)
  preset = hf_presets.get_config('arch=qwen3_moe')
  preset.moe.num_shared_experts = 1
  with pytest.raises(ConfigError, match='config.moe.num_shared_experts=1'):
    hf.arch_of(preset)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  c = HF_CONFIGS['llama']
  tensors = random_hf_tensors(c)
  config = hf.config_from_hf(c)
  from stmoe_jax.train import train_state  # pylint: disable=import-outside-toplevel
  placement = train_state.place(config)
  abstract = placement.abstract_state.params
  broken = dict(tensors)
  del broken['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(ConfigError, match='no tensor model.layers.1.mlp.up_proj.weight'):
    hf.from_hf_state_dict(broken, abstract, placement.model_cfg, 'llama')
  broken = dict(tensors, **{'model.layers.0.self_attn.q_proj.weight': np.zeros((24, 20))})
  with pytest.raises(ConfigError, match=r'q_proj.weight has shape \[24, 20\]; this config needs \[24, 24\]'):
    hf.from_hf_state_dict(broken, abstract, placement.model_cfg, 'llama')
  broken = dict(tensors, **{'model.layers.0.mlp.shared_expert.weight': np.zeros(3)})
  with pytest.raises(ConfigError, match='has tensor model.layers.0.mlp.shared_expert.weight'):
    hf.from_hf_state_dict(broken, abstract, placement.model_cfg, 'llama')


def test_eval_reads_a_converted_workdir(tmp_path, stdlib_data_dir):
  c = HF_CONFIGS['olmoe']
  source, workdir = str(tmp_path / 'hf'), str(tmp_path / 'workdir')
  write_hf_checkpoint(source, c, random_hf_tensors(c, seed=1))
  convert.from_hf(source, workdir, log=lambda _: None, data_dir=stdlib_data_dir)
  metrics = entry_points.evaluate_workdir(workdir, max_batches=1)
  assert metrics['step'] == 0
  # Random weights: about the entropy of a uniform guess over the 300 tokens, in nats.
  assert abs(metrics['loss'] - np.log(300)) < 1.0, metrics['loss']


def test_train_resumes_a_converted_workdir_as_init_from_starts_from_it(tmp_path, stdlib_data_dir):
  """Resuming the converted step 0 and a fresh run with init_from=it train the same steps: the
  same parameters, optimizer state and data from its beginning."""
  c = HF_CONFIGS['mixtral']
  source, converted = str(tmp_path / 'hf'), str(tmp_path / 'converted')
  write_hf_checkpoint(source, c, random_hf_tensors(c, seed=2))
  convert.from_hf(source, converted, log=lambda _: None, data_dir=stdlib_data_dir)
  config = entry_points.load_config(converted)
  config.update(num_train_steps=2, log_every_steps=1, eval_every_steps=2, eval_batches=1,
                checkpoint_every_steps=2, eval_sample_tokens=0, batch_size=2)
  config.moe.group_size = 2 * config.data.seq_len  # Not a resume field: a smaller step.
  train_lib.train_and_evaluate(config, converted)
  fresh = str(tmp_path / 'fresh')
  config.init_from = f'{converted}:0'
  train_lib.train_and_evaluate(config, fresh)
  losses = lambda w: [(r['step'], r['loss']) for r in records.read_jsonl(
      os.path.join(w, 'metrics.jsonl'), keys=('step', 'kind')) if r['kind'] == 'train']
  assert [s for s, _ in losses(converted)] == [1, 2]
  assert losses(converted) == losses(fresh)


def test_fused_experts_read_as_the_per_expert_tensors():
  """transformers >= 5 in memory: mlp.experts.gate_up_proj [E, 2F, D] (gate rows first) and
  mlp.experts.down_proj [E, D, F] per layer."""
  from stmoe_jax.train import train_state  # pylint: disable=import-outside-toplevel
  c = HF_CONFIGS['olmoe']
  tensors = random_hf_tensors(c, seed=2)
  placement = train_state.place(hf.config_from_hf(c))
  args = (placement.abstract_state.params, placement.model_cfg, 'olmoe')
  fused = {}
  for name, value in tensors.items():
    found = re.fullmatch(r'(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight', name)
    if not found:
      fused[name] = value
  for i in range(c['num_hidden_layers']):
    p = f'model.layers.{i}.mlp.experts'
    each = lambda kind: np.stack([tensors[f'{p}.{e}.{kind}.weight'] for e in range(6)])
    fused[f'{p}.gate_up_proj'] = np.concatenate([each('gate_proj'), each('up_proj')], axis=1)
    fused[f'{p}.down_proj'] = each('down_proj')
  want = hf.from_hf_state_dict(tensors, *args)
  got = hf.from_hf_state_dict(fused, *args)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_a_scanned_layer_stack_maps_the_same_tensors():
  """model.scan_layers: the mapping unstacks and restacks the 'layers' axis."""
  from stmoe_jax.train import train_state  # pylint: disable=import-outside-toplevel
  c = HF_CONFIGS['qwen3_moe']
  tensors = random_hf_tensors(c, seed=4)
  config = hf.config_from_hf(c)
  config.model.scan_layers = True
  placement = train_state.place(config)
  params = hf.from_hf_state_dict(tensors, placement.abstract_state.params,
                                 placement.model_cfg, 'qwen3_moe')
  assert params['blocks'][0]['ffn']['experts']['w_up'].shape == (2, 5, 24, 10)  # [U, E, D, F]
  back = hf.to_hf_state_dict(params, placement.model_cfg, 'qwen3_moe')
  assert sorted(back) == sorted(tensors)
  for name, value in tensors.items():
    assert back[name].tobytes() == value.tobytes(), name
