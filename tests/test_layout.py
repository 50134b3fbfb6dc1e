"""The package's imports run one way: no module imports another that
imports it back, directly or through others (function-level imports too)."""

import ast
import graphlib
import json
import os
import subprocess
import sys

PACKAGE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    'introvae_jax')


def _files(module):
  """The files of a module, or of every module of a sub-package."""
  path = os.path.join(PACKAGE, module)
  if os.path.isdir(path):
    return [os.path.join(path, n) for n in sorted(os.listdir(path))
            if n.endswith('.py')]
  return [path + '.py']


def package_imports():
  """{module: modules of the package it imports anywhere in its file}; a
  sub-package (`objectives`) is one node, its modules' imports together."""
  modules = {name[:-3] for name in os.listdir(PACKAGE) if name.endswith('.py')}
  modules |= {name for name in os.listdir(PACKAGE) if os.path.isfile(
      os.path.join(PACKAGE, name, '__init__.py'))}
  graph = {}
  for module in modules - {'__init__'}:
    trees = []
    for path in _files(module):
      with open(path) as f:
        trees.append(ast.parse(f.read()))
    deps = set()
    for node in (n for tree in trees for n in ast.walk(tree)):
      if isinstance(node, ast.ImportFrom) and node.module == 'introvae_jax':
        deps |= {alias.name for alias in node.names} & modules
      elif isinstance(node, ast.ImportFrom) and node.module and (
          node.module.startswith('introvae_jax.')):
        deps.add(node.module.split('.')[1])
      elif isinstance(node, ast.Import):
        deps |= {a.name.split('.')[1] for a in node.names
                 if a.name.startswith('introvae_jax.')}
    graph[module] = deps - {module, '__init__'}
  return graph


def parsed_apart():
  """`package_imports()` computed in a fresh interpreter. In CPython 3.11
  the AST converter's recursion count is shared by the interpreter's
  threads, so an `ast.parse` beside another thread's (a library's, in a
  test worker) can raise "SystemError: AST constructor recursion depth
  mismatch" (python/cpython#106905); it did once in this suite."""
  out = subprocess.run([sys.executable, __file__], capture_output=True,
                       text=True, check=True, timeout=120).stdout
  return {module: set(deps) for module, deps in json.loads(out).items()}


def test_module_imports_have_no_cycle():
  graph = parsed_apart()
  assert {'evaluation', 'inception', 'digit_classifier', 'step'} <= set(graph)
  assert 'evaluation' in graph['compare']   # the graph is really read
  assert {'losses', 'models'} <= graph['objectives'] <= {'losses', 'models'}
  assert 'objectives' in graph['step']
  try:
    graphlib.TopologicalSorter(graph).prepare()
  except graphlib.CycleError as e:
    raise AssertionError(f'import cycle: {" -> ".join(e.args[1])}') from None


if __name__ == '__main__':
  print(json.dumps({m: sorted(d) for m, d in package_imports().items()}))
