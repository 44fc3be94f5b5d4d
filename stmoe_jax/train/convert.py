r"""Converts Hugging Face checkpoints (Llama, Mixtral, OLMoE, Qwen3-MoE) to train.py workdirs
and back (docs/open_models.md).

  python -m stmoe_jax.convert --from_hf=DIR --workdir=W [--check]
  python -m stmoe_jax.convert --to_hf --workdir=W --out=DIR [--step=S] [--check]

`--from_hf` reads DIR's config.json and safetensors (one file or a sharded index) and writes W:
config.json (the model's options, `models.hf.config_from_hf`; everything else at its declared
default), hf_config.json (DIR's config.json as it was, so a later `--to_hf` keeps the fields we
do not model), and checkpoint step 0 in train.py's format: the parameters in float32, fresh
optimizer moments, no data position. DIR's tokenizer (`tokenizer.json`, with
`tokenizer_config.json` and `special_tokens_map.json` when present) is copied to W/tokenizer and
becomes `data.tokenizer` (recorded by content hash, `entry_points.record_tokenizer`) when the
model embeds its ids: with the bos/eos its tokenizer_config.json names, or else with the
pad/bos/eos this codebase appends after them (`data.tokenizer`); otherwise (no
tokenizer.json, or a vocabulary that leaves no room) one line says so and `data.tokenizer`
stays 'bytes'. eval.py and sample.py read W; train.py starts from it with
`--config.init_from=W`, or resumes W itself from step 0 (the data from its beginning).

`--to_hf` writes DIR/config.json and DIR/model.safetensors (per-expert tensors, float32) from
W's newest (or `--step`) checkpoint, and the tokenizer files of W's `data.tokenizer` when it is
a tokenizer.json directory (a `tokenizer_config.json` naming the generic fast tokenizer when it
has none, so `AutoTokenizer` loads it as it is); a config with an option HF cannot express is
refused naming it.

`--check` loads both sides on a fixed batch of token ids, the HF one with `transformers`
(PyTorch, CPU, float32), and prints one JSON line with the largest absolute logit difference;
without `torch` and `transformers` it says so and exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmoe_jax.config import ConfigError
from stmoe_jax.data import tokenizer as tokenizer_lib
from stmoe_jax.models import factory as model_factory
from stmoe_jax.models import hf
from stmoe_jax.train import entry_points
from stmoe_jax.train import train_state
from stmoe_jax.train import workdir as workdir_lib

HF_CONFIG = 'hf_config.json'  # In a converted workdir: the source's config.json, verbatim.
TOKENIZER_DIR = 'tokenizer'  # In a converted workdir: the source's tokenizer files.
# What AutoTokenizer reads of a tokenizer.json tokenizer (the rest of a checkpoint's files are
# the model's).
TOKENIZER_FILES = (tokenizer_lib.HF_FILE, tokenizer_lib.HF_SPECIALS_FILE,
                   'special_tokens_map.json')


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _copy_tokenizer(hf_dir: str, workdir: str, vocab_size: int) -> tuple[str, str]:
  """(the `data.tokenizer` of a workdir converted from `hf_dir`, one line saying which): its
  tokenizer files copied to `workdir`/tokenizer if the model embeds their ids (with the model's
  own bos/eos when tokenizer_config.json names them, else the pad/bos/eos this codebase appends),
  else 'bytes'."""
  source = os.path.join(hf_dir, tokenizer_lib.HF_FILE)
  if not os.path.isfile(source):
    return tokenizer_lib.BYTES, (
        f'{hf_dir} has no {tokenizer_lib.HF_FILE}: no tokenizer converted, data.tokenizer stays '
        "'bytes' (ids 0-255 read as utf-8 bytes, whatever this model was trained on)")
  try:
    tok = tokenizer_lib.load(hf_dir)
  except ConfigError as e:
    return tokenizer_lib.BYTES, f"{source} not converted ({e}); data.tokenizer stays 'bytes'"
  if tok.vocab_size > vocab_size:
    return tokenizer_lib.BYTES, (
        f"{source} not converted: its {tok.vocab_size} ids exceed the model's "
        f'vocab_size={vocab_size} (need vocab_size >= {tok.vocab_size}); data.tokenizer stays '
        "'bytes'")
  directory = os.path.abspath(os.path.join(workdir, TOKENIZER_DIR))
  os.makedirs(directory, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(directory, name))
  return directory, (f'tokenizer {source} ({tok.num_tokens} tokens, {tok.content_hash}) copied '
                     f'to {directory}: data.tokenizer={directory}')


def from_hf(hf_dir: str, workdir: str, log: Callable[[str], None] = print,
            data_dir: str = '') -> None:
  """Writes train.py workdir `workdir` from HF checkpoint directory `hf_dir` (see the module
  docstring), its config reading data from TFDS `data_dir` ('' = the TFDS default).
  ConfigError naming an unsupported field or a missing or misshapen tensor; FileExistsError if
  `workdir` already has checkpoints."""
  source = _read_json(os.path.join(hf_dir, 'config.json'))
  config = hf.config_from_hf(source)
  config.data.data_dir = data_dir
  arch = source['model_type']
  checkpoints = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise FileExistsError(f'workdir {workdir} already has checkpoints: choose a new --workdir')
  workdir_lib.prepare(workdir)
  config.data.tokenizer, tokenizer_line = _copy_tokenizer(hf_dir, workdir,
                                                          config.model.vocab_size)
  placement = train_state.place(config)
  shardings, abstract = placement.state_shardings, placement.abstract_state
  params = hf.from_hf_state_dict(hf.read_safetensors(hf_dir), abstract.params,
                                 placement.model_cfg, arch)
  params = jax.device_put(params, shardings.params)
  buffers = jax.tree.map(lambda a, s: jax.device_put(jnp.zeros(a.shape, a.dtype), s),
                         abstract.buffers, shardings.buffers)
  _, rng = jax.random.split(jax.random.PRNGKey(config.seed))  # As `train_state.init_state`.
  zero = jnp.zeros((), jnp.int32)
  state = train_state.TrainState(
      step=zero, params=params, buffers=buffers,
      opt_state=jax.jit(placement.tx.init, out_shardings=shardings.opt_state)(params),
      rng=rng, skipped_steps=zero, halted_at=zero)
  ckpt = entry_points.checkpointer(config, workdir)
  try:
    ckpt.save(0, state, {}, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  entry_points.record_config(config, workdir)
  if config.data.tokenizer != tokenizer_lib.BYTES:
    entry_points.record_tokenizer(config, workdir)
  shutil.copyfile(os.path.join(hf_dir, 'config.json'), os.path.join(workdir, HF_CONFIG))
  log(f'Converted {arch} from {hf_dir} to {workdir} (checkpoint step 0, '
      f'{sum(x.size for x in jax.tree.leaves(params)):,} parameters)')
  log(tokenizer_line)


def to_hf(workdir: str, out: str, step: int | None = None,
          log: Callable[[str], None] = print) -> None:
  """Writes `out`/config.json and `out`/model.safetensors from checkpoint `step` (default: the
  newest) of `workdir`. ConfigError naming an option HF cannot express."""
  config = entry_points.load_config(workdir)
  arch = hf.arch_of(config)  # Refused before anything is restored.
  placement, step, state = entry_points.restore_workdir(workdir, step)
  base_path = os.path.join(workdir, HF_CONFIG)
  base = _read_json(base_path) if os.path.exists(base_path) else None
  if base is not None and base.get('model_type') != arch:
    base = None  # Converted from another architecture, since changed: nothing to keep.
  tensors = hf.to_hf_state_dict(jax.device_get(state.params), placement.model_cfg, arch)
  os.makedirs(out, exist_ok=True)
  hf.write_safetensors(out, tensors)
  hf_cfg = hf.hf_config(placement.config, arch, base)
  spec = placement.config.data.tokenizer  # restore_workdir checked it is the one trained with.
  tok = tokenizer_lib.load(spec)
  if base is None:  # Trained here: the special ids our pipelines used.
    hf_cfg.update(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf_cfg, f, indent=2)
  log(f'Wrote {arch} checkpoint step {step} of {workdir} to {out}')
  log(_write_tokenizer(tok, out))


def _write_tokenizer(tok: tokenizer_lib.Tokenizer, out: str) -> str:
  """Copies the tokenizer files of `tok` (a tokenizer.json directory) to `out`; one line
  saying what was written."""
  if not isinstance(tok, tokenizer_lib.HuggingFaceTokenizer):
    return (f'no tokenizer written: data.tokenizer={tok.spec!r} is not a '
            f'{tokenizer_lib.HF_FILE} directory')
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(tok.spec, name)):
      shutil.copyfile(os.path.join(tok.spec, name), os.path.join(out, name))
  config_path = os.path.join(out, TOKENIZER_FILES[1])
  if not os.path.exists(config_path):  # Else AutoTokenizer picks the class of the model_type.
    with open(config_path, 'w') as f:
      json.dump({'tokenizer_class': 'PreTrainedTokenizerFast'}, f, indent=2)
  return f'Wrote tokenizer {tok.spec} ({tok.num_tokens} tokens, {tok.content_hash}) to {out}'


# ---- --check ----

def check_tokens(vocab_size: int) -> np.ndarray:
  """The fixed batch `--check` compares on: [2, 16] ids."""
  return np.random.default_rng(0).integers(0, vocab_size, (2, 16))


def our_logits(workdir: str, tokens: np.ndarray, step: int | None = None) -> np.ndarray:
  """float32 [B, L, V] logits of a workdir's checkpoint on `tokens`, every MoE layer routing
  as HF does, whatever the run trained with: every choice of every token kept. (One sequence
  a routing group, each expert with room for all of it: the einsum dispatch with nothing
  dropped computes what dropless does, and compiles faster on CPU.)"""
  placement, _, state = entry_points.restore_workdir(workdir, step)
  cfg = placement.model_cfg
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
      cfg.moe, dispatch='einsum', second_policy_eval='all', group_size=tokens.shape[1],
      eval_capacity_factor=float(cfg.moe.num_experts), min_capacity=tokens.shape[1]))
  graphdef, _, _ = model_factory.get_model(cfg).abstract()

  @jax.jit
  def forward(params, buffers, tokens):
    logits, _ = nnx.merge(graphdef, params, buffers)(tokens, train=False)
    return logits

  return np.asarray(forward(state.params, state.buffers, jnp.asarray(tokens, jnp.int32)),
                    np.float32)


def check(hf_dir: str, workdir: str, step: int | None = None) -> dict:
  """{'max_abs_logit_diff', ...} of `transformers`' model of `hf_dir` against `workdir`'s;
  ImportError when torch or transformers is missing."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  source = _read_json(os.path.join(hf_dir, 'config.json'))
  tokens = check_tokens(source['vocab_size'])
  # The reference loops: torch's grouped matmul refuses (on CPU) experts whose width is no
  # multiple of 16 bytes.
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32, attn_implementation='eager', experts_implementation='eager')
  model.eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens)).logits.float().numpy()
  ours = our_logits(workdir, tokens, step)
  return {'model_type': source['model_type'], 'tokens': list(tokens.shape),
          'max_abs_logit_diff': float(np.abs(ours - theirs).max()),
          'max_abs_logit': float(np.abs(theirs).max()), 'transformers': transformers.__version__}


def run_check(hf_dir: str, workdir: str, step: int | None = None) -> int:
  """`--check`: prints the JSON line (exit status 0), or why it cannot (exit status 2)."""
  try:
    result = check(hf_dir, workdir, step)
  except ImportError as e:
    print(f'--check needs torch and transformers ({e.name or e} is not importable)',
          file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0
