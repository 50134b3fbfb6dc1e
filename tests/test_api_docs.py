"""Every name the API reference renders has a docstring.

docs/api.md documents the public API with autodoc; Sphinx leaves a member
without a docstring out of the page without a warning, so the docs build
alone (`sphinx-build -W -n`, in .ci/run) cannot catch a missing one. This
test reads the page's autodoc directives and checks, as autodoc selects
them: each module's docstring; each member (a module's `__all__`, else the
public functions and classes defined in it, less `:exclude-members:`); and
each public method or property a documented class defines. Constants in
`introvae_jax.__all__` need a doc comment (`#:`) or a `py:data` entry on the
page.
"""

import importlib
import inspect
import os
import re

import pytest

import introvae_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_PAGE = os.path.join(REPO, 'docs', 'api.md')
DIRECTIVE = re.compile(r'^\.\. (automodule|autofunction|autoclass|py:data)'
                       r':: (\S+)\n((?:   :[\w-]+:.*\n)*)', re.M)


def _directives():
  """[(kind, dotted name, {option: value})] of the page's directives."""
  with open(API_PAGE, encoding='utf-8') as f:
    text = f.read()
  found = []
  for kind, name, options in DIRECTIVE.findall(text):
    opts = dict(re.findall(r'   :([\w-]+):(.*)', options))
    found.append((kind, name, {k: v.strip() for k, v in opts.items()}))
  return found


def _resolve(dotted):
  """The object a directive names: a module, or an attribute of one."""
  try:
    return importlib.import_module(dotted)
  except ModuleNotFoundError:
    module, _, attr = dotted.rpartition('.')
    return getattr(importlib.import_module(module), attr)


def _names(option):
  return [n.strip() for n in option.split(',') if n.strip()]


def _module_members(module, opts):
  """The members `automodule :members:` renders, as autodoc picks them."""
  if 'no-members' in opts:
    return []
  if opts.get('members'):
    names = _names(opts['members'])
  elif hasattr(module, '__all__'):
    names = list(module.__all__)
  else:
    names = [n for n, v in vars(module).items() if not n.startswith('_') and
             (inspect.isfunction(v) or inspect.isclass(v)) and
             v.__module__ == module.__name__]
  return [n for n in names if n not in _names(opts.get('exclude-members', ''))]


def _own_members(cls):
  """The public methods and properties `cls` itself defines."""
  for name, value in vars(cls).items():
    if name.startswith('_'):
      continue
    if isinstance(value, (staticmethod, classmethod)):
      value = value.__func__
    if isinstance(value, property):
      value = value.fget
    if inspect.isfunction(value):
      yield name, value


def _missing(objects):
  """The qualified names in `objects` ({name: object}) without a docstring
  of their own (a class's, not one inherited)."""
  missing = []
  for name, obj in objects.items():
    doc = obj.__dict__.get('__doc__') if inspect.isclass(obj) else obj.__doc__
    if not (doc or '').strip():
      missing.append(name)
  return missing


def _documented():
  """{qualified name: object} of everything the page renders with autodoc,
  and the py:data names it documents by hand."""
  objects, data = {}, set()
  for kind, name, opts in _directives():
    if kind == 'py:data':
      data.add(f'{opts.get("module", "")}.{name}'.lstrip('.'))
      continue
    obj = _resolve(name)
    objects[name] = obj
    members = {}
    if kind == 'automodule':
      members = {f'{name}.{m}': getattr(obj, m)
                 for m in _module_members(obj, opts)}
    if 'no-members' not in opts:  # autodoc_default_options: members
      for member, value in [(name, obj), *members.items()]:
        if inspect.isclass(value):
          members.update({f'{member}.{m}': f for m, f in _own_members(value)})
    objects.update(members)
  return objects, data


def test_the_page_renders_the_public_api():
  objects, data = _documented()
  assert 'introvae_jax' in objects
  exported = {f'introvae_jax.{n}' for n in introvae_jax.__all__
              if n != 'objectives'}
  assert exported <= set(objects) | data, exported - set(objects) - data
  assert 'introvae_jax.objectives' in objects
  for module in ('train', 'checkpointing', 'sampling', 'evaluation',
                 'convert', 'recipes', 'extras', 'errors', 'input_pipeline',
                 'configuration', 'plan', 'hardware'):
    assert f'introvae_jax.{module}' in objects, module
  assert len(objects) > 150, len(objects)


def test_every_documented_name_has_a_docstring():
  objects, _ = _documented()
  missing = _missing(objects)
  assert not missing, f'no docstring: {missing}'


def test_constants_of_the_package_are_documented():
  """A constant in `__all__` (no docstring of its own) needs a `#:` comment
  where it is defined, or a py:data entry on the page."""
  analyzer = pytest.importorskip('sphinx.pycode').ModuleAnalyzer
  _, data = _documented()
  for name in introvae_jax.__all__:
    value = getattr(introvae_jax, name)
    if inspect.ismodule(value) or callable(value):
      continue  # the other tests check those
    module = next(m for m in ('introvae_jax.parallel', 'introvae_jax.step',
                              'introvae_jax.configuration', 'introvae_jax')
                  if name in vars(importlib.import_module(m)))
    docs = analyzer.for_module(module).find_attr_docs()
    assert ('', name) in docs or f'introvae_jax.{name}' in data, name


def test_the_check_finds_a_missing_docstring():
  """The check itself: an undocumented function and method are reported."""

  def undocumented():
    pass

  class Documented:
    """A class."""

    def method(self):
      pass

  assert _missing({'f': undocumented, 'C': Documented,
                   'C.method': Documented.method}) == ['f', 'C.method']
