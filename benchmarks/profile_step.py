r"""Where a train step's time goes: a jax.profiler trace of a few steps, summed per XLA op kind.

  python benchmarks/profile_step.py                                     # configs/default.py
  python benchmarks/profile_step.py --config=configs/dense.py --override=model.d_model=128
  python benchmarks/profile_step.py --quick                             # configs/tiny.py

Prints JSON lines: one `step` record (median seconds per step outside the profiler, XLA's
`cost_analysis()` FLOPs of the compiled step, model FLOPs from `stmoe_jax.models.flops`), then one
`op_kind` record per kind of XLA op (the op's name without its numeric suffix: `ynn_fusion`
and `dot` are matmuls, `*_fusion` elementwise and layout work) with its milliseconds per step
and count, largest first, and finally the share of traced op time spent in matmuls. The trace
is read from the Perfetto JSON the profiler writes, so nothing beyond JAX is needed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.train_step import apply_override, random_batch  # noqa: E402
from stmoe_jax.models import flops  # noqa: E402
from stmoe_jax.analysis import sweep  # noqa: E402
from stmoe_jax.train import train_lib  # noqa: E402

MATMUL_KINDS = ('ynn_fusion', 'dot', 'custom-call')  # XLA:CPU's matmul thunks.
# Host-side events of the profiler and the runtime, not XLA ops.
_NOT_OPS = ('ThunkExecutor', '$', 'PjitFunction', 'end: ', 'ParseArguments',
            'CommonPjRt')


def op_kind_times(trace_events: list[dict], steps: int) -> dict[str, tuple[float, int]]:
  """{op kind: (milliseconds per step, ops per step)} of the complete ('X') trace events."""
  total, count = collections.Counter(), collections.Counter()
  for event in trace_events:
    name = event.get('name', '')
    if event.get('ph') != 'X' or name.startswith(_NOT_OPS):
      continue
    kind = re.sub(r'\.\d+$', '', name)
    total[kind] += event.get('dur', 0)
    count[kind] += 1
  return {k: (total[k] / 1e3 / steps, count[k] // steps) for k, _ in total.most_common()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'default.py'))
  parser.add_argument('--override', action='append', default=[], help='field=value')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--top', type=int, default=15, help='Op kinds to print.')
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args(argv)
  config = sweep.load_config_file(os.path.join(ROOT, 'configs', 'tiny.py') if args.quick
                             else args.config)
  for text in args.override:
    apply_override(config, text)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train_lib.Trainer(config, workdir)
    state = trainer.init()
    batch = random_batch(trainer, config)
    compiled = trainer.train_step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    times = []
    for i in range(args.steps + 2):
      start = time.perf_counter()
      state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready(metrics)
      if i >= 2:
        times.append(time.perf_counter() - start)
    trace_dir = os.path.join(workdir, 'trace')
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
    [path] = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  kinds = op_kind_times(events, args.steps)
  tokens_per_step = config.batch_size * config.data.seq_len
  print(json.dumps({
      'kind': 'step', 'seconds_per_step': statistics.median(times),
      'xla_flops_per_step': float(cost.get('flops', 0.0)),
      'model_flops_per_step': flops.train_flops_per_token(trainer.model_cfg, config.data.seq_len)
                              * tokens_per_step,
      'traced_op_ms_per_step': sum(ms for ms, _ in kinds.values())}), flush=True)
  for kind, (ms, n) in list(kinds.items())[:args.top]:
    print(json.dumps({'kind': 'op_kind', 'op': kind, 'ms_per_step': round(ms, 3),
                      'ops_per_step': n}))
  matmul = sum(ms for k, (ms, _) in kinds.items() if k in MATMUL_KINDS)
  print(json.dumps({'kind': 'matmul_share', 'matmul_ms_per_step': round(matmul, 3),
                    'share_of_op_time': matmul / max(sum(ms for ms, _ in kinds.values()), 1e-9)}))


if __name__ == '__main__':
  main()
