"""Shared pytest fixtures (session-scoped, CPU only)."""

import os
import shutil
import sys
import tempfile

import pytest

# Let plain `pytest` (not only `python -m pytest`) import the repo package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# One persistent XLA compilation cache for the session, in a temporary directory that the
# train.py/eval.py subprocesses inherit through the environment: dozens of them compile the
# same tiny programs. Set before anything imports JAX.
_XLA_CACHE = tempfile.mkdtemp(prefix='stmoe_jax_xla_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
# The tests are dominated by XLA:CPU compiling hundreds of small programs, not by running them:
# skipping LLVM's optimisation passes halves compile times (results are the same programs'; the
# benchmarks measure speed, outside the tests).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_backend_optimization_level=0').strip()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def stdlib_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with the stdlib_py corpus prepared once (~1-2 s)."""
  from stmoe_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  input_pipeline.get_data_source('stdlib_py', 'train', data_dir)
  return data_dir
