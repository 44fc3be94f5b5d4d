r"""Train-step time under expert parallelism: all-to-all dispatch vs the dropless all-gather fallback.

  python benchmarks/expert_parallel.py                 # 4 simulated CPU devices, expert=4
  python benchmarks/expert_parallel.py --quick         # a smoke test (CI runs it)
  python benchmarks/expert_parallel.py --devices=8 --expert=8

Prints one JSON line per dispatch strategy: seconds per train step (median of --steps after two
warm-up steps), tokens/s, and how many all-to-all / all-gather / reduce-scatter ops the compiled
step holds. On one CPU the "devices" are threads of the same 2 cores, so the times show the
relative cost of the exchange patterns (and of the dropless fallback moving `expert` times the
tokens), not a network; on GPUs/TPUs run it with the real device count.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', type=int, default=4, help='simulated CPU devices')
  parser.add_argument('--expert', type=int, default=4, help='mesh.expert (data = the rest)')
  parser.add_argument('--dispatch', default='scatter,einsum,dropless')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--quick', action='store_true')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if 'jax' not in sys.modules:  # Simulated devices must be requested before jax starts.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}')
  import json  # pylint: disable=g-import-not-at-top
  import statistics  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import default, tiny  # pylint: disable=g-import-not-at-top
  from stmoe_jax.train import train_lib  # pylint: disable=g-import-not-at-top
  from benchmarks.train_step import random_batch  # pylint: disable=g-import-not-at-top

  for dispatch in args.dispatch.split(','):
    config = tiny.get_config() if args.quick else default.get_config()
    config.mesh.update(data=-1, expert=args.expert, model=1)
    config.moe.update(dispatch=dispatch, num_experts=max(config.moe.num_experts, args.expert))
    if args.quick:
      config.batch_size = 2 * args.devices
      config.moe.group_size = config.data.seq_len
    with tempfile.TemporaryDirectory() as workdir:
      trainer = train_lib.Trainer(config, workdir)
      state = trainer.init()
      batch = random_batch(trainer, config)
      hlo = trainer.train_step.lower(state, batch).compile().as_text()
      times = []
      for i in range((1 if args.quick else args.steps) + 2):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        if i >= 2:
          times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({
        'dispatch': dispatch, 'mesh': dict(trainer.mesh.shape), 'devices': jax.device_count(),
        'seconds_per_step': seconds,
        'tokens_per_sec': config.batch_size * config.data.seq_len / seconds,
        'all_to_all_ops': hlo.count(' all-to-all('), 'all_gather_ops': hlo.count(' all-gather('),
        'reduce_scatter_ops': hlo.count(' reduce-scatter('),
    }), flush=True)


if __name__ == '__main__':
  main()
