"""Conversion (stmoe_jax/train/convert.py) against `transformers` itself (PyTorch, CPU): tiny
random Llama, Mixtral, OLMoE and Qwen3-MoE models built from a config (no download,
tests/hf_tiny_checkpoint.py) and saved with `save_pretrained`, converted in (our float32 logits
within 1e-4 of theirs on the same ids) and out again (`from_pretrained` loads every tensor
bit for bit, hence the same logits, and every config.json field), the tokenizer both ways.
"""

import json
import os

import numpy as np
import pytest

from stmoe_jax.data import tokenizer as tokenizer_lib
from stmoe_jax.data import train_tokenizer
from stmoe_jax.models import hf
from stmoe_jax.train import convert
from stmoe_jax.train import entry_points

# torch, transformers and tests/hf_tiny_checkpoint.py (which imports both) are imported in the
# tests, not here: every xdist worker collects every file, and importing them takes seconds.

# Sizes neither the numpy tests nor the script use: 4 query heads of 4 (Qwen3: of 8, wider than
# D / H), 2 layers, 300 tokens.
COMMON = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
              max_position_embeddings=64)
SIZES = {
    # Grouped kv heads, embeddings tied to the output head (not saved: HF ties them on load).
    'llama': dict(num_key_value_heads=2, intermediate_size=24, rope_theta=500000.0,
                  tie_word_embeddings=True),
    'mixtral': dict(num_key_value_heads=2, intermediate_size=12, num_local_experts=3,
                    num_experts_per_tok=2),
    'olmoe': dict(num_key_value_heads=4, intermediate_size=8, num_experts=4,
                  num_experts_per_tok=3, norm_topk_prob=False),
    'qwen3_moe': dict(num_key_value_heads=1, head_dim=8, intermediate_size=32,
                      moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, rms_norm_eps=1e-6),
}
TEXTS = ['def add(a, b):\n    return a + b\n', 'import os\nprint(os.getcwd())  # héllo\n'] * 8


def _logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """arch -> (source model, source dir, workdir, exported dir, conversion log lines), each
  converted once; Llama's checkpoint carries a tokenizer."""
  import transformers  # pylint: disable=import-outside-toplevel
  import hf_tiny_checkpoint  # pylint: disable=import-outside-toplevel
  done = {}

  def get(arch: str):
    if arch not in done:
      root = tmp_path_factory.mktemp(arch)
      source, workdir, out = (str(root / n) for n in ('hf', 'workdir', 'out'))
      # Mixtral's in shards (a model.safetensors.index.json).
      model = hf_tiny_checkpoint.write(arch, source, max_shard_size='20KB' if arch == 'mixtral'
                                       else None, **COMMON, **SIZES[arch])
      if arch == 'llama':  # A byte-level BPE saved as transformers saves a fast tokenizer.
        train_tokenizer.train(TEXTS, 280, str(root / 'bpe'))
        transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(root / 'bpe' / tokenizer_lib.HF_FILE)).save_pretrained(source)
      lines = []
      convert.from_hf(source, workdir, log=lines.append)
      convert.to_hf(workdir, out, log=lines.append)
      done[arch] = model, source, workdir, out, lines
    return done[arch]

  return get


@pytest.mark.parametrize('arch', ['llama', 'mixtral', 'olmoe', 'qwen3_moe'])
def test_transformers_computes_our_logits_and_loads_the_export_exactly(arch, converted):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  import hf_tiny_checkpoint  # pylint: disable=import-outside-toplevel
  model, source, workdir, out, lines = converted(arch)
  if arch == 'mixtral':
    assert os.path.exists(os.path.join(source, 'model.safetensors.index.json'))
  tokens = convert.check_tokens(COMMON['vocab_size'])
  theirs = _logits(model, tokens)
  assert np.abs(theirs).max() > 1  # Not a trivially small comparison.
  assert np.abs(convert.our_logits(workdir, tokens) - theirs).max() <= 1e-4

  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                           **hf_tiny_checkpoint.EAGER).eval()
  want, got = model.state_dict(), back.state_dict()
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == torch.float32 and torch.equal(got[name], value), name
  np.testing.assert_array_equal(_logits(back, tokens), theirs)
  with open(os.path.join(source, 'config.json')) as f:
    original = json.load(f)
  with open(os.path.join(out, 'config.json')) as f:
    written = json.load(f)
  for field, value in original.items():
    assert written.get(field, 'absent') == value, field
  # The same config.json as transformers 4 wrote it (the released files): the same options.
  old = {k: v for k, v in original.items() if k not in ('rope_parameters', 'dtype')}
  old.update(rope_theta=original['rope_parameters']['rope_theta'], torch_dtype='float32')
  assert hf.config_from_hf(old).to_dict() == hf.config_from_hf(original).to_dict()
  if arch != 'llama':
    assert any(f'has no {tokenizer_lib.HF_FILE}' in line for line in lines), lines
    assert entry_points.load_config(workdir).data.tokenizer == tokenizer_lib.BYTES


def test_the_tokenizer_converts_both_ways(converted, tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  _, source, workdir, out, lines = converted('llama')
  original = transformers.AutoTokenizer.from_pretrained(source)
  spec = entry_points.load_config(workdir).data.tokenizer
  assert spec == os.path.join(os.path.abspath(workdir), convert.TOKENIZER_DIR), lines
  ours = tokenizer_lib.load(spec)
  assert ours.num_tokens == len(original) == 280
  assert entry_points.trained_tokenizer_hash(workdir) == ours.content_hash
  exported = transformers.AutoTokenizer.from_pretrained(out)
  for text in TEXTS[:2] + ['unseen: 字 and ünïcode']:
    ids = original(text, add_special_tokens=False)['input_ids']
    assert len(ids) < len(text.encode())  # Merged tokens, not bytes.
    assert ours.encode(text).tolist() == ids
    assert exported(text)['input_ids'] == original(text)['input_ids'] == ids
  # A vocabulary with no room for pad/bos/eos after it is left out, in one line.
  spec, line = convert._copy_tokenizer(source, str(tmp_path), vocab_size=282)
  assert spec == tokenizer_lib.BYTES and 'need vocab_size >= 283' in line and '\n' not in line
