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
  Sampler(cfg, context_len)                 KV-cache text generation: .generate_text(state.params, ..., buffers=state.buffers)
  make_sampler(cfg, config.data)            the Sampler (or EncoderDecoderSampler) of a model family
  sample_workdir(workdir, prompt, n)        prompt + generated text from a checkpoint
  plot                                      PNG plots of runs, routing plots for notebooks

Modules, in reading order: routing (routers and their registry, router losses, telemetry),
gating (scores, noise, group-limited top-k, later-choice policies), dispatch (einsum, scatter,
dropless and their registry), experts (batched expert FFNs), grouped_matmul (dropless matmuls),
moe (route -> dispatch -> experts -> combine), expert_parallel, layers (parameters with logical
axes, buffers, RMSNorm, rotary), attention, sparse_attention, head_routing, layer_stats (the
per-layer stats), remat (per-block rematerialization), layer_scan (scan over layers),
transformer, encoder_decoder (+ seq2seq_losses), config (frozen model configs; config_schema,
config_validation), sharding (logical axes -> mesh), data (stdlib corpora, grain pipelines,
span corruption, tasks, your own files), losses, model_factory (config -> model family),
trainable (which parameters train), finetune (init_from, sparse upcycling), train_state
(optimizer, state, placement on the mesh), train_lib, guards, evaluation, checkpointing,
entry_points (config.json and its history, restoring for eval.py and sample.py), workdir
(writable checks, the one-run lock), errors (one-line errors at the entry points), metrics
(metrics.jsonl + TensorBoard), flops, sampling, byte_classes + specialization (+
specialization_report: what each expert learned), plot, sweep.
"""

import importlib

_EXPORTS = {
    'ConfigError': 'config', 'ModelConfig': 'config', 'MoeConfig': 'config',
    'model_config': 'config', 'validate': 'config',
    'Transformer': 'transformer', 'EncoderDecoder': 'encoder_decoder',
    'Trainer': 'train_lib', 'train_and_evaluate': 'train_lib', 'get_model': 'model_factory',
    'load_config': 'entry_points', 'evaluate_workdir': 'entry_points',
    'load_checkpoint': 'entry_points', 'sample_workdir': 'entry_points', 'Sampler': 'sampling',
    'make_sampler': 'sampling',
    'MetricsWriter': 'metrics',
}
_SUBMODULES = ('plot', 'sweep', 'flops', 'sampling', 'train_lib', 'evaluation', 'metrics',
               'entry_points')

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'stmoe_jax.{_EXPORTS[name]}'), name)
  if name in _SUBMODULES:
    return importlib.import_module(f'stmoe_jax.{name}')
  raise AttributeError(f'module stmoe_jax has no attribute {name!r}')


def __dir__():
  return __all__
