"""Sparse upcycling (Komatsuzaki et al. 2023): a trained dense model continued as an MoE."""

from __future__ import annotations

import os

from configs import moe_vs_dense
from experiments.findings import common
from experiments.study import plan

MOE_ARM = 'switch32'  # Its FFN width is the dense arm's; moe_shape sets the rest.


def moe_shape(size: str) -> dict:
  """Top-2 of 8 experts, each as wide as the dense FFN so that each starts as a copy of it (an
  upcycled expert cannot be narrower than the FFN it copies)."""
  return dict(moe__num_experts=8, moe__top_k=2,
              moe__expert_d_ff=moe_vs_dense.ACTIVE_FFN_WIDTH[size])
DATA_SEED = 1000  # Continuations read other batches than the dense run's (seed + DATA_SEED).


def _run(name, arm, seed, lr, steps, data_seed=None, **overrides) -> plan.Run:
  """A run named by `seed`; `data_seed` (config.seed: initialisation and batch order) if given."""
  if data_seed is not None:
    overrides['seed'] = data_seed
  items = tuple((k.replace('__', '.'), v) for k, v in overrides.items())
  return plan.Run(f'findings/{name}_s{seed}', arm, seed, lr, steps, 'finding', items)


def runs(size: str, tuned: dict, root: str):
  """Per seed, in order on one core: the dense run (the sunk cost), then its continuations as
  dense (N and 2N more steps) and as the upcycled MoE (N); the MoE from scratch for N in its
  own group."""
  n, dense_lr = common.STEPS[size], tuned['lr']['dense']
  routing = {**common.tuned_moe(tuned, MOE_ARM), **moe_shape(size)}
  groups = []
  for seed in common.SEEDS[size]:
    dense = _run('dense', 'dense', seed, dense_lr, n)
    start = os.path.join(root, dense.name)
    data = dict(data_seed=seed + DATA_SEED, init_from=start)
    groups.append([
        dense,
        _run('dense_continued', 'dense', seed, dense_lr, n, **data),
        _run('dense_continued_2n', 'dense', seed, dense_lr, 2 * n, **data),
        _run('upcycled', MOE_ARM, seed, dense_lr, n, **data, **routing)])
    groups.append([_run('moe_scratch', MOE_ARM, seed, tuned['lr']['stmoe'], n,
                        data_seed=seed + DATA_SEED, **routing)])
  return groups


ROWS = {  # label -> run name; the extra steps after the dense run's N.
    'dense, continued N steps': 'dense_continued',
    'dense, continued 2N steps': 'dense_continued_2n',
    'upcycled MoE, N steps': 'upcycled',
    'MoE from scratch, N steps': 'moe_scratch',
}


def summarize(loaded: dict[str, dict], size: str) -> dict:
  seeds = common.SEEDS[size]
  base = common.variant_row('dense, N steps (the start)', [f'findings/dense_s{s}'
                                                           for s in seeds], loaded)
  rows = [base] + [common.variant_row(label, [f'findings/{name}_s{s}' for s in seeds], loaded)
                   for label, name in ROWS.items()]
  _, cont, cont2, up, scratch = rows
  beats = {r['variant']: common.lower_on_every_seed(up, r) for r in (cont, scratch)}
  verdict = ('reproduced' if all(beats.values()) else
             'partly reproduced' if any(beats.values()) else 'not reproduced')
  why = (f"upcycled {up['final_val_loss_mean']:.4f} vs dense continued "
         f"{cont['final_val_loss_mean']:.4f} (2N: {cont2['final_val_loss_mean']:.4f}) and MoE "
         f"from scratch {scratch['final_val_loss_mean']:.4f} at N extra steps; the MoE does about twice the "
         "FFN work per token of the dense model (top-2 of FFN-wide experts)")
  return {'rows': rows, 'verdict': verdict, 'why': why}


FINDING = common.Finding(
    name='upcycling',
    title='Sparse upcycling vs dense continuation vs an MoE from scratch',
    paper='Komatsuzaki et al. 2023 (Sparse Upcycling), Figures 2-4',
    claim='With the same extra compute, an MoE started from a trained dense model beats both '
          'continuing the dense model and training the MoE from scratch.',
    paper_rows={'upcycled MoE, N steps': 'better than dense continuation at every extra '
                                         'budget tried, and than the MoE from scratch until '
                                         'that gets far more compute'},
    runs=runs, summarize=summarize)
