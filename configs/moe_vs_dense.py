r"""The arms of the MoE-vs-dense study (experiments/moe_vs_dense.py; docs/results.md).

  python train.py --config=configs/moe_vs_dense.py:arm=stmoe64 --workdir=runs/mvd/stmoe64
  python train.py --config=configs/moe_vs_dense.py:arm=dense,lr=6e-3 --workdir=runs/mvd/d
  python train.py --config=configs/moe_vs_dense.py:arm=dense,size=quick --workdir=/tmp/q
  python train.py --config=configs/moe_vs_dense.py:arm=stmoe64,router=deepseek --workdir=/tmp/ds

A model small enough that the study's dense baseline sees many tokens per parameter: byte-level,
d_model 64, 2 layers, and every FFN is the arm's FFN (moe.every=1). All arms do the same FFN
work per token: a token passes through ACTIVE_FFN_WIDTH (256) GEGLU hidden units per layer,
as one dense FFN or as top_k experts of width 256 / top_k:
  dense     one FFN of width 256 (131k non-embedding parameters);
  switch32  Switch: top-1 of 32 experts of width 256;
  stmoe8/16/64  ST-MoE/GShard: top-2 of 8, 16 or 64 experts of width 128;
  fine64    fine-grained (DeepSeekMoE): top-8 of 64 experts of width 32 (stmoe16's experts cut
            in four, four times as many chosen).
MoE arms route 4096-token groups (the whole batch, position-major, so still causal) at train
capacity factor 1.25 and eval capacity 2.0, with the Switch balance loss (1e-2) and the ST-MoE
z-loss (1e-3). size=full: 1600 steps of 64 x 64 bytes (6.6M tokens, 50 per dense
non-embedding parameter) on a warmup-stable-decay schedule whose stable part is shared by the
shorter complete runs the study branches off; validation on 50 fixed batches every 160 steps.
size=quick: one layer of d_model 32 and 20 steps, a smoke test of the study. `lr=0` takes the
family's peak learning rate from TUNED_LR (the study's sweep chose it). `router=<name>` swaps an
MoE arm's gating for one of ROUTER_OPTIONS (docs/routers.md); the study itself runs none of them.
"""

from configs import common
from configs import default

# arm -> (family, num_experts, top_k); expert width = ACTIVE_FFN_WIDTH // top_k.
ARMS = {
    'dense': ('dense', 0, 1),
    'switch32': ('switch', 32, 1),
    'stmoe8': ('stmoe', 8, 2),
    'stmoe16': ('stmoe', 16, 2),
    'stmoe64': ('stmoe', 64, 2),
    'fine64': ('fine', 64, 8),
}
SIZES = ('full', 'quick')
ACTIVE_FFN_WIDTH = {'full': 256, 'quick': 64}
# Peak learning rate per family: the best final validation loss of the study's sweep
# (docs/results/results.md, "Learning-rate sweep"), used when the arm's `lr` argument is 0.
TUNED_LR = {'dense': 6e-3, 'switch': 6e-3, 'stmoe': 6e-3, 'fine': 6e-3}




