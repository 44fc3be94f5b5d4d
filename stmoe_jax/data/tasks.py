"""Input pipelines of `config.data.task`: 'lm' (packed language modelling, `input_pipeline`)
or a prompt -> answer task such as 'func_name' (`func_name_corpus`), one example per row.

A model family takes a (prompt, answer) example in its own format (`model_factory.Model.
task_format`, a key of FORMATS). The decoder-only Transformer uses 'prefix_lm': one causal
sequence `[BOS] prompt [SEP] answer [EOS]` whose loss weights cover the answer and its EOS
only (attention stays causal over the prompt too: the same model as in pre-training). The
encoder-decoder uses 'seq2seq': the prompt to the encoder, the answer to the decoder, rows shaped
as span corruption's (`span_corruption.to_batch`), so a span-corruption pre-trained model
fine-tunes on the same shapes. The task datasets, the iterators and the metrics are shared.

Every row of a task batch is one example or all padding (weights 0), so an example is exactly
right when every weighted target of its row is: `losses.exact_match_sums` counts that.

Batch layout ('prefix_lm'): {'inputs': int32[B, L], 'targets': int32[B, L], 'weights':
float32[B, L]}, L = data.seq_len. ('seq2seq'): {'encoder_inputs': int32[B, T], 'decoder_inputs',
'targets': int32[B, L], 'weights': float32[B, L]}, T = data.seq_len, L = the decoder length of
span corruption at data.seq_len (`span_corruption.lengths(...).decoder_len`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from stmoe_jax.config import options
from stmoe_jax.config.options import OneOf, Option
from stmoe_jax.data import func_name_corpus
from stmoe_jax.data import input_pipeline
from stmoe_jax.data import sources
from stmoe_jax.data import span_corruption
from stmoe_jax.data import tokenizer

# The separator between prompt and answer. EOS, not a new id: the byte vocabulary (259) stays
# that of the pre-trained checkpoints, and EOS never occurs inside a text.
SEP_ID = tokenizer.EOS_ID


@dataclasses.dataclass(frozen=True)
class Task:
  """A prompt -> answer task: the TFDS dataset and the features holding prompt and answer."""
  dataset: str
  prompt: str
  answer: str


TASK_SPECS = {'func_name': Task(func_name_corpus.NAME, func_name_corpus.PROMPT,
                                func_name_corpus.ANSWER)}
# data.task -> the dataset it reads ('' = any text dataset).
TASKS = {'lm': '', **{name: task.dataset for name, task in TASK_SPECS.items()}}
options.declare(Option('data.task', str, 'lm', "'lm' (language modelling) or 'func_name' "
                       "(data.name='stdlib_func_name': function body -> its name).",
                       OneOf(tuple(TASKS))), owner='data.tasks')


@options.add_check
def _check_task(config) -> None:
  task = config.data.task
  if TASKS[task] and config.data.name != TASKS[task]:
    raise options.ConfigError(f'config.data.name={config.data.name!r} is invalid: expected '
                              f'{TASKS[task]!r} with data.task={task!r}.')


def prefix_lm_example(prompt: np.ndarray, answer: np.ndarray, seq_len: int,
                      decoder_len: int = 0, tok: tokenizer.Tokenizer | None = None) -> dict:
  """One decoder-only row: `[BOS] prompt [SEP] answer [EOS]` as inputs/targets shifted by one.

  The prompt (byte ids, int [P]) is cut to its first bytes so that the answer and its EOS fit in
  the L + 1 tokens; an answer too long for the window is cut too (that example can then never
  be exactly right). Padding is PAD_ID. weights[t] = 1 iff targets[t] is an answer byte or the
  EOS after it. Returns {'inputs', 'targets': int32 [L], 'weights': float32 [L]}. `decoder_len`
  is unused (one sequence, no decoder). `tok` (default: bytes) gives the special ids; SEP is
  its EOS.
  """
  del decoder_len
  tok = tok or tokenizer.load()
  L = seq_len  # pylint: disable=invalid-name
  answer = np.append(answer, tok.eos_id)
  budget = max(L + 1 - 2 - answer.size, 0)  # Room left for the prompt beside BOS and SEP.
  row = np.concatenate([[tok.bos_id], prompt[:budget], [tok.eos_id], answer])[:L + 1]
  start = min(budget, prompt.size) + 2  # Index of the first answer token in `row`.
  padded = np.full(L + 1, tok.pad_id, np.int32)
  padded[:row.size] = row
  weights = np.zeros(L, np.float32)
  weights[start - 1:row.size - 1] = 1.0  # targets[t] = row[t + 1].
  return {'inputs': padded[:-1], 'targets': padded[1:], 'weights': weights}


def seq2seq_example(prompt: np.ndarray, answer: np.ndarray, seq_len: int,
                    decoder_len: int, tok: tokenizer.Tokenizer | None = None) -> dict:
  """One encoder-decoder row: the prompt (byte ids, int [P]) and EOS to the encoder, the answer
  to the decoder behind BOS (the decoder start token, as in span corruption).

  encoder_inputs = prompt + [EOS], cut to its first T = seq_len tokens (a prompt too long loses
  its end and its EOS); targets = answer + [EOS] and decoder_inputs = [BOS] + answer, both cut to
  L = decoder_len (an answer of L bytes or more can then never be exactly right); PAD fills the
  rest, weights are 1 on the answer and its EOS. Returns {'encoder_inputs': int32 [T],
  'decoder_inputs', 'targets': int32 [L], 'weights': float32 [L]}.
  """
  del tok  # Byte ids only: encoder-decoders take the byte tokenizer (`tokenizer`).
  T, L = seq_len, decoder_len  # pylint: disable=invalid-name
  encoder = np.append(prompt, tokenizer.EOS_ID)[:T]
  targets = np.append(answer, tokenizer.EOS_ID)[:L]
  row = {'encoder_inputs': np.full(T, tokenizer.PAD_ID, np.int32),
         'decoder_inputs': np.full(L, tokenizer.PAD_ID, np.int32),
         'targets': np.full(L, tokenizer.PAD_ID, np.int32),
         'weights': np.zeros(L, np.float32)}
  row['encoder_inputs'][:encoder.size] = encoder
  row['targets'][:targets.size] = targets
  row['decoder_inputs'][0] = tokenizer.BOS_ID
  row['decoder_inputs'][1:targets.size] = targets[:-1]
  row['weights'][:targets.size] = 1.0
  return row


# Model family's task format -> (prompt ids, answer ids, seq_len, decoder_len, tokenizer) -> one
# row of each of its batch keys.
FORMATS: dict[str, Callable[[np.ndarray, np.ndarray, int, int], dict]] = {
    'prefix_lm': prefix_lm_example, 'seq2seq': seq2seq_example}


def seq2seq_decoder_len(seq_len: int, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0) -> int:
  """The decoder length of 'seq2seq' rows: span corruption's at these data fields, so that the
  config's routing-group checks (`config.routing_groups_per_batch`) hold for task batches too."""
  return span_corruption.lengths(seq_len, noise_density, mean_noise_span_length).decoder_len


