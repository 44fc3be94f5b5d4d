"""Model families and what is computed from them.

The decoder-only `transformer` and the T5-style `encoder_decoder` (stacks built or scanned by
`layer_scan`), their losses (`losses`, `seq2seq_losses`), KV-cache `sampling`, `flops`, and
`factory.get_model`: config -> module, loss, eval step and batch keys.
"""
