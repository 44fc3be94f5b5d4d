"""OLMoE and DeepSeek-V3: what the balance loss (or the bias balancer) buys."""

from __future__ import annotations

from experiments.findings import common

ARM = 'fine64'  # Top-8 of 64 experts of width 32, the study's best arm.
# label -> (run name, moe overrides); the tuned routing is the balance loss at 0.1.
VARIANTS = {
    'no balance loss': ('fine64_aux0', dict(moe__aux_loss_coef=0.0)),
    'balance loss 0.1': ('fine64', dict(moe__aux_loss_coef=0.1)),
    'bias balancer, no loss': ('fine64_bias', dict(moe__aux_loss_coef=0.0,
                                                   moe__bias_balancer_rate=1e-3)),
}


def runs(size: str, tuned: dict, root: str):
  del root
  lr = tuned['lr']['fine']
  return [[common.run(name, ARM, seed, lr, size, **{**common.tuned_moe(tuned, ARM), **over})]
          for name, over in VARIANTS.values() for seed in common.SEEDS[size]]


def summarize(loaded: dict[str, dict], size: str) -> dict:
  seeds = common.SEEDS[size]
  rows = [common.variant_row(label, [f'findings/{name}_s{s}' for s in seeds], loaded)
          for label, (name, _) in VARIANTS.items()]
  none, loss, bias = rows
  collapse = none['usage_entropy'] < loss['usage_entropy'] - 0.05
  worse = common.lower_on_every_seed(loss, none)
  verdict = ('reproduced' if collapse and worse else
             'partly reproduced' if collapse or worse else 'not reproduced')
  why = (f"without a balance loss the usage entropy is {none['usage_entropy']:.3f} (loss 0.1: "
         f"{loss['usage_entropy']:.3f}; 1 = uniform), max load {none['max_load_ratio']:.1f}x, "
         f"{none['train_dropped_fraction']:.1%} of assignments dropped, final loss "
         f"{none['final_val_loss_mean']:.4f} vs {loss['final_val_loss_mean']:.4f}; the bias "
         f"balancer: {bias['final_val_loss_mean']:.4f}")
  return {'rows': rows, 'verdict': verdict, 'why': why}


FINDING = common.Finding(
    name='load_balance',
    title='Load balancing: none, the balance loss (0.1), the bias balancer',
    paper='Muennighoff et al. 2024 (OLMoE), section 4.1; DeepSeek-AI 2024 (DeepSeek-V3)',
    claim='Without a balance loss a few experts take most tokens and the loss is worse; '
          'DeepSeek-V3 balances with a routing bias and no loss.',
    paper_rows={'no balance loss': 'OLMoE: experts collapse, worse loss',
                'balance loss 0.1': "the study's tuned coefficient (OLMoE and Switch: 0.01)",
                'bias balancer, no loss': 'DeepSeek-V3: better than the loss'},
    runs=runs, summarize=summarize)
