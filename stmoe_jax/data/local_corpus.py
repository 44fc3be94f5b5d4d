"""Your own corpus as a TFDS dataset: local text or JSONL files, no builder to write.

`build(CorpusSpec(name='mycorpus', files=('~/corpus/**/*.txt',)))` (or
`python -m stmoe_jax.data.build`) writes `<data_dir>/mycorpus/<version>/` as array_record with
the features of `stdlib_py` (`text`, `path`), so `--config.data.name=mycorpus` trains on it:
`tfds.builder(name, data_dir=...)` reads a dataset whose name no builder class registers from its
directory (dataset_info.json, features.json), in any later process.

Documents: each plain text file is one document; each non-blank line of a JSONL file is one
document (its `text_field`). Empty documents (whitespace only) and documents that are not valid
UTF-8 are skipped and counted (or, with decode_errors='replace', decoded with U+FFFD).

Split: a document goes to `validation` iff the first 8 bytes of sha256(its UTF-8 text), read as
an integer, fall below validation_share * 2**64. Hashing the text (not the path or the position)
keeps a document in its split across rebuilds, renames and reorderings, and puts duplicates on one
side. A small corpus whose hashes put no document there still gets one: the cut is raised to
just above the smallest hash, so the document(s) with that hash go to validation (the build
says how many).

Versions: `metadata.json` beside dataset_info.json records the globs, the options and a
fingerprint (sha256 over every file's path and bytes, and the options). Building again with the
same globs reuses the latest version when the fingerprint matches, and otherwise writes the next
patch version (1.0.0 -> 1.0.1), which readers by name then get; earlier versions stay readable as
'mycorpus:1.0.0'. Other globs under an existing name are refused (a collision, not a change).

Every file is read and checked before anything is written, and TFDS writes into an
`incomplete.*` directory renamed into place only when complete, so a failed build leaves no
dataset behind.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from typing import Callable, Iterable, Iterator

from etils import epath
import tensorflow_datasets as tfds

# Imported for its registration: `stdlib_py` is a name readers resolve to that builder.
from stmoe_jax.data import stdlib_corpus  # pylint: disable=unused-import

TRAIN = 'train'
VALIDATION = 'validation'
FORMATS = ('text', 'jsonl')
DECODE_ERRORS = ('skip', 'replace')
FIRST_VERSION = '1.0.0'
METADATA_FILE = 'metadata.json'
_BUILDER = 'stmoe_jax.data.local_corpus'  # Marks metadata.json as ours.
_NAME_RE = re.compile(r'[a-z][a-z0-9_]*')
# Fields that say which corpus a name holds; a change in any of them is another corpus.
_SOURCE_FIELDS = ('files', 'format', 'text_field')


class CorpusError(ValueError):
  """Input the corpus builder refuses; the one-line message names the file, line or pattern."""


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """What to build: a dataset name, the globs of its files and how to read them."""

  name: str  # TFDS dataset name, lower_snake_case; a directory under data_dir.
  files: tuple[str, ...]  # Globs ('**' recursive), kept absolute with '~' expanded.
  format: str = 'text'  # 'text': one document per file; 'jsonl': one per line.
  text_field: str = 'text'  # JSONL only: the field holding each document's text.
  validation_share: float = 0.02  # Expected share of documents in the validation split.
  decode_errors: str = 'skip'  # Not-UTF-8 documents: 'skip' (and count) or 'replace'.

  def __post_init__(self):
    if not _NAME_RE.fullmatch(self.name):
      raise CorpusError(f'name {self.name!r} is not a dataset name (lower_snake_case, '
                        'starting with a letter)')
    if isinstance(self.files, str) or not self.files:
      raise CorpusError(f'files={self.files!r}: give a list of one or more globs')
    # Absolute: the same relative glob run from another directory is another corpus.
    object.__setattr__(self, 'files', tuple(os.path.abspath(os.path.expanduser(g))
                                            for g in self.files))
    if self.format not in FORMATS:
      raise CorpusError(f'format={self.format!r}: one of {FORMATS}')
    if self.decode_errors not in DECODE_ERRORS:
      raise CorpusError(f'decode_errors={self.decode_errors!r}: one of {DECODE_ERRORS}')
    if not 0 < self.validation_share < 1:
      raise CorpusError(f'validation_share={self.validation_share}: needs 0 < share < 1')

  def source(self) -> dict:
    """The fields that identify the corpus a name holds."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items() if k in _SOURCE_FIELDS}


