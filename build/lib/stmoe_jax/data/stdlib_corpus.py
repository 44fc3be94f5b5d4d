"""TFDS builder `stdlib_py`: the running interpreter's standard library source.

A small (~30 MB), always-available, license-clean text corpus that lets the
whole training stack run end to end on a machine without network access.
The corpus differs between Python versions, so the version is baked into the
builder config name (e.g. `py3_11_7`); data prepared by another interpreter
lives in another directory and is never silently mixed in.

Split: a file goes to `validation` iff `sha1(relative_path) % 100 < 2`
(~2%). Hashing the path (not the content) keeps a file in the same split when
its content changes between patch releases.

Non-utf-8 files (a handful of test fixtures) are kept, decoded with
errors='replace', so the example count equals the number of .py files.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import inspect
import os
import sys
import sysconfig

from etils import epath
import tensorflow_datasets as tfds

NAME = 'stdlib_py'
NUM_BUCKETS = 100
VALIDATION_BUCKETS = 2  # buckets [0, 2) of 100 -> validation (~2%).
TRAIN = 'train'
VALIDATION = 'validation'
_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})


def python_version() -> str:
  """Returns the running interpreter's version, e.g. '3.11.7'."""
  return '%d.%d.%d' % sys.version_info[:3]


def config_name(version: str | None = None) -> str:
  """Returns the builder config name for a version, e.g. 'py3_11_7'."""
  return 'py' + (version or python_version()).replace('.', '_')


def stdlib_root() -> str:
  """Returns the directory of the running interpreter's standard library."""
  return sysconfig.get_paths()['stdlib']


def split_for_path(rel_path: str) -> str:
  """Returns 'train' or 'validation' for a '/'-separated relative path."""
  digest = hashlib.sha1(rel_path.encode('utf-8')).hexdigest()
  bucket = int(digest, 16) % NUM_BUCKETS
  return VALIDATION if bucket < VALIDATION_BUCKETS else TRAIN


def list_stdlib_files(root: str | None = None) -> list[str]:
  """Returns sorted '/'-separated paths of all stdlib .py files under root."""
  root = root or stdlib_root()
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Pruning in place stops os.walk from descending into installed packages.
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for fname in filenames:
      if fname.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, fname), root)
        paths.append(rel.replace(os.sep, '/'))
  return sorted(paths)


def read_source(root: str, rel_path: str) -> str:
  """Reads one file as text the same way the builder does."""
  with open(os.path.join(root, rel_path), 'rb') as f:
    return f.read().decode('utf-8', errors='replace')


@dataclasses.dataclass(eq=False)
class StdlibPyConfig(tfds.core.BuilderConfig):
  """Config pinning the corpus to one interpreter version and stdlib root."""

  python_version: str = ''
  stdlib_root: str = ''


def current_config() -> StdlibPyConfig:
  """The builder config of the running interpreter: its version and stdlib root."""
  version = python_version()
  return StdlibPyConfig(
      name=config_name(version),
      python_version=version,
      stdlib_root=stdlib_root(),
      description=(
          f'.py files of the CPython {version} standard library '
          f'({sys.implementation.name}, {sys.version.split()[0]}).'
      ),
  )


class StdlibBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the TFDS builders over the running interpreter's standard library.

  The files of `list_stdlib_files`, split by `split_for_path`, every feature text. A subclass
  sets `name`, `VERSION`, `RELEASE_NOTES`, `BUILDER_CONFIGS = [current_config()]`, `FEATURES`,
  `SUPERVISED_KEYS` and `HOMEPAGE`, and yields the examples of some files in
  `_generate_examples`. TFDS registers no dataset for this class: `skip_registration` keeps it
  out of the registry and, as `_generate_examples` is abstract, out of its module's builders.
  """

  FEATURES: tuple[str, ...] = ()  # The text features, in this order.
  SUPERVISED_KEYS: tuple[str, str] | None = None
  HOMEPAGE = ''

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # The base implementation probes `importlib_resources`, which tfds 4.9.10
    # imports lazily but this stack does not install; the file is all it needs
    # (the subclass's own, as the base implementation would find).
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {feature: tfds.features.Text() for feature in self.FEATURES}),
        supervised_keys=self.SUPERVISED_KEYS,
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only: nothing to download.
    root = self.builder_config.stdlib_root or stdlib_root()
    paths = list_stdlib_files(root)
    return {
        split: self._generate_examples(
            root, [p for p in paths if split_for_path(p) == split]
        )
        for split in (TRAIN, VALIDATION)
    }

  @abc.abstractmethod
  def _generate_examples(self, root: str, paths: list[str]):
    """Yields (key, example) for the files `paths`, relative to `root`."""


class StdlibPy(StdlibBuilder):
  """The .py files of the running interpreter's standard library.

  Features: `text` (file contents, str) and `path` (relative path, str).
  """

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [current_config()]
  FEATURES = ('text', 'path')
  HOMEPAGE = 'https://docs.python.org/3/library/'

  def _generate_examples(self, root, paths):
    for rel in paths:
      yield rel, {'text': read_source(root, rel), 'path': rel}
