"""stmoe_jax: sparse Mixture-of-Experts transformers (ST-MoE, Switch, GShard) in JAX/Flax NNX.

Modules, in reading order: routing (tokens-choose top-k, router losses), experts (batched expert
FFNs), moe (route -> dispatch -> experts -> combine), attention, transformer, config (validation
and frozen model configs), sharding (logical axes -> mesh), data (stdlib corpus, grain
pipelines), train_lib, evaluation, checkpointing, metrics.
"""
