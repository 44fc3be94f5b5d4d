"""Switch Transformer, Table 1: the training capacity factor of top-1 routing."""

from __future__ import annotations

from experiments.findings import common

ARM = 'switch32'  # Top-1 of 32 experts of width 256.
FACTORS = (1.0, 1.25, 2.0)


def runs(size: str, tuned: dict, root: str):
  del root
  lr = tuned['lr']['switch']
  return [[common.run(f'{ARM}_cf{cf:g}', ARM, seed, lr, size, moe__train_capacity_factor=cf,
                      **common.tuned_moe(tuned, ARM))]
          for cf in FACTORS for seed in common.SEEDS[size]]


def summarize(loaded: dict[str, dict], size: str) -> dict:
  seeds = common.SEEDS[size]
  rows = [common.variant_row(f'capacity factor {cf:g}',
                             [f'findings/{ARM}_cf{cf:g}_s{s}' for s in seeds], loaded,
                             capacity_factor=cf)
          for cf in FACTORS]
  one, mid, two = rows
  worse_per_step = common.lower_on_every_seed(mid, one)
  faster = one['tokens_per_sec'] > mid['tokens_per_sec'] > two['tokens_per_sec']
  verdict = ('reproduced' if worse_per_step and faster else
             'partly reproduced' if worse_per_step or faster else 'not reproduced')
  why = (f"per step CF 1.0 is {'worse than' if worse_per_step else 'not worse than'} CF 1.25 on "
         f"every seed ({one['final_val_loss_mean']:.4f} vs {mid['final_val_loss_mean']:.4f}); "
         f"tokens/s {one['tokens_per_sec']:,.0f} / {mid['tokens_per_sec']:,.0f} / "
         f"{two['tokens_per_sec']:,.0f} at CF 1.0 / 1.25 / 2.0 "
         f"({'fastest at the smallest factor' if faster else 'not ordered by the factor'})")
  return {'rows': rows, 'verdict': verdict, 'why': why}


FINDING = common.Finding(
    name='capacity_factor',
    title='Training capacity factor of top-1 routing',
    paper='Fedus, Zoph, Shazeer 2022 (Switch Transformer), Table 1',
    claim='A smaller train capacity factor (1.0) is slightly worse per step but faster, so it '
          'reaches a quality threshold sooner than 1.25 or 2.0.',
    paper_rows={'capacity factor 1': 'Switch-Base: neg. log perplexity -1.561 at 100k steps, '
                                     '1000 examples/s',
                'capacity factor 1.25': '-1.553, 910 examples/s',
                'capacity factor 2': '-1.554, 860 examples/s'},
    runs=runs, summarize=summarize)