@dataclasses.dataclass
class CorpusStats:
  """What a scan of the files found (counts per split; bytes are UTF-8 bytes of the text)."""

  files: list[str]
  file_digests: dict[str, str]
  documents: dict[str, int]
  bytes: dict[str, int]
  skipped_empty: list[str]
  skipped_not_utf8: list[str]
  replaced_not_utf8: list[str]
  fingerprint: str
  # Paths left out as other routes (symlinks) to a file already read (`list_files`).
  skipped_links: list[str] = dataclasses.field(default_factory=list)
  # Hashes below it go to validation too: 0, or (when validation_share put no document there)
  # one more than the smallest, and the documents that moved there for it.
  validation_cut: int = 0
  moved_to_validation: int = 0


@dataclasses.dataclass
class BuildResult:
  name: str
  version: str
  data_dir: str  # The TFDS data dir (root), where `name/version/` lives.
  stats: CorpusStats
  reused: bool  # True: an identical corpus was already prepared; nothing was written.

  @property
  def path(self) -> str:
    return os.path.join(self.data_dir, self.name, self.version)


def list_files(globs: Iterable[str], skipped: list[str] | None = None) -> list[str]:
  """Returns the sorted absolute paths of the regular files the globs match, each real file
  once: a path reaching a file already listed through symlinks (a '**' glob follows a link to a
  directory, round a loop up to 40 times) is left out, and appended to `skipped`."""
  paths = set()
  for pattern in globs:
    found = glob.glob(os.path.expanduser(pattern), recursive=True)
    matched = [p for p in found if os.path.isfile(p)]
    if not matched:
      hint = f" (only directories: try '{pattern.rstrip('/')}/**/*.txt')" if found else ''
      raise CorpusError(f'files pattern {pattern!r} matches no files{hint}')
    paths.update(os.path.abspath(p) for p in matched)
  by_real = {}
  # The shortest path first (fewest links followed), then the alphabetical one.
  for path in sorted(paths, key=lambda p: (p.count(os.sep), p)):
    real = os.path.realpath(path)
    if real in by_real:
      if skipped is not None:
        skipped.append(path)
    else:
      by_real[real] = path
  return sorted(by_real.values())


def _text_hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big')


def split_for_text(text: str, validation_share: float, validation_cut: int = 0) -> str:
  """Returns 'train' or 'validation' for a document, from a hash of its text alone (below
  validation_share * 2**64, or below `CorpusStats.validation_cut`)."""
  value = _text_hash(text)
  return VALIDATION if value < validation_share * 2**64 or value < validation_cut else TRAIN


def _decode(data: bytes, decode_errors: str) -> tuple[str | None, str]:
  """bytes -> (text, status): status 'ok', 'replaced' or 'not_utf8' (text None)."""
  try:
    return data.decode('utf-8'), 'ok'
  except UnicodeDecodeError:
    if decode_errors == 'replace':
      return data.decode('utf-8', errors='replace'), 'replaced'
    return None, 'not_utf8'


