"""Config options, declared once each, and the registries that own them.

An `Option` is one config field (`moe.top_k`): its type, default, domain and a one-line doc.
Options are declared where they are used: the core ones in `config.schema`, an extension's own
options with its entry in a `Registry` (a router's in `moe/routing.py`, an attention kind's in
`nn/sparse_attention.py`, a model family's in `models/factory.py`). Everything else is derived
from the declarations: the sections' frozen configs (`schema.MoeConfig`), the base values of
every config (`defaults()`), the per-field checks of `validate`, the option reference
(docs/options.md) and the values an old config.json lacks.

A registry entry is selected by one option (`moe.router='hierarchical'`); it brings its options,
its own `validate(config)` and its capabilities (fields of the entry's dataclass). Registering
one from outside the library (a test, a notebook, a fork's module) needs no library edit:

  routing.ROUTERS.register(routing.Router(name='mine', route=..., options=(
      Option('moe.mine_temperature', float, 1.0, 'Softmax temperature of my router.',
             Range(0, None, low_open=True)),)))
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from stmoe_jax.errors import ConfigError  # pylint: disable=unused-import (re-exported)


class Domain:
  """The values an option may take: `check(value) -> bool`, described as 'in [0, 1)'."""

  def check(self, value: Any) -> bool:
    raise NotImplementedError

  def describe(self) -> str:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Range(Domain):
  """Numbers between `low` and `high` (None = unbounded); NaN and infinities never pass."""
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  note: str = ''  # What special values mean, e.g. '0 = off'.

  def check(self, value):
    if not math.isfinite(value):
      return False
    if self.low is not None and (value < self.low or self.low_open and value == self.low):
      return False
    return not (self.high is not None and (value > self.high or
                                           self.high_open and value == self.high))

  def describe(self):
    if self.high is None:
      text = f'{">" if self.low_open else ">="} {self.low}' if self.low is not None else 'finite'
    elif self.low is None:
      text = f'{"<" if self.high_open else "<="} {self.high}'
    else:
      text = (f'in {"(" if self.low_open else "["}{self.low}, {self.high}'
              f'{")" if self.high_open else "]"}')
    return f'{text} ({self.note})' if self.note else text


@dataclasses.dataclass(frozen=True)
class OneOf(Domain):
  """One of fixed `values`, or of the names of a `Registry` (read when checked, so entries
  registered later count)."""
  values: tuple = ()
  registry: Registry | None = None
  note: str = ''

  def allowed(self) -> tuple:
    return tuple(self.registry.names()) if self.registry is not None else self.values

  def check(self, value):
    return value in self.allowed()

  def describe(self):
    text = 'one of ' + ', '.join(repr(v) for v in self.allowed())
    return f'{text} ({self.note})' if self.note else text


@dataclasses.dataclass(frozen=True)
class Satisfies(Domain):
  """Values for which `predicate` holds, described by `text`."""
  predicate: Callable[[Any], bool]
  text: str

  def check(self, value):
    return bool(self.predicate(value))

  def describe(self):
    return self.text


def invalid(name: str, value, expected: str) -> ConfigError:
  """The one-line error every check raises: 'config.<name>=<value> is invalid: expected ...'."""
  return ConfigError(f'config.{name}={value!r} is invalid: expected {expected}.')


TYPE_NAMES = {int: 'an integer', float: 'a number', str: 'a string', bool: 'True or False',
              dict: 'a dict', list: 'a list', tuple: 'a tuple'}


def type_ok(value, expected: type) -> bool:
  """Whether `value` is a config value of type `expected`."""
  if expected is float:  # An int is a fine float (lr=1); a bool is neither.
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if expected is dict:
    return isinstance(value, (dict, ml_collections.ConfigDict))
  if expected in (list, tuple):
    return isinstance(value, (list, tuple))
  return isinstance(value, expected)


@dataclasses.dataclass(frozen=True)
class Option:
  """One config field.

  Attributes:
    name: dotted path, 'section.field' or a top-level 'field'.
    type: int, float, str, bool, tuple, list or dict.
    default: the value every config starts from (configs/ presets change some).
    doc: one line: what it does, and the paper or codebase its values come from.
    domain: the values it may take beyond its type (None = any of its type).
    owner: who declared it ('core', or '<registry kind>:<entry>'), set on declaration.
  """
  name: str
  type: type
  default: Any
  doc: str
  domain: Domain | None = None
  owner: str = 'core'

  @property
  def section(self) -> str:
    return self.name.rpartition('.')[0]

  @property
  def field(self) -> str:
    return self.name.rpartition('.')[2]

  def check(self, value) -> None:
    """Raises ConfigError naming the option when `value` has the wrong type or domain."""
    if not type_ok(value, self.type):
      raise invalid(self.name, value, TYPE_NAMES[self.type])
    if self.type is float and not math.isfinite(value):
      raise invalid(self.name, value, 'a finite number' +
                    (f' ({self.domain.describe()})' if self.domain else ''))
    if self.domain is not None and not self.domain.check(value):
      raise invalid(self.name, value, self.domain.describe())


_OPTIONS: dict[str, Option] = {}
_REGISTRIES: list[Registry] = []
_CHECKS: list[Callable[[ml_collections.ConfigDict], None]] = []


def declare(*options: Option, owner: str = 'core') -> None:
  """Adds `options` to the option table; a name may be declared once (again only identically,
  as a module re-imported by a notebook's reload does)."""
  for option in options:
    option = dataclasses.replace(option, owner=owner)
    known = _OPTIONS.get(option.name)
    if known is not None and dataclasses.replace(known, owner=owner) != option:
      raise ValueError(f'config option {option.name} is declared twice ({known.owner} and '
                       f'{option.owner})')
    if known is None:
      _OPTIONS[option.name] = option


def add_check(check: Callable[[ml_collections.ConfigDict], None]) -> Callable:
  """Registers a check across options, run by `validate` after every option's own check; it
  raises ConfigError naming the field. Usable as a decorator."""
  if check not in _CHECKS:
    _CHECKS.append(check)
  return check


def checks() -> tuple[Callable, ...]:
  load_library()
  return tuple(_CHECKS)


@dataclasses.dataclass(frozen=True)
class Entry:
  """What every registry entry has; registries subclass it with their capabilities.

  Attributes:
    name: the value of the registry's selecting option that picks it.
    options: the options this entry reads that the core does not (declared when it registers;
      an option several entries read, such as a capacity factor, is listed by each).
    validate: config -> None, raising ConfigError naming a field, when the entry is selected.
    doc: one line for the option reference.
  """
  name: str
  options: tuple[Option, ...] = ()
  validate: Callable[[ml_collections.ConfigDict], None] | None = None
  doc: str = ''


class Registry:
  """Named entries of one extension point, selected by the option `selector`, which the
  registry declares (its domain: the registered names).

  `selected(config)` names the entries a config uses (usually the selector's value; a registry
  whose entries several options select overrides it). An entry's options are read only when it
  is selected: `validate` refuses a changed one otherwise.
  """

  def __init__(self, kind: str, selector: str, default: str, doc: str,
               selected: Callable[[ml_collections.ConfigDict], set[str]] | None = None):
    self.kind, self.selector = kind, selector
    self._entries: dict[str, Entry] = {}
    self._selected = selected
    declare(Option(selector, str, default, doc, OneOf(registry=self)), owner=f'{kind} registry')
    _REGISTRIES.append(self)

  def selected(self, config: ml_collections.ConfigDict) -> set[str]:
    if self._selected is not None:
      return set(self._selected(config))
    return {lookup(config, self.selector)}

  def register(self, entry: Entry) -> Entry:
    declare(*entry.options, owner=f'{self.kind}:{entry.name}')
    self._entries[entry.name] = entry
    return entry

  def names(self) -> list[str]:
    load_library()
    return list(self._entries)

  def __getitem__(self, name: str) -> Entry:
    load_library()
    return self._entries[name]

  def __contains__(self, name: str) -> bool:
    load_library()
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def items(self):
    load_library()
    return self._entries.items()

  def values(self):
    load_library()
    return self._entries.values()

  def __setitem__(self, name: str, entry: Entry) -> None:  # monkeypatch.setitem in tests.
    self.register(dataclasses.replace(entry, name=name))

  def __delitem__(self, name: str) -> None:
    del self._entries[name]

  def get(self, name: str, default=None):
    load_library()
    return self._entries.get(name, default)


# The library's modules that declare options and register entries. The option table is read
# through `load_library()`, which imports them by name (as big_vision loads models by name), so
# that this layer imports nothing above it while every table is complete when read.
LIBRARY_MODULES = ('stmoe_jax.config.schema', 'stmoe_jax.nn.remat',
                   'stmoe_jax.nn.sparse_attention', 'stmoe_jax.moe.gating',
                   'stmoe_jax.moe.routing', 'stmoe_jax.moe.dispatch',
                   'stmoe_jax.moe.grouped_matmul', 'stmoe_jax.moe.head_routing',
                   'stmoe_jax.data.tokenizer', 'stmoe_jax.data.span_corruption',
                   'stmoe_jax.data.tasks', 'stmoe_jax.models.factory',
                   'stmoe_jax.train.train_state', 'stmoe_jax.train.trainable',
                   'stmoe_jax.train.guards')
_loaded = False


def load_library() -> None:
  """Imports `LIBRARY_MODULES` once, so that their declarations are in the tables."""
  global _loaded
  if not _loaded:
    _loaded = True
    for module in LIBRARY_MODULES:
      importlib.import_module(module)


def registries() -> list[Registry]:
  load_library()
  return list(_REGISTRIES)


def check_entries(config: ml_collections.ConfigDict) -> None:
  """Per registry: an option that only unselected entries read must keep its default (else it
  would be silently ignored); then each selected entry's own `validate`."""
  for registry in registries():
    selected = registry.selected(config)
    used = {o.name for name in selected if name in registry
            for o in registry[name].options}
    for name, entry in registry.items():
      for option in entry.options:
        if option.name in used:
          continue
        value = lookup(config, option.name)
        if _normal(value) != _normal(option.default):
          users = [n for n, e in registry.items() if option in e.options]
          raise ConfigError(
              f'config.{option.name}={value!r} is read only with {registry.selector}='
              + ' or '.join(repr(u) for u in users) + f' (it is {_selected_text(selected)}): '
              f'leave it at {option.default!r}.')
    for name in sorted(selected):
      entry = registry.get(name)
      if entry is not None and entry.validate is not None:
        entry.validate(config)


def _selected_text(selected: set[str]) -> str:
  return ' and '.join(repr(s) for s in sorted(selected))


def _normal(value):
  return tuple(value) if isinstance(value, list) else value


def all_options() -> dict[str, Option]:
  """{dotted name: Option} of every declared option, in declaration order."""
  load_library()
  return dict(_OPTIONS)


def section_options(section: str) -> dict[str, Option]:
  """{field: Option} of the options in `section` ('' = top level) declared so far (no library
  load: a section's frozen config is built while the library is still importing)."""
  return {o.field: o for o in _OPTIONS.values() if o.section == section}


def sections() -> list[str]:
  """Every section with options ('' first: the top-level fields)."""
  return list(dict.fromkeys(o.section for o in all_options().values()))


def defaults() -> ml_collections.ConfigDict:
  """A config holding every option at its declared default: what configs/ presets start from."""
  config = ml_collections.ConfigDict()
  for option in all_options().values():
    node = config
    for part in option.section.split('.') if option.section else ():
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    value = option.default
    node[option.field] = (ml_collections.ConfigDict(value) if option.type is dict
                          else list(value) if option.type is list else value)
  return config


def lookup(config: ml_collections.ConfigDict, name: str):
  """config's value of the dotted option `name`."""
  node = config
  for part in name.split('.'):
    node = node[part]
  return node


def check_structure(config: ml_collections.ConfigDict) -> None:
  """Unknown, missing and mistyped fields and values outside their domain, in declaration order;
  ConfigError naming the first."""
  table = all_options()
  known_sections = {o.section for o in table.values()}

  def walk(node, prefix):
    for key in node.keys():
      name = f'{prefix}{key}'
      if name in table:
        continue
      if name in known_sections:
        if not type_ok(node[key], dict):
          raise invalid(name, node[key], 'a section (ConfigDict)')
        walk(node[key], name + '.')
        continue
      siblings = sorted(o.field for o in table.values() if o.section == prefix[:-1])
      raise ConfigError(f'config.{name} is not a field stmoe_jax knows: expected one of '
                        f'{siblings}.')

  walk(config, '')
  for option in table.values():
    try:
      value = lookup(config, option.name)
    except (KeyError, AttributeError):
      raise ConfigError(f'config.{option.name} is missing: every config needs it (see '
                        'docs/options.md).') from None
    option.check(value)


def reference_markdown() -> str:
  """docs/options.md: every option, grouped by section, with its default, domain, owner, doc."""
  lines = ['# Options', '',
           'Generated from the option declarations by `python -m stmoe_jax.config.reference`; '
           'do not edit by hand. Every config starts from these defaults; `configs/` presets '
           'change some (each with its reason). An option owned by a registry entry '
           '(`router:hierarchical`) is read only when that entry is selected.', '']
  lines += ['## Registries', '', '| selected by | entry | its options | what it is |',
            '|---|---|---|---|']
  # Sorted: the tables' order must not depend on the order the modules were imported in.
  for registry in sorted(registries(), key=lambda r: r.selector):
    for name, entry in registry.items():
      own = ', '.join(f'`{o.name}`' for o in entry.options) or '-'
      lines.append(f'| `{registry.selector}` | `{name!r}` | {own} | '
                   f'{entry.doc.replace("|", "/")} |')
  lines.append('')
  for section in sorted(sections()):
    lines += [f'## `{section or "top level"}`', '',
              '| option | type | default | allowed | owner | what it does |',
              '|---|---|---|---|---|---|']
    for option in sorted(all_options().values(), key=lambda o: o.name):
      if option.section != section:
        continue
      allowed = option.domain.describe() if option.domain else 'any'
      lines.append(f'| `{option.name}` | {option.type.__name__} | `{option.default!r}` | '
                   f'{allowed.replace("|", "/")} | {option.owner} | '
                   f'{option.doc.replace("|", "/")} |')
    lines.append('')
  return '\n'.join(lines)
