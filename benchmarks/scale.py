r"""Does a config fit? Compile its train step for N simulated devices and report the memory.

  python benchmarks/scale.py --config=configs/stmoe.py:size=1b --mesh=fsdp=4,expert=4 \
    --devices=16 --remat=full --batch=256
  python benchmarks/scale.py --config=configs/stmoe.py:size=tiny --mesh=fsdp=2,expert=2 \
    --devices=4 --batch=8      # seconds; CI runs this
  ... --scan                   # model.scan_layers=True; any field: --override=model.num_layers=4

Sets `--xla_force_host_platform_device_count=N` before JAX starts, builds the Trainer's jitted
train step (the same shardings, donation and step function as training), then lowers and
compiles it from `jax.ShapeDtypeStruct`s of the train state and a batch: nothing is allocated,
so a model far larger than this machine's memory compiles. Prints one JSON line: compile
seconds, the per-device argument / output / temp / alias bytes of `compiled.memory_analysis()`
(SPMD compiles one program per device, so these are one device's), total and active parameters
(active: a token's top_k of E experts) and the collectives in the compiled HLO.

The CPU compiler's buffer assignment stands in for the accelerator's: the bytes are what XLA
plans for this program on CPU, a close guide, not a TPU/GPU allocator's exact figure (their
fusion and layouts differ). Under remat, measure with `--scan`: with unrolled layers XLA:CPU's
schedule keeps every layer's recomputed activations alive until late in the backward pass
(docs/scaling.md), which a scan's one-unit-per-iteration loop rules out.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

COLLECTIVES = ('all-gather', 'all-to-all', 'reduce-scatter', 'all-reduce', 'collective-permute')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='config file[:arg]')
  parser.add_argument('--mesh', default='data=-1', help="mesh axis sizes, e.g. 'fsdp=4,expert=4'")
  parser.add_argument('--devices', type=int, default=16, help='simulated CPU devices')
  parser.add_argument('--remat', default='', help='model.remat (default: the config\'s)')
  parser.add_argument('--batch', type=int, default=0, help='global batch (default: the config\'s)')
  parser.add_argument('--scan', action='store_true', help='model.scan_layers=True')
  parser.add_argument('--override', action='append', default=[],
                      help='config field=value, e.g. model.num_layers=4 (repeatable)')
  return parser.parse_args(argv)


def count_collectives(hlo: str) -> dict[str, int]:
  """{collective: number of ops} in compiled HLO text, sync or async (`-start`) forms."""
  return {name: len(re.findall(rf'\s{name}(?:-start)?\(', hlo)) for name in COLLECTIVES}


def parameter_counts(params, cfg) -> tuple[int, int]:
  """(total, active) parameters of a params tree: active counts top_k / E of each expert
  weight (those under an 'experts' key) and everything else whole."""
  import jax  # pylint: disable=g-import-not-at-top
  total = active = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = int(leaf.size)
    total += size
    is_expert = any(getattr(k, 'key', None) == 'experts' for k in path)
    active += size * cfg.moe.top_k // cfg.moe.num_experts if is_expert else size
  return total, active


def batch_lengths(config) -> dict[str, int]:
  """Each array of a train batch and its length: seq_len for the decoder-only model; for the
  encoder-decoder, the span-corruption encoder and decoder lengths."""
  from stmoe_jax.data import span_corruption  # pylint: disable=g-import-not-at-top
  data = config.data
  if config.model.architecture != 'encoder_decoder':
    return {'inputs': data.seq_len, 'targets': data.seq_len, 'weights': data.seq_len}
  lengths = span_corruption.lengths(data.seq_len, data.noise_density, data.mean_noise_span_length)
  return {'encoder_inputs': lengths.encoder_len, 'decoder_inputs': lengths.decoder_len,
          'targets': lengths.decoder_len, 'weights': lengths.decoder_len}


def main(argv=None) -> dict:
  args = parse_args(argv)
  if 'jax' not in sys.modules:  # Simulated devices must be requested before jax starts.
    # XLA:CPU's default scheduler favours concurrency and runs a rematerialized block's
    # recomputation as early as it can, which keeps its activations alive as if there were no
    # remat (a toy 8-layer chain: 332 MiB temp with or without jax.checkpoint; 176 MiB with
    # it under the memory-minimising scheduler). Accelerators schedule for memory; so do we.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}'
                               ' --xla_cpu_enable_concurrency_optimized_scheduler=false')
  import json  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from stmoe_jax.nn import sharding  # pylint: disable=g-import-not-at-top
  from stmoe_jax.analysis import sweep  # pylint: disable=g-import-not-at-top
  from stmoe_jax.train import train_lib  # pylint: disable=g-import-not-at-top
  from benchmarks.train_step import apply_override  # pylint: disable=g-import-not-at-top

  config = sweep.load_config_file(args.config)
  config.mesh = sharding.parse_mesh(args.mesh)
  if args.remat:
    config.model.remat = args.remat
  if args.batch:
    config.batch_size = args.batch
  if args.scan:
    config.model.scan_layers = True
  for text in args.override:
    apply_override(config, text)
  trainer = train_lib.Trainer(config, '/nonexistent')  # Builds jits; compiles and writes nothing.
  batch = {key: jax.ShapeDtypeStruct((config.batch_size, length),
                                     jnp.float32 if key == 'weights' else jnp.int32,
                                     sharding=trainer.batch_sharding)
           for key, length in batch_lengths(config).items()}
  start = time.perf_counter()
  lowered = trainer.train_step.lower(trainer.abstract_state, batch)
  lower_seconds = time.perf_counter() - start
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start - lower_seconds
  memory = compiled.memory_analysis()
  total, active = parameter_counts(trainer.abstract_state.params, trainer.model_cfg)
  record = {
      'config': args.config, 'mesh': dict(trainer.mesh.shape), 'devices': jax.device_count(),
      'batch': config.batch_size, 'seq_len': config.data.seq_len,
      'remat': config.model.remat, 'scan_layers': config.model.scan_layers,
      'num_layers': config.model.num_layers, 'dtype': config.model.dtype,
      'param_dtype': config.model.param_dtype,
      'lower_seconds': round(lower_seconds, 2), 'compile_seconds': round(compile_seconds, 2),
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes,
      'argument_plus_temp_gib': round((memory.argument_size_in_bytes +
                                       memory.temp_size_in_bytes) / 2**30, 3),
      'total_params': total, 'active_params': active,
      'collectives': count_collectives(compiled.as_text()),
  }
  print(json.dumps(record), flush=True)
  return record


if __name__ == '__main__':
  main()
