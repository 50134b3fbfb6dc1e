"""What pip installs: the version in one place, dependency ranges that agree
with the lock, a core that needs no extra, a clear message naming the extra
that is missing, and the recipes by name in a clone and in the package.

The built wheel itself, installed in a fresh venv, is tests/test_wheel.py
(slow set).
"""

import glob
from importlib import metadata
import os
import re
import subprocess
import sys
import tomllib

from absl import flags
from ml_collections import config_flags
import pytest

from introvae_jax import cli
from introvae_jax import extras
from introvae_jax import recipes
from introvae_jax.errors import UserError

requirements = pytest.importorskip('packaging.requirements')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def _pyproject():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def _pins(*files):
  """{normalised name: version} of the `name==version` lines of the lock
  files (and the files they include with -r)."""
  pins = {}
  for name in files:
    with open(os.path.join(REPO, name), encoding='utf-8') as f:
      for line in f:
        line = line.split('#')[0].strip()
        if line.startswith('-r '):
          pins.update(_pins(line[3:].strip()))
        elif '==' in line:
          req = requirements.Requirement(line)
          pins[_norm(req.name)] = str(req.specifier).removeprefix('==')
  return pins


def _norm(name):
  return re.sub(r'[-_.]+', '-', name).lower()


@pytest.fixture(autouse=True)
def _forget_loaded_config_files():
  """config_flags loads a file into sys.modules['config_config'] with the
  deprecated `load_module`, which executes the next file into that same
  module object: a later file without get_config() (tests/test_cli.py) would
  find this one's. Leave none behind."""
  yield
  sys.modules.pop('config_config', None)


def _run(code, *args, cwd=REPO):
  return subprocess.run([sys.executable, '-c', code, *args], cwd=cwd,
                        env=CHILD_ENV, capture_output=True, text=True,
                        timeout=300)


# --------------------------------------------------------------------------
# The version and the declared dependencies.


def test_the_version_is_written_once():
  """pyproject.toml reads the version from introvae_jax/__init__.py; no
  other file of the package, configs or docs sets one."""
  project = _pyproject()
  assert 'version' not in project['project']
  assert project['project']['dynamic'] == ['version']
  assert project['tool']['setuptools']['dynamic']['version'] == {
      'attr': 'introvae_jax.__version__'}
  import introvae_jax  # pylint: disable=g-import-not-at-top
  setters = []
  for path in glob.glob(os.path.join(REPO, '**', '*.py'), recursive=True):
    if '.venv' in path or '_build' in path:
      continue
    with open(path, encoding='utf-8') as f:
      if re.search(r'^\s*(__version__|version|release)\s*=\s*[\'"]\d',
                   f.read(), re.M):
        setters.append(os.path.relpath(path, REPO))
  assert setters == ['introvae_jax/__init__.py'], setters
  with open(os.path.join(REPO, 'CHANGELOG.md'), encoding='utf-8') as f:
    released = re.findall(r'^## \[(\d+\.\d+\.\d+)\]', f.read(), re.M)
  assert released[0] == introvae_jax.__version__, released


def test_declared_ranges_start_at_the_tested_lock():
  """Every declared dependency has a lower bound, the version the lock
  (requirements*.txt, what CI tests) pins, and no upper bound; every pin of
  requirements.txt is declared in the core or an extra."""
  project = _pyproject()['project']
  declared = {'core': project['dependencies'],
              **project['optional-dependencies']}
  pins = _pins('requirements.txt', 'requirements-dev.txt',
               'requirements-docs.txt')
  named = set()
  for group, lines in declared.items():
    for line in lines:
      req = requirements.Requirement(line)
      name = _norm(req.name)
      named.add(name)
      specs = {s.operator: s.version for s in req.specifier}
      assert set(specs) == {'>='}, (group, line)
      assert name in pins or group in ('cuda12', 'tpu'), (group, line)
      if name in pins:
        assert specs['>='] == pins[name], (group, line, pins[name])
  # A pin nothing declares must come with a declared package (jaxlib: jax).
  brought = {_norm(requirements.Requirement(r).name) for name in named
             for r in (metadata.requires(name) or []) if 'extra ==' not in r}
  lock = set(_pins('requirements.txt'))
  assert not lock - named - brought, f'pinned, not declared: {lock - named}'
  assert 'tensorflow-cpu' not in {
      _norm(requirements.Requirement(r).name) for r in declared['train']}
  assert not {'torch', 'tensorflow-cpu'} & {
      _norm(requirements.Requirement(r).name) for r in declared['core']}