class _ToExample(grain.transforms.Map):
  """record -> one formatted row (see FORMATS)."""

  def __init__(self, task: Task, fmt: str, seq_len: int, decoder_len: int,
               tokenizer_spec: str = tokenizer.BYTES):
    self._task, self._format, self._seq_len = task, FORMATS[fmt], seq_len
    self._decoder_len, self._spec = decoder_len, tokenizer_spec

  def map(self, record):
    tok = tokenizer.load(self._spec)
    return self._format(tok.encode(record[self._task.prompt]),
                        tok.encode(record[self._task.answer]), self._seq_len,
                        self._decoder_len, tok)


def _source(task: str, name: str, split: str, data_dir):
  """The checked data source of a task's split (DataError naming a missing feature)."""
  spec = TASK_SPECS[task]
  source = input_pipeline._checked_source(name, split, data_dir, spec.prompt)  # pylint: disable=protected-access
  if spec.answer not in source[0]:
    raise input_pipeline.DataError(f'{name}[{split}] record 0 has no feature {spec.answer!r} '
                                   f'(the answer of task {task!r})')
  return source


def make_task_train_iterator(*, task: str, fmt: str, name: str, split: str, data_dir,
                             seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                             process_count: int = 1, noise_density: float = 0.15,
                             mean_noise_span_length: float = 3.0,
                             tokenizer: str = tokenizer.BYTES,  # pylint: disable=redefined-outer-name
                             **unused) -> input_pipeline.TrainIterator:
  """An infinite, checkpointable iterator of task batches (`task_train_iterator` of the
  dataset's split); the noise fields set only the 'seq2seq' decoder length (`decoder_len`)."""
  del unused  # `Placement.data_kwargs` as it is (feature_key: the task names its features).
  return task_train_iterator(
      _source(task, name, split, data_dir), task, fmt, seq_len=seq_len, batch_size=batch_size,
      seed=seed, process_index=process_index, process_count=process_count,
      where=dict(name=name, split=split),
      decoder_len=seq2seq_decoder_len(seq_len, noise_density, mean_noise_span_length),
      tokenizer_spec=tokenizer)


