r"""What each expert learned: which kinds of source bytes a trained model routes to it.

  python -m stmoe_jax.analysis.specialization --workdir=W [--num_batches=N] [--step=S] [--out=DIR]

runs the validation split (all of it, or N batches) through checkpoint S (default: the
newest) of a train.py workdir at the eval capacity factor, and counts, per MoE layer, every
(token, choice) that reached an expert (`routing.Routing.kept`) by the `byte_classes` class of
the input byte (BOS and EOS count as 'other'). Writes to DIR (default W/specialization):
  specialization.json  per layer: counts [E, C], shares both ways, scores, top n-grams,
                       experts per token by class;
  specialization.md    the same as tables;
  specialization.png   per layer, expert x class heatmaps normalised both ways.

Routing is the model's own: each MoE layer's `route` (its registered router, selection bias,
second-expert policy, capacity) is recorded during the eval forward pass, not recomputed.

Which tokens skip compute: per class, the mean number of experts a routed token of it reached
(`experts_per_token_by_class`: below k where choices were dropped or went to null experts,
varying with ReLU routing).

Specialization score of a layer: I(expert; class) / H(class), the share of the class entropy
that knowing the expert removes, over all kept choices (0: experts see the corpus mix; 1: the
expert determines the class). `random_router_score` is the same score after shuffling the
classes over the routed tokens (each token keeps its experts): a router blind to the class with
the same expert loads and k, the reference the score must clearly exceed. `byte_score` is the
same ratio for the byte value (259 ids) instead of the class.

Top n-grams of an expert: the n bytes ending at a byte routed to it; of the expert's 50 most
frequent, those with the highest lift = their share of the expert's choices / their share of
all the layer's choices (ranked among all n-grams, rare ones that happened to go to one expert
would top every list). With top-k routing over E experts of load l_e, an n-gram sent to expert
e at every occurrence has the largest lift, 1 / (k l_e).

Einsum letters: M MoE layers, B batch, L length, K choices per token, E experts, C classes,
N kept choices, T positions of the validation token stream.
"""

from __future__ import annotations

import argparse
import os
import sys

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmoe_jax.analysis import byte_classes
from stmoe_jax.train import checkpointing
from stmoe_jax.train import entry_points
from stmoe_jax import errors
from stmoe_jax.moe import layer as moe_lib
from stmoe_jax.analysis import specialization_report
from stmoe_jax.config import ConfigError
from stmoe_jax.data import input_pipeline
from stmoe_jax.data import tokenizer

CLASSES = byte_classes.CLASSES


# Routing decisions of a forward pass.