def iter_documents(path: str, spec: CorpusSpec, digest) -> Iterator[tuple[str, str | None, str]]:
  """Yields (key, text, status) for each document of one file, feeding its bytes to `digest`.

  key: the path (text files) or 'path:line' (JSONL); status: 'ok', 'replaced' (decoded with
  U+FFFD), 'empty' or 'not_utf8' (text None: skip it).

  Raises:
    CorpusError: a JSONL line that is not JSON, not an object with `text_field`, or whose field
      is not a string (names the file and line).
  """
  if spec.format == 'text':
    with open(path, 'rb') as f:
      data = f.read()
    digest.update(data)
    if not data.strip():
      yield path, None, 'empty'
      return
    text, status = _decode(data, spec.decode_errors)
    yield path, text, status
    return
  non_blank = 0
  with open(path, 'rb') as f:
    for line_no, line in enumerate(f, start=1):
      digest.update(line)
      if not line.strip():
        continue  # Blank lines (a trailing newline) separate nothing and hold no document.
      non_blank += 1
      key = f'{path}:{line_no}'
      line_text, status = _decode(line, spec.decode_errors)
      if line_text is None:
        yield key, None, status
        continue
      try:
        record = json.loads(line_text)
      except json.JSONDecodeError as e:
        raise CorpusError(f'{key}: not JSON ({e.msg} at column {e.colno})') from None
      if not isinstance(record, dict) or spec.text_field not in record:
        has = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f'{key}: no field {spec.text_field!r} (it has {has})')
      text = record[spec.text_field]
      if not isinstance(text, str):
        raise CorpusError(f'{key}: field {spec.text_field!r} is a {type(text).__name__}, '
                          'not a string')
      try:
        text.encode('utf-8')  # A JSON escape can spell a lone surrogate, which UTF-8 cannot.
      except UnicodeEncodeError:
        if spec.decode_errors == 'skip':
          yield key, None, 'not_utf8'
          continue
        text, status = text.encode('utf-8', errors='replace').decode('utf-8'), 'replaced'
      yield (key, None, 'empty') if not text.strip() else (key, text, status)
  if not non_blank:
    yield path, None, 'empty'


def scan(spec: CorpusSpec, files: list[str],
         progress: Callable[[Iterable], Iterable] = lambda x: x) -> CorpusStats:
  """Reads every file once: checks it, counts documents and bytes per split, fingerprints it."""
  stats = CorpusStats(files=files, file_digests={}, documents={TRAIN: 0, VALIDATION: 0},
                      bytes={TRAIN: 0, VALIDATION: 0}, skipped_empty=[], skipped_not_utf8=[],
                      replaced_not_utf8=[], fingerprint='')
  fingerprint = hashlib.sha256(json.dumps(
      [spec.format, spec.text_field, spec.validation_share, spec.decode_errors]).encode())
  smallest = [2**64, 0, 0]  # The smallest hash of a training document, its documents, bytes.
  for path in progress(files):
    digest = hashlib.sha256()
    try:
      for key, text, status in iter_documents(path, spec, digest):
        if text is None:
          (stats.skipped_empty if status == 'empty' else stats.skipped_not_utf8).append(key)
          continue
        if status == 'replaced':
          stats.replaced_not_utf8.append(key)
        split = split_for_text(text, spec.validation_share)
        size = len(text.encode('utf-8'))
        stats.documents[split] += 1
        stats.bytes[split] += size
        value = _text_hash(text)
        if value < smallest[0]:
          smallest = [value, 0, 0]
        if value == smallest[0]:
          smallest[1:] = smallest[1] + 1, smallest[2] + size
    except OSError as e:
      raise CorpusError(f'{path}: cannot be read ({e.strerror or e})') from None
    stats.file_digests[path] = digest.hexdigest()
    fingerprint.update(f'{path}\0{digest.hexdigest()}\n'.encode())
  stats.fingerprint = 'sha256:' + fingerprint.hexdigest()
  value, documents, size = smallest
  if not stats.documents[VALIDATION] and stats.documents[TRAIN] > documents:
    stats.validation_cut, stats.moved_to_validation = value + 1, documents
    stats.documents[TRAIN] -= documents
    stats.documents[VALIDATION] += documents
    stats.bytes[TRAIN] -= size
    stats.bytes[VALIDATION] += size
  return stats


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  """The TFDS data dir a reader with this `data_dir` ('' or None: the TFDS default) uses."""
  if data_dir:
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  return os.fspath(tfds.core.constants.DATA_DIR)


