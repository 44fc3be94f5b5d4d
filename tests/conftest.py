"""Shared pytest fixtures (session-scoped, CPU only)."""

import os
import sys

import pytest

# Let plain `pytest` (not only `python -m pytest`) import the repo package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)


@pytest.fixture(scope='session')
def stdlib_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with the stdlib_py corpus prepared once (~1-2 s)."""
  from stmoe_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  input_pipeline.get_data_source('stdlib_py', 'train', data_dir)
  return data_dir
