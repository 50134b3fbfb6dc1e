"""Which extra of the package installs an optional dependency.

`import introvae_jax` and `train_step` need only the core dependencies
(`pyproject.toml`). The training program, data, checkpoints, evaluation,
sampling, conversion and the tools need the `train` extra, and TensorFlow
for tf.data: the `tf-cpu` extra, or the `tensorflow` a machine already has
(Colab and GPU images ship it; the two packages must not both be installed).
Where one of them is missing, `missing` turns the bare
`ModuleNotFoundError` into one that says what to install.
"""

from introvae_jax.errors import MissingDependencyError

# The top-level module a ModuleNotFoundError names -> the extra that has it.
EXTRA = {
    'tensorflow': 'tf-cpu', 'tensorflow_datasets': 'train',
    'orbax': 'train', 'clu': 'train', 'tensorboard': 'train',
    'tqdm': 'train', 'scipy': 'train', 'PIL': 'train', 'skimage': 'train',
    'mlxtend': 'train', 'matplotlib': 'train',
    'google': 'train', 'importlib_resources': 'train', 'torch': 'dev',
}

INSTALL = ("pip install 'introvae-jax[{extras}] @ git+<repository URL>', or "
           "'<the .whl file>[{extras}]' (in a clone: pip install -r "
           'requirements.txt -e .).')


def missing(error: ModuleNotFoundError, needed_by: str) -> ImportError:
  """The error to raise from `error` (a failed import) for `needed_by`
  ('the training program', ...): naming the extra that installs the module,
  or `error` itself for a module no extra provides (a bug to report)."""
  top = (error.name or '').split('.')[0]
  extra = EXTRA.get(top)
  if extra is None:
    return error
  if extra == 'tf-cpu':
    how = ('TensorFlow (tf.data), which is not installed. Where a machine '
           'ships `tensorflow` (Colab, GPU images) that one serves; '
           'elsewhere (a TPU VM, a fresh venv) add the tf-cpu extra: '
           + INSTALL.format(extras='train,tf-cpu'))
  elif extra == 'dev':
    how = (f"'{top}', which is not installed: pip install torch (the CPU "
           'wheel serves; requirements-dev.txt pins it).')
  else:
    how = (f"'{top}', which is not installed: it comes with the {extra} "
           'extra, ' + INSTALL.format(extras=extra))
  return MissingDependencyError(f'{needed_by} needs {how}', name=error.name)
