"""The recipes by name: `configs/<name>.py` in a clone, the same files as
`introvae_jax.configs` in an installed package.

A recipe is a config file with `get_config()`; ml_collections' `--config=`
takes a file path. From a clone, name the file:
`python main.py --config=configs/ffhq1024.py`. Every command line of the
package also takes a recipe's name where it takes a config file (`cli`
resolves it with `recipe_path`), so an installed package, with no clone at
hand, trains with::

  python -m introvae_jax --config=ffhq1024 --workdir=runs/ffhq
  python -m introvae_jax.toy2d --config=toy2d:rings

From Python, `recipe_path('ffhq1024')` is the file (for `config_flags` or
another program's `--config`), `load_recipe('toy2d:rings')` the ConfigDict
(with the `:<argument>` that ml_collections passes to `get_config`) and
`recipe_names()` the list.

The recipes import each other from `introvae_jax.configs` when the package
carries them (installed, or installed editable from a clone) and from
`configs` when a clone's checkout is imported without an install; both name
the same files.
"""

import importlib
import importlib.util
import os
from typing import List

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


def is_recipe_name(value: str) -> bool:
  """Whether a `--config` value names a recipe rather than a file: no
  folder, no `.py`, and no such file here (`'ffhq1024'`, `'toy2d:rings'`)."""
  base = value.partition(':')[0]
  return bool(base) and not (os.sep in base or '/' in base or
                             base.endswith('.py') or os.path.exists(base))


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
