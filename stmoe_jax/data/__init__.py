"""Data layer: byte tokenizer, stdlib_py TFDS corpus, grain input pipelines."""

from stmoe_jax.data.input_pipeline import EvalIterable
from stmoe_jax.data.input_pipeline import get_data_source
from stmoe_jax.data.input_pipeline import make_eval_iterator
from stmoe_jax.data.input_pipeline import make_train_iterator
from stmoe_jax.data.input_pipeline import TrainIterator
from stmoe_jax.data.stdlib_corpus import StdlibPy
from stmoe_jax.data.tokenizer import BOS_ID
from stmoe_jax.data.tokenizer import decode
from stmoe_jax.data.tokenizer import encode
from stmoe_jax.data.tokenizer import EOS_ID
from stmoe_jax.data.tokenizer import PAD_ID
from stmoe_jax.data.tokenizer import VOCAB_SIZE
