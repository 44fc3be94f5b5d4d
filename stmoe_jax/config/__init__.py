"""The one factory from ConfigDict to frozen model configs, and a saved run's config.

Modules never read the ml_collections config: `model_config(config)` turns it into the frozen
`ModelConfig`/`MoeConfig` dataclasses they take. `validate(config)` checks every field the
library reads and raises `ConfigError` with one line naming the field, before anything compiles.
A run's config.json is read back with `with_defaults` and must pass `check_resumable`.

The dataclasses and the field schema live in `config_schema`, the checks in
`config_validation`; every config name is imported from here.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import ml_collections

from stmoe_jax.config import schema as config_schema
# pylint: disable=unused-import
from stmoe_jax.config.schema import (ATTENTION_KINDS, AttentionConfig, ModelConfig, MoeConfig,
                                     layer_period)
from stmoe_jax.config.validation import (ACTIVATIONS, ARCHITECTURES, EXTRA_DENSE_FFN,
                                         GROUPED_MATMULS, NONFINITE_TERMS, TASKS, TRAINABLE,
                                         parse_init_from, routing_groups_per_batch, validate)
from stmoe_jax.errors import ConfigError
# pylint: enable=unused-import


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Builds the frozen ModelConfig from `config.model`, `config.moe` and `config.attention`
  (validated first)."""
  validate(config)
  # A config.json stores tuples as lists; the frozen config keeps them hashable.
  moe = MoeConfig(**{f.name: (tuple(v) if isinstance(v := config.moe[f.name], list) else v)
                     for f in dataclasses.fields(MoeConfig)})
  attention = AttentionConfig(**{f.name: config.attention[f.name]
                                 for f in dataclasses.fields(AttentionConfig)})
  fields = [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in ('moe', 'attention', 'mesh_rules')]
  return ModelConfig(**{name: config.model[name] for name in fields}, moe=moe,
                     attention=attention)


def with_defaults(saved: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict
                  ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A copy of `saved` with every schema field it lacks taken from `defaults`, and the dotted
  names of those fields: a run's config.json written before a field existed still loads. Fields
  `saved` has that the schema does not know are kept, for `validate` to refuse."""
  config = copy.deepcopy(saved)
  added = []

  def fill(node, default, schema, prefix):
    for key, expected in schema.items():
      if key not in node:
        node[key] = copy.deepcopy(default[key])
        added.append(prefix + key)
      elif isinstance(expected, dict) and config_schema.type_ok(node[key], dict):
        fill(node[key], default[key], expected, f'{prefix}{key}.')

  fill(config, defaults, config_schema.schema(), '')
  return config, added


# Fields a resumed run must share with the run that wrote the checkpoint: they fix parameter
# shapes, optimizer state structure or the data stream. Everything else (steps, capacity
# factors, learning rate, logging) may change between restarts.
RESUME_FIELDS = ('model', 'moe.enabled', 'moe.every', 'moe.num_experts', 'moe.expert_d_ff',
                 'moe.hierarchy', 'moe.router_noise',
                 'moe.num_shared_experts', 'moe.shared_expert_d_ff', 'moe.extra_dense_ffn',
                 'opt.name', 'seed', 'data.name', 'data.feature_key', 'data.seq_len',
                 'data.train_split', 'data.objective', 'data.noise_density',
                 'data.mean_noise_span_length', 'attention.kind', 'attention.layer_kinds',
                 'data.task', 'finetune.trainable')
# Within 'model', these change only how the step computes, not what the checkpoint holds: a run
# may resume with remat turned on (e.g. after running out of memory) or another compute dtype.
RESUME_FREE = ('model.remat', 'model.dtype')


def check_resumable(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                    where: str) -> None:
  """Raises ConfigError naming the first RESUME_FIELDS entry where `config` differs from the
  config `saved` with the checkpoints at `where`."""
  def flat(node, prefix):
    if isinstance(node, (dict, ml_collections.ConfigDict)):
      for key in node.keys():
        yield from flat(node[key], f'{prefix}.{key}')
    else:
      yield prefix, node

  for field in RESUME_FIELDS:
    section, _, key = field.partition('.')
    now = config[section][key] if key else config[section]
    then = saved[section][key] if key else saved[section]
    for (name, a), (_, b) in zip(flat(now, field), flat(then, field)):
      if name in RESUME_FREE:
        continue
      if (tuple(a) if isinstance(a, list) else a) != (tuple(b) if isinstance(b, list) else b):
        hint = ('use a new --workdir to train a different model'
                + (f' (or, to go on from these weights in the other layer layout, start one with '
                   f'--config.init_from={os.path.dirname(where)}; its optimizer starts fresh)'
                   if name == 'model.scan_layers' else ''))
        raise ConfigError(f'config.{name}={a!r} differs from {b!r} in the run saved at {where}; '
                          + hint)
