"""Neural-network building blocks below the MoE layer.

Parameters with logical axis names and the rules that map them to a mesh (`layers`,
`sharding`), causal, bidirectional and cross attention (`attention`), the block-sparse pattern
kinds (`sparse_attention`) and per-block rematerialization (`remat`).
"""