def prepared_versions(name: str, data_dir: str) -> dict[str, dict | None]:
  """Complete versions of `name` in data_dir -> their metadata.json (None if not ours)."""
  out = {}
  root = os.path.join(data_dir, name)
  for version in tfds.core.utils.version.list_all_versions(root):
    version_dir = os.path.join(root, str(version))
    metadata = None
    try:
      with open(os.path.join(version_dir, METADATA_FILE)) as f:
        metadata = json.load(f)
    except (OSError, ValueError):
      pass
    out[str(version)] = metadata if (metadata or {}).get('builder') == _BUILDER else None
  return out


def _check_name_is_free(spec: CorpusSpec, data_dir: str,
                        existing: dict[str, dict | None]) -> None:
  """Refuses a name TFDS resolves to something else, or that holds another corpus."""
  try:
    tfds.builder_cls(spec.name)
  except tfds.core.registered.DatasetNotFoundError:
    pass
  else:
    raise CorpusError(f'name {spec.name!r} is a registered TFDS dataset, which readers by that '
                      'name would get: choose another name')
  where = os.path.join(data_dir, spec.name)
  for version, metadata in existing.items():
    if metadata is None:
      raise CorpusError(f'name {spec.name!r}: {where}/{version} holds a dataset this builder '
                        'did not write: choose another name')
    old = {k: metadata.get(k) for k in _SOURCE_FIELDS}
    if old != spec.source():
      raise CorpusError(f'name {spec.name!r} already holds another corpus in {where} '
                        f'(version {version}: {old}): choose another name, or delete {where}')


def _next_version(versions: Iterable[str]) -> str:
  latest = max(tfds.core.Version(v) for v in versions)
  return f'{latest.major}.{latest.minor}.{latest.patch + 1}'


def _choose_version(spec: CorpusSpec, stats: CorpusStats, existing: dict[str, dict],
                    version: str | None, where: str) -> tuple[str, bool]:
  """Returns (version, reuse): an existing version with this fingerprint, or a new one."""
  fingerprints = {v: m['fingerprint'] for v, m in existing.items()}
  latest = max(existing, key=tfds.core.Version) if existing else None
  if version:
    if not tfds.core.Version.is_valid(version):
      raise CorpusError(f'version {version!r} is not MAJOR.MINOR.PATCH')
    if version in fingerprints:
      if fingerprints[version] != stats.fingerprint:
        raise CorpusError(f'{where}/{version} holds other content ({fingerprints[version]}, '
                          f'now {stats.fingerprint}): leave out the version to build '
                          f'{_next_version(existing)}')
      return version, True
    if latest and tfds.core.Version(version) < tfds.core.Version(latest):
      raise CorpusError(f'version {version} is older than {where}/{latest}, which readers by '
                        f'name would get instead: give a version above {latest}')
    return version, False
  if latest is None:
    return FIRST_VERSION, False
  if fingerprints[latest] == stats.fingerprint:
    return latest, True
  return _next_version(existing), False


def _builder_class(spec: CorpusSpec, stats: CorpusStats, version: str):
  """A TFDS builder class for this corpus, named spec.name and not registered with TFDS."""
  return type(f'LocalCorpus_{spec.name}', (_LocalCorpusBuilder,),
              {'name': spec.name, 'VERSION': tfds.core.Version(version),
               'RELEASE_NOTES': {version: f'Files {list(spec.files)}, {stats.fingerprint}.'},
               'SPEC': spec, 'STATS': stats, '__module__': __name__},
              skip_registration=True)


