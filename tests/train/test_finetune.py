"""init_from (fine-tuning, sparse upcycling) and finetune.trainable, with tiny in-process runs.

A 'pre-trained' workdir is a tiny run's real checkpoint and config.json; the task fine-tune
reads a stdlib_func_name dataset built from a few files (conftest's `task_data_dir`).
"""

import os

import jax
import numpy as np
import pytest

from configs import t5_stmoe
from configs import tiny
from stmoe_jax.train import entry_points
from stmoe_jax.train import finetune
from stmoe_jax.models import layer_scan
from stmoe_jax.analysis import sweep
from stmoe_jax.train import train_lib
from stmoe_jax.train import trainable
from stmoe_jax.train.checkpointing import IncompatibleCheckpointError
from stmoe_jax.config import ConfigError, validate

LOG = lambda line: None


def _flat(tree):
  return {trainable.path_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _pretrain(config, workdir):
  """A real train.py workdir (checkpoint, config.json) holding `config`'s initial state at
  seed 1, so that it differs from any seed-0 run's; returns the trainer and that state."""
  config.seed = 1
  trainer = train_lib.Trainer(config, workdir)
  state = trainer.init()
  trainer.checkpointer.save(1, state, trainer.train_iterator().get_state(), force=True)
  trainer.checkpointer.wait()
  entry_points.record_config(config, workdir, 0, LOG)
  return trainer, state


def _config(data_dir, **moe):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.mesh = {'data': 1, 'expert': 1, 'model': 1}
  config.moe.update(**moe)
  return config


@pytest.fixture(scope='module')
def pretrained(stdlib_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  return workdir, _pretrain(_config(stdlib_data_dir), workdir)


@pytest.fixture(scope='module')
def task_run(pretrained, task_data_dir, tmp_path_factory):
  """A func_name fine-tune (non_moe) of the pre-trained run: trainer, its initial state, and the
  state after 3 steps."""
  config = _config(task_data_dir)
  config.data.update(task='func_name', name='stdlib_func_name', seq_len=32)
  config.update(init_from=f'{pretrained[0]}:1', batch_size=2)
  config.finetune.trainable = 'non_moe'
  config.opt.update(weight_decay=0.5, warmup_steps=0)  # Decay would move frozen matrices.
  trainer = train_lib.Trainer(config, str(tmp_path_factory.mktemp('finetune')))
  data = trainer.train_iterator()
  start = train_lib.restore_or_init(trainer, data, LOG)
  first = jax.device_get(start)
  state = start
  for _ in range(3):
    state, _ = trainer.train_step(state, trainer.global_batch(next(data)))
  return trainer, first, state, data


def test_init_from_copies_every_parameter_and_starts_the_optimizer_fresh(pretrained, task_run):
  _, (_, source) = pretrained
  _, first, _, _ = task_run
  got, want = _flat(first.params), _flat(source.params)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert int(first.step) == 0
  moments = [x for n, x in _flat(first.opt_state).items() if x.ndim]
  assert moments and all(not np.any(m) for m in moments)  # Adam's mu and nu: zeros.


def test_frozen_parameters_stay_bit_identical_and_the_rest_train(task_run):
  trainer, first, state, _ = task_run
  before, after = _flat(first.params), _flat(state.params)
  moe = {n for n in before if n.startswith('blocks/1/ffn/')}  # tiny: layer 1 is the MoE layer.
  assert moe
  for name in before:
    if name in moe:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    else:
      assert np.any(after[name] != before[name]), name


def test_a_finetune_run_resumes_from_its_own_checkpoint(task_run):
  trainer, first, state, data = task_run
  trainer.checkpointer.save(3, state, data.get_state(), force=True)
  trainer.checkpointer.wait()
  entry_points.record_config(trainer.config, trainer.workdir, 0, LOG)
  resumed = train_lib.restore_or_init(trainer, trainer.train_iterator(), LOG)
  assert int(resumed.step) == 3  # Not step 0 from init_from again.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
               jax.device_get(state.params))


def test_task_eval_reports_exact_match_over_the_validation_functions(task_run):
  trainer, _, state, _ = task_run
  metrics = trainer.evaluate(state)
  assert metrics['num_examples'] == 2  # two() and three().
  assert metrics['exact_match'] in (0.0, 0.5, 1.0)
  assert 0.0 <= metrics['accuracy'] <= 1.0


# Trainable masks against path lists written out for configs/tiny.py (layer 1 is MoE).
_ATTENTION = [f'blocks/{i}/attn/w_{p}' for i in (0, 1) for p in 'kovq']
_MOE = ['blocks/1/ffn/experts/w_down', 'blocks/1/ffn/experts/w_gate',
        'blocks/1/ffn/experts/w_up', 'blocks/1/ffn/router']


@pytest.mark.parametrize('kind,expected', [
    ('all', None), ('non_moe', 'not moe'), ('moe_only', _MOE), ('attention', _ATTENTION)])
def test_trainable_mask_selects_exactly_the_listed_parameters(kind, expected, stdlib_data_dir):
  from stmoe_jax.train import train_state  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  placement = train_state.place(_config(stdlib_data_dir))
  graphdef, params, buffers = placement.model.abstract()
  mask = _flat(trainable.mask(nnx.merge(graphdef, params, buffers), nnx.to_pure_dict(params),
                              kind))
  names = sorted(mask)
  assert len(names) == 22
  if expected is None:
    expected = names
  elif expected == 'not moe':
    expected = [n for n in names if n not in _MOE]
  assert sorted(n for n in names if mask[n]) == sorted(expected)


def test_a_shape_mismatch_names_the_parameter_and_both_shapes(pretrained, stdlib_data_dir):
  from stmoe_jax.train import train_state  # pylint: disable=g-import-not-at-top
  config = _config(stdlib_data_dir)
  config.model.d_ff = 48
  config.init_from = pretrained[0]
  with pytest.raises(IncompatibleCheckpointError) as e:
    finetune.plan(config.init_from, train_state.place(config))
  assert str(e.value) == (f"init_from='{pretrained[0]}': parameter blocks/0/ffn/w_down is "
                          '[64, 32] there but this model needs [48, 32]')


# Sparse upcycling: a dense run (every FFN d_ff=64) into an MoE run whose experts are 64 wide.


def _dense_and_moe(data_dir, **moe):
  dense = _config(data_dir, every=0)
  sparse = _config(data_dir, expert_d_ff=64, every=2, aux_loss_coef=0.0, z_loss_coef=0.0,
                   **moe)
  return dense, sparse


def _upcycle(data_dir, tmp_path, **model):
  """A dense run (`model` fields) upcycled into an MoE run (the same fields) by init_from, top-2
  of 4 at capacity factor 2.0 (C = 2 * 2 * S / 4: every token): (dense trainer, dense state,
  MoE trainer, MoE state), and asserts that at step 0 the MoE run drops nothing and has the
  dense run's loss (within 1e-5) on the first batch."""
  dense, sparse = _dense_and_moe(data_dir, top_k=2, renormalize_gates=True,
                                 train_capacity_factor=2.0)
  dense.model.update(**{k: v for k, v in model.items() if k != 'scan_layers'})
  sparse.model.update(**model)
  workdir = str(tmp_path / 'dense')
  dense_trainer, dense_state = _pretrain(dense, workdir)
  sparse.init_from = workdir
  trainer = train_lib.Trainer(sparse, str(tmp_path / 'moe'))
  data = trainer.train_iterator()
  state = train_lib.restore_or_init(trainer, data, LOG)
  batch, rng = next(data), jax.random.PRNGKey(0)
  loss = lambda t, st: jax.jit(t.placement.model.loss_fn, static_argnums=2)(
      st.params, st.buffers, t.graphdef, t.global_batch(batch), rng)[1][0]
  dense_metrics, moe_metrics = loss(dense_trainer, dense_state), loss(trainer, state)
  assert float(moe_metrics['dropped_fraction']) == 0.0
  assert abs(float(moe_metrics['loss']) - float(dense_metrics['loss'])) < 1e-5
  return dense_trainer, dense_state, trainer, state


def test_upcycled_moe_matches_the_dense_model_at_step_0(stdlib_data_dir, tmp_path):
  _, dense_state, trainer, state = _upcycle(stdlib_data_dir, tmp_path)
  got, want, fresh = _flat(state.params), _flat(dense_state.params), _flat(trainer.init().params)
  for e in range(4):  # Every expert a copy of the FFN it replaces.
    for w in ('w_up', 'w_gate', 'w_down'):
      np.testing.assert_array_equal(got[f'blocks/1/ffn/experts/{w}'][e], want[f'blocks/1/ffn/{w}'])
  np.testing.assert_array_equal(got['blocks/1/ffn/router'], fresh['blocks/1/ffn/router'])


@pytest.mark.parametrize('edit,message', [
    (dict(activation='gelu'), "cannot upcycle blocks/1/ffn: its dense FFN is "
                              "model.activation='gelu' but the experts would be 'geglu'"),
    (dict(expert_d_ff=32), 'upcycling blocks/1/ffn copies its dense FFN parameter '
                           'blocks/1/ffn/w_down [64, 32] into every expert, but'),
    (dict(num_shared_experts=1), 'cannot upcycle blocks/1/ffn with moe.num_shared_experts=1'),
])
def test_incompatible_upcycling_is_refused(edit, message, stdlib_data_dir, tmp_path):
  from stmoe_jax.train import train_state  # pylint: disable=g-import-not-at-top
  dense, sparse = _dense_and_moe(stdlib_data_dir)
  if 'activation' in edit:
    dense.model.activation = edit.pop('activation')
  sparse.moe.update(**edit)
  os.makedirs(tmp_path / 'dense')
  entry_points.record_config(dense, str(tmp_path / 'dense'), 0, LOG)  # plan reads no arrays.
  with pytest.raises(IncompatibleCheckpointError, match='.*'.join(
      map(__import__('re').escape, [message]))):
    finetune.plan(str(tmp_path / 'dense'), train_state.place(sparse))


@pytest.mark.parametrize('field,value,message', [
    ('data.task', 'qa', "config.data.task='qa' is invalid: expected one of 'lm', 'func_name'"),
    ('finetune.trainable', 'experts',
     "config.finetune.trainable='experts' is invalid: expected one of 'all'"),
    ('init_from', 'runs/x:last', "config.init_from='runs/x:last' is invalid"),
    ('init_from', ':5', "config.init_from=':5' is invalid"),
])
def test_bad_finetune_fields_are_refused(field, value, message):
  config = tiny.get_config()
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(ConfigError, match=__import__('re').escape(message)):
    validate(config)


def test_task_needs_its_dataset_and_moe_only_needs_moe():
  config = tiny.get_config()
  config.data.task = 'func_name'
  with pytest.raises(ConfigError, match="config.data.name='stdlib_py' is invalid: expected "
                                        "'stdlib_func_name' with data.task='func_name'"):
    validate(config)
  config = tiny.get_config()
  config.moe.enabled, config.finetune.trainable = False, 'moe_only'
  with pytest.raises(ConfigError, match="config.finetune.trainable='moe_only' is invalid"):
    validate(config)
  # The encoder-decoder's task rows hold no sentinel: its pre-trained vocabulary (261 at
  # seq_len 32) fits a task at seq_len 128, where span corruption would need 266 ids.
  config = sweep.load_config_file(os.path.join(sweep.REPO, 'configs', 't5_stmoe.py:size=tiny'))
  config.data.seq_len = 128
  with pytest.raises(ConfigError, match='config.model.vocab_size=261 is invalid: expected at '
                                        'least 266'):
    validate(config)
  config.data.task, config.data.name = 'func_name', 'stdlib_func_name'
  validate(config)


def test_exact_match_counts_rows_whose_every_answer_token_is_the_argmax(task_run):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from stmoe_jax.models import losses  # pylint: disable=g-import-not-at-top
  trainer, _, state, data = task_run
  batch = next(data)
  logits = np.asarray(nnx.merge(trainer.graphdef, state.params, state.buffers)(
      batch['inputs'], mask_BL=batch['inputs'] != 256)[0])
  argmax = logits.argmax(-1)
  # Force a known pattern: row 0 exactly right (targets := argmax on its answer), row 1 wrong
  # on one answer token only.
  targets = np.array(batch['targets'])
  answer = batch['weights'] > 0
  targets[0][answer[0]] = argmax[0][answer[0]]
  targets[1][answer[1]] = argmax[1][answer[1]]
  targets[1][np.flatnonzero(answer[1])[0]] = (argmax[1][np.flatnonzero(answer[1])[0]] + 1) % 256
  sums = losses.eval_step(state.params, state.buffers, {**batch, 'targets': targets},
                          graphdef=trainer.graphdef)
  assert int(sums['num_examples']) == 2 and int(sums['num_exact']) == 1
  assert int(sums['num_correct']) == int(answer.sum()) - 1


def test_shipped_finetune_and_upcycle_configs_fit_together(tmp_path):
  """configs/finetune.py validates for every trainable; configs/upcycle.py's MoE stage plans
  an upcycling of its dense stage (configs only, no arrays), both layers upcycled."""
  from configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  from configs import upcycle  # pylint: disable=g-import-not-at-top
  from stmoe_jax.train import train_state  # pylint: disable=g-import-not-at-top
  for kind in ('all', 'non_moe', 'moe_only', 'attention'):
    config = finetune_config.get_config(f'trainable={kind}')
    validate(config)
    assert config.finetune.trainable == kind and config.data.task == 'func_name'
  entry_points.record_config(upcycle.get_config('stage=dense'), str(tmp_path), 0, LOG)
  plan = finetune.plan(str(tmp_path), train_state.place(upcycle.get_config('stage=moe')))
  assert plan.upcycled == ('blocks/0/ffn', 'blocks/1/ffn')
  assert sorted(k for k, _ in plan.actions.values()).count('fresh') == 2
  with pytest.raises(ValueError, match="stage='sparse' is invalid"):
    upcycle.get_config('stage=sparse')


# The encoder-decoder (the paper's setting): span-corruption pre-trained, fine-tuned on the task.


@pytest.fixture(scope='module')
def t5_task_run(stdlib_data_dir, task_data_dir, tmp_path_factory):
  """configs/t5_stmoe.py:size=tiny's initial state saved as a span-corruption run, then its
  task=func_name,trainable=non_moe preset from it (shrunk: 32-byte encoder inputs, 2 rows):
  the pre-trained state, the fine-tune's first state and its state after 3 steps."""
  mesh = {'data': 1, 'expert': 1, 'model': 1}
  config = t5_stmoe.get_config('size=tiny')
  config.data.data_dir, config.mesh = stdlib_data_dir, mesh
  workdir = str(tmp_path_factory.mktemp('t5_pretrained'))
  _, source = _pretrain(config, workdir)
  config = t5_stmoe.get_config('size=tiny,task=func_name,trainable=non_moe')
  config.data.update(data_dir=task_data_dir, seq_len=32)  # Decoder length 8.
  config.moe.update(group_size=16, encoder_group_size=64)  # One group per batch of 2 rows.
  config.update(init_from=f'{workdir}:1', batch_size=2, mesh=mesh)
  config.opt.update(weight_decay=0.5, warmup_steps=0)  # Decay would move frozen matrices.
  trainer = train_lib.Trainer(config, str(tmp_path_factory.mktemp('t5_finetune')))
  data = trainer.train_iterator()
  state = train_lib.restore_or_init(trainer, data, LOG)
  first = jax.device_get(state)
  for _ in range(3):
    state, _ = trainer.train_step(state, trainer.global_batch(next(data)))
  return trainer, source, first, state


def test_encoder_decoder_finetune_from_span_corruption_freezes_its_experts(t5_task_run):
  trainer, source, first, state = t5_task_run
  batch = next(trainer.train_iterator())
  assert set(batch) == {'encoder_inputs', 'decoder_inputs', 'targets', 'weights'}
  assert batch['decoder_inputs'].shape == (2, 8) and not np.any(batch['targets'] >= 259)
  pre, start, after = _flat(source.params), _flat(first.params), _flat(state.params)
  assert start.keys() == pre.keys()
  for name in pre:
    np.testing.assert_array_equal(start[name], pre[name], err_msg=name)
  # t5 tiny: FFN 1 of each stack is the MoE layer (4 experts and a router each).
  moe = {n for n in pre if n.split('/')[0] in ('encoder_blocks', 'decoder_blocks') and
         n.split('/')[1:3] == ['1', 'ffn']}
  assert len(moe) == 8, sorted(moe)
  for name in pre:
    if name in moe:
      np.testing.assert_array_equal(after[name], start[name], err_msg=name)
    else:
      assert np.any(after[name] != start[name]), name
  metrics = trainer.evaluate(state)
  assert metrics['num_examples'] == 2  # two() and three().
  assert metrics['exact_match'] in (0.0, 0.5, 1.0)


# Across layer layouts (model.scan_layers): the checkpoint is converted (layer_scan.relayout).


def test_upcycling_a_dense_run_into_a_scanned_moe_run(stdlib_data_dir, tmp_path):
  # 4 layers: scanned, 2 units of (dense, MoE); step-0 losses equal (asserted in _upcycle).
  _, dense_state, _, state = _upcycle(stdlib_data_dir, tmp_path, num_layers=4, scan_layers=True)
  got, want = _flat(state.params), _flat(dense_state.params)
  for u, layer in enumerate((1, 3)):  # Scanned block 1, unit u = layer 2u + 1.
    for e in range(4):
      np.testing.assert_array_equal(got['blocks/1/ffn/experts/w_up'][u, e],
                                    want[f'blocks/{layer}/ffn/w_up'])
  for u, layer in enumerate((0, 2)):
    np.testing.assert_array_equal(got['blocks/0/attn/w_q'][u], want[f'blocks/{layer}/attn/w_q'])


def test_a_scanned_checkpoint_initialises_an_unscanned_run(stdlib_data_dir, tmp_path):
  source = _config(stdlib_data_dir)
  source.model.update(num_layers=4, scan_layers=True)
  _, source_state = _pretrain(source, str(tmp_path / 'scanned'))
  target = _config(stdlib_data_dir)
  target.model.num_layers = 4
  target.init_from = str(tmp_path / 'scanned')
  trainer = train_lib.Trainer(target, str(tmp_path / 'plain'))
  state = train_lib.restore_or_init(trainer, trainer.train_iterator(), LOG)
  want = layer_scan.to_unscanned(jax.device_get(source_state.params), 2)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), want)
