"""The recipes by name: `configs/<name>.py` in a clone, the same files as
`introvae_jax.configs` in an installed package.

A recipe is a config file with `get_config()` (ml_collections'
`--config=<path>` takes a file path). From a clone, name the file:
`python main.py --config=configs/ffhq1024.py`. Where the package was
installed (from a wheel or a git URL, with no clone at hand), ask for its
path::

  python -m introvae_jax --workdir=runs/ffhq \\
      --config=$(python -m introvae_jax.recipes ffhq1024)
  python -m introvae_jax.recipes            # every recipe and its path

or, from Python, `recipe_path('ffhq1024')` (a path for `--config` or
`config_flags`) and `load_recipe('toy2d:rings')` (the ConfigDict, with the
`:<argument>` that ml_collections passes to `get_config`).

The recipes import each other from `introvae_jax.configs` when the package
carries them (installed, or installed editable from a clone) and from
`configs` when a clone's checkout is imported without an install; both name
the same files.
"""

import importlib
import importlib.util
import os
import sys
from typing import List, Optional

import ml_collections

from introvae_jax.errors import UserError

PACKAGE = 'introvae_jax.configs'


def recipe_dir() -> str:
  """The folder of the recipe files: the package's `introvae_jax/configs/`,
  else (a checkout imported without an install) the clone's `configs/`."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  clone = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'configs')
  if os.path.isfile(os.path.join(clone, 'default.py')):
    return clone
  raise UserError('The recipes are not installed: reinstall introvae-jax '
                  '(its wheel carries them as introvae_jax.configs).')


def recipe_names() -> List[str]:
  """The recipes' names, sorted: `default`, `faces`, `ffhq1024`, ..."""
  return sorted(name[:-3] for name in os.listdir(recipe_dir())
                if name.endswith('.py') and not name.startswith('_'))


def recipe_path(name: str) -> str:
  """The file of the recipe `name` (`'ffhq1024'`, or `'toy2d:rings'` with
  the argument ml_collections passes to `get_config`), for `--config=`.

  Raises:
    UserError: no recipe has that name (the message lists them).
  """
  base, colon, argument = name.partition(':')
  base = base.removesuffix('.py')
  names = recipe_names()
  if base not in names:
    raise UserError(f'No recipe named {base!r}; the recipes are: '
                    f'{", ".join(names)}.')
  return os.path.join(recipe_dir(), base + '.py') + colon + argument


def load_recipe(name: str) -> ml_collections.ConfigDict:
  """The config of the recipe `name` (as `recipe_path`), as `--config=` of
  that file gives it: `get_config()`, or `get_config(argument)`."""
  path, _, argument = recipe_path(name).partition(':')
  base = os.path.basename(path)[:-3]
  if importlib.util.find_spec(PACKAGE) is not None:
    module = importlib.import_module(f'{PACKAGE}.{base}')
  else:  # a checkout imported without an install: the file itself
    spec = importlib.util.spec_from_file_location(f'_recipe_{base}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def main(argv: Optional[List[str]] = None) -> None:
  """`python -m introvae_jax.recipes [NAME]`: NAME's path, or every recipe's
  name and path."""
  args = sys.argv[1:] if argv is None else argv
  if len(args) > 1 or any(a.startswith('-') for a in args):
    print('usage: python -m introvae_jax.recipes [NAME]', file=sys.stderr)
    sys.exit(2)
  try:
    if args:
      print(recipe_path(args[0]))
    else:
      for name in recipe_names():
        print(f'{name:16} {recipe_path(name)}')
  except UserError as e:
    print(f'introvae_jax.recipes: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
