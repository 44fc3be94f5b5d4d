"""The Checkpointer alone, on a small pytree (no model, nothing to compile): a kill during a
write, a full disk, damaged steps skipped or set aside, incompatible arrays named."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe_jax.train import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATE = {'w': np.arange(12, dtype=np.float32).reshape(3, 4), 'step': np.int32(0)}


def abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def saved_checkpoints(directory, steps):
  ckpt = checkpointing.Checkpointer(directory, keep=5)
  for step in steps:
    ckpt.save(step, jax.tree.map(lambda x: jnp.asarray(x) + step, STATE), {'pos': step},
              force=True)
  ckpt.wait()
  ckpt.close()
  return directory


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
  """Deliver 3: SIGKILL while step 2 is half written (arrays on disk, the data item not yet)
  leaves step 1 the latest, restorable and intact; the leftover temp dir is cleaned up."""
  directory = str(tmp_path / 'ckpt')
  marker = tmp_path / 'writing'
  script = textwrap.dedent(f'''
      import sys, time
      sys.path.insert(0, {ROOT!r})
      import numpy as np
      from orbax.checkpoint._src.handlers import json_checkpoint_handler
      from stmoe_jax.train import checkpointing
      ckpt = checkpointing.Checkpointer({directory!r})
      state = {{'w': np.arange(12, dtype=np.float32).reshape(3, 4), 'step': np.int32(0)}}
      ckpt.save(1, {{k: v + 1 for k, v in state.items()}}, {{'pos': 1}}, force=True)
      ckpt.wait()
      async def hang(self, item, directory):
        open({str(marker)!r}, 'w').write(str(directory))
        time.sleep(600)
      json_checkpoint_handler.JsonCheckpointHandler._save_fn = hang
      ckpt.save(2, {{k: v + 2 for k, v in state.items()}}, {{'pos': 2}}, force=True)
      ckpt.wait()
  ''')
  proc = subprocess.Popen([sys.executable, '-c', script], stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not marker.exists():
    assert proc.poll() is None and time.time() < deadline, 'the save never started'
    time.sleep(0.01)
  proc.kill()
  proc.wait()
  leftovers = sorted(os.listdir(directory))
  assert leftovers == ['1', '2.orbax-checkpoint-tmp'], leftovers  # Step 2 was mid-write.
  ckpt = checkpointing.Checkpointer(directory)
  assert ckpt.all_steps() == [1]
  state, data = ckpt.restore(1, abstract(STATE))
  np.testing.assert_array_equal(state['w'], STATE['w'] + 1)
  assert data == {'pos': 1}
  assert sorted(os.listdir(directory)) == ['1']  # The half-written step is gone...
  ckpt.save(2, STATE, {'pos': 2}, force=True)  # ...and can be written again.
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_disk_full_while_saving_is_a_clear_error(tmp_path, monkeypatch):
  """Deliver 3: ENOSPC in the middle of a save names the directory and the intact steps."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  directory = saved_checkpoints(str(tmp_path / 'ckpt'), [1, 2])

  async def disk_full(self, item, path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, '_save_fn', disk_full)
  ckpt = checkpointing.Checkpointer(directory, keep=5)
  ckpt.save(3, STATE, {'pos': 3}, force=True)
  with pytest.raises(checkpointing.CheckpointError) as error:
    ckpt.wait()
  assert str(error.value) == (f'saving checkpoint step 3 to {directory} failed (disk full); '
                              'the steps saved before it are intact: [1, 2]')
  monkeypatch.undo()
  reopened = checkpointing.Checkpointer(directory)
  assert reopened.all_steps() == [1, 2]
  for step in (1, 2):
    state, data = reopened.restore(step, abstract(STATE))
    np.testing.assert_array_equal(state['w'], STATE['w'] + step)
    assert data == {'pos': step}


@pytest.mark.parametrize('damage', ['truncate_all', 'delete_state', 'delete_data'])
def test_restore_latest_skips_damaged_steps(tmp_path, damage):
  """Deliver 3: each kind of damage to the newest step is reported by path, the step before it
  is restored, and set aside only once a good step is found."""
  directory = saved_checkpoints(str(tmp_path / 'ckpt'), [1, 2, 3])
  newest = os.path.join(directory, '3')
  if damage == 'truncate_all':
    for parent, _, files in os.walk(newest):
      for name in files:
        open(os.path.join(parent, name), 'w').close()
  else:
    shutil.rmtree(os.path.join(newest, damage.split('_')[1]))
  warnings = []
  ckpt = checkpointing.Checkpointer(directory)
  assert ckpt.restore_latest(abstract(STATE), warn=warnings.append)[0] == 2  # eval.py's way:
  assert sorted(os.listdir(directory)) == ['1', '2', '3']  # reported, left in place.
  step, state, data = ckpt.restore_latest(abstract(STATE), set_aside_damaged=True,
                                          warn=warnings.append)
  assert (step, data) == (2, {'pos': 2})
  np.testing.assert_array_equal(state['w'], STATE['w'] + 2)
  assert len(warnings) == 2 and all(w.startswith(f'warning: checkpoint {newest} is unreadable: ')
                                    for w in warnings)
  assert sorted(os.listdir(directory)) == ['1', '2', '3.corrupt']
  assert ckpt.all_steps() == [1, 2]


def test_incompatible_checkpoint_names_the_array(tmp_path):
  """Deliver 5: a checkpoint whose arrays do not fit is refused by name, never reshaped, and not
  'fallen back' from (an older step of the same run would not fit either)."""
  directory = saved_checkpoints(str(tmp_path / 'ckpt'), [1, 2])
  ckpt = checkpointing.Checkpointer(directory)
  wider = {**STATE, 'w': np.zeros((3, 5), np.float32)}
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=rf'^checkpoint {directory}/2 stores w as float32\[3, 4\] but this '
                           r'config needs float32\[3, 5\]$'):
    ckpt.restore_latest(abstract(wider))
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=f'checkpoint {directory}/1 has no array extra'):
    ckpt.restore(1, abstract({**STATE, 'extra': np.zeros(2, np.float32)}))
