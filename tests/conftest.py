"""Shared pytest fixtures (session-scoped, CPU only)."""

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# Let plain `pytest` (not only `python -m pytest`) import the repo package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# One persistent XLA compilation cache for the session, in a temporary directory that the
# train.py/eval.py subprocesses and the pytest-xdist workers (pytest.ini runs two) inherit
# through the environment: dozens of processes compile the same tiny programs. JAX writes cache
# entries atomically, so concurrent writers are safe. Set before anything imports JAX.
_OWNS_XLA_CACHE = 'STMOE_JAX_TEST_XLA_CACHE' not in os.environ
if _OWNS_XLA_CACHE:
  os.environ['STMOE_JAX_TEST_XLA_CACHE'] = tempfile.mkdtemp(prefix='stmoe_jax_xla_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['STMOE_JAX_TEST_XLA_CACHE']
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
# The tests are dominated by XLA:CPU compiling hundreds of small programs, not by running them:
# skipping LLVM's optimisation passes halves compile times (results are the same programs'; the
# benchmarks measure speed, outside the tests).
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

# pytest.ini distributes whole groups of tests over the xdist workers (`--dist loadgroup`): a
# group is one test file, so module-scoped fixtures (trained workdirs) are built once, except
# that the files reading the 8-device `sharding_checks` subprocess share a group. The slowest
# groups are handed out first, so that no long file starts last and runs alone.
_SHARED_GROUPS = {'test_sharding.py': 'sharding_checks', 'test_expert_parallel.py': 'sharding_checks'}
_SLOWEST_FIRST = ('test_moe_vs_dense.py', 'test_multihost.py', 'test_faults.py',
                  'test_notebook.py', 'test_reliability.py', 'test_benchmarks.py',
                  'test_every_option_is_used.py', 'test_extending.py', 'test_transformer.py',
                  'test_dispatch.py', 'sharding_checks', 'test_sampling.py', 'test_entry_points.py')


def _group(path: str) -> str:
  """The xdist group of the test file at `path`: its name, or the group it shares."""
  name = os.path.basename(path)
  return _SHARED_GROUPS.get(name, name)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  group = lambda item: _group(str(item.path))
  rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: file order kept
  for item in items:
    item.add_marker(pytest.mark.xdist_group(group(item)))


# Seconds per group (file), summed over its tests' setup, call and teardown: what to list in
# _SLOWEST_FIRST, printed after pytest's own slowest tests.
_GROUP_SECONDS: collections.Counter = collections.Counter()


def pytest_runtest_logreport(report):
  _GROUP_SECONDS[_group(report.nodeid.split('::')[0])] += report.duration


def pytest_terminal_summary(terminalreporter):
  if _GROUP_SECONDS:
    terminalreporter.write_sep('=', 'slowest files (seconds of setup, call and teardown)')
    for name, seconds in _GROUP_SECONDS.most_common(20):
      terminalreporter.write_line(f'{seconds:8.1f}s {name}')


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWNS_XLA_CACHE:
    shutil.rmtree(os.environ['STMOE_JAX_TEST_XLA_CACHE'], ignore_errors=True)


@pytest.fixture(scope='session')
def stdlib_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with the stdlib_py corpus prepared once (~1-2 s)."""
  from stmoe_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds_data'))
  input_pipeline.get_data_source('stdlib_py', 'train', data_dir)
  return data_dir


@pytest.fixture(scope='session')
def task_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with stdlib_func_name prepared from four small files (5 functions, two of
  them, two() and three(), in the validation split), so the pipeline reads it by name as it
  would the real one."""
  from stmoe_jax.data import func_name_corpus  # pylint: disable=g-import-not-at-top
  from stmoe_jax.data import stdlib_corpus  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('stdlib')
  sources = {'a.py': 'def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n',
             'b.py': 'def neg(x):\n    return -x\n', 'pkg/c.py': 'def one():\n    return 1\n'}
  val = next(f'm{i}.py' for i in range(1000)
             if stdlib_corpus.split_for_path(f'm{i}.py') == 'validation')
  sources[val] = 'def two():\n    return 2\n\ndef three():\n    return 3\n'
  for rel, text in sources.items():
    os.makedirs(os.path.dirname(root / rel), exist_ok=True)
    (root / rel).write_text(text)

  # The real builder, reading these files in place of the standard library's.
  list_files, read_source = stdlib_corpus.list_stdlib_files, stdlib_corpus.read_source
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(stdlib_corpus, 'list_stdlib_files', lambda _: list_files(str(root)))
    patch.setattr(stdlib_corpus, 'read_source', lambda _, rel: read_source(str(root), rel))
    func_name_corpus.StdlibFuncName(data_dir=data_dir).download_and_prepare(
        file_format='array_record')
  return data_dir


def tiny_model_config(*, moe: dict | None = None, attention: dict | None = None,
                      **model):
  """The tests' tiny model, fields overridable: 2 layers of width 16 (2 heads of 8, dense FFN
  32), every 2nd FFN 4 experts of width 16, top-2, groups of 32 tokens, capacity at least 1.

  Test modules whose helpers run outside a test function import it (`from conftest import
  tiny_model_config`); tests take the `tiny_model_cfg` fixture.
  """
  # Imported here, not above: stmoe_jax imports JAX, which must start after the XLA flags.
  from stmoe_jax import config  # pylint: disable=g-import-not-at-top
  moe_fields = dict(num_experts=4, top_k=2, expert_d_ff=16, group_size=32, min_capacity=1)
  model_fields = dict(vocab_size=259, d_model=16, num_layers=2, num_heads=2, head_dim=8, d_ff=32)
  return config.ModelConfig(**{**model_fields, **model},
                            moe=config.MoeConfig(**{**moe_fields, **(moe or {})}),
                            attention=config.AttentionConfig(**(attention or {})))


@pytest.fixture
def tiny_model_cfg():
  """`tiny_model_config`: call it with overrides."""
  return tiny_model_config


def run_with_devices(script: str, num_devices: int, *args: str, timeout: int = 900) -> str:
  """Runs a tests/ script with `num_devices` fake CPU devices; returns its last stdout line."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={num_devices}"
  env = {**os.environ, 'XLA_FLAGS': flags.strip(),
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, os.path.join(_ROOT, 'tests', script), *args],
                          cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  if result.returncode:
    raise AssertionError(f'{script} failed ({result.returncode}):\n{result.stderr[-4000:]}')
  return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope='session')
def sharding_checks() -> dict:
  """tests/sharding_checks.py's results on 8 fake CPU devices, run once per session (the flag
  must precede JAX start-up, hence the subprocess): each mesh and dispatch strategy against
  one device (loss within rtol 1e-5, gradients within rtol 1e-4 / atol 1e-6: float32 reductions
  split differently across shards), and the ConfigError of each bad mesh setting."""
  return json.loads(run_with_devices('sharding_checks.py', 8))
