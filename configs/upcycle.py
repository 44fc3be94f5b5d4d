r"""Sparse upcycling (Komatsuzaki et al. 2023): a dense model, then an MoE model started from it.

stage=dense: configs/default.py with every FFN dense (GEGLU, width 256). stage=moe: the same
model with every FFN an MoE of `experts=8` experts of width 256, `top_k=2`; with init_from a
stage=dense workdir, every expert starts as a copy of the FFN it replaces and the routers fresh
(docs/finetuning.md). Without init_from, the same MoE from scratch.

  python train.py --config=configs/upcycle.py:stage=dense --workdir=runs/dense_ffn
  python train.py --config=configs/upcycle.py:stage=moe --workdir=runs/upcycled \
      --config.init_from=runs/dense_ffn
  python train.py --config=configs/upcycle.py:stage=moe --workdir=runs/moe_scratch

`stage=moe,from=W[:<step>]` upcycles the dense model of workdir W (an imported Llama,
`python -m stmoe_jax.convert --from_hf`, or any dense run) and sets init_from=W: W's config.json
with every FFN an MoE routed as Mixtral (configs/hf.py `route_as_hf`): a softmax over all
experts, the top-k weights renormalised to sum to 1, every choice of every token routed
(dropless). Both matter for the upcycled model to compute the dense one exactly at step 0:
its output is sum_k w_k FFN(x) = FFN(x) only if the k weights sum to 1 and no choice is
dropped (a capacity, or ST-MoE's random second-choice policy, would drop some; at top_k=1 the
weight is the raw probability). The result is a Mixtral (`convert --to_hf` exports it):

  python -m stmoe_jax.convert --from_hf=path/to/llama --workdir=runs/llama
  python train.py --config=configs/upcycle.py:stage=moe,from=runs/llama,experts=8,top_k=2 \
      --workdir=runs/llama_moe
"""

from configs import common
from configs import default
from configs import hf


def get_config(arg: str | None = None):
  """The dense model (stage=dense) or its upcycling target (stage=moe, `from=` a dense
  workdir's model)."""
  args = common.parse_arg(arg, stage='dense', experts=8, top_k=2, **{'from': ''})
  if args.stage not in ('dense', 'moe'):
    raise ValueError(f"config argument stage={args.stage!r} is invalid: expected 'dense' or 'moe'")
  if args['from']:
    return _upcycled(args['from'], args)
  config = default.get_config()
  if args.stage == 'dense':
    config.moe.every = 0  # No MoE layer: every FFN dense, width model.d_ff.
  else:
    config.moe.update(num_experts=args.experts, top_k=args.top_k,
                      expert_d_ff=config.model.d_ff)
  return config


def _upcycled(spec: str, args):
  """`from=spec`'s dense model with every FFN a Mixtral-routed MoE of copies of it."""
  if args.stage != 'moe':
    raise ValueError(f'config argument from={spec!r} is invalid with stage={args.stage!r}: '
                     "expected stage=moe (from= names the dense model to upcycle)")
  config = common.workdir_config(spec)
  if config.moe.every:
    raise ValueError(f'config argument from={spec!r} is invalid: expected a dense model with '
                     f'every FFN of width model.d_ff (its config has moe.every={config.moe.every})')
  config.moe.enabled = True
  hf.route_as_hf(config, 'mixtral', args.experts, args.top_k, config.model.d_ff)
  config.init_from = spec
  return config
