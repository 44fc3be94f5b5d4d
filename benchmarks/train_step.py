r"""Whole-model train-step throughput: MoE configs vs dense configs of equal active FLOPs.

  python benchmarks/train_step.py                               # configs/default.py vs configs/dense.py
  python benchmarks/train_step.py --grid --out=grid.json        # d_model 64, 128 x dense, 8/16/64 experts
  python benchmarks/train_step.py --quick                       # configs/tiny.py, a smoke test
  python benchmarks/train_step.py --config=configs/moe_vs_dense.py:arm=stmoe64   # one config
  python benchmarks/train_step.py --override=model.dtype=bfloat16

`--grid` runs, at d_model 64 and 128 (4 layers, MoE every other layer, top-2 of experts of width
2 d_model, batch 64 x 64 bytes), a dense twin and 8, 16 and 64 experts, with one
`moe_over_dense_tokens_per_sec` line per MoE config.

Prints one JSON line per config: seconds per step (median of --steps after two warm-up steps;
the MoE config and its dense twin step in turn, so their ratio holds on a shared machine),
tokens/s, model FLOPs per token (`stmoe_jax.models.flops`: active parameters and attention, training =
3x forward) and model FLOPs utilisation against the device's datasheet peak when known (GPU,
TPU) and against a plain matmul measured in this process (`mfu_vs_measured_matmul`, the only
peak a CPU has). The last line is the MoE/dense tokens/s ratio. Uses random tokens: the
data pipeline is not part of the step.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import timing  # noqa: E402
from configs import default, dense, tiny  # noqa: E402
from stmoe_jax.models import flops  # noqa: E402
from stmoe_jax.analysis import sweep  # noqa: E402
from stmoe_jax.train import train_lib  # noqa: E402


def measured_matmul_peak(d: int, dtype) -> float:
  """FLOP/s of a [4096, d] x [d, 4d] matmul's forward+backward, the best of 5."""
  x, w = jnp.ones((4096, d), dtype), jnp.ones((d, 4 * d), dtype)
  fn = jax.jit(jax.grad(lambda x, w: jnp.sum(x @ w), (0, 1)))
  jax.block_until_ready(fn(x, w))
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(fn(x, w))
    best = min(best, time.perf_counter() - start)
  return 3 * 2 * 4096 * d * 4 * d / best


def apply_override(config, text: str):
  """Sets the config field of `text` = 'section.field=value', the value read as the field's
  type: a bool only from True/False, a tuple or list as a Python literal; raises ValueError
  naming the field for a value of another type (a typo must not flip a flag silently)."""
  key, _, value = text.partition('=')
  *sections, name = key.split('.')
  node = config
  for section in sections:
    node = node[section]
  old = node[name]
  try:
    if isinstance(old, bool):
      if value not in ('True', 'False'):
        raise ValueError('expected True or False')
      new = value == 'True'
    elif isinstance(old, (tuple, list)):
      new = type(old)(ast.literal_eval(value))
    else:
      new = type(old)(value)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'--override {key}={value!r} is invalid: {e}') from None
  node[name] = new


def random_batch(trainer, config) -> dict:
  """A global batch of random bytes (seed 0) in the trainer's batch sharding."""
  tokens = np.random.default_rng(0).integers(
      0, 256, (config.batch_size, config.data.seq_len + 1), dtype=np.int32)
  return trainer.global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
                               'weights': np.ones(tokens[:, 1:].shape, np.float32)})


class Run:
  """One config's trainer, state and batch, stepped on demand (a temporary workdir)."""

  def __init__(self, name: str, config):
    self.name, self.config = name, config
    self._workdir = tempfile.TemporaryDirectory()
    self.trainer = train_lib.Trainer(config, self._workdir.name)
    self.state = self.trainer.init()
    self.batch = random_batch(self.trainer, config)
    self.times = []

  def step(self, timed: bool) -> None:
    start = time.perf_counter()
    self.state, metrics = self.trainer.train_step(self.state, self.batch)
    jax.block_until_ready(metrics)
    if timed:
      self.times.append(time.perf_counter() - start)

  def record(self) -> dict:
    self._workdir.cleanup()
    config, seconds = self.config, statistics.median(self.times)
    tokens_per_step = config.batch_size * config.data.seq_len
    flops_per_token = flops.train_flops_per_token(self.trainer.model_cfg, config.data.seq_len)
    achieved = flops_per_token * tokens_per_step / seconds
    measured = measured_matmul_peak(config.model.d_model, jnp.dtype(config.model.dtype))
    datasheet = flops.peak_flops_per_device(jax.devices()[0].device_kind)
    return {'config': self.name, 'device': jax.devices()[0].device_kind,
            'dtype': config.model.dtype, 'seconds_per_step': seconds,
            'tokens_per_sec': tokens_per_step / seconds,
            'model_flops_per_token': flops_per_token, 'model_flops_per_sec': achieved,
            'matmul_peak_flops_per_sec': measured, 'mfu_vs_measured_matmul': achieved / measured,
            'mfu_vs_datasheet': (achieved / (datasheet * jax.device_count()) if datasheet
                                 else None)}


