"""The stmoe_jax module graph has no cycle, counting imports inside functions.

Read from the source with `ast` (nothing is imported): an edge A -> B for every `import B` or
`from B import x` anywhere in A, plus A -> its parent packages, whose `__init__` Python runs
first. An import inside a function to dodge a cycle is still a cycle.
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
    parts = module.split('.')
    edges.update('.'.join(parts[:i]) for i in range(1, len(parts)))
    graph[module] = {m for m in edges if m in modules and m != module}
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
  assert 'stmoe_jax.routing' in graph['stmoe_jax.moe']
  assert 'stmoe_jax.data' in graph['stmoe_jax.data.tokenizer']  # The package runs first.


def test_stmoe_jax_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)
