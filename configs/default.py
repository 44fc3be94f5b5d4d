r"""Default ST-MoE byte-level language model on the embedded stdlib corpus.

The MoE-vs-dense study's best arm (README "Results"): d_model 64, 2 layers, every FFN a
fine-grained MoE (top-8 of 64 experts of width 32, DeepSeekMoE-style), a 10x balance loss,
warmup-stable-decay at 3e-3. Sized for 2 CPU cores: about 5 minutes (README, "The default
config"); configs/dense.py is its equal-active-FLOPs twin.

  python train.py --config=configs/default.py --workdir=runs/default
  python train.py --config=configs/default.py --workdir=runs/e16 --config.moe.num_experts=16
  python eval.py --workdir=runs/default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default ST-MoE configuration (see field comments)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameter init, data order, router noise; a run is reproducible from it.

  config.data = data = ml_collections.ConfigDict()
  data.name = 'stdlib_py'  # TFDS dataset; 'stdlib_py' is built locally from the Python stdlib.
  data.data_dir = ''  # TFDS data dir; '' = the TFDS default (~/tensorflow_datasets).
  data.feature_key = 'text'  # Which string feature of each example to train on.
  data.train_split = 'train'  # TFDS split to train on.
  data.eval_split = 'validation'  # TFDS split of the periodic eval and eval.py.
  data.seq_len = 64  # Tokens (bytes) per training sequence (the encoder's input, span corruption).
  data.objective = 'causal_lm'  # 'causal_lm' (decoder_only) or 'span_corruption' (T5; encoder_decoder).
  data.noise_density = 0.15  # span_corruption: share of a window's tokens masked (T5: 0.15).
  data.mean_noise_span_length = 3.0  # span_corruption: mean tokens per masked span (T5: 3).
  data.task = 'lm'  # 'lm' (language modelling) or 'func_name' (data.name='stdlib_func_name': body -> name).

  config.model = model = ml_collections.ConfigDict()
  model.vocab_size = 259  # 256 bytes + pad/bos/eos (stmoe_jax.data.tokenizer).
  model.d_model = 64  # Width of the residual stream.
  model.num_layers = 2  # Transformer blocks (the decoder's, for encoder_decoder).
  model.num_heads = 2  # Attention heads per layer.
  model.head_dim = 32  # Width of each head's queries, keys and values (even: rotary pairs).
  model.d_ff = 256  # Hidden width of the dense FFN layers.
  model.activation = 'geglu'  # 'gelu', 'geglu' or 'geglu_mult_bias' (ST-MoE), for dense FFNs and experts.
  model.rope_max_wavelength = 10_000  # Longest rotary wavelength, in positions (RoFormer).
  model.init_scale = 0.1  # Switch Transformer: truncated normal, std sqrt(init_scale / fan_in).
  model.dtype = 'float32'  # Activation/compute dtype: 'float32' or 'bfloat16'. Router is float32.
  model.architecture = 'decoder_only'  # Or 'encoder_decoder' (T5/ST-MoE; num_layers = decoder layers).
  model.num_encoder_layers = 0  # encoder_decoder: encoder layers (MoE at moe.every as in the decoder).
  model.param_dtype = 'float32'  # Storage of parameters and optimizer state; 'bfloat16' halves them.
  model.remat = 'none'  # Recompute per block: 'none', 'full', 'save_dots', 'moe_save_dispatched'.
  model.scan_layers = False  # Scan over the repeating unit of layers: compile time flat in depth.

  config.moe = moe = ml_collections.ConfigDict()
  moe.enabled = True  # False: every MoE layer becomes a dense FFN of width top_k * expert_d_ff.
  moe.every = 1  # Layer i is MoE when i % every == every - 1 (every=2: layers 1, 3, ...).
  moe.num_experts = 64  # Experts per MoE layer (a multiple of mesh.expert).
  moe.top_k = 8  # 1 = Switch, 2 = ST-MoE/GShard, 8 of 64 narrow experts = fine-grained.
  moe.expert_d_ff = 32  # Hidden width of each expert.
  moe.group_size = 512  # Tokens per routing group: capacity and balance are computed per group.
  moe.router = 'tokens_choose'  # Each token picks top_k experts. 'expert_choice' is non-causal: refused here.
  moe.dispatch = 'scatter'  # 'scatter' (index gather), 'einsum' (one-hot masks, GShard) or 'dropless' (grouped matmuls).
  moe.grouped_matmul = 'auto'  # dropless: 'ragged_dot', 'blocked' (padded row blocks), 'megablox' (Pallas TPU); 'auto' = blocked on CPU, megablox on TPU.
  moe.train_capacity_factor = 1.25  # ST-MoE: 1.25 in training...
  moe.eval_capacity_factor = 2.0  # ...and 2.0 at evaluation. Both ignored by 'dropless'.
  moe.capacity_scaled_by_k = True  # C = CF * k * S / E (MaxText, ST-MoE); False: CF * S / E (flaxformer).
  moe.min_capacity = 4  # Floor on per-expert capacity, so tiny groups still route.
  moe.renormalize_gates = True  # Combine weights renormalised over the chosen k (no effect at k=1).
  moe.second_expert_threshold = 0.0  # ST-MoE policy: route choice 2..k w.p. min(1, gate/threshold) (0.2); 0 = always.
  moe.batch_prioritized_routing = False  # Capacity to the most confident tokens first; non-causal: refused here.
  moe.router_jitter = 0.0  # Multiplicative uniform jitter on router inputs in training (Switch); 0 = off.
  moe.bias_balancer_rate = 0.0  # DeepSeek-V3 aux-loss-free balancing bias step (1e-3); 0 = off.
  moe.num_shared_experts = 0  # Experts every token passes through, added to the routed output.
  moe.shared_expert_d_ff = 0  # Hidden width of each shared expert; 0 = expert_d_ff.
  moe.expert_dropout = 0.0  # Dropout on expert hidden units in training (Switch fine-tuning: 0.4).
  moe.extra_dense_ffn = 'none'  # ST-MoE sparse-dense stacking: 'before' or 'after' each MoE FFN, or 'none'.
  moe.aux_loss_coef = 0.1  # Load-balancing loss weight (Switch: 1e-2; the study found 0.1 best).
  moe.z_loss_coef = 1e-3  # ST-MoE router z-loss weight.
  moe.encoder_router = ''  # encoder_decoder: the encoder's router ('' = moe.router); expert_choice allowed.
  moe.encoder_batch_prioritized_routing = False  # encoder_decoder: BPR in the (non-causal) encoder.
  moe.encoder_group_size = 0  # encoder_decoder: encoder tokens per routing group; 0 = moe.group_size.
  # Gating options (README "Routers"; stmoe_jax/gating.py).
  moe.score_fn = 'softmax'  # 'sigmoid': DeepSeek-V3 per-expert sigmoid scores, gates renormalised over the k.
  moe.routed_scaling_factor = 1.0  # Combine weights times this (DeepSeek-V3: 2.5).
  moe.n_groups = 1  # Group-limited top-k: experts in n_groups groups...
  moe.topk_groups = 1  # ...only each token's topk_groups best groups eligible (DeepSeek-V3: 8, 4).
  moe.seq_aux_loss_coef = 0.0  # DeepSeek-V3 sequence-wise balance loss weight (1e-4); 0 = off.
  moe.router_noise = 'none'  # Training noise on router logits: 'gumbel' (st-moe-pytorch) or 'noisy_top_k' (Shazeer 2017).
  moe.importance_loss_coef = 0.0  # Shazeer 2017 w_importance * CV(gate sums per expert)^2, per group (e.g. 0.1); 0 = off.
  moe.load_loss_coef = 0.0  # Shazeer 2017 w_load * CV(smooth load)^2 (e.g. 0.1); needs router_noise='noisy_top_k'; 0 = off.
  moe.second_policy_train = 'random'  # Choices 2..k in training: 'all', 'none', 'threshold' or 'random'...
  moe.second_policy_eval = 'threshold'  # ...and at eval (mixture-of-experts); thresholds 0 route all.
  moe.threshold_train = ()  # Per-rank thresholds of choices 2..k, e.g. (0.2, 0.1); () = second_expert_threshold...
  moe.threshold_eval = ()  # ...and at eval (st-moe-pytorch).
  moe.hierarchy = ()  # router='hierarchical': (outer groups, experts per group), product num_experts.
  moe.hierarchy_outer_k = 1  # router='hierarchical': outer groups per token; top_k / it experts in each.

  # Attention per layer (README "Sparse attention"). The pattern kinds compute only the key
  # blocks their pattern touches; head_routed picks top-k of model.num_heads heads per token.
  config.attention = att = ml_collections.ConfigDict()
  att.kind = 'dense'  # 'dense', 'local', 'strided', 'block_sparse' or 'head_routed'.
  att.layer_kinds = ''  # Kinds cycled over layers, e.g. 'local,local,local,dense'; '' = all `kind`.
  att.block_size = 64  # Query/key block of the pattern kinds; also block_sparse's pattern block.
  att.window = 256  # local and strided: a token sees itself and the window - 1 before it.
  att.stride = 64  # strided: also every stride-th earlier token (Sparse Transformer).
  att.num_local_blocks = 3  # block_sparse: a query block sees its block and the ones before, this many...
  att.num_global_blocks = 1  # ...plus the first this many blocks (global tokens, BigBird).
  att.head_top_k = 2  # head_routed: heads each token runs (of model.num_heads; MoA, SwitchHead).
  att.head_capacity_factor = 2.0  # head_routed: head capacity = ceil(CF * k * seq_len / num_heads).
  att.head_aux_loss_coef = 1e-2  # head_routed: Switch balance loss over heads.
  att.head_z_loss_coef = 1e-3  # head_routed: router z-loss over heads.
  att.logit_z_loss_coef = 0.0  # mean logsumexp(attention logits)^2, every layer (ST-MoE); 0 = off.
  att.query_chunk = 256  # Dense, encoder and cross-attention in chunks of this many queries above it (memory O(L)); 0 = off.

  config.opt = opt = ml_collections.ConfigDict()
  opt.name = 'adamw'  # 'adamw' or 'adafactor'.
  opt.lr = 3e-3  # Peak learning rate.
  opt.warmup_steps = 100  # Linear warmup from 0 to lr.
  # 'cosine' (to final_lr_fraction * lr), 'rsqrt' (inverse square root) or 'wsd' (warmup-stable-
  # decay: constant lr, then linear to final_lr_fraction * lr over the last decay_fraction).
  opt.schedule = 'wsd'  # See the two lines above.
  opt.final_lr_fraction = 0.0  # 'cosine'/'wsd': the last step's lr as a fraction of lr.
  opt.decay_fraction = 0.2  # 'wsd' only: a run of N steps branches off a longer one at 0.8 N.
  opt.b1 = 0.9  # AdamW first-moment decay.
  opt.b2 = 0.98  # AdamW second-moment decay.
  opt.weight_decay = 0.1  # Decoupled; applied to matrices only, not norms.
  opt.grad_clip_norm = 1.0  # Global-norm clipping; 0 = off.

  # Mesh axis sizes (-1 = all remaining devices) and the one table from logical axis names
  # (on parameters and activations) to mesh axes, a tuple of axes, or None = replicated. The
  # batch is split over data, fsdp and expert axes: expert shards bring their own tokens (README
  # "Scaling out"); experts over 'expert', expert and FFN hidden units over 'model'; the model
  # dim of every parameter (and so its optimizer state) over 'fsdp' (ZeRO-3).
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'expert': 1, 'model': 1})
  config.logical_axis_rules = [
      ('batch', ('data', 'fsdp', 'expert')), ('expert', 'expert'), ('mlp', 'model'),
      ('heads', 'model'), ('vocab', 'model'), ('embed', 'fsdp'), ('kv', None), ('length', None),
      ('layers', None),  # The stacked-layers dim of model.scan_layers parameters: never split.
  ]

  config.batch_size = 64  # Global batch, in sequences (4096 tokens).
  config.num_train_steps = 1000  # Length of the learning-rate schedule and of the run.
  config.stop_at_step = 0  # Exit early (after a checkpoint) at this step, e.g. for job slices; 0 = off.
  config.log_every_steps = 50  # Train metrics to metrics.jsonl/TensorBoard, averaged over this many.
  config.eval_every_steps = 500  # Periodic eval on eval_batches (and always at the last step).
  config.eval_batches = 40  # Validation batches per periodic eval; 0 = the whole split.
  config.checkpoint_every_steps = 500  # Orbax checkpoint interval (and at the last step).
  config.keep_checkpoints = 3  # Newest checkpoints kept; older ones are deleted.
  config.eval_sample_tokens = 64  # Bytes generated at each eval (TensorBoard text); 0 = off.
  config.eval_sample_prompt = 'def '  # Prompt of those samples.
  config.peak_flops_per_device = 0.0  # For the MFU metric; 0 = the datasheet peak if known (not CPUs).
  # Non-finite loss or gradients: 'skip' drops that update (counted and logged), 'stop' saves
  # the last good state and exits non-zero naming the step and the bad terms.
  config.on_nonfinite = 'stop'
  config.loss_spike_factor = 2.0  # Log a loss above this x the median of the last 32 steps; 0 = off.
  # Fine-tuning (README "Fine-tuning and upcycling"): start from the parameters of another run's
  # checkpoint, '<workdir>[:<step>]' (default its newest step); optimizer and step start fresh. A
  # dense checkpoint into an MoE model upcycles: every expert a copy of the FFN it replaces.
  config.init_from = ''  # '' = train from scratch.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.trainable = 'all'  # 'all', 'non_moe', 'moe_only' or 'attention' (ST-MoE Table 7).
  config.debug = debug = ml_collections.ConfigDict()
  debug.nan_at_step = 0  # Poison step n's (1-based) debug.nan_term with NaN, to test the guard; 0 = off.
  debug.nan_term = 'cross_entropy'  # 'cross_entropy', 'balance_loss', 'z_loss' or 'grad_norm'.
  debug.step_sleep_s = 0.0  # Host sleep after each step, so tests can kill a run at a chosen step.
  return config
