"""Training runs: the loop and everything a workdir holds.

`train_lib` (the jitted steps and the loop), `train_state` (optimizer, state, placement on the
mesh), `trainable` and `finetune` (what trains; init_from and sparse upcycling), `evaluation`,
`checkpointing` (Orbax, checksums), `guards` (non-finite losses), `metrics` (metrics.jsonl,
TensorBoard), `workdir` (the one-run lock) and `entry_points` (config.json, restoring for
eval.py and sample.py).
"""
