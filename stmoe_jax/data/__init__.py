"""Data layer: tokenizers (`tokenizer`: bytes, SentencePiece, Hugging Face; `train_tokenizer`
trains one), the stdlib_py and stdlib_func_name TFDS corpora
(`stdlib_corpus`, `func_name_corpus`), grain input pipelines (`input_pipeline`: `sources` reads
the documents, `eval_pipeline` the eval batches), T5 span corruption (`span_corruption`),
prompt -> answer tasks (`tasks`), and a researcher's own files as a TFDS dataset (`build`,
`local_corpus`).

Import the submodules themselves: this package re-exports nothing, so importing the tokenizer
and span corruption (as `config_validation` does) does not pull in the pipelines, which import
`config`.
"""
