"""Sphinx configuration of the documentation site (Sphinx + MyST, the
sphinx-book-theme that jax, flax and optax use).

Built by `.ci/run` with warnings as errors and nitpicky references:
`sphinx-build -W --keep-going -n -b html docs docs/_build/html`.
"""

import os
import sys

sys.path.insert(0, os.path.abspath('..'))  # the checkout, also uninstalled
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import introvae_jax  # pylint: disable=g-import-not-at-top

project = 'introvae-jax'
author = 'the introvae-jax authors'
copyright = 'the introvae-jax authors; Apache-2.0'  # pylint: disable=redefined-builtin
release = introvae_jax.__version__  # the one place it is written
version = release

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'markdown'}
# The docstrings write code in single backticks (as the README does).
default_role = 'code'
root_doc = 'index'
exclude_patterns = ['_build']

myst_enable_extensions = ['colon_fence', 'dollarmath']
myst_heading_anchors = 3  # [text](page.md#a-heading) links are checked

autodoc_default_options = {'members': True, 'member-order': 'bysource'}
autodoc_typehints = 'description'
autodoc_typehints_format = 'short'
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Types from other libraries in signatures and docstrings: nothing to link to
# offline (no intersphinx: the build needs no network).
nitpick_ignore_regex = [
    (r'py:.*', r'(jax|jaxlib|flax|optax|ml_collections|numpy|np|tf|'
     r'tensorflow|orbax|ocp|etils|epath|absl|clu|PIL|torch|collections|'
     r'typing|types|os|pathlib|concurrent|threading|signal)(\..*)?'),
    (r'py:class', r'_\w+'),  # private helpers in a signature
    (r'py:class', r'(Any|Callable|Iterator|Iterable|Sequence|Mapping|Dict|'
     r'List|Tuple|Optional|NoReturn|ModuleType|ndarray|Array|PRNGKey|'
     r'ConfigDict|Path|PathLike|ArrayLike|PyTree)'),
]

html_theme = 'sphinx_book_theme'
html_title = f'introvae-jax {release}'
html_theme_options = {'show_toc_level': 2}
html_static_path = []
