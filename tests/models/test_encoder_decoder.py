"""The encoder-decoder (stmoe_jax.models.encoder_decoder) through the model seam: a bidirectional
encoder, a causal decoder, KV-cache decoding equal to the full forward pass, non-causal encoder
routing, per-stack routing telemetry, its config refusals, and train/eval/sample end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import t5_stmoe
from conftest import tiny_model_config
from stmoe_jax.train import entry_points
from stmoe_jax.train import evaluation
from stmoe_jax.models import flops
from stmoe_jax.train import metrics as metrics_lib
from stmoe_jax.models import factory as model_factory
from stmoe_jax.models import sampling
from stmoe_jax import config as config_lib
from stmoe_jax.config import ConfigError, validate
from stmoe_jax.data import span_corruption
from stmoe_jax.data import tasks
from stmoe_jax.data import tokenizer
from stmoe_jax.models.encoder_decoder import EncoderDecoder, init_caches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAD, S0 = tokenizer.PAD_ID, tokenizer.VOCAB_SIZE
B, T, L = 2, 16, 8


def encdec_config(**moe):
  """2 + 2 layers of width 16, MoE in layer 1 of each stack, 2 sentinels."""
  return tiny_model_config(architecture='encoder_decoder', num_encoder_layers=2, vocab_size=261,
                           moe={'group_size': 16, **moe})


def make(cfg, seed=0):
  return EncoderDecoder(cfg, rngs=nnx.Rngs(params=seed))


def jitted(model, fn):
  """fn(module, *args) compiled once for the module's current parameters (the tests' models
  run eagerly op by op otherwise, which costs minutes of CPU)."""
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: compiled(state, *args)


def tokens(seed, shape, high=261):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


@pytest.fixture(scope='module')
def model():
  return make(encdec_config())


def test_encoder_is_bidirectional_and_hides_padding(model):
  encode = jitted(model, lambda m, enc, mask: m.encode(enc, mask)[0])
  enc = tokens(0, (B, T), 256)
  mask = jnp.ones((B, T), bool).at[1, T - 4:].set(False)
  out = encode(enc, mask)
  changed = encode(enc.at[:, T - 5].set((enc[:, T - 5] + 1) % 256), mask)
  # A later real token changes every earlier position of its row.
  assert np.all(np.abs(np.asarray(out - changed))[:, :T - 5].max(-1) > 1e-4)
  # Padding content changes no real position.
  padded = encode(enc.at[1, T - 4:].set(7), mask)
  np.testing.assert_array_equal(np.asarray(out[1, :T - 4]), np.asarray(padded[1, :T - 4]))


def test_decoder_is_causal_and_reads_the_encoder(model):
  forward = jitted(model, lambda m, enc, dec, mask: m(enc, dec, encoder_mask_BT=mask)[0])
  enc, dec = tokens(1, (B, T)), tokens(2, (B, L))
  mask = jnp.ones((B, T), bool).at[:, T - 3:].set(False)
  logits = forward(enc, dec, mask)
  j = 5
  later = forward(enc, dec.at[:, j].set((dec[:, j] + 1) % 259), mask)
  np.testing.assert_array_equal(np.asarray(logits[:, :j]), np.asarray(later[:, :j]))
  assert np.abs(np.asarray(logits[:, j] - later[:, j])).max() > 1e-4
  other_input = forward(enc.at[:, 0].set((enc[:, 0] + 1) % 259), dec, mask)
  assert np.abs(np.asarray(logits[:, 0] - other_input[:, 0])).max() > 1e-4
  # Cross-attention never reads encoder padding.
  other_padding = forward(enc.at[:, T - 3:].set(7), dec, mask)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(other_padding))


def test_kv_cache_decoding_equals_the_full_forward_pass():
  # The sampler's routing: decoder tokens alone (groups of 1), one encoder input per group.
  cfg = encdec_config(encoder_group_size=T)
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, group_size=1))
  model = make(cfg, seed=3)
  enc, dec = tokens(4, (B, T)), tokens(5, (B, L))
  enc_mask = jnp.ones((B, T), bool).at[0, T - 3:].set(False)
  full = jitted(model, lambda m, enc, dec, mask: m(enc, dec, encoder_mask_BT=mask)[0])(
      enc, dec, enc_mask)
  crosses = jitted(model, lambda m, enc, mask: m.cross_caches(m.encode(enc, mask)[0], mask))(
      enc, enc_mask)  # Computed once.
  decode = jitted(model, lambda m, dec, caches, crosses: m.decode(dec, caches, crosses))
  caches = init_caches(cfg, B, L)
  prefix = 3
  logits, caches = decode(dec[:, :prefix], caches, crosses)
  steps = [logits]
  for t in range(prefix, L):
    logits, caches = decode(dec[:, t:t + 1], caches, crosses)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full),
                             atol=2e-5, rtol=1e-5)
  assert int(caches[0].end) == L and len(caches) == cfg.num_layers


def test_encoder_routes_non_causally_decoder_refuses_it():
  cfg = encdec_config(encoder_router='expert_choice', min_capacity=1)
  logits, stats = jitted(make(cfg), lambda m, enc, dec: m(enc, dec, train=True))(
      tokens(6, (B, T)), tokens(7, (B, L)))
  # Expert choice: K = E choices per token in the encoder, top-2 in the decoder; every expert
  # takes exactly its capacity, so the encoder's load is perfectly balanced.
  assert stats['dropped_fraction_per_slot/encoder'].shape == (1, 4)
  assert stats['dropped_fraction_per_slot/decoder'].shape == (1, 2)
  np.testing.assert_allclose(np.asarray(stats['expert_load/encoder']), 0.25, atol=1e-6)
  assert np.isfinite(np.asarray(logits)).all()
  make(encdec_config(encoder_batch_prioritized_routing=True))  # BPR in the encoder builds.
  with pytest.raises(ValueError, match='cannot be used in a causal decoder'):
    make(encdec_config(router='expert_choice'))


def test_params_carry_logical_axes_and_the_embedding_is_shared():
  graphdef, params, _ = model_factory.get_model(encdec_config()).abstract()
  for path, p in nnx.to_flat_state(params):
    axes = p.get_metadata()['out_sharding']
    assert len(axes) == len(p.value.shape), path
  names = {'/'.join(map(str, path)) for path, _ in nnx.to_flat_state(params)}
  assert 'embed' in names and not any('embed' in n and n != 'embed' and 'blocks' not in n
                                      for n in names)
  assert any(n.startswith('decoder_blocks/1/cross/w_k') for n in names)
  assert any(n.startswith('encoder_blocks/1/ffn/router') for n in names)


def test_loss_and_eval_report_routing_per_stack():
  # Shazeer's importance and DeepSeek-V3's sequence-wise balance losses: both stacks'.
  cfg = encdec_config(importance_loss_coef=0.5, seq_aux_loss_coef=0.25)
  model = model_factory.get_model(cfg)
  params, buffers = model.init(jax.random.PRNGKey(0))
  graphdef = model.abstract()[0]
  batch = span_corruption.to_batch(
      [span_corruption.SpanCorrupt(0.15, 3.0).random_map(
          {'tokens': np.arange(2, 20, dtype=np.int32) + i}, np.random.default_rng(i))
       for i in range(B)],
      span_corruption.Lengths(raw_len=18, encoder_len=T, targets_len=L, decoder_len=L,
                              num_sentinels=2), B)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss, (metrics, _) = jax.jit(model.loss_fn, static_argnums=2)(
      params, buffers, graphdef, batch, jax.random.PRNGKey(1))
  # Reference: the same cross-entropy from the module's logits, plus both stacks' aux losses.
  enc_mask = batch['encoder_inputs'] != PAD
  logits, stats = jitted(nnx.merge(graphdef, params, buffers), lambda m, b: m(
      b['encoder_inputs'], b['decoder_inputs'], encoder_mask_BT=b['encoder_inputs'] != PAD,
      decoder_mask_BL=b['decoder_inputs'] != PAD, train=True, rng=jax.random.PRNGKey(1)))(batch)
  logp = jax.nn.log_softmax(logits)
  w = batch['weights']
  ce = -jnp.sum(jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0] * w) / w.sum()
  balance = stats['balance_loss/encoder'].sum() + stats['balance_loss/decoder'].sum()
  z = stats['z_loss/encoder'].sum() + stats['z_loss/decoder'].sum()
  importance = stats['importance_loss/encoder'].sum() + stats['importance_loss/decoder'].sum()
  seq_balance = stats['seq_balance_loss/encoder'].sum() + stats['seq_balance_loss/decoder'].sum()
  assert importance > 0 and seq_balance > 0
  np.testing.assert_allclose(float(loss), float(ce + 1e-2 * balance + 1e-3 * z +
                                                0.5 * importance + 0.25 * seq_balance), rtol=1e-5)
  assert metrics['expert_load/encoder'].shape == metrics['expert_load/decoder'].shape == (1, 4)
  table = evaluation.byte_table(tokenizer.load(), cfg.vocab_size)  # As `make_eval_step` adds.
  out = jax.jit(lambda b: {**model.eval_step(params, buffers, b, graphdef=graphdef),
                           'num_bytes': evaluation.count_bytes(b, table)})
  report = evaluation.evaluate(out, [batch, batch], cfg)
  assert [(l['stack'], l['layer']) for l in report['moe_layers']] == [('encoder', 1),
                                                                      ('decoder', 1)]
  single = out(batch)
  np.testing.assert_allclose(report['moe_layers'][0]['expert_load'],
                             np.asarray(single['expert_load/encoder'][0]), atol=1e-6)
  assert report['num_tokens'] == 2 * int(w.sum())


def test_task_exact_match_counts_rows_whose_every_answer_token_is_the_argmax():
  """seq2seq task rows (tasks.seq2seq_example): with the targets forced to the model's own
  argmax, row 0 everywhere on its answer + EOS and row 1 all but one answer token, eval counts
  one exact example of two and one wrong token (the decoder-only test's pattern)."""
  cfg = encdec_config()
  model = model_factory.get_model(cfg)
  assert model.task_format == 'seq2seq'
  params, buffers = model.init(jax.random.PRNGKey(0))
  graphdef = model.abstract()[0]
  rows = [tasks.FORMATS[model.task_format](tokenizer.encode(p), tokenizer.encode(a), T, L)
          for p, a in (('return a + b', 'add'), ('return -x', 'neg_it'))]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  logits = jitted(nnx.merge(graphdef, params, buffers), lambda m, b: m(
      b['encoder_inputs'], b['decoder_inputs'], encoder_mask_BT=b['encoder_inputs'] != PAD,
      decoder_mask_BL=b['decoder_inputs'] != PAD, train=False)[0])(batch)
  argmax = np.asarray(logits).argmax(-1)
  answer = batch['weights'] > 0
  targets = np.array(batch['targets'])
  targets[answer] = argmax[answer]
  wrong = np.flatnonzero(answer[1])[2]
  targets[1, wrong] = (argmax[1, wrong] + 1) % cfg.vocab_size
  sums = jax.jit(lambda b: model.eval_step(params, buffers, b, graphdef=graphdef))(
      {**batch, 'targets': targets})
  assert int(sums['num_examples']) == 2 and int(sums['num_exact']) == 1
  assert int(sums['num_correct']) == int(answer.sum()) - 1 == 4 + 7 - 1
  sums = jax.jit(lambda b: model.eval_step(params, buffers, b, graphdef=graphdef))(
      {**batch, 'targets': np.where(answer, argmax, targets)})
  assert int(sums['num_exact']) == 2


def _t5_tiny(**overrides):
  config = t5_stmoe.get_config('size=tiny')
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


@pytest.mark.parametrize('overrides,message', [
    ({'data.objective': 'mlm'}, "config.data.objective='mlm' is invalid: expected one of"),
    ({'data.noise_density': 1.0}, 'config.data.noise_density=1.0 is invalid'),
    ({'data.mean_noise_span_length': 0.5}, 'config.data.mean_noise_span_length=0.5 is invalid'),
    ({'model.architecture': 'seq2seq'}, "config.model.architecture='seq2seq' is invalid"),
    ({'model.num_encoder_layers': -1}, 'config.model.num_encoder_layers=-1 is invalid'),
    ({'model.num_encoder_layers': 0}, 'config.model.num_encoder_layers=0 is invalid: expected '
                                      "a positive integer with model.architecture='encoder_"),
    ({'data.objective': 'causal_lm'}, "config.data.objective='causal_lm' is invalid: expected "
                                      "'span_corruption' with model.architecture='encoder_"),
    ({'model.vocab_size': 259}, 'config.model.vocab_size=259 is invalid: expected at least 261'),
    ({'moe.encoder_router': 'no_such'}, "config.moe.encoder_router='no_such' is invalid"),
    ({'moe.encoder_router': 'hash'}, "config.moe.encoder_router='hash' is invalid: the "
                                     'encoder-decoder does not pass token ids'),
    ({'moe.encoder_router': 'expert_choice', 'moe.dispatch': 'dropless'},
     "config.moe.encoder_router='expert_choice' is invalid: expected a router with a dropless"),
    ({'moe.encoder_group_size': -1}, 'config.moe.encoder_group_size=-1 is invalid'),
    ({'moe.encoder_group_size': 48}, 'config.moe.encoder_group_size=48 is invalid'),
    ({'moe.group_size': 12}, 'config.moe.group_size=12 is invalid: expected a divisor or '
                             'multiple of decoder length=8'),
    ({'attention.kind': 'local'}, "config.attention.kind='local' is invalid: expected 'dense'"),
    ({'attention.logit_z_loss_coef': 1e-4}, 'config.attention.logit_z_loss_coef=0.0001 is'),
    ({'model.scan_layers': True, 'model.num_encoder_layers': 3},
     'config.model.num_encoder_layers=3 is invalid: expected a multiple of 2 with '
     'model.scan_layers=True (each stack scans over units of lcm(moe.every=2, '
     'len(attention.layer_kinds))=2 layers)'),
    ({'data.seq_len': 1, 'moe.group_size': 1, 'moe.encoder_group_size': 1},
     'config.data.seq_len=1 is invalid: expected at least 2'),
    ({'model.architecture': 'decoder_only'}, 'config.model.num_encoder_layers=2 is read only '
                                             "with model.architecture='encoder_decoder'"),
])
def test_bad_encoder_decoder_configs_are_refused(overrides, message):
  with pytest.raises(ConfigError, match='^' + message.replace('(', r'\(').replace(')', r'\)')
                     .replace('.', r'\.').replace('?', r'\?')):
    validate(_t5_tiny(**overrides))


@pytest.mark.parametrize('field,value', [
    ('model.num_encoder_layers', 2), ('moe.encoder_router', 'tokens_choose'),
    ('moe.encoder_batch_prioritized_routing', True), ('moe.encoder_group_size', 64)])
def test_encoder_fields_are_refused_without_an_encoder(field, value):
  config = t5_stmoe.default.get_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ConfigError, match=f"^config.{field}=.* is read only with "
                                        "model.architecture='encoder_decoder' \\(it is "
                                        "'decoder_only'\\)"):
    validate(config)


