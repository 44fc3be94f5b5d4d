"""Validation metrics at the eval capacity factor: run a model's eval step over the validation
split and reduce. (`entry_points.evaluate_workdir` is eval.py's logic.)

bits/byte = total cross-entropy over all target tokens (in bits) / the utf-8 bytes those targets
stand for (`Tokenizer.token_bytes`: 1 per byte target for the byte tokenizer, a subword's
length in bytes otherwise), so runs with different vocabularies compare. The EOS target ending
each document costs bits but is no byte, so it counts against the model (BOS targets carry
weight 0 in evaluation batches: predicting BOS after EOS is trivial).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from stmoe_jax.moe import layer_stats
from stmoe_jax.models import factory as model_factory
from stmoe_jax.config import ModelConfig
from stmoe_jax.data import tasks
from stmoe_jax.data import tokenizer


def evaluate(run_step: Callable[[dict], dict], batches: Iterable[dict],
             cfg: ModelConfig, exact_match: bool = False) -> dict:
  """Runs `run_step` (a jitted eval step with params bound, returning a family's eval-step sums
  and `num_bytes`, as `make_eval_step`'s) over `batches` and reduces.

  Returns a dict: loss (nats/token), bits_per_byte, accuracy, num_tokens, balance_loss and
  z_loss (summed over MoE layers, as in the train loss), dropped_fraction (mean over layers),
  and `moe_layers`: one entry per MoE layer with its transformer `layer` index (and, in an
  encoder-decoder, its `stack`: 'encoder' or 'decoder', `ModelConfig.moe_stacks`) and its routing
  telemetry averaged over all real tokens: `expert_load` (E fractions summing to 1),
  `max_load_ratio`, `dropped_fraction` (share of assigned choices dropped at the eval capacity
  factor), `dropped_fraction_per_slot` (1st, 2nd, ... choice), `router_z` (mean
  logsumexp^2), `router_entropy` (nats), `tokens_left_behind` (share of tokens every choice
  of which was dropped), `router_confidence` (mean top-1 router probability),
  `null_choice_fraction` (share of choices sent to null experts), `experts_per_token` (mean
  choices per token that reached an expert, after drops and null choices) and
  `experts_per_token_hist` (share of tokens that reached 0, 1, ..., K experts), `importance_loss`
  and `load_loss` (`cv_balance`; at evaluation the load is the hard count) and `router_bias`
  (the aux-loss-free balancer's bias).
  `evaluate_split` adds `flops_report`'s forward FLOPs per token, nominal and spent.
  With `exact_match` (prompt -> answer tasks, one example per row) also `exact_match`: the share
  of examples whose every answer token (and its EOS) is the argmax given the ones before, which
  is when greedy decoding emits the answer exactly; `accuracy` is then the token accuracy over
  the answers, and `num_examples` their count.
  """
  totals, routing = None, None
  stacks = cfg.moe_stacks()
  routed = {stack: layer_stats.key('num_routed', stack) for stack, _ in stacks}
  keys = ('ce_sum', 'num_tokens', 'num_correct', 'num_bytes', *routed.values()) + (
      ('num_exact', 'num_examples') if exact_match else ())
  for batch in batches:
    out = jax.device_get(run_step(batch))
    sums = {k: float(out[k]) for k in keys}
    # Routing stats are per-batch means over real tokens: weight them by that count.
    stats = {(stack, k): np.asarray(out[layer_stats.key(k, stack)], np.float64) *
             sums[routed[stack]] for stack, _ in stacks for k in layer_stats.MOE}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    routing = stats if routing is None else {k: routing[k] + stats[k] for k in stats}
  if totals is None or not totals['num_tokens']:
    raise ValueError('the evaluation split produced no tokens')
  routing = {(stack, k): v / totals[routed[stack]] for (stack, k), v in routing.items()}
  total = lambda k: float(sum(np.sum(routing[stack, k]) for stack, _ in stacks))
  dropped = np.concatenate([routing[stack, 'dropped_fraction'] for stack, _ in stacks])
  task = ({'exact_match': totals['num_exact'] / max(totals['num_examples'], 1.0),
           'num_examples': int(totals['num_examples'])} if exact_match else {})
  return {
      **task,
      'loss': totals['ce_sum'] / totals['num_tokens'],
      'bits_per_byte': totals['ce_sum'] / math.log(2) / max(totals['num_bytes'], 1.0),
      'accuracy': totals['num_correct'] / totals['num_tokens'],
      'num_tokens': int(totals['num_tokens']),
      'balance_loss': total('balance_loss'),
      'z_loss': total('z_loss'),
      'dropped_fraction': float(np.mean(dropped)) if dropped.size else 0.0,
      'moe_layers': [_layer_report(layer, {k: routing[stack, k][m] for k in layer_stats.MOE},
                                   stack)
                     for stack, moe_layers in stacks for m, layer in enumerate(moe_layers)],
  }


def _layer_report(layer: int, stats: dict, stack: str = '') -> dict:
  load = stats['expert_load']
  as_list = lambda x: np.round(x, 6).tolist()
  return {
      **({'stack': stack} if stack else {}), 'layer': layer, 'expert_load': as_list(load),
      # From the averaged load: the mean of per-batch ratios would overstate imbalance.
      'max_load_ratio': float(np.max(load) * len(load)),
      'dropped_fraction': float(stats['dropped_fraction']),
      'dropped_fraction_per_slot': as_list(stats['dropped_fraction_per_slot']),
      'router_z': float(stats['z_loss']), 'router_entropy': float(stats['router_entropy']),
      'tokens_left_behind': float(stats['tokens_left_behind']),
      'router_confidence': float(stats['router_confidence']),
      'null_choice_fraction': float(stats['null_choice_fraction']),
      'experts_per_token': float(stats['experts_per_token']),
      'experts_per_token_hist': as_list(stats['experts_per_token_hist']),
      'importance_loss': float(stats['importance_loss']), 'load_loss': float(stats['load_loss']),
      'router_bias': as_list(stats['router_bias']),
  }


def nonfinite_results(metrics: dict) -> list[str]:
  """Names of the headline metrics (loss, bits_per_byte, accuracy) that are NaN or inf."""
  return [k for k in ('loss', 'bits_per_byte', 'accuracy') if not math.isfinite(metrics[k])]


def parse_capacity_factors(text: str) -> list[float | str]:
  """'1.0,1.25,dropless' -> [1.0, 1.25, 'dropless']; ValueError naming a bad entry."""
  factors = []
  for item in text.split(','):
    item = item.strip()
    if item == 'dropless':
      factors.append(item)
      continue
    try:
      value = float(item)
    except ValueError:
      value = float('nan')
    if not 0 < value < math.inf:
      raise ValueError(f'--eval_capacity_factors entry {item!r} is invalid: expected a finite '
                       "number > 0 or 'dropless'")
    factors.append(value)
  return factors


def with_eval_capacity(cfg: ModelConfig, factor: float | str) -> ModelConfig:
  """`cfg` evaluated at capacity factor `factor`, or with dropless dispatch for 'dropless'."""
  if factor == 'dropless':
    moe = dataclasses.replace(cfg.moe, dispatch='dropless')
  else:
    moe = dataclasses.replace(cfg.moe, eval_capacity_factor=float(factor))
  return dataclasses.replace(cfg, moe=moe)


def make_eval_step(placement, model_cfg: ModelConfig | None = None) -> Callable:
  """The jitted eval step (params, buffers, batch) -> sums of a `train_state.Placement`'s model,
  or, with `model_cfg`, of the same parameters under other routing settings (e.g. another
  eval capacity factor or dropless dispatch; parameter shapes must not change); with
  `num_bytes` (`count_bytes`) of the config's tokenizer."""
  model = placement.model if model_cfg is None else model_factory.get_model(model_cfg)
  graphdef = placement.graphdef if model_cfg is None else model.abstract()[0]
  shardings = placement.state_shardings
  token_bytes = byte_table(tokenizer.load(placement.config.data.tokenizer),
                           (model_cfg or placement.model_cfg).vocab_size)

  def step(params, buffers, batch):
    return {**model.eval_step(params, buffers, batch, graphdef=graphdef),
            'num_bytes': count_bytes(batch, token_bytes)}

  return jax.jit(step, in_shardings=(shardings.params, shardings.buffers,
                                     placement.batch_sharding))


def byte_table(tok: tokenizer.Tokenizer, vocab_size: int) -> np.ndarray:
  """float32 [vocab_size]: `tok.token_bytes`, zero for ids past it (sentinels, unused rows)."""
  table = np.zeros(max(vocab_size, tok.vocab_size), np.float32)
  table[:tok.vocab_size] = tok.token_bytes
  return table


def count_bytes(batch: dict, token_bytes: np.ndarray) -> jax.Array:
  """The utf-8 bytes of a batch's weighted targets: sum of weights * token_bytes[targets]."""
  return jnp.sum(batch['weights'] * jnp.asarray(token_bytes)[batch['targets']])


def evaluate_split(placement, state, eval_step: Callable, max_batches: int | None = None,
                   model_cfg: ModelConfig | None = None) -> dict:
  """`evaluate` of `state` over the config's validation split (all of it, or `max_batches`),
  with `eval_step` from `make_eval_step` (for `model_cfg`, default the placement's model); with
  a prompt -> answer `data.task`, exact match too."""
  config = placement.config
  batches = tasks.eval_iterator(config.data.task, placement.model.task_format,
                                **placement.data_kwargs(config.data.eval_split),
                                max_batches=max_batches)
  run_step = lambda b: eval_step(state.params, state.buffers, placement.global_batch(b))
  cfg = model_cfg or placement.model_cfg
  metrics = evaluate(run_step, batches, cfg, exact_match=config.data.task != 'lm')
  return {**metrics, **flops_report(cfg, config.data, metrics['moe_layers'])}


def flops_report(cfg: ModelConfig, data, moe_layers: list[dict]) -> dict:
  """{'forward_flops_per_token': nominal (top_k experts in every MoE layer),
  'spent_forward_flops_per_token': with each layer's measured `experts_per_token`} per input
  token (`flops.forward_flops_per_token`), from `evaluate`'s `moe_layers`; {} for a model
  family that does not count its FLOPs."""
  count = model_factory.MODEL_FAMILIES[cfg.architecture].forward_flops_per_token
  if count is None:
    return {}
  used = {(layer.get('stack', ''), layer['layer']): layer['experts_per_token']
          for layer in moe_layers}
  return {'forward_flops_per_token': count(cfg, data),
          'spent_forward_flops_per_token': count(cfg, data, experts_per_token=used)}