_BLOCK = '''
import sys
for name in sys.argv[1].split(','):
  sys.modules[name] = None  # `import name` raises ModuleNotFoundError
'''


def test_the_core_needs_no_extra():
  """`import introvae_jax` and a jitted train_step run with every module an
  extra brings (TensorFlow, Orbax, clu, torch, ...) unimportable."""
  code = _BLOCK + '''
import functools, jax
import introvae_jax
from introvae_jax import base_config, create_train_state, train_step
c = base_config()
c.image_size, c.channels, c.hdim, c.batch_size = 8, (4,), 4, 2
state = create_train_state(c, jax.random.PRNGKey(0))
step = jax.jit(functools.partial(train_step, config=c))
state, metrics = step(state, jax.random.uniform(jax.random.PRNGKey(1),
                                                (2, 8, 8, 3)))
assert int(state.step) == 1 and float(metrics['finite']) == 1.0
assert introvae_jax.recipe_path('default').endswith('default.py')
print('ok', sorted(m for m in sys.argv[1].split(',') if sys.modules[m]))
'''
  proc = _run(code, ','.join(extras.EXTRA))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == 'ok []', proc.stdout


@pytest.mark.parametrize('blocked,wanted', [
    ('tensorflow', ['TensorFlow', 'tf-cpu', '[train,tf-cpu]', 'Colab']),
    ('clu', ["'clu'", 'train extra', '[train]']),
])
def test_a_missing_extra_is_one_line_naming_it(blocked, wanted, tmp_path):
  """The training program without TensorFlow, or without the train extra:
  exit 2 and one line saying what to install, before any work."""
  code = _BLOCK + '''
import runpy
sys.argv = ['introvae_jax', '--config=default', '--workdir=' + sys.argv[2]]
runpy.run_module('introvae_jax', run_name='__main__', alter_sys=True)
'''
  proc = _run(code, blocked, str(tmp_path / 'run'))
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if 'error' in l]
  assert len(lines) == 1 and lines[0].startswith('introvae_jax: error: The '
                                                 'training program needs'), (
      proc.stderr)
  for text in wanted:
    assert text in lines[0], (text, lines[0])
  assert not (tmp_path / 'run').exists()


def test_missing_maps_every_extra_module_and_passes_others_through():
  error = extras.missing(ModuleNotFoundError('x', name='skimage.data'), 'X')
  assert isinstance(error, ImportError) and isinstance(error, UserError)
  assert 'train extra' in str(error) and error.name == 'skimage.data'
  assert 'pip install torch' in str(extras.missing(
      ModuleNotFoundError('x', name='torch'), 'X'))
  bug = ModuleNotFoundError('x', name='not_a_dependency')
  assert extras.missing(bug, 'X') is bug
  project = _pyproject()['project']['optional-dependencies']
  assert set(extras.EXTRA.values()) <= set(project)


# --------------------------------------------------------------------------
# The recipes by name.


def _recipe_files():
  return sorted(os.path.basename(p)[:-3]
                for p in glob.glob(os.path.join(REPO, 'configs', '[!_]*.py')))


