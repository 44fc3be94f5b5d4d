"""DeepSeekMoE and OLMoE: finer experts and a shared expert at equal active FLOPs."""

from __future__ import annotations

from experiments.findings import common

# label -> (arm, family, overrides): every variant runs 256 active FFN units per token.
VARIANTS = {
    'top-2 of 16': ('stmoe16', 'stmoe', {}),
    'top-8 of 64': ('fine64', 'fine', {}),
    '1 shared + top-7 of 63': ('fine64', 'fine', dict(moe__num_experts=63, moe__top_k=7,
                                                       moe__num_shared_experts=1)),
}
NAMES = {'top-2 of 16': 'stmoe16', 'top-8 of 64': 'fine64', '1 shared + top-7 of 63':
         'fine63_shared1'}


def runs(size: str, tuned: dict, root: str):
  del root
  return [[common.run(NAMES[label], arm, seed, tuned['lr'][family], size,
                      **common.tuned_moe(tuned, arm), **overrides)]
          for label, (arm, family, overrides) in VARIANTS.items()
          for seed in common.SEEDS[size]]


def summarize(loaded: dict[str, dict], size: str) -> dict:
  seeds = common.SEEDS[size]
  rows = [common.variant_row(label, [f'findings/{NAMES[label]}_s{s}' for s in seeds], loaded)
          for label in VARIANTS]
  coarse, fine, shared = rows
  finer_wins = common.lower_on_every_seed(fine, coarse)
  shared_wins = common.lower_on_every_seed(shared, fine)
  shared_loses = common.lower_on_every_seed(fine, shared)
  verdict = ('reproduced' if finer_wins and shared_wins else
             'partly reproduced' if finer_wins else 'not reproduced')
  why = (f"top-8 of 64 {'beats' if finer_wins else 'does not beat'} top-2 of 16 on every seed "
         f"({fine['final_val_loss_mean']:.4f} vs {coarse['final_val_loss_mean']:.4f}); the shared "
         f"expert {'helps' if shared_wins else 'hurts' if shared_loses else 'is within seed noise'} "
         f"({shared['final_val_loss_mean']:.4f}), as "
         f"{'DeepSeekMoE' if shared_wins else 'OLMoE'} found")
  return {'rows': rows, 'verdict': verdict, 'why': why}


FINDING = common.Finding(
    name='granularity',
    title='Expert granularity and a shared expert at equal active FLOPs',
    paper='Dai et al. 2024 (DeepSeekMoE), Figure 3; Muennighoff et al. 2024 (OLMoE), section 4.1',
    claim='Finer experts (more, narrower, more chosen) lower the loss at equal active FLOPs; a '
          'shared expert helps in DeepSeekMoE, not in OLMoE.',
    paper_rows={'top-2 of 16': 'DeepSeekMoE 2B ablation: the GShard-style baseline',
                'top-8 of 64': 'finer segmentation: lower loss (DeepSeekMoE, OLMoE)',
                '1 shared + top-7 of 63': 'DeepSeekMoE: lower still; OLMoE: no gain'},
    runs=runs, summarize=summarize)
