"""The stmoe_jax module graph has no cycle, counting imports inside functions.

Read from the source with `ast` (nothing is imported): an edge A -> B for every `import B` or
`from B import x` anywhere in A, and to the packages above B, whose `__init__` Python runs
first. An import inside a function to dodge a cycle is still a cycle. A module's own parent
package is no edge: that package is already importing when the module runs.

The subpackages form layers, each importing only those below it (`LAYERS`); the library never
imports the experiments in configs/.
"""

import ast
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = 'stmoe_jax'


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module under stmoe_jax/."""
  modules = {}
  for folder, _, files in os.walk(os.path.join(_ROOT, _PACKAGE)):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      parts = os.path.relpath(path, _ROOT)[:-3].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      modules['.'.join(parts)] = path
  return modules


def import_graph() -> dict[str, set[str]]:
  """{module: modules of stmoe_jax it imports} (packages included, as Python runs them)."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        targets.add(node.module)
        # `from pkg import sub` imports the submodule pkg.sub.
        targets.update(f'{node.module}.{alias.name}' for alias in node.names)
    edges = set()
    for target in targets:
      parts = target.split('.')
      # A module imports every package above it (their __init__ runs first).
      edges.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
    parents = {module.rsplit('.', i)[0] for i in range(1, module.count('.') + 1)}
    graph[module] = {m for m in edges if m in modules and m != module and m not in parents}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state = {}  # module -> 'open' while on the DFS path, 'done' after.
  path = []

  def visit(node):
    state[node] = 'open'
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_sees_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_graph_reads_imports_inside_functions():
  graph = import_graph()
  assert 'stmoe_jax.moe.routing' in graph['stmoe_jax.moe.layer']
  assert 'stmoe_jax.data' in graph['stmoe_jax.models.losses']  # The package runs first.


def test_stmoe_jax_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


# Bottom to top; `errors` is a leaf every layer may use.
LAYERS = ('stmoe_jax.errors', 'stmoe_jax.config', 'stmoe_jax.nn', 'stmoe_jax.moe',
          'stmoe_jax.data', 'stmoe_jax.models', 'stmoe_jax.train', 'stmoe_jax.analysis')


def _layer(module: str) -> int | None:
  for i, prefix in enumerate(LAYERS):
    if module == prefix or module.startswith(prefix + '.'):
      return i
  return None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  """(importer, imported) pairs where a module imports a layer above its own."""
  return sorted((a, b) for a, targets in graph.items() for b in targets
                if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a))


def test_upward_imports_are_found():
  assert upward_imports({'stmoe_jax.nn.layers': {'stmoe_jax.train.metrics'}}) == [
      ('stmoe_jax.nn.layers', 'stmoe_jax.train.metrics')]


def test_subpackages_import_only_the_layers_below_them():
  assert upward_imports(import_graph()) == []


def test_the_library_never_imports_the_experiments():
  for module, path in _modules().items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n == 'configs' or n.startswith('configs.') for n in names), module
