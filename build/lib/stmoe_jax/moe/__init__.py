"""The mixture-of-experts layer and its parts.

Route (`routing`, `gating`, `cv_balance`) -> dispatch (`dispatch`) -> experts (`experts`,
`grouped_matmul`) -> combine, put together in `layer.MoeLayer`, optionally over an expert mesh
axis (`expert_parallel`). `layer_stats` names the per-layer statistics the losses read;
`head_routing` reuses the routers to pick attention heads per token.
"""