def test_presets_are_valid_and_grow():
  sizes = []
  for size in t5_stmoe.SIZES:
    for arg in (f'size={size},task=func_name', f'size={size}', f'size={size},runlocal'):
      config = t5_stmoe.get_config(arg)
      validate(config)
      if 'task' in arg:  # The fine-tune keeps the pre-trained model, vocabulary included.
        assert config.model == t5_stmoe.get_config(f'size={size}').model, size
        assert config.data.task == 'func_name' and config.finetune.trainable == 'all'
    cfg = model_factory.get_model(entry_points.model_config(config)).cfg
    sizes.append(sum(np.prod(p.value.shape) for _, p in nnx.to_flat_state(
        model_factory.get_model(cfg).abstract()[1])))
  assert sizes == sorted(sizes) and len(set(sizes)) == 3
  validate(_t5_tiny(**{'moe.encoder_router': 'expert_choice',
                       'moe.encoder_batch_prioritized_routing': True}))


def run(script, *flags):
  result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  if result.returncode:
    raise AssertionError(f'{script} failed ({result.returncode}):\n{result.stderr[-3000:]}')
  return result


def test_t5_tiny_trains_evaluates_and_samples(stdlib_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  run('train.py', '--config=configs/t5_stmoe.py:size=tiny', f'--workdir={workdir}',
      f'--config.data.data_dir={stdlib_data_dir}', '--config.num_train_steps=4',
      '--config.eval_every_steps=4', '--config.eval_batches=1', '--config.log_every_steps=2',
      '--config.checkpoint_every_steps=4', '--config.eval_sample_tokens=0')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r['kind'] == 'train']
  assert [r['step'] for r in train] == [2, 4]
  assert 'expert_load/encoder' in train[-1] and 'max_expert_load/decoder' in train[-1]
  assert train[-1]['loss'] < train[0]['loss'] or train[-1]['loss'] < 6.0
  assert '4' in os.listdir(os.path.join(workdir, 'checkpoints'))
  # eval.py's and sample.py's logic, in this process.
  metrics = entry_points.evaluate_workdir(workdir, max_batches=1)
  assert metrics['step'] == 4 and np.isfinite(metrics['loss'])
  assert [l['stack'] for l in metrics['moe_layers']] == ['encoder', 'decoder']
  text = entry_points.sample_workdir(workdir, 'def ', 6, temperature=0.0)
  assert text.startswith('def ')


