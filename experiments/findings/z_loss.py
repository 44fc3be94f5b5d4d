"""ST-MoE, Table 4: the router z-loss keeps training stable without hurting quality."""

from __future__ import annotations

from experiments.findings import common

ARM = 'stmoe16'  # Top-2 of 16 experts of width 128.
STRESS = 8  # Peak learning rate = STRESS x the tuned one: the stress that may destabilise.
Z_LOSS = 1e-3  # ST-MoE's coefficient (the arms' own).
SEEDS = {'full': (0, 1, 2), 'quick': (0,)}


def runs(size: str, tuned: dict, root: str):
  del root
  lr = tuned['lr']['stmoe'] * STRESS
  return [[common.run(f'{ARM}_x{STRESS}_z{z:g}', ARM, seed, lr, size, moe__z_loss_coef=z,
                      **common.tuned_moe(tuned, ARM))]
          for z in (0.0, Z_LOSS) for seed in SEEDS[size]]


def summarize(loaded: dict[str, dict], size: str) -> dict:
  seeds = SEEDS[size]
  rows = []
  for z in (0.0, Z_LOSS):
    row = common.variant_row(f'z-loss {z:g}', [f'findings/{ARM}_x{STRESS}_z{z:g}_s{s}'
                                               for s in seeds], loaded, z_loss_coef=z)
    row['stable_runs'] = sum(x <= common.SPIKE_NATS for x in row['max_loss_spike'])
    row['runs_total'] = len(seeds)
    rows.append(row)
  off, on = rows
  if off['stable_runs'] == len(seeds):
    verdict = 'not reproduced'
    why = (f'no run without the z-loss became unstable at {STRESS}x the tuned rate (largest '
           f"loss spike {max(off['max_loss_spike']):.2f} nats), so there was nothing to fix; "
           f"final loss {off['final_val_loss_mean']:.4f} without, {on['final_val_loss_mean']:.4f} "
           'with')
  else:
    steadier = on['stable_runs'] > off['stable_runs']
    verdict = 'reproduced' if steadier else 'not reproduced'
    why = (f"stable runs: {off['stable_runs']}/{len(seeds)} without, {on['stable_runs']}/"
           f"{len(seeds)} with the z-loss; final loss {off['final_val_loss_mean']:.4f} vs "
           f"{on['final_val_loss_mean']:.4f}")
  return {'rows': rows, 'verdict': verdict, 'why': why,
          'stress': f'peak learning rate {STRESS}x the tuned one',
          'unstable_means': f'a train loss more than {common.SPIKE_NATS} nats above its running '
                            'minimum after warmup, or not finite'}


FINDING = common.Finding(
    name='z_loss',
    title='Router z-loss under a stress that destabilises training',
    paper='Zoph et al. 2022 (ST-MoE), Table 4',
    claim='Adding the router z-loss (1e-3) makes unstable runs stable and does not hurt quality.',
    paper_rows={'z-loss 0': 'baseline: 4 of 6 runs stable, neg. log perplexity -1.755',
                'z-loss 0.001': '3 of 3 runs stable, -1.741'},
    runs=runs, summarize=summarize)
