"""Data layer: byte tokenizer (`tokenizer`), stdlib_py TFDS corpus (`stdlib_corpus`), grain
input pipelines (`input_pipeline`: `sources` reads the documents, `eval_pipeline` the eval
batches), T5 span corruption (`span_corruption`).

Import the submodules themselves: this package re-exports nothing, so importing the tokenizer
(as `config` does) does not pull in the pipelines, which import `config`.
"""