def test_tensorboard_tags_name_the_stack():
  scalars, histograms = metrics_lib.tensorboard_values({
      'expert_load/encoder': np.array([[0.5, 0.5, 0.0, 0.0]]),
      'layer_dropped_fraction/decoder': np.array([0.25])})
  assert list(histograms) == ['expert_load/encoder/moe0']
  assert scalars == {'max_over_mean_load/encoder/moe0': 2.0,
                     'layer_dropped_fraction/decoder/moe0': 0.25}


@pytest.mark.parametrize('enabled', [True, False])
def test_flops_count_encoder_tokens_and_decoder_tokens(enabled):
  config = t5_stmoe.get_config('size=small')
  config.moe.enabled = enabled
  cfg = entry_points.model_config(config)
  shape = span_corruption.lengths(config.data.seq_len, 0.15, 3.0)
  T, L = shape.encoder_len, shape.decoder_len
  _, params, _ = model_factory.get_model(cfg).abstract()
  # Independent count from the parameter shapes: a matrix is a multiply-add per token of its
  # stack (cross-attention keys/values per encoder token), a token of `blocks` uses
  # experts_per_token(blocks) of E experts.
  def count(experts_per_token):
    per_encoder, per_decoder = 0, 0
    for path, p in nnx.to_flat_state(params):
      if len(p.value.shape) < 2 or path[0] == 'embed':
        continue
      n = int(np.prod(p.value.shape))
      n = n * experts_per_token(path[0]) / cfg.moe.num_experts if 'experts' in path else n
      if path[0] == 'encoder_blocks' or 'cross' in path and path[-1] in ('w_k', 'w_v'):
        per_encoder += 2 * n
      else:
        per_decoder += 2 * n
    HK = cfg.num_heads * cfg.head_dim
    per_encoder += 2 * 2 * HK * T * cfg.num_encoder_layers
    per_decoder += 2 * 2 * HK * (L + T) * cfg.num_layers  # Self- and cross-attention scores.
    return per_encoder + per_decoder * L / T

  expected = count(lambda blocks: cfg.moe.top_k)
  assert flops.forward_flops_per_token(cfg, T, L) == pytest.approx(expected, abs=1)
  assert flops.run_train_flops_per_token(cfg, config.data) == 3 * round(expected)
  # With measured experts per token (eval.py's) the encoder's MoE layers use 1.5 experts, the
  # decoder's 0.75.
  measured = {(stack, i): 1.5 if stack == 'encoder' else 0.75
              for stack, layers in cfg.moe_stacks() for i in layers}
  assert flops.run_forward_flops_per_token(cfg, config.data, measured) == pytest.approx(
      count(lambda block: 1.5 if block == 'encoder_blocks' else 0.75), abs=1)


