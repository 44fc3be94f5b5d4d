"""Starting from imported Hugging Face checkpoints (#29 item 4), without torch: a tiny
numpy-written Mixtral with its own tokenizer (<unk>, <s>, </s> first) fine-tuned on func_name
with each `finetune.trainable` (configs/finetune.py:from=W), and a tiny Llama on bytes
sparse-upcycled into a Mixtral-routed MoE (configs/upcycle.py:stage=moe,from=W) whose step-0
loss is the dense model's.
"""

import os

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import upcycle
from stmoe_jax.data import tokenizer
from stmoe_jax.models import hf
from stmoe_jax.train import convert
from stmoe_jax.train import entry_points
from stmoe_jax.train import train_lib
from stmoe_jax.train import trainable
from hf_reference import hf_logits
from hf_reference import write_model_tokenizer
from test_convert import HF_CONFIGS, hyper_of, random_hf_tensors, write_hf_checkpoint

LOG = lambda line: None


def _flat(tree):
  return {trainable.path_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


MISTRAL_SPECIALS = {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
                    'pad_token': None}
TEXTS = [f'def f_{i}(values):\n    return [v * {i} for v in values if v > {i % 3}]\n'
         for i in range(50)]


def _converted(root, arch: str, data_dir: str, seed: int, tokenizer: bool = False):
  """A numpy-written HF checkpoint of HF_CONFIGS[arch] (with a tokenizer of its 300 ids)
  converted to a workdir: (its float32 HF tensors, the workdir)."""
  c = HF_CONFIGS[arch]
  tensors = random_hf_tensors(c, seed=seed)
  write_hf_checkpoint(str(root / 'hf'), c, tensors)
  if tokenizer:
    write_model_tokenizer(str(root / 'hf'), TEXTS, c['vocab_size'], MISTRAL_SPECIALS)
  convert.from_hf(str(root / 'hf'), str(root / 'w'), log=LOG, data_dir=data_dir)
  return tensors, str(root / 'w')


def _cross_entropy(logits_BLV, batch) -> float:
  """Weighted mean cross-entropy (float64) of logits on a batch's targets."""
  logits = logits_BLV - logits_BLV.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = np.take_along_axis(logp, np.asarray(batch['targets'])[..., None], -1)[..., 0]
  weights = np.asarray(batch['weights'], np.float64)
  return float(-(target * weights).sum() / weights.sum())


@pytest.fixture(scope='module')
def mixtral(task_data_dir, tmp_path_factory):
  return _converted(tmp_path_factory.mktemp('mixtral'), 'mixtral', task_data_dir, seed=5,
                    tokenizer=True)


# Mixtral's 3 experts and router per layer are the MoE; the q/k/v/o projections the attention.
def _in_moe(name):
  return name.startswith('blocks/') and name.split('/')[2] == 'ffn'


def _in_attention(name):
  return name.startswith('blocks/') and name.split('/')[2] == 'attn'


TRAINED = {'all': lambda n: True, 'non_moe': lambda n: not _in_moe(n), 'moe_only': _in_moe,
           'attention': _in_attention}


@pytest.mark.parametrize('kind', ['non_moe', 'moe_only'])
def test_an_imported_mixtral_finetunes_on_func_name(kind, mixtral, tmp_path):
  """Step 0's cross-entropy is the numpy HF transcription's on the same batch; after 2 steps
  the parameters `kind` freezes are bit for bit the imported ones, the others all moved."""
  tensors, workdir = mixtral
  config = finetune_config.get_config(f'from={workdir},trainable={kind}')
  assert config.init_from == workdir and config.data.task == 'func_name'
  assert (config.model.d_model, config.moe.num_experts) == (24, 3)  # The checkpoint's model.
  config.data.seq_len, config.batch_size = 32, 2
  config.moe.group_size = 64
  config.opt.update(weight_decay=0.5, warmup_steps=0)  # Decay would move frozen matrices.
  trainer = train_lib.Trainer(config, str(tmp_path / 'ft'))
  data = trainer.train_iterator()
  state = train_lib.restore_or_init(trainer, data, LOG)
  before = _flat(state.params)
  batch = next(data)
  # [<s>] body [</s>] name [</s>] in the checkpoint's own ids, <unk> padding.
  assert config.data.tokenizer == os.path.join(workdir, 'tokenizer')
  inputs = batch['inputs']
  assert (inputs[:, 0] == 1).all() and (inputs == 2).any(axis=1).all()
  assert batch['weights'].sum() > 0 and inputs.max() > 258  # Subword ids, not bytes.
  state, metrics = trainer.train_step(state, trainer.global_batch(batch))
  want = _cross_entropy(hf_logits({k: v.astype(np.float64) for k, v in tensors.items()},
                                  batch['inputs'], 'mixtral', hyper_of(HF_CONFIGS['mixtral'])),
                        batch)
  assert abs(float(metrics['cross_entropy']) - want) < 1e-5, (metrics['cross_entropy'], want)
  state, _ = trainer.train_step(state, trainer.global_batch(next(data)))
  after = _flat(state.params)
  assert sum(map(TRAINED[kind], before)) not in (0, len(before))
  for name in before:
    if TRAINED[kind](name):
      assert np.any(after[name] != before[name]), name
    else:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize('kind', sorted(TRAINED))
def test_every_trainable_value_splits_an_imported_mixtral_as_named(kind, mixtral):
  """finetune.trainable's mask on the imported model against the parameter names."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  placement = entry_points.workdir_placement(mixtral[1])
  graphdef, params, buffers = placement.model.abstract()
  mask = _flat(trainable.mask(nnx.merge(graphdef, params, buffers), nnx.to_pure_dict(params),
                              kind))
  assert len(mask) == 23  # embed, final_norm, lm_head and 10 per layer.
  assert {n for n in mask if mask[n]} == {n for n in mask if TRAINED[kind](n)}


def test_an_imported_llama_upcycles_into_a_mixtral_with_its_step_0_loss(stdlib_data_dir,
                                                                       tmp_path):
  """Every expert a copy of the FFN it replaces, the routers fresh: with renormalised top-2
  gates and nothing dropped (dropless), the MoE computes the dense model, so both
  cross-entropies agree on one batch."""
  _, workdir = _converted(tmp_path, 'llama', stdlib_data_dir, seed=6)
  config = upcycle.get_config(f'stage=moe,from={workdir},experts=4,top_k=2')
  assert hf.arch_of(config) == 'mixtral'  # convert --to_hf can export the result.
  config.batch_size = 2
  config.moe.group_size = 2 * config.data.seq_len
  trainer = train_lib.Trainer(config, str(tmp_path / 'moe'))
  data = trainer.train_iterator()
  state = train_lib.restore_or_init(trainer, data, LOG)
  placement, _, dense = entry_points.restore_workdir(workdir)
  batch, rng = next(data), jax.random.PRNGKey(0)
  loss = lambda p, st: jax.jit(p.model.loss_fn, static_argnums=2)(
      st.params, st.buffers, p.graphdef, p.global_batch(batch), rng)[1][0]
  dense_metrics, moe_metrics = loss(placement, dense), loss(trainer.placement, state)
  assert float(moe_metrics['dropped_fraction']) == 0.0
  assert float(moe_metrics['balance_loss']) > 0  # The MoE layers did route.
  np.testing.assert_allclose(float(moe_metrics['cross_entropy']),
                             float(dense_metrics['cross_entropy']), rtol=0, atol=1e-5)
  got, want = _flat(state.params), _flat(dense.params)
  fresh = _flat(trainer.init().params)
  for layer in (0, 1):
    ffn = f'blocks/{layer}/ffn'
    for w in ('w_gate', 'w_up', 'w_down'):
      for e in range(4):
        np.testing.assert_array_equal(got[f'{ffn}/experts/{w}'][e], want[f'{ffn}/{w}'])
    np.testing.assert_array_equal(got[f'{ffn}/router'], fresh[f'{ffn}/router'])
  for name in want:
    if not name.split('/')[2:3] == ['ffn']:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_from_needs_a_dense_model_and_stage_moe(mixtral):
  with pytest.raises(ValueError, match=r"from='.*' is invalid with stage='dense': expected "
                                       'stage=moe'):
    upcycle.get_config(f'stage=dense,from={mixtral[1]}')
  with pytest.raises(ValueError, match=r"from='.*' is invalid: expected a dense model .*"
                                       r'moe.every=1\)'):
    upcycle.get_config(f'stage=moe,from={mixtral[1]}')
  with pytest.raises(FileNotFoundError, match='is .* a train.py workdir'):
    finetune_config.get_config(f'from={mixtral[1]}/nowhere')


def test_the_checkpoint_tokenizer_travels_in_and_out(mixtral, tmp_path):
  _, workdir = mixtral
  source = os.path.join(os.path.dirname(workdir), 'hf')
  assert entry_points.load_config(workdir).data.tokenizer == os.path.join(workdir, 'tokenizer')
  assert entry_points.trained_tokenizer_hash(workdir) == tokenizer.load(source).content_hash
  convert.to_hf(workdir, str(tmp_path / 'out'), log=LOG)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    with open(os.path.join(source, name), 'rb') as a, open(tmp_path / 'out' / name, 'rb') as b:
      assert a.read() == b.read(), name