def _load_file(path):
  """A recipe as ml_collections' --config=<path> loads it."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv)
  fv(['prog', f'--config={path}'])
  return fv.config


def test_recipe_names_are_the_files_of_configs():
  assert recipes.recipe_names() == _recipe_files()
  assert {'default', 'faces', 'ffhq1024', 'toy2d'} <= set(_recipe_files())
  # In this checkout (installed editable) the package's recipes are these.
  assert os.path.samefile(recipes.recipe_dir(), os.path.join(REPO, 'configs'))


@pytest.mark.parametrize('name', _recipe_files() + ['toy2d:rings'])
def test_load_recipe_equals_the_file_given_to_config(name):
  """recipe_path and load_recipe give what --config=configs/<file> gives
  (the recipes that import another one included)."""
  base, colon, argument = name.partition(':')
  path = os.path.join(REPO, 'configs', base + '.py') + colon + argument
  assert recipes.recipe_path(name) == path
  assert recipes.recipe_path(base + '.py' + colon + argument) == path
  assert recipes.load_recipe(name) == _load_file(path)


def test_an_unknown_recipe_lists_the_recipes():
  with pytest.raises(UserError, match=r"No recipe named 'ffhq512'; the "
                     r'recipes are: celebahq1024, .*ffhq1024'):
    recipes.recipe_path('ffhq512')
  assert recipes.is_recipe_name('ffhq1024')
  assert recipes.is_recipe_name('toy2d:rings')
  for value in ('configs/ffhq1024.py', 'ffhq1024.py', '/tmp/x.py:a', '',
                os.path.join(REPO, 'configs', 'default.py')):
    assert not recipes.is_recipe_name(value), value


def _parse(capsys, *args):
  fv = flags.FlagValues()
  argv = ['main.py', *args]
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, '', flag_values=fv)
  try:
    cli._parse_flags(argv, fv)  # pylint: disable=protected-access
  except SystemExit as e:
    return e.code, capsys.readouterr().err
  return fv, ''


def test_config_flags_take_a_recipe_name(capsys):
  """`--config=faces` and `--config toy2d:rings` are the recipes' files;
  a path is left alone; an unknown name is one line listing the recipes."""
  fv, _ = _parse(capsys, '--config=faces', '--config.batch_size=4')
  expected = _load_file(os.path.join(REPO, 'configs', 'faces.py'))
  expected.batch_size = 4
  assert fv.config == expected
  fv, _ = _parse(capsys, '--config', 'toy2d:rings', '--workdir', 'w')
  assert fv.config == recipes.load_recipe('toy2d:rings')
  fv, _ = _parse(capsys, f'--config={REPO}/configs/default.py')
  assert fv.config == recipes.load_recipe('default')
  code, err = _parse(capsys, '--config=ffhq512')
  assert code == 2
  assert len(err.strip().splitlines()) == 1
  assert err.strip().endswith(
      " error: --config=ffhq512 is neither a file nor a recipe. No recipe "
      f"named 'ffhq512'; the recipes are: {', '.join(_recipe_files())}."), err


def test_recipes_load_from_a_checkout_without_an_install(tmp_path):
  """Without the package's `introvae_jax.configs` (a checkout on sys.path,
  no install), the recipes that import another recipe fall back on the
  clone's `configs` package, and recipe_path finds configs/."""
  code = '''
import sys
sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]
sys.path.insert(0, sys.argv[1])
import importlib.util
assert importlib.util.find_spec('introvae_jax.configs') is None
from introvae_jax import recipes
from ml_collections import config_flags
from absl import flags
fv = flags.FlagValues()
config_flags.DEFINE_config_file('config', None, '', flag_values=fv)
fv(['prog', '--config=' + recipes.recipe_path('ffhq256')])
assert fv.config.image_size == 256 and fv.config.num_vae_steps == 17500
assert recipes.load_recipe('faces').dataset == 'faces_offline'
print(recipes.recipe_dir())
'''
  proc = _run(code, REPO, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.samefile(proc.stdout.strip(), os.path.join(REPO, 'configs'))