def router_options(num_experts: int, top_k: int) -> dict[str, dict]:
  """Gating options an MoE arm can run (`router=<name>`), as moe overrides for its E and k.

  Classic: DeepSeek-V3 (sigmoid scores, 8 groups of which 4 eligible, gates x 2.5,
  sequence-wise loss, aux-loss-free bias), Gumbel or noisy top-k router noise, ST-MoE per-rank
  thresholds for choices 2..k, a hierarchy of sqrt(E)-ish outer groups with one chosen per token.
  Since ST-MoE (docs/routers.md): the balance loss per sequence, per 256-token group, or per
  256-token group with global-batch frequencies (Qiu et al. 2025); quantile balancing and the
  re-centred bias balancer, both without the balance loss; ReLU routing (ReMoE, k = the mean
  aimed at); null experts (MoE++, a quarter as many as real ones); the Gemma 4 router; hash
  routing (one expert per token, so k = 1 and experts k times wider: the same active FLOPs).
  """
  outer = next(o for o in (8, 4, 2, 1) if num_experts % o == 0 and num_experts // o >= top_k)
  return {
      'deepseek': dict(score_fn='sigmoid', routed_scaling_factor=2.5, n_groups=8, topk_groups=4,
                       seq_aux_loss_coef=1e-4, bias_balancer_rate=1e-3),
      'gumbel': dict(router_noise='gumbel'),
      'noisy_top_k': dict(router_noise='noisy_top_k'),
      'thresholds': dict(threshold_train=tuple(0.2 / j for j in range(1, top_k)),
                         threshold_eval=tuple(0.2 / j for j in range(1, top_k))),
      'hierarchical': dict(router='hierarchical', hierarchy=(outer, num_experts // outer),
                           hierarchy_outer_k=1),
      'sequence_balance': dict(balance_scope='sequence'),
      'group256': dict(group_size=256),
      'global256': dict(group_size=256, balance_scope='global'),
      'quantile': dict(quantile_balance_rate=1.0, bias_balancer_recenter=True, aux_loss_coef=0.0),
      'bias_recenter': dict(bias_balancer_rate=1e-3, bias_balancer_recenter=True,
                            aux_loss_coef=0.0),
      'relu': dict(router='relu', dispatch='dropless'),
      'null_experts': dict(num_null_experts=max(num_experts // 4, 1)),
      'gemma4': dict(router_input_norm=True, expert_output_scale=True),
      'hash': dict(router='hash', top_k=1),
  }


ROUTER_OPTIONS = tuple(router_options(64, 2))


def get_config(arg: str | None = None):
  """Returns the config of one study arm:
  `arg` = 'arm=<arm>[,size=full|quick][,lr=<peak>][,router=<one of ROUTER_OPTIONS>]'."""
  arg = common.parse_arg(arg, arm='stmoe64', size='full', lr=0.0, router='')
  if arg.arm not in ARMS:
    raise ValueError(f'config argument arm={arg.arm!r} is invalid: expected one of {list(ARMS)}')
  if arg.router and (arg.router not in ROUTER_OPTIONS or ARMS[arg.arm][0] == 'dense'):
    raise ValueError(f'config argument router={arg.router!r} is invalid: expected one of '
                     f'{list(ROUTER_OPTIONS)} with an MoE arm')
  if arg.size not in SIZES:
    raise ValueError(f'config argument size={arg.size!r} is invalid: expected one of {SIZES}')
  family, num_experts, top_k = ARMS[arg.arm]
  width = ACTIVE_FFN_WIDTH[arg.size]
  config = default.get_config()
  config.model.update(d_model=64, num_layers=2, num_heads=2, head_dim=32, d_ff=width)
  config.opt.update(lr=arg.lr or TUNED_LR[family], schedule='wsd', warmup_steps=100,
                    decay_fraction=0.2, final_lr_fraction=0.0)
  config.update(num_train_steps=1600, log_every_steps=80, eval_every_steps=160, eval_batches=50,
                checkpoint_every_steps=320, keep_checkpoints=5, eval_sample_tokens=0)
  if arg.size == 'quick':  # One layer, MoE: the least to compile.
    config.data.seq_len = 32
    config.model.update(d_model=32, num_layers=1, num_heads=2, head_dim=16)
    config.opt.update(warmup_steps=4)
    config.update(batch_size=8, num_train_steps=20, log_every_steps=4, eval_every_steps=10,
                  eval_batches=2, checkpoint_every_steps=4)
  config.moe.update(every=1, group_size=config.batch_size * config.data.seq_len,
                    train_capacity_factor=1.25, eval_capacity_factor=2.0, z_loss_coef=1e-3,
                    aux_loss_coef=1e-2)  # The study's routing stage may raise it.
  if family == 'dense':
    config.moe.update(enabled=False, top_k=1, expert_d_ff=width, num_experts=8)  # FFN width k * d_ff.
  else:
    config.moe.update(num_experts=num_experts, top_k=top_k, expert_d_ff=width // top_k)
  if arg.router:
    config.moe.update(router_options(num_experts, top_k)[arg.router])
    config.moe.expert_d_ff = width // config.moe.top_k  # Equal active FLOPs at any k.
  return config
