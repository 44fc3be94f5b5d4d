"""metrics.jsonl and TensorBoard events (read back from the event files), and model FLOPs."""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from configs import default, tiny
from stmoe_jax.models import flops
from stmoe_jax.train import train_lib
from stmoe_jax.config import model_config
from stmoe_jax.train.metrics import MetricsWriter
from stmoe_jax.models.transformer import Transformer


def read_events(workdir):
  """{tag: [(step, value)]} from the TFRecord event files: scalars as floats, histograms as
  (bucket_limits, bucket_counts), text as str."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      while header := f.read(12):  # uint64 length, uint32 crc, data, uint32 crc.
        data = f.read(struct.unpack('<Q', header[:8])[0])
        f.read(4)
        event = event_pb2.Event.FromString(data)
        for v in event.summary.value:
          if v.HasField('histo'):
            value = (list(v.histo.bucket_limit), list(v.histo.bucket))
          elif v.metadata.plugin_data.plugin_name == 'text':
            value = v.tensor.string_val[0].decode()
          else:
            value = v.simple_value
          out.setdefault(v.tag, []).append((event.step, value))
  return out


def test_writer_sends_scalars_histograms_and_text(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  load = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
  writer.write(10, 'train', {'loss': np.float32(2.5), 'expert_load': load,
                             'layer_dropped_fraction': np.array([0.01, 0.0])})
  writer.write(20, 'eval', {'loss': 2.0, 'moe_layers': [
      {'layer': 1, 'expert_load': [0.4, 0.3, 0.2, 0.1], 'dropped_fraction': 0.02,
       'experts_per_token': 1.75}]})
  writer.write_text(20, 'eval/sample', 'def f(x):\n  return x')
  writer.close()
  events = read_events(str(tmp_path))
  assert events['train/loss'] == [(10, 2.5)]
  limits, counts = events['train/expert_load/moe0'][0][1]
  assert limits == [0.5, 1.5, 2.5, 3.5]
  np.testing.assert_allclose(counts, load[0])
  np.testing.assert_allclose(events['train/max_over_mean_load/moe0'][0][1], 0.4 / 0.25, rtol=1e-6)
  np.testing.assert_allclose(events['train/layer_dropped_fraction/moe0'][0][1], 0.01, rtol=1e-6)
  np.testing.assert_allclose(events['eval/expert_load/moe0'][0][1][1], [0.4, 0.3, 0.2, 0.1])
  np.testing.assert_allclose(events['eval/layer_dropped_fraction/moe0'][0][1], 0.02, rtol=1e-6)
  np.testing.assert_allclose(events['eval/experts_per_token/moe0'][0][1], 1.75, rtol=1e-6)
  assert 'def f(x):\n  return x' in events['eval/sample/text_summary'][0][1]
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines[0]['expert_load'] == load.tolist() and lines[0]['loss'] == 2.5
  assert lines[1]['moe_layers'][0]['layer'] == 1 and lines[1]['wall_time'] > 0
  sample = json.loads((tmp_path / 'samples.jsonl').read_text())
  assert sample == {'step': 20, 'tag': 'eval/sample', 'text': 'def f(x):\n  return x'}


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  writer = MetricsWriter(str(tmp_path / 'w'))
  writer.write(1, 'train', {'loss': 1.0})
  writer.write_text(1, 'eval/sample', 'x')
  writer.close()
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='torch is not installed')
def test_the_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports an installed torch (more CPU time than JAX at each train.py start-up)
  only for torch tensors: the writer imports it without, and still writes events."""
  code = ('import sys\nfrom stmoe_jax.train.metrics import MetricsWriter\n'
          f'w = MetricsWriter({str(tmp_path)!r})\nw.write(3, "train", {{"loss": 1.5}})\n'
          'w.close()\nprint("torch" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert result.stdout.split() == ['False'], result.stderr[-3000:]
  assert read_events(str(tmp_path))['train/loss'] == [(3, 1.5)]


@pytest.mark.parametrize('enabled', [True, False])
def test_flops_are_six_times_active_params_plus_attention(enabled):
  config = default.get_config()
  config.moe.enabled = enabled
  cfg = model_config(config)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  # Independent count from the parameter shapes: every matrix but the embedding is a
  # multiply-add per token; a token uses top_k of the E experts.
  active = 0
  for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if len(p.shape) < 2 or path[0] == 'embed':
      continue
    n = int(np.prod(p.shape))
    active += n * cfg.moe.top_k // cfg.moe.num_experts if 'experts' in path else n
  attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * config.data.seq_len
  assert flops.forward_flops_per_token(cfg, config.data.seq_len) == 2 * active + attention
  assert flops.train_flops_per_token(cfg, 64) == 3 * flops.forward_flops_per_token(cfg, 64)


def test_peak_flops_lookup():
  assert flops.peak_flops_per_device('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops_per_device('TPU v5 lite') == 197e12
  assert flops.peak_flops_per_device('cpu') is None
  assert flops.model_flops_utilization(1000.0, 1e9, None) is None
  assert flops.model_flops_utilization(1000.0, 1e9, 4e12) == 0.25


def test_training_writes_tensorboard_and_jsonl(stdlib_data_dir, tmp_path):
  config = tiny.get_config()
  config.data.data_dir = stdlib_data_dir
  config.update(num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4, eval_batches=1)
  config.eval_sample_tokens = 20
  config.peak_flops_per_device = 1e9  # CPU peaks are unknown: give one to get an MFU.
  train_lib.train_and_evaluate(config, str(tmp_path))
  events = read_events(str(tmp_path))
  for tag in ['loss', 'balance_loss', 'z_loss', 'learning_rate', 'grad_norm', 'param_norm',
              'update_norm', 'tokens_per_sec', 'mfu', 'layer_dropped_fraction/moe0']:
    assert [step for step, _ in events[f'train/{tag}']] == [2, 4], tag
  for tag in ['loss', 'bits_per_byte', 'accuracy', 'layer_dropped_fraction/moe0']:
    assert [step for step, _ in events[f'eval/{tag}']] == [4], tag
  _, counts = events['train/expert_load/moe0'][0][1]
  assert len(counts) == 4 and abs(sum(counts) - 1) < 1e-5
  sample = events['eval/sample/text_summary'][0][1]
  assert sample.startswith('```\ndef ') and len(sample) > len('```\ndef ')
  train = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
           if json.loads(l)['kind'] == 'train']
  last = train[-1]
  assert np.asarray(last['expert_load']).shape == (1, 4)  # tiny: one MoE layer, 4 experts.
  per_token = flops.train_flops_per_token(model_config(config), config.data.seq_len)
  assert last['model_flops_per_sec'] == pytest.approx(last['tokens_per_sec'] * per_token)
  assert last['mfu'] == pytest.approx(last['model_flops_per_sec'] / 1e9)
  np.testing.assert_allclose(events['train/loss'][-1][1], last['loss'], rtol=1e-6)
