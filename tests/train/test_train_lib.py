"""Training on the real corpus with a tiny model: the loss falls; save -> restore is exact."""

import jax
import numpy as np
import pytest

from configs import tiny
from stmoe_jax.train import train_lib


@pytest.fixture(scope='module')
def trainer(stdlib_data_dir, tmp_path_factory):
  config = tiny.get_config()
  config.data.data_dir = stdlib_data_dir
  config.num_train_steps = 40
  config.moe.bias_balancer_rate = 1e-3  # So that checkpoints must carry the router biases.
  return train_lib.Trainer(config, str(tmp_path_factory.mktemp('workdir')))


def test_loss_falls(trainer):
  state, data = trainer.init(), trainer.train_iterator()
  losses = []
  for _ in range(40):
    state, metrics = trainer.train_step(state, trainer.global_batch(next(data)))
    losses.append(float(metrics['loss']))
  # ln(259) = 5.56 at init; a byte model learns unigram statistics within tens of steps.
  assert np.mean(losses[:3]) > 5.0
  assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses


def test_save_restore_gives_identical_params_and_next_loss(trainer):
  state, data = trainer.init(), trainer.train_iterator()
  for _ in range(3):
    state, _ = trainer.train_step(state, trainer.global_batch(next(data)))
  trainer.checkpointer.save(3, state, data.get_state(), force=True)
  trainer.checkpointer.wait()
  restored, data_state = trainer.checkpointer.restore(3, trainer.abstract_state)
  assert int(restored.step) == 3
  assert np.abs(jax.tree.leaves(restored.buffers)[0]).sum() > 0  # Biases moved and were saved.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))

  resumed_data = trainer.train_iterator()
  resumed_data.set_state(data_state)
  batch, resumed_batch = next(data), next(resumed_data)
  jax.tree.map(np.testing.assert_array_equal, batch, resumed_batch)
  _, metrics = trainer.train_step(state, trainer.global_batch(batch))
  _, resumed_metrics = trainer.train_step(restored, trainer.global_batch(resumed_batch))
  assert float(metrics['loss']) == float(resumed_metrics['loss'])


def test_bias_balancer_update_is_rate_times_sign_of_load_gap(trainer):
  state, data = trainer.init(), trainer.train_iterator()
  for _ in range(2):
    old = jax.device_get(state.buffers)
    state, metrics = trainer.train_step(state, trainer.global_batch(next(data)))
  new = jax.device_get(state.buffers)
  load = np.asarray(metrics['expert_load'])  # [M, E]: this step's load, before the update.
  expected = np.asarray(metrics['router_bias']) + 1e-3 * np.sign(load.mean(-1, keepdims=True) - load)
  moe_layers = [i for i in range(trainer.model_cfg.num_layers)
                if trainer.model_cfg.ffn_kind(i) == 'moe']
  for m, layer in enumerate(moe_layers):
    bias = new['blocks'][layer]['ffn']['router_bias']
    np.testing.assert_allclose(bias, expected[m], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(metrics['router_bias'])[m],
                               old['blocks'][layer]['ffn']['router_bias'])


def test_adafactor_trains(stdlib_data_dir, tmp_path):
  config = tiny.get_config()
  config.data.data_dir = stdlib_data_dir
  config.opt.update(name='adafactor', schedule='rsqrt', final_lr_fraction=0.0, weight_decay=0.1)
  trainer = train_lib.Trainer(config, str(tmp_path))
  state, data = trainer.init(), trainer.train_iterator()
  batch = trainer.global_batch(next(data))
  losses, param_norms = [], []
  for _ in range(10):  # Same batch: the loss on it must fall.
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics['loss']))
    param_norms.append(float(metrics['param_norm']))
  # Adafactor scales steps by each parameter's RMS (small under the Switch init): slow but steady.
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.05, losses
  # Decoupled weight decay is lr-scaled (3e-4 per step here), not 10% of every weight per step.
  assert param_norms[-1] > 0.95 * param_norms[0], param_norms