def benchmark_interleaved(pairs: list[tuple[str, object]], steps: int) -> list[dict]:
  """Records of every config, their steps taken in turn (A, B, A, B, ...) after two warm-up
  steps each (compilation, first-touch allocation): ratios hold on a shared machine."""
  runs = [Run(name, config) for name, config in pairs]
  for i in range(steps + 2):
    for run in runs:
      run.step(timed=i >= 2)
  return [run.record() for run in runs]


def benchmark(name: str, config, steps: int) -> dict:
  return benchmark_interleaved([(name, config)], steps)[0]


def grid_configs(d_models=(64, 128), num_experts=(8, 16, 64)) -> list[tuple[str, object]]:
  """(name, config) pairs of `--grid`: per d_model, its dense twin then each expert count."""
  pairs = []
  for d in d_models:
    base = default.get_config()
    base.model.update(d_model=d, num_layers=4, num_heads=d // 32, head_dim=32, d_ff=4 * d)
    base.moe.update(expert_d_ff=2 * d, top_k=2, every=2, group_size=256)
    base.update(batch_size=64)
    base.data.seq_len = 64
    twin = base.copy_and_resolve_references()
    twin.moe.enabled = False
    pairs.append((f'd{d}_dense', twin))
    for e in num_experts:
      config = base.copy_and_resolve_references()
      config.moe.num_experts = e
      pairs.append((f'd{d}_e{e}', config))
  return pairs


def run_grid(args) -> list[dict]:
  results, dense = [], None
  for name, config in grid_configs():
    for text in args.override:
      apply_override(config, text)
    result = benchmark(name, config, args.steps)
    print(json.dumps(result), flush=True)
    results.append(result)
    if name.endswith('_dense'):
      dense = result
    else:
      ratio = {'config': name, 'moe_over_dense_tokens_per_sec':
               result['tokens_per_sec'] / dense['tokens_per_sec']}
      print(json.dumps(ratio), flush=True)
      results.append(ratio)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--override', action='append', default=[],
                      help='config field=value applied to both configs, e.g. model.dtype=bfloat16')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--grid', action='store_true', help='d_model 64/128 x dense, 8/16/64 experts')
  parser.add_argument('--out', default='', help='Also write every record to this JSON file.')
  parser.add_argument('--config', default='', help='Benchmark this one config file[:arg] only.')
  args = parser.parse_args(argv)
  if args.config:
    config = sweep.load_config_file(args.config)
    for text in args.override:
      apply_override(config, text)
    print(json.dumps(benchmark(args.config, config, args.steps)), flush=True)
    return
  if args.grid:
    results = run_grid(args)
    if args.out:
      with open(args.out, 'w') as f:
        json.dump(results, f, indent=1)
    return
  pairs = [('tiny', tiny.get_config()), ('tiny_dense', tiny.get_config())] if args.quick else [
      ('default', default.get_config()), ('dense', dense.get_config())]
  pairs[1][1].moe.enabled = False
  for name, config in pairs:
    for text in args.override:
      apply_override(config, text)
    if args.quick:
      config.batch_size = 4
  results = benchmark_interleaved(pairs, 2 if args.quick else args.steps)
  ratio = {'moe_over_dense_tokens_per_sec':
           results[0]['tokens_per_sec'] / results[1]['tokens_per_sec']}
  for result in (*results, ratio):
    print(json.dumps(result), flush=True)
  if args.out:  # The same lines, after a header naming the machine and the command.
    with open(args.out, 'w') as f:
      json.dump([{'kind': 'machine', **timing.machine()}, *results, ratio], f, indent=1)


if __name__ == '__main__':
  main()
