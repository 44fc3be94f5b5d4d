"""experiments/routers.py: the runs it plans and its seed-for-seed summary, on fake records."""

import pytest

from configs import moe_vs_dense
from experiments import routers
from experiments.study import plan

TUNED = {'lr': {'dense': 1.5e-3, 'fine': 3e-3}, 'routing_overrides': {'moe.aux_loss_coef': 0.1}}


def test_a_routers_own_settings_win_over_the_tuned_routing():
  runs = {(r.router, r.seed): r for r in routers.router_runs('full', TUNED, [
      routers.BASELINE, 'quantile', 'gemma4'])}
  assert set(runs) == {(r, s) for r in ('', 'quantile', 'gemma4') for s in routers.SEEDS}
  for run in runs.values():
    assert (run.arm, run.lr, run.steps) == ('fine64', 3e-3, plan.SWEEP_STEPS['full'])
  # Quantile balancing sets its own aux_loss_coef (0): the tuned 0.1 is not passed over it.
  assert runs['quantile', 0].overrides == ()
  assert runs['gemma4', 1].overrides == (('moe.aux_loss_coef', 0.1),)
  assert runs['', 0].name == 'routers/fine64_softmax_topk_s0'
  assert moe_vs_dense.get_config('arm=fine64,router=quantile').moe.aux_loss_coef == 0.0


def fake(router, seed, loss, speed, layers):
  run = plan.Run(f'routers/fine64_{router}_s{seed}', 'fine64', seed, 3e-3, 400, 'routers',
                 router='' if router == routers.BASELINE else router)
  records = [{'kind': 'train', 'step': s, 'tokens_per_sec': speed + s} for s in (80, 160, 240)]
  records.append({'kind': 'eval', 'step': 400, 'loss': loss, 'bits_per_byte': loss * 1.44,
                  'moe_layers': layers})
  return {'run': run, 'records': records, 'params': 1000}


def test_summary_compares_seed_for_seed_and_averages_the_layers():
  layer = lambda d, e: {'dropped_fraction': d, 'experts_per_token': e, 'router_entropy': 1.0}
  loaded = [fake(routers.BASELINE, 0, 2.0, 100, [layer(0.1, 7.0), layer(0.3, 5.0)]),
            fake(routers.BASELINE, 1, 2.2, 100, [layer(0.1, 7.0), layer(0.1, 7.0)]),
            fake('relu', 0, 1.9, 50, [layer(0.0, 9.0), layer(0.0, 7.0)]),
            fake('relu', 1, 2.3, 70, [layer(0.0, 6.0), layer(0.0, 6.0)])]
  base, relu = routers.summarize(loaded, [routers.BASELINE, 'relu'])
  assert base['delta_vs_baseline'] == [0.0, 0.0]
  assert relu['delta_vs_baseline'] == pytest.approx([-0.1, 0.1])
  assert relu['final_val_loss_mean'] == pytest.approx(2.1)
  # Mean over layers, then over seeds: (8 + 6) / 2 experts per token; run medians 210, 230.
  assert relu['experts_per_token'] == pytest.approx(7.0)
  assert base['dropped_fraction'] == pytest.approx((0.2 + 0.1) / 2)
  assert relu['tokens_per_sec_in_runs'] == pytest.approx((210 + 230) / 2)
  assert relu['overrides'] == {'router': 'relu', 'dispatch': 'dropless'}
