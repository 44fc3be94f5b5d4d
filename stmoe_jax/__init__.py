"""stmoe_jax: sparse Mixture-of-Experts transformers (ST-MoE, Switch, GShard) in JAX/Flax NNX.

Library API (each name's docstring says more; imported on first use, so `import stmoe_jax`
stays light):

  model_config(config) -> ModelConfig      ConfigDict -> frozen model config (validated)
  Transformer(cfg, rngs=nnx.Rngs(0))        the model: tokens [B, L] -> (logits, moe stats)
  EncoderDecoder(cfg, rngs=nnx.Rngs(0))     span-corruption encoder-decoder: ([B, T], [B, L]) -> (logits, stats)
  train_and_evaluate(config, workdir)       train (resuming), log, evaluate; returns eval metrics
  Trainer(config, workdir)                  jitted init/train/eval steps and checkpoints
  get_model(cfg)                            the model family: module, loss, eval step, batch keys
  load_config(workdir)                      a run's config.json (newer fields get defaults)
  evaluate_workdir(workdir)                 restore a checkpoint, evaluate the validation split
  load_checkpoint(workdir) -> (config, state) a checkpoint's TrainState
  Sampler(cfg, context_len, tok)            KV-cache text generation: .generate_text(state.params, ..., buffers=state.buffers)
  make_sampler(cfg, config.data)            the Sampler (or EncoderDecoderSampler) of a model family
  sample_workdir(workdir, prompt, n)        prompt + generated text from a checkpoint
  plot                                      PNG plots of runs, routing plots for notebooks

Subpackages, from the bottom up (each one imports only those before it): `config` (option
declarations, frozen model configs, validation), `nn` (layers, attention), `moe` (routing,
dispatch, experts, the MoE layer), `data` (corpora, pipelines, tasks), `models` (model families,
losses, sampling, FLOPs), `train` (the loop, state, checkpoints, evaluation), `analysis`
(specialization, plots, sweeps).
"""

import importlib

_EXPORTS = {
    'ConfigError': 'config', 'ModelConfig': 'config', 'MoeConfig': 'config',
    'model_config': 'config', 'validate': 'config',
    'Transformer': 'models.transformer', 'EncoderDecoder': 'models.encoder_decoder',
    'Trainer': 'train.train_lib', 'train_and_evaluate': 'train.train_lib',
    'get_model': 'models.factory',
    'load_config': 'train.entry_points', 'evaluate_workdir': 'train.entry_points',
    'load_checkpoint': 'train.entry_points', 'sample_workdir': 'train.entry_points',
    'Sampler': 'models.sampling', 'make_sampler': 'models.factory',
    'MetricsWriter': 'train.metrics',
}
# Modules reachable as attributes (`stmoe_jax.plot.plot_losses(...)` in a notebook).
_SUBMODULES = {'plot': 'analysis.plot', 'sweep': 'analysis.sweep', 'flops': 'models.flops',
               'sampling': 'models.sampling', 'train_lib': 'train.train_lib',
               'evaluation': 'train.evaluation', 'metrics': 'train.metrics',
               'entry_points': 'train.entry_points'}

_PACKAGES = ('config', 'nn', 'moe', 'data', 'models', 'train', 'analysis')

__all__ = sorted([*_EXPORTS, *_SUBMODULES, *_PACKAGES])


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'stmoe_jax.{_EXPORTS[name]}'), name)
  if name in _PACKAGES:
    return importlib.import_module(f'stmoe_jax.{name}')
  if name in _SUBMODULES:
    return importlib.import_module(f'stmoe_jax.{_SUBMODULES[name]}')
  raise AttributeError(f'module stmoe_jax has no attribute {name!r}')


def __dir__():
  return __all__