def capture_routing(model, tokens_BL: jax.Array, mask_BL: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """The experts each token's choices went to in an eval forward pass of `model`.

  Wraps each MoE layer's `route` for one call of `model` (a `Transformer`) so that the
  `routing.Routing` its forward pass used is recorded, then maps it from routing groups back to
  positions. Returns (expert_index_MBLK int32, kept_MBLK bool) over the M MoE layers; kept is
  False for padding (mask_BL 0), choices the router did not send and those over capacity.
  """
  records = []
  model = model.unscanned()  # One Block per layer, so that each layer's `route` can be wrapped.
  layers = [block.ffn for block in model.blocks if block.is_moe]
  for layer in layers:
    def recording_route(*args, _route=layer.route, **kwargs):
      route = _route(*args, **kwargs)
      records.append(route)
      return route
    layer.route = recording_route
  try:
    model(tokens_BL, train=False, mask_BL=mask_BL)
  finally:
    for layer in layers:
      del layer.route  # The class's method again.
  B, L = tokens_BL.shape
  ungroup = lambda x_GSK: moe_lib.from_groups(x_GSK, (B, L, x_GSK.shape[-1]))
  return (jnp.stack([ungroup(r.expert_index) for r in records]),
          jnp.stack([ungroup(r.kept) for r in records]))


def make_routing_step(placement):
  """Jitted (params, buffers, global batch) -> `capture_routing` of the batch's inputs, for a
  `train_state.Placement`'s model (non-PAD inputs are real tokens, as in the eval step)."""
  def step(params, buffers, batch):
    model = nnx.merge(placement.graphdef, params, buffers)
    inputs_BL = batch['inputs']
    return capture_routing(model, inputs_BL, inputs_BL != tokenizer.PAD_ID)
  shardings = placement.state_shardings
  return jax.jit(step, in_shardings=(shardings.params, shardings.buffers,
                                     placement.batch_sharding))


def token_stream(records, feature_key: str) -> tuple[np.ndarray, np.ndarray, int, int]:
  """The validation token stream as the eval pipeline builds it, [BOS] + bytes + [EOS] per
  record in order, and its byte classes.

  Returns (tokens_T int32, classes_T uint8, fallback_bytes, num_bytes): `fallback_bytes` of the
  `num_bytes` source bytes are 'other' because `tokenize` rejected their file.
  """
  tokens, classes, fallback, num_bytes = [], [], 0, 0
  for i in range(len(records)):
    data = records[i][feature_key]
    data = data.encode('utf-8') if isinstance(data, str) else bytes(data)
    labels_N, failed = byte_classes.classify_source(data)
    tokens += [[tokenizer.BOS_ID], tokenizer.encode(data), [tokenizer.EOS_ID]]
    classes += [[byte_classes.OTHER], labels_N, [byte_classes.OTHER]]
    fallback, num_bytes = fallback + failed, num_bytes + len(data)
  return (np.concatenate(tokens).astype(np.int32), np.concatenate(classes).astype(np.uint8),
          fallback, num_bytes)


def collect(placement, state, tokens_T: np.ndarray, num_batches: int | None = None
            ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
  """(per MoE layer (expert_N, position_N): the expert and stream position of every kept
  (token, choice) of the validation split (all of it, or `num_batches` batches), and routed_R:
  the stream positions of every routed (non-padding) token, kept choices or not).

  `tokens_T` is `token_stream`'s: evaluation windows tile the stream with stride L, so batch b
  holds positions [b B L, (b + 1) B L) row-major; checked against every batch's inputs.
  """
  if jax.process_count() > 1:
    raise ValueError('the specialization report runs in one process')
  config = placement.config
  batches = input_pipeline.make_eval_iterator(**placement.data_kwargs(config.data.eval_split),
                                              max_batches=num_batches)
  step = make_routing_step(placement)
  experts, positions = None, None  # Per layer, one array per batch.
  routed = []
  offset = 0
  for batch in batches:
    inputs = np.asarray(batch['inputs']).reshape(-1)
    position_X = offset + np.arange(inputs.size)
    offset += inputs.size
    real = inputs != tokenizer.PAD_ID
    if (position_X[real].max(initial=0) >= tokens_T.size or
        not np.array_equal(tokens_T[position_X[real]], inputs[real])):
      raise RuntimeError('evaluation batches do not tile the validation stream as expected')
    routed.append(position_X[real])
    index_MBLK, kept_MBLK = jax.device_get(
        step(state.params, state.buffers, placement.global_batch(batch)))
    M, K = index_MBLK.shape[0], index_MBLK.shape[-1]
    index_MXK, kept_MXK = index_MBLK.reshape(M, -1, K), kept_MBLK.reshape(M, -1, K)
    if experts is None:
      experts, positions = [[] for _ in range(M)], [[] for _ in range(M)]
    for m in range(M):
      row, choice = np.nonzero(kept_MXK[m])
      experts[m].append(index_MXK[m, row, choice].astype(np.int32))
      positions[m].append(position_X[row])
  if experts is None:
    raise ValueError(f'the {config.data.eval_split!r} split produced no batches')
  return ([(np.concatenate(e), np.concatenate(p)) for e, p in zip(experts, positions)],
          np.concatenate(routed))


# Aggregation (plain numpy on the collected choices).


def class_counts(expert_N: np.ndarray, class_N: np.ndarray, num_experts: int,
                 num_classes: int) -> np.ndarray:
  """int64 [E, C]: how many of the N choices went to expert e with a byte of class c."""
  flat = expert_N.astype(np.int64) * num_classes + class_N
  return np.bincount(flat, minlength=num_experts * num_classes).reshape(num_experts, num_classes)


def shares(counts_EC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(by_expert_EC, by_class_EC): each expert's choices split over classes (rows sum to 1) and
  each class's choices split over experts (columns sum to 1); 0 where an expert or a class got
  no choices."""
  counts_EC = counts_EC.astype(np.float64)
  per_expert_E1 = counts_EC.sum(axis=1, keepdims=True)
  per_class_1C = counts_EC.sum(axis=0, keepdims=True)
  return (np.divide(counts_EC, per_expert_E1, out=np.zeros_like(counts_EC),
                    where=per_expert_E1 > 0),
          np.divide(counts_EC, per_class_1C, out=np.zeros_like(counts_EC),
                    where=per_class_1C > 0))


def entropy_bits(counts: np.ndarray) -> float:
  """Entropy (bits) of the distribution proportional to `counts` (any shape)."""
  p = counts[counts > 0].astype(np.float64)
  p /= p.sum()
  return float(-np.sum(p * np.log2(p)))


def mutual_information_bits(counts_EC: np.ndarray) -> float:
  """I(expert; class) in bits of the joint distribution proportional to `counts_EC`:
  H(expert) + H(class) - H(expert, class)."""
  return (entropy_bits(counts_EC.sum(axis=1)) + entropy_bits(counts_EC.sum(axis=0)) -
          entropy_bits(counts_EC))


def specialization_score(counts_EC: np.ndarray) -> float:
  """I(expert; class) / H(class): 0 when experts see the class mix, 1 when the expert
  determines the class (0 for a single class)."""
  h_class = entropy_bits(counts_EC.sum(axis=0))
  return mutual_information_bits(counts_EC) / h_class if h_class > 0 else 0.0


def shuffled_labels(position_N: np.ndarray, labels_T: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
  """Labels of the N choices after permuting labels over the routed positions: every choice of
  a token gets the same other token's label, so expert loads and k stay as they were."""
  routed, inverse = np.unique(position_N, return_inverse=True)
  return rng.permutation(labels_T[routed])[inverse]


def ngram_codes(position_N: np.ndarray, tokens_T: np.ndarray, n: int) -> np.ndarray:
  """int64 [N]: the n tokens ending at each position as one base-VOCAB_SIZE number (PAD
  before the stream's start)."""
  codes = np.zeros(position_N.shape, np.int64)
  for back in range(n - 1, -1, -1):
    at = position_N - back
    codes = codes * tokenizer.VOCAB_SIZE + np.where(
        at >= 0, tokens_T[np.maximum(at, 0)], tokenizer.PAD_ID)
  return codes


def decode_ngram(code: int, n: int) -> list[int]:
  """Inverse of `ngram_codes` for one code: its n token ids, oldest first."""
  ids = []
  for _ in range(n):
    code, token = divmod(int(code), tokenizer.VOCAB_SIZE)
    ids.append(token)
  return ids[::-1]


def top_ngrams(expert_N: np.ndarray, position_N: np.ndarray, tokens_T: np.ndarray,
               num_experts: int, *, n: int = 3, top: int = 5, pool: int = 50
               ) -> list[list[dict]]:
  """Per expert, the `top` n-grams (ending at the routed byte) with the highest lift over the
  layer's choices among the expert's `pool` most frequent ones (ties go to the more frequent,
  then to the smaller code): dicts with ids, count, share (of the expert's choices) and lift."""
  codes_N = ngram_codes(position_N, tokens_T, n)
  corpus_codes, corpus_counts = np.unique(codes_N, return_counts=True)
  per_expert = np.bincount(expert_N, minlength=num_experts)
  # Sorted by expert, then code: each expert's n-grams are one contiguous run.
  keys, counts = np.unique(expert_N.astype(np.int64) * tokenizer.VOCAB_SIZE**n + codes_N,
                           return_counts=True)
  experts, codes = np.divmod(keys, tokenizer.VOCAB_SIZE**n)
  corpus_share = corpus_counts[np.searchsorted(corpus_codes, codes)] / codes_N.size
  bounds = np.searchsorted(experts, np.arange(num_experts + 1))
  result = []
  for e in range(num_experts):
    run = np.arange(bounds[e], bounds[e + 1])
    frequent = run[np.argsort(-counts[run], kind='stable')[:pool]]
    share = counts[frequent] / max(per_expert[e], 1)
    lift = share / corpus_share[frequent]
    best = frequent[np.argsort(-lift, kind='stable')[:top]]
    result.append([{'ids': decode_ngram(codes[i], n), 'count': int(counts[i]),
                    'share': float(counts[i] / per_expert[e]),
                    'lift': float(counts[i] / per_expert[e] / corpus_share[i])} for i in best])
  return result


def experts_per_token_by_class(position_N: np.ndarray, routed_R: np.ndarray,
                               classes_T: np.ndarray, num_classes: int) -> np.ndarray:
  """float64 [C]: the mean number of experts a routed token of class c reached (its kept
  choices; 0 for a class with no routed token): which tokens skip compute, through capacity
  drops, null experts or ReLU routing's zero gates."""
  kept_C = np.bincount(classes_T[position_N], minlength=num_classes)
  tokens_C = np.bincount(classes_T[routed_R], minlength=num_classes)
  return np.divide(kept_C, tokens_C, out=np.zeros(num_classes), where=tokens_C > 0)


def layer_report(expert_N: np.ndarray, position_N: np.ndarray, tokens_T: np.ndarray,
                 classes_T: np.ndarray, num_experts: int, seed: int = 0,
                 routed_R: np.ndarray | None = None) -> dict:
  """Everything the report says about one MoE layer's kept choices (see the module
  docstring): counts, both shares, class mix, scores with their random-router references,
  per-expert load, class lift and top 3-grams; with `routed_R` (`collect`'s positions of the
  routed tokens) also the experts per token, overall and `experts_per_token_by_class`."""
  class_N, byte_N = classes_T[position_N], tokens_T[position_N]
  counts_EC = class_counts(expert_N, class_N, num_experts, len(CLASSES))
  by_expert_EC, by_class_EC = shares(counts_EC)
  class_mix_C = counts_EC.sum(axis=0) / max(counts_EC.sum(), 1)
  rng = np.random.default_rng(seed)
  random_counts_EC = class_counts(expert_N, shuffled_labels(position_N, classes_T, rng),
                                  num_experts, len(CLASSES))
  bytes_EV = class_counts(expert_N, byte_N, num_experts, tokenizer.VOCAB_SIZE)
  random_bytes_EV = class_counts(expert_N, shuffled_labels(position_N, tokens_T, rng),
                                 num_experts, tokenizer.VOCAB_SIZE)
  lift_EC = np.divide(by_expert_EC, class_mix_C, out=np.zeros_like(by_expert_EC),
                      where=class_mix_C > 0)
  ngrams = top_ngrams(expert_N, position_N, tokens_T, num_experts)
  load_E = counts_EC.sum(axis=1) / max(counts_EC.sum(), 1)
  per_token = {} if routed_R is None else {
      'experts_per_token': expert_N.size / max(routed_R.size, 1),
      'experts_per_token_by_class': experts_per_token_by_class(position_N, routed_R, classes_T,
                                                               len(CLASSES)).tolist()}
  return {
      'num_choices': int(expert_N.size), 'class_mix': class_mix_C.tolist(), **per_token,
      'mutual_information_bits': mutual_information_bits(counts_EC),
      'class_entropy_bits': entropy_bits(counts_EC.sum(axis=0)),
      'score': specialization_score(counts_EC),
      'random_router_score': specialization_score(random_counts_EC),
      'byte_score': specialization_score(bytes_EV),
      'random_router_byte_score': specialization_score(random_bytes_EV),
      'counts': counts_EC.tolist(), 'by_expert': by_expert_EC.tolist(),
      'by_class': by_class_EC.tolist(),
      'experts': [{'expert': e, 'load': float(load_E[e]), 'class_lift': lift_EC[e].tolist(),
                   'top_class': CLASSES[int(np.argmax(lift_EC[e]))],
                   'top_ngrams': ngrams[e]} for e in range(num_experts)],
  }


def specialization(workdir: str, num_batches: int | None = None, step: int | None = None
                   ) -> dict:
  """The report of a train.py workdir (see the module docstring) as a JSON-ready dict."""
  placement, step, state = entry_points.restore_workdir(workdir, step)
  cfg = placement.model_cfg
  layers = [i for i in range(cfg.num_layers) if cfg.ffn_kind(i) == 'moe']
  if not layers:
    raise ValueError(f'{workdir!r} has no MoE layer: no experts to report on')
  data = placement.config.data
  if data.tokenizer != 'bytes':  # Its token classes are those of bytes of Python source.
    raise ValueError(f'{workdir!r} trained with data.tokenizer={data.tokenizer!r}: the '
                     'specialization report reads byte-level runs only')
  source = input_pipeline.get_data_source(data.name, data.eval_split, data.data_dir or None)
  tokens_T, classes_T, fallback, num_bytes = token_stream(source, data.feature_key)
  collected, routed_R = collect(placement, state, tokens_T, num_batches)
  return {
      'workdir': os.path.abspath(workdir), 'step': step, 'split': data.eval_split,
      'num_batches': num_batches, 'classes': list(CLASSES),
      'tokenize_fallback_share': fallback / max(num_bytes, 1),
      'layers': [{'layer': layer, **layer_report(expert_N, position_N, tokens_T, classes_T,
                                                  cfg.moe.num_experts, routed_R=routed_R)}
                 for layer, (expert_N, position_N) in zip(layers, collected)],
  }


def main(argv: list[str]) -> None:
  """The command line (module docstring): writes the report's files and prints their paths."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='train.py workdir')
  parser.add_argument('--num_batches', type=int, default=None,
                      help='validation batches to run (default: the whole split)')
  parser.add_argument('--step', type=int, default=None, help='checkpoint (default: newest)')
  parser.add_argument('--out', default=None, help='output directory (default: W/specialization)')
  args = parser.parse_args(argv)
  if args.num_batches is not None and args.num_batches < 1:
    sys.exit(f'error: --num_batches={args.num_batches} is invalid: expected >= 1')
  errors.quiet_orbax_errors()
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warnings about steps we report.
  with errors.one_line_errors(ConfigError, OSError, ValueError, checkpointing.CheckpointError,
                              input_pipeline.DataError):
    report = specialization(args.workdir, args.num_batches, args.step)
    out = args.out or os.path.join(args.workdir, 'specialization')
    paths = specialization_report.write(report, out)
  for path in paths:
    print(path)


if __name__ == '__main__':
  main(sys.argv[1:])