def build(spec: CorpusSpec, data_dir: str | os.PathLike | None = None,
          version: str | None = None,
          progress: Callable[[Iterable], Iterable] = lambda x: x) -> BuildResult:
  """Prepares the corpus as a TFDS array_record dataset, or finds it already prepared.

  Args:
    spec: the corpus.
    data_dir: TFDS data dir; None or '' means the TFDS default (~/tensorflow_datasets, or
      $TFDS_DATA_DIR), the one `config.data.data_dir=''` reads.
    version: MAJOR.MINOR.PATCH to build; None: reuse the latest version if its fingerprint
      matches, else the next patch version (1.0.0 for a new name).
    progress: wraps the file list while scanning (e.g. tqdm.tqdm).

  Returns:
    A `BuildResult` (what was found, where, and whether it was already there).

  Raises:
    CorpusError: bad input (see `CorpusSpec`, `list_files`, `iter_documents`), a name that holds
      another corpus, an empty split; nothing is written then.
  """
  data_dir = resolve_data_dir(data_dir)
  for path in (data_dir, os.path.join(data_dir, spec.name)):
    if os.path.exists(path) and not os.path.isdir(path):
      raise CorpusError(f'data_dir: {path} is a file, not a directory')
  existing = prepared_versions(spec.name, data_dir)
  _check_name_is_free(spec, data_dir, existing)
  links = []
  files = list_files(spec.files, links)
  stats = scan(spec, files, progress)
  stats.skipped_links = links
  where = os.path.join(data_dir, spec.name)
  version, reuse = _choose_version(spec, stats, existing, version, where)
  result = BuildResult(name=spec.name, version=version, data_dir=data_dir, stats=stats,
                       reused=reuse)
  if reuse:
    return result
  skipped = len(stats.skipped_empty) + len(stats.skipped_not_utf8)
  for split, count in stats.documents.items():
    if not count:
      raise CorpusError(
          f'{spec.name}: the {split} split would be empty ({len(files)} files, '
          f'{sum(stats.documents.values())} documents, {skipped} skipped, '
          f'validation_share={spec.validation_share})')
  builder = _builder_class(spec, stats, version)(data_dir=data_dir)
  # try_download_gcs=False: otherwise TFDS asks GCS for a prepared copy (network).
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return result


class _LocalCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-corpus builder classes `_builder_class` makes (name, version, files)."""

  VERSION = tfds.core.Version(FIRST_VERSION)
  SPEC: CorpusSpec
  STATS: CorpusStats

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # As in stdlib_corpus: the base implementation probes `importlib_resources`.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    spec, stats = self.SPEC, self.STATS
    metadata = dict(spec.source(), builder=_BUILDER, fingerprint=stats.fingerprint,
                    validation_share=spec.validation_share, decode_errors=spec.decode_errors,
                    validation_cut=str(stats.validation_cut),
                    num_files=len(stats.files), documents=stats.documents, bytes=stats.bytes,
                    skipped_empty=len(stats.skipped_empty),
                    skipped_not_utf8=len(stats.skipped_not_utf8),
                    replaced_not_utf8=len(stats.replaced_not_utf8))
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'Local {spec.format} files {list(spec.files)}, built by '
                     f'`python -m stmoe_jax.data.build`; {stats.fingerprint}.'),
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'path': tfds.features.Text(),  # The file, or 'file:line' for JSONL.
        }),
        supervised_keys=None,
        metadata=tfds.core.MetadataDict(metadata),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only: nothing to download.
    return {split: self._generate_examples(split) for split in (TRAIN, VALIDATION)}

  def _generate_examples(self, split):
    spec, stats = self.SPEC, self.STATS
    for path in stats.files:
      digest = hashlib.sha256()
      for key, text, _ in iter_documents(path, spec, digest):
        if text is not None and split_for_text(text, spec.validation_share,
                                               stats.validation_cut) == split:
          yield key, {'text': text, 'path': key}
      if digest.hexdigest() != stats.file_digests[path]:
        raise CorpusError(f'{path} changed while the corpus was being built: build it again')