def test_sampler_greedy_equals_full_forward_argmax():
  """EncoderDecoderSampler (KV cache, cross caches, re-encoding after each span) against a
  reference loop of full forward passes over padded inputs."""
  cfg = encdec_config()
  sampler = model_factory.make_sampler(cfg, ml_collections.ConfigDict(dict(
      seq_len=T, noise_density=0.15, mean_noise_span_length=3.0)))
  assert (sampler.encoder_len, sampler.decoder_len) == (T, L)
  params, buffers = model_factory.get_model(sampler.cfg).init(jax.random.PRNGKey(4))
  forward = jax.jit(lambda enc, dec: nnx.merge(sampler.graphdef, params, buffers)(
      enc, dec, encoder_mask_BT=enc != PAD)[0])
  prompt, n = [tokenizer.BOS_ID, *tokenizer.encode('def f(x):').tolist()], 12
  context, expected = list(prompt), []
  while len(expected) < n:
    enc = context[-(T - 1):] + [S0]
    dec, span = [tokenizer.BOS_ID, S0], []
    while len(dec) < L and len(expected) + len(span) < n:
      padded = jnp.array([enc + [PAD] * (T - len(enc))]), jnp.array([dec + [PAD] * (L - len(dec))])
      logits = np.array(forward(*padded)[0, len(dec) - 1])
      logits[[PAD, tokenizer.BOS_ID]] = -np.inf
      token = int(np.argmax(logits))
      if token == tokenizer.EOS_ID or token >= S0:
        break
      span.append(token)
      dec.append(token)
    if not span:
      break
    expected += span
    context += span
  assert len(expected) == n  # Spans hold at most L - 2 = 6 tokens: the text was re-encoded.
  got = sampler.generate_tokens(params, prompt, n, temperature=0.0, buffers=buffers)
  assert got.tolist() == expected


def test_routing_groups_per_batch_count_each_stack():
  # t5 tiny: 8 x 32 encoder tokens in groups of 256, 8 x 8 decoder tokens in groups of 64.
  assert model_factory.routing_groups_per_batch(_t5_tiny()) == (1, 1)
  assert model_factory.routing_groups_per_batch(_t5_tiny(**{'moe.encoder_group_size': 32,
                                                         'moe.group_size': 16})) == (8, 4)
  # A decoder-only config has one stack: the default's 64 x 64 tokens in groups of 512.
  decoder_only = t5_stmoe.default.get_config()
  decoder_only.moe.group_size = 512
  assert model_factory.routing_groups_per_batch(decoder_only) == (64 * 64 // 512,)


def test_param_dtype_stores_every_encoder_decoder_parameter():
  cfg = tiny_model_config(architecture='encoder_decoder', num_encoder_layers=2,
                          param_dtype='bfloat16')
  params = nnx.state(EncoderDecoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
  assert dtypes == {jnp.dtype('bfloat16')}
