r"""Bytes vs byte-level BPE vocabularies on the embedded corpus at equal training time:
validation bits per byte of configs/default.py trained for the same wall seconds on one core.

  python experiments/tokenizer_bpb.py --root=runs/tokenizer_bpb --seconds=240 \
      --out=docs/results/tokenizer_bpb.json

Per arm: trains the vocabulary (`stmoe_jax.data.train_tokenizer`, on stdlib_py's train split),
times a short pilot run to get its seconds per step, then trains for seconds / that many steps
(so each arm's cosine schedule ends where it stops) under `taskset -c <core>`, and reads the
final evaluation over the whole validation split from metrics.jsonl.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = flags.DEFINE_string('root', 'runs/tokenizer_bpb', 'Where vocabularies and runs go.')
_SECONDS = flags.DEFINE_integer('seconds', 240, 'Training seconds per arm (after compiling).')
_VOCABS = flags.DEFINE_list('vocabs', ['bytes', '4096', '8192'], "'bytes' or BPE sizes.")
_CORE = flags.DEFINE_integer('core', 0, 'The CPU core every run is pinned to.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data dir.')
_PILOT = flags.DEFINE_integer('pilot_steps', 30, 'Steps of the timing pilot.')
_OUT = flags.DEFINE_string('out', '', 'Record JSON to write.')


def _run(args: list[str]) -> None:
  subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def _train(workdir: str, flags_: list[str], steps: int) -> list[dict]:
  """train.py on one core for `steps`; returns its metrics.jsonl rows."""
  _run(['taskset', '-c', str(_CORE.value), sys.executable, 'train.py',
        '--config=configs/default.py', f'--workdir={workdir}',
        f'--config.num_train_steps={steps}', f'--config.eval_every_steps={steps}',
        '--config.eval_batches=0', f'--config.checkpoint_every_steps={steps}',
        '--config.eval_sample_tokens=0', *flags_])
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _seconds_per_step(rows: list[dict]) -> float:
  """Between the first and the last train log: compiling and evaluating left out."""
  train = [r for r in rows if r['kind'] == 'train']
  return (train[-1]['wall_time'] - train[0]['wall_time']) / (train[-1]['step'] - train[0]['step'])


def main(argv):
  del argv
  root = os.path.abspath(_ROOT.value)
  data = [f'--config.data.data_dir={_DATA_DIR.value}'] if _DATA_DIR.value else []
  runs = []
  for vocab in _VOCABS.value:
    flags_ = list(data)
    if vocab != 'bytes':
      out = os.path.join(root, f'bpe{vocab}')
      if not os.path.exists(os.path.join(out, 'tokenizer.json')):
        _run([sys.executable, '-m', 'stmoe_jax.data.train_tokenizer', f'--vocab_size={vocab}',
              f'--out={out}'] + ([f'--data_dir={_DATA_DIR.value}'] if _DATA_DIR.value else []))
      flags_ += [f'--config.data.tokenizer={out}', f'--config.model.vocab_size={int(vocab) + 3}']
    pilot = _seconds_per_step(_train(os.path.join(root, f'pilot_{vocab}'), flags_ +
                                     ['--config.log_every_steps=5'], _PILOT.value))
    steps = max(int(_SECONDS.value / pilot), 1)
    start = time.time()
    rows = _train(os.path.join(root, f'run_{vocab}'), flags_, steps)
    wall = time.time() - start
    train = [r for r in rows if r['kind'] == 'train']
    final = [r for r in rows if r['kind'] == 'eval'][-1]
    runs.append({'tokenizer': 'bytes' if vocab == 'bytes' else f'byte-level BPE {vocab}',
                 'vocab_size': 259 if vocab == 'bytes' else int(vocab) + 3, 'steps': steps,
                 'pilot_seconds_per_step': pilot,
                 'train_seconds': train[-1]['wall_time'] - train[0]['wall_time'],
                 'wall_seconds': wall,
                 'validation_bits_per_byte': final['bits_per_byte'],
                 'validation_loss_nats_per_token': final['loss'],
                 'validation_tokens': final['num_tokens']})
    print(json.dumps(runs[-1]), flush=True)
  record = {
      'what': 'configs/default.py at equal training time on one core: bytes vs byte-level BPE '
              'vocabularies trained on stdlib_py (seq_len 64 tokens each), validation bits per '
              'byte over the whole validation split',
      'command': 'python experiments/tokenizer_bpb.py ' + ' '.join(sys.argv[1:]),
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one '
                 'core per run (taskset), shared with other jobs; no GPU, float32',
      'date': datetime.date.today().isoformat(),
      'seconds': _SECONDS.value, 'runs': runs}
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(json.dumps(record, indent=1) + '\n')
  print(json.dumps(record))


if __name__ == '__main__':
  app.run(main)