def task_train_iterator(source, task: str, fmt: str, *, seq_len: int, batch_size: int,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        where: dict | None = None, decoder_len: int = 0,
                        tokenizer_spec: str = tokenizer.BYTES) -> input_pipeline.TrainIterator:
  """Task batches from `source` (a sequence of records): examples shuffled per epoch with
  `seed`, one per row, this process's share `process_index::process_count`; each batch as
  FORMATS[fmt] gives its rows (at seq_len, decoder_len), stacked to [batch_size, ...]."""
  ds = sources.shard(grain.MapDataset.source(source), process_index, process_count)
  ds = ds.shuffle(seed=seed).repeat(None).map(
      _ToExample(TASK_SPECS[task], fmt, seq_len, decoder_len, tokenizer_spec))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=16))
  it_ds = it_ds.batch(batch_size, drop_remainder=True)
  config = dict(task=task, format=fmt, **(where or {}), seq_len=seq_len, seed=seed,
                process_index=process_index, process_count=process_count)
  if tokenizer_spec != tokenizer.BYTES:  # By content, as `input_pipeline.make_train_iterator`.
    config.update(tokenizer=tokenizer.load(tokenizer_spec).content_hash)
  return input_pipeline.TrainIterator(it_ds, config)


class TaskEvalIterable:
  """Finite, unshuffled, re-iterable task batches: every example of this process's share once,
  one per row, the last batch filled with all-padding rows (weights 0). With several processes
  every one yields the same number of batches (collective eval steps never deadlock)."""

  def __init__(self, source, task: str, fmt: str, *, seq_len: int, batch_size: int,
               process_index: int, process_count: int, max_batches: int | None,
               decoder_len: int = 0, tokenizer_spec: str = tokenizer.BYTES):
    self._source, self._spec = source, TASK_SPECS[task]
    self._map = _ToExample(self._spec, fmt, seq_len, decoder_len, tokenizer_spec)
    self._pad_id = tokenizer.load(tokenizer_spec).pad_id
    self._seq_len, self._batch_size = seq_len, batch_size
    self._indices = range(process_index, len(source), process_count)
    longest = -(-len(source) // process_count)  # Process 0's share, the largest.
    n = -(-longest // batch_size)
    self._num_batches = n if max_batches is None else min(n, max_batches)

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    # A padding row in the format's own layout: its integer arrays PAD, its weights 0.
    blank = self._map.map({self._spec.prompt: b'', self._spec.answer: b''})
    blank = {k: (np.full_like(v, self._pad_id) if v.dtype.kind == 'i' else np.zeros_like(v))
             for k, v in blank.items()}
    B = self._batch_size  # pylint: disable=invalid-name
    for b in range(self._num_batches):
      rows = [self._map.map(self._source[i]) for i in self._indices[b * B:(b + 1) * B]]
      rows += [blank] * (B - len(rows))
      yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_task_eval_iterator(*, task: str, fmt: str, name: str, split: str, data_dir,
                            seq_len: int, batch_size: int, process_index: int = 0,
                            process_count: int = 1, max_batches: int | None = None,
                            noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            tokenizer: str = tokenizer.BYTES,  # pylint: disable=redefined-outer-name
                            **unused) -> TaskEvalIterable:
  """The `TaskEvalIterable` of a task's split (all of it, or the first `max_batches`); the noise
  fields set only the 'seq2seq' decoder length."""
  del unused
  return TaskEvalIterable(_source(task, name, split, data_dir), task, fmt, seq_len=seq_len,
                          batch_size=batch_size, process_index=process_index,
                          process_count=process_count, max_batches=max_batches,
                          decoder_len=seq2seq_decoder_len(seq_len, noise_density,
                                                          mean_noise_span_length),
                          tokenizer_spec=tokenizer)


# The three entry points the trainer and evaluation call, for any `data.task`.


def train_iterator(task: str, fmt: str, **kwargs) -> input_pipeline.TrainIterator:
  """`data.task`'s train iterator (kwargs: `Placement.data_kwargs` plus seed)."""
  if task == 'lm':
    return input_pipeline.make_train_iterator(**kwargs)
  return make_task_train_iterator(task=task, fmt=fmt, **kwargs)


def eval_iterator(task: str, fmt: str, **kwargs) -> Any:
  """`data.task`'s eval batches (kwargs: `Placement.data_kwargs` plus max_batches)."""
  if task == 'lm':
    return input_pipeline.make_eval_iterator(**kwargs)
  return make_task_eval_iterator(task=task, fmt=fmt, **kwargs)


def check_split(task: str, *, name: str, split: str, data_dir: str | os.PathLike | None,
                feature_key: str, **unused) -> None:
  """Raises DataError (or ConfigError) if `split` cannot feed `task`'s pipeline."""
  del unused
  if task == 'lm':
    input_pipeline.check_split(name=name, split=split, data_dir=data_dir,
                               feature_key=feature_key)
  else:
    _source(task, name, split, data_dir)
