"""The package's imports run one way: no module imports another that
imports it back, directly or through others (function-level imports too)."""

import ast
import graphlib
import os

PACKAGE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    'introvae_jax')


def package_imports():
  """{module: modules of the package it imports anywhere in its file}."""
  modules = {name[:-3] for name in os.listdir(PACKAGE) if name.endswith('.py')}
  graph = {}
  for module in modules - {'__init__'}:
    with open(os.path.join(PACKAGE, module + '.py')) as f:
      tree = ast.parse(f.read())
    deps = set()
    for node in ast.walk(tree):
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


def test_module_imports_have_no_cycle():
  graph = package_imports()
  assert {'evaluation', 'inception', 'digit_classifier', 'step'} <= set(graph)
  assert 'evaluation' in graph['compare']   # the graph is really read
  try:
    graphlib.TopologicalSorter(graph).prepare()
  except graphlib.CycleError as e:
    raise AssertionError(f'import cycle: {" -> ".join(e.args[1])}') from None
