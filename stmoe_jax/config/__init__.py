"""Options, their registries, and the frozen model configs the modules take.

Every option is declared once (`options.Option`: type, default, domain, one-line doc), the core
ones in `schema`, each extension's with its registry entry. From the declarations:
`defaults()` is the config every preset starts from, `validate(config)` checks every field and
raises `ConfigError` with one line naming it, before anything compiles, and docs/options.md is
written (`python -m stmoe_jax.config.reference`). Modules never read the ml_collections config:
`model_config(config)` turns it into the frozen `ModelConfig` (with `MoeConfig` and
`AttentionConfig`). A run's config.json is read back with `with_defaults` and must pass
`check_resumable`.

This layer imports nothing of the library above it; `options.load_library` imports the modules
that declare options by name when a table is first read.
"""

from __future__ import annotations

import copy
import os

import ml_collections

from stmoe_jax.config import options
# pylint: disable=unused-import
from stmoe_jax.config.options import defaults
from stmoe_jax.config.schema import AttentionConfig, ModelConfig, MoeConfig, layer_period
from stmoe_jax.config.validation import parse_init_from, validate
from stmoe_jax.errors import ConfigError
# pylint: enable=unused-import


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Builds the frozen ModelConfig from `config.model`, `config.moe` and `config.attention`
  (validated first)."""
  validate(config)
  section = lambda cls: cls(**{name: config[cls.SECTION][name]
                               for name in options.section_options(cls.SECTION)})
  fields = {name: config.model[name] for name in options.section_options('model')}
  return ModelConfig(**fields, moe=section(MoeConfig), attention=section(AttentionConfig))


def with_defaults(saved: ml_collections.ConfigDict
                  ) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A copy of `saved` with every option it lacks at its declared default, and the dotted names
  of those options: a run's config.json written before an option existed still loads (an option
  is added with the default that keeps earlier behaviour). Fields `saved` has that no option
  declares are kept, for `validate` to refuse."""
  config = copy.deepcopy(saved)
  base = defaults()
  added = []
  for name in options.all_options():
    node, base_node, parts = config, base, name.split('.')
    for i, part in enumerate(parts[:-1]):
      if part not in node:  # A whole section the file predates: named once.
        node[part] = copy.deepcopy(base_node[part])
        added.append('.'.join(parts[:i + 1]))
        break
      if not options.type_ok(node[part], dict):
        break  # A mistyped section: `validate` names it.
      node, base_node = node[part], base_node[part]
    else:
      if parts[-1] not in node:
        node[parts[-1]] = copy.deepcopy(base_node[parts[-1]])
        added.append(name)
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
                 'attention.num_kv_heads', 'attention.qk_norm', 'attention.rope_layout',
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
