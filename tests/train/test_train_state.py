"""The learning-rate schedules; a config placed on its mesh without compiling."""

import jax
import numpy as np
import pytest

from configs import tiny
from stmoe_jax.train import train_state
from stmoe_jax.config import ConfigError


def test_learning_rate_schedules():
  opt = tiny.get_config().opt
  opt.update(lr=1.0, warmup_steps=10, final_lr_fraction=0.1, schedule='cosine')
  cosine = train_state.learning_rate_schedule(opt, num_train_steps=110)
  np.testing.assert_allclose([cosine(0), cosine(4), cosine(9), cosine(10), cosine(60),
                              cosine(110)], [0.1, 0.5, 1.0, 1.0, 0.55, 0.1], rtol=1e-5)
  opt.schedule = 'rsqrt'
  rsqrt = train_state.learning_rate_schedule(opt, num_train_steps=110)
  # After warmup: lr / sqrt(1 + (step - warmup) / warmup).
  np.testing.assert_allclose([rsqrt(10), rsqrt(20), rsqrt(40)],
                             [1.0, 1 / np.sqrt(2), 0.5], rtol=1e-5)


def test_place_lays_out_the_state_without_compiling():
  config = tiny.get_config()
  placement = train_state.place(config)
  state = placement.abstract_state
  assert jax.tree.structure(state.params) == jax.tree.structure(placement.state_shardings.params)
  biases = jax.tree.leaves(state.buffers)  # One router bias [E] per MoE layer.
  assert len(biases) == placement.model_cfg.num_moe_layers
  assert all(b.shape == (config.moe.num_experts,) for b in biases)
  assert placement.model_cfg.mesh_rules is placement.mesh_rules
  assert placement.model.batch_keys == ('inputs', 'targets', 'weights')


def test_place_validates_first():
  config = tiny.get_config()
  config.moe.top_k = 0
  with pytest.raises(ConfigError, match='config.moe.top_k=0'):
    train_state.place(config)


def test_wsd_schedule_branches_off_longer_runs():
  opt = tiny.get_config().opt
  opt.update(lr=1.0, warmup_steps=10, final_lr_fraction=0.0, schedule='wsd', decay_fraction=0.2)
  wsd = train_state.learning_rate_schedule(opt, num_train_steps=110)
  # Stable until 110 - 22 = 88, then linear to 0 at 110.
  np.testing.assert_allclose([wsd(0), wsd(9), wsd(50), wsd(88), wsd(99), wsd(110)],
                             [0.1, 1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)
  # A 55-step run is the 110-step run's first 44 steps plus its own decay.
  short = train_state.learning_rate_schedule(opt, num_train_steps=55)
  steps = np.arange(45)
  np.testing.assert_allclose([short(s) for s in steps], [wsd(s) for s in steps], rtol=0)
  np.testing.assert_allclose([short(44), short(55)], [1.0, 0.0], atol=1e-6)
