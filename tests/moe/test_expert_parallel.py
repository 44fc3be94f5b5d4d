"""Expert parallelism on 8 fake CPU devices: every mesh and dispatch strategy gives one
device's loss and gradients (einsum with the DeepSeek-V3 gating options, dropless with the
hierarchical router, see sharding_checks.STRATEGY_ROUTING); experts or groups that do not split over the mesh are refused
before compiling. (The `sharding_checks` fixture of conftest.py runs tests/sharding_checks.py.)
"""

import json

import pytest

from conftest import run_with_devices


@pytest.mark.parametrize('name', [
    'scatter:data=8', 'scatter:expert=8', 'scatter:data=2,expert=4',
    'scatter:data=2,expert=2,model=2', 'einsum:expert=8', 'einsum:data=2,expert=2,model=2',
    'dropless:expert=8', 'dropless:data=2,expert=2,model=2'])
def test_mesh_matches_single_device(sharding_checks, name):
  """Loss and every gradient equal one device's (asserted in the script, which also checks
  parameter and Adam-moment shardings); all-to-all in the compiled step iff expert > 1."""
  result = sharding_checks[name]
  assert result['loss'] == pytest.approx(result['ref_loss'], rel=1e-5)
  assert result['max_grad_err'] < 1e-6
  if not name.startswith('dropless'):
    assert result['all_to_all'] == ('expert=' in name)
  if name.startswith('scatter'):
    assert result['dropped_fraction'] > 0  # Capacity 1.0: the drops must agree too.
  # The routing bias after the step (scatter: the bias balancer re-centred; einsum: quantile
  # balancing, over every token of the batch; the hierarchical router has none) is one device's.
  assert result['max_bias_err'] < 1e-6
  if not name.startswith('dropless'):
    assert max(map(abs, result['router_bias'])) > 1e-4
  if name.startswith('scatter'):
    assert abs(sum(result['router_bias'])) < 1e-6  # Re-centred.


@pytest.mark.parametrize('name', ['scatter:data=8', 'scatter:expert=8',
                                  'scatter:data=2,expert=4', 'scatter:fsdp=2,expert=2,model=2'])
def test_global_balance_loss_is_the_gathered_batch_loss_on_every_mesh(sharding_checks, name):
  """moe.balance_scope='global' with the batch split over data, expert and fsdp shards, one
  routing group (= one sequence) per shard: the loss (and, asserted in the script, every
  gradient) is one device's on the gathered batch, not the per-shard (per-group) loss that
  `seq_balance_loss` equals here. Expert parallelism routes outside its shard_map, so the
  global sums stay global there too."""
  result = sharding_checks[name]
  assert result['balance_loss'] == pytest.approx(result['ref_balance_loss'], rel=1e-5)
  assert abs(result['balance_loss'] - result['seq_balance_loss']) > 1e-3


@pytest.mark.parametrize('key, message', [
    ('num_experts', 'config.moe.num_experts=6 is invalid: expected a multiple of the mesh axis '
                    'expert=4'),
    ('groups', 'config.moe.group_size gives 4 routing groups per batch: expected a multiple of '
               'the 8 token shards'),
])
def test_experts_and_groups_that_do_not_split_fail_before_compiling(sharding_checks, key,
                                                                     message):
  assert message in sharding_checks['errors'][key]
  assert '\n' not in sharding_checks['errors'][key]


def test_scanned_fsdp_expert_model_mesh_matches_one_device(sharding_checks):
  """tests/sharding_checks.py `check_scanned`: a scanned 2-unit stack on fsdp=2, expert=2,
  model=2 (stacked weights [U, E, D, F] sharded (None, expert, fsdp, model)) gives one device's
  loss and gradients (asserted there), its step a loop with all-to-all inside."""
  result = sharding_checks['scanned']
  assert result['loss'] == pytest.approx(result['ref_loss'], rel=1e-5)


def test_grouped_matmul_backends_run_under_expert_parallelism():
  """Every backend EP may use (the layer's moe.grouped_matmul, not a hard-coded one), in
  shard_map(check_vma=True) on data=2 x expert=2: outputs and the weight gradient summed over
  the data shards equal a numpy loop's (tests/sharding_checks.py `check_grouped_matmuls`)."""
  errors = json.loads(run_with_devices('sharding_checks.py', 4, '--grouped'))
  assert set(errors) == {'ragged_dot', 'blocked', 'tokamax'}
  assert max(errors.values()) < 1e-5, errors
