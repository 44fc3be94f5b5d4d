r"""Bytes vs byte-level BPE vocabularies on the embedded corpus at equal training time:
validation bits per byte of configs/default.py trained for the same wall seconds on one core.

  python experiments/tokenizer_bpb.py --root=runs/tokenizer_bpb --seconds=180 \
      --out=docs/results/tokenizer_bpb.json

Per arm: trains the vocabulary (`stmoe_jax.data.train_tokenizer`, on stdlib_py's train split),
starts train.py under `taskset -c <core>` with a step count it will not reach, so that the
learning rate stays in the stable phase of the default warmup-stable-decay schedule, stops it
with SIGTERM (train.py saves a checkpoint and exits) `--seconds` after its first logged step
(compiling left out), and evaluates that checkpoint on the whole validation split with eval.py.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = flags.DEFINE_string('root', 'runs/tokenizer_bpb', 'Where vocabularies and runs go.')
_SECONDS = flags.DEFINE_integer('seconds', 180, 'Training seconds per arm (after compiling).')
_VOCABS = flags.DEFINE_list('vocabs', ['bytes', '4096', '8192'], "'bytes' or BPE sizes.")
_CORE = flags.DEFINE_integer('core', 0, 'The CPU core every run is pinned to.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data dir.')
_OUT = flags.DEFINE_string('out', '', 'Record JSON to write.')


def _run(args: list[str]) -> None:
  subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def _train_for(workdir: str, flags_: list[str], seconds: float) -> tuple[int, float]:
  """train.py on one core, stopped `seconds` after its first logged step; returns (steps,
  seconds from the first logged step to the stop)."""
  metrics = os.path.join(workdir, 'metrics.jsonl')
  proc = subprocess.Popen(
      ['taskset', '-c', str(_CORE.value), sys.executable, 'train.py',
       '--config=configs/default.py', f'--workdir={workdir}', '--config.num_train_steps=1000000',
       '--config.log_every_steps=10', '--config.eval_every_steps=1000000',
       '--config.checkpoint_every_steps=1000000', '--config.eval_sample_tokens=0', *flags_],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while not (os.path.exists(metrics) and os.path.getsize(metrics)):
    if proc.poll() is not None:
      raise RuntimeError(f'train.py exited ({proc.returncode}) before its first step: {workdir}')
    time.sleep(0.5)
  start = time.time()
  time.sleep(seconds)
  proc.send_signal(signal.SIGTERM)
  stopped = time.time()
  proc.wait()
  steps = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  return steps, stopped - start


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
    workdir = os.path.join(root, f'run_{vocab}')
    steps, seconds = _train_for(workdir, flags_, _SECONDS.value)
    _run(['taskset', '-c', str(_CORE.value), sys.executable, 'eval.py', f'--workdir={workdir}'])
    with open(os.path.join(workdir, f'eval_{steps}.json'), encoding='utf-8') as f:
      final = json.load(f)
    runs.append({'tokenizer': 'bytes' if vocab == 'bytes' else f'byte-level BPE {vocab}',
                 'vocab_size': 259 if vocab == 'bytes' else int(vocab) + 3, 'steps': steps,
                 'train_seconds': seconds,
                 'validation_bits_per_byte': final['bits_per_byte'],
                 'validation_loss_nats_per_token': final['loss'],
                 'validation_tokens': final['num_tokens']})
    print(json.dumps(runs[-1]), flush=True)
  record = {
      'what': 'configs/default.py at equal training time on one core: bytes vs byte-level BPE '
              'vocabularies trained on stdlib_py (seq_len 64 tokens each, constant learning rate '
              'of the wsd schedule, stopped by SIGTERM), validation bits per byte over the whole '
              'validation split',
      'command': 'python experiments/tokenizer_bpb.py ' + ' '.join(sys.argv[1:]),
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one '
                 'core per run (taskset), shared with other jobs (load average '
                 f'{os.getloadavg()[0]:.1f} at the end); no GPU, float32',
      'date': datetime.date.today().isoformat(),
      'seconds': _SECONDS.value, 'runs': runs}
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(json.dumps(record, indent=1) + '\n')
  print(json.dumps(record))


if __name__ == '__main__':
  app.run(main)
