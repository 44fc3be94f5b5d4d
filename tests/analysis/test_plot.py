"""`python -m stmoe_jax.analysis.plot` on synthetic metrics.jsonl files, and the routing plot's data."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmoe_jax.analysis import plot
from stmoe_jax.models.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fake_run(workdir, offset):
  """A metrics.jsonl like train.py's: train lines every 10 steps (2 MoE layers, 4 experts),
  eval lines every 20, 30 s apart."""
  os.makedirs(workdir)
  records = []
  for step in range(10, 41, 10):
    load = np.roll([0.4, 0.3, 0.2, 0.1], step // 10)
    records.append({'step': step, 'kind': 'train', 'wall_time': 1000 + 3 * step,
                    'loss': 3.1 - step / 100 + offset, 'cross_entropy': 3 - step / 100 + offset,
                    'dropped_fraction': 0.01, 'expert_load': [load.tolist(), [0.25] * 4],
                    'layer_dropped_fraction': [0.02, step / 1000]})
    if step % 20 == 0:
      records.append({'step': step, 'kind': 'eval', 'wall_time': 1001 + 3 * step,
                      'loss': 3.2 - step / 100 + offset, 'moe_layers': []})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  return records


def test_plot_command_writes_pngs(tmp_path):
  fake_run(tmp_path / 'a', 0.0)
  fake_run(tmp_path / 'b', 0.5)
  result = subprocess.run(
      [sys.executable, '-m', 'stmoe_jax.analysis.plot', f'--workdir={tmp_path / "a"}',
       f'--workdir={tmp_path / "b"}', f'--out={tmp_path / "plots"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
  names = sorted(os.path.basename(p) for p in result.stdout.split())
  assert names == ['dropped_fraction.png', 'expert_load_a.png', 'expert_load_b.png', 'loss.png']
  for name in names:
    with open(tmp_path / 'plots' / name, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  missing = subprocess.run([sys.executable, '-m', 'stmoe_jax.analysis.plot', f'--workdir={tmp_path}',
                            f'--out={tmp_path / "p"}'], cwd=ROOT, capture_output=True, text=True)
  assert missing.returncode == 1
  assert missing.stderr.strip() == f"error: {tmp_path / 'metrics.jsonl'} not found: is " \
                                   f"'{tmp_path}' a train.py workdir?"


def test_figures_hold_the_logged_values(tmp_path):
  runs = {'a': fake_run(tmp_path / 'a', 0.0), 'b': fake_run(tmp_path / 'b', 0.5)}
  by_step, by_time = plot.plot_losses(runs).axes
  lines = {line.get_label(): line for line in by_step.lines}
  assert sorted(lines) == ['a train', 'a validation', 'b train', 'b validation']
  np.testing.assert_allclose(lines['b train'].get_ydata(), [3.4, 3.3, 3.2, 3.1])
  np.testing.assert_allclose(lines['a validation'].get_xdata(), [20, 40])
  # Wall time in minutes since the run's first line (t = 1030 s).
  np.testing.assert_allclose(by_time.lines[0].get_xdata(), [0, 0.5, 1.0, 1.5])
  assert by_step.get_xlabel() and by_step.get_ylabel() and by_time.get_xlabel()
  assert len(by_time.get_legend().get_texts()) == 4

  heat = plot.plot_expert_load('a', runs['a'])
  layer0 = heat.axes[0].collections[0].get_array().reshape(4, 4)  # [experts, steps]
  expected = np.array([np.roll([0.4, 0.3, 0.2, 0.1], s) for s in (1, 2, 3, 4)]).T
  np.testing.assert_allclose(layer0, expected)
  assert heat.axes[0].get_ylabel() == 'expert' and 'MoE layer 1' in heat.axes[1].get_title()

  dropped = plot.plot_dropped(runs).axes[0]
  np.testing.assert_allclose(dropped.lines[1].get_ydata(), [1, 2, 3, 4])  # %, layer 1 of run a.
  assert dropped.lines[1].get_label() == 'a MoE layer 1'


def test_expert_choices_match_the_layer_routing_stats(tiny_model_cfg):
  cfg = tiny_model_cfg(moe=dict(group_size=12, every=1, eval_capacity_factor=2.0))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.arange(24).reshape(2, 12) * 7
  gates = plot.expert_choices(model, tokens)
  _, stats = model(tokens, train=False)
  assert len(gates) == 2 and gates[0].shape == (2, 12, 4)
  for gate_BLE, load_E in zip(gates, np.asarray(stats['expert_load'])):
    assert np.all((gate_BLE > 0).sum(-1) == 2)  # Two experts per token...
    np.testing.assert_allclose(gate_BLE.sum(-1), 1.0, rtol=1e-5)  # ...renormalised gates.
    np.testing.assert_allclose((gate_BLE > 0).mean(axis=(0, 1)) / 2, load_E, rtol=1e-6)
  assert all(block.ffn.__class__.__name__ in ('MoeLayer', 'Mlp') for block in model.blocks)
  fig = plot.plot_expert_choices('abcdefghijkl', [g[:1] for g in gates])
  np.testing.assert_allclose(fig.axes[0].images[0].get_array(), gates[0][0].T)
