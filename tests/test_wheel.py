"""The wheel works on its own, outside the checkout.

Builds the wheel from the files a clone has, installs it into a fresh venv in
a temporary folder with only its declared dependencies (`requirements.txt`
as constraints: the versions CI tests, served by pip's cache), and from a
folder outside the checkout, with no PYTHONPATH:

1. the core alone: the README's `train_step` snippet runs, and the training
   program says in one line that it needs the `train` extra;
2. with `[train]`: the training program says it needs TensorFlow and names
   the `tf-cpu` extra;
3. with `[train,tf-cpu]`: every recipe the package carries loads as the
   clone's file does, and `python -m introvae_jax --config=faces` (a recipe
   that imports another) trains one step to a checkpoint.

torch and `tensorflow` (the GPU build) are constrained to no version, so a
dependency that pulled either fails the install at once instead of
downloading gigabytes.

What it guards against, shown by hand (2026-12-07): with `ml_collections`
deleted from `dependencies` in pyproject.toml the wheel still built and
installed (jax, flax and optax do not bring it), and step 1's snippet failed
at its first line, `from introvae_jax import ...` -> `configuration.py`,
`import ml_collections`: `ModuleNotFoundError: No module named
'ml_collections'`. Nothing in the checkout can see that: its venv has
ml_collections from requirements.txt, and clu (in `[train]`) brings it too.
With `introvae_jax.configs` left out of `[tool.setuptools] packages` the wheel
held no recipe (the content check below), and `python -m introvae_jax
--config=faces` in a venv with every extra said `introvae_jax: error:
--config=faces is neither a file nor a recipe. The recipes are not
installed: ...` (exit 2).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import introvae_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_TIMEOUT_S = 900
RUN_TIMEOUT_S = 600


def _run(args, cwd, env, timeout=RUN_TIMEOUT_S, check=True):
  proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f'{" ".join(map(str, args))} failed '
                         f'({proc.returncode}):\n{proc.stdout[-2000:]}\n'
                         f'{proc.stderr[-4000:]}')
  return proc


def _clone_files(dest):
  """The checkout's files as a clone has them (tracked, and new files git
  does not ignore), copied to `dest`."""
  names = subprocess.run(
      ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
      cwd=REPO, capture_output=True, check=True).stdout.decode().split('\0')
  for name in filter(None, names):
    source = os.path.join(REPO, name)
    if os.path.isfile(source):  # a deleted file not yet committed is gone
      os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
      shutil.copy2(source, os.path.join(dest, name))


def readme_snippet():
  """The README's train_step snippet (the python block that calls it)."""
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.S)
  return next(b for b in blocks if 'create_train_state(config' in b
              and 'train_step' in b)


def _one_error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if ': error: ' in l]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


@pytest.mark.slow
def test_the_wheel_installs_and_trains_outside_the_checkout(tmp_path):
  src, dist, work = tmp_path / 'src', tmp_path / 'dist', tmp_path / 'work'
  work.mkdir()
  _clone_files(src)
  env = {k: v for k, v in os.environ.items()
         if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
  env.update(JAX_PLATFORMS='cpu', INTROVAE_CACHE=str(tmp_path / 'cache'),
             PIP_DISABLE_PIP_VERSION_CHECK='1')
  _run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w',
        str(dist), str(src)], cwd=work, env=env, timeout=INSTALL_TIMEOUT_S)
  (wheel,) = glob.glob(str(dist / '*.whl'))
  version = introvae_jax.__version__
  assert os.path.basename(wheel) == f'introvae_jax-{version}-py3-none-any.whl'

  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  recipes = sorted(os.path.basename(p) for p in glob.glob(
      os.path.join(REPO, 'configs', '*.py')))
  assert {f'introvae_jax/configs/{r}' for r in recipes} <= names
  assert f'introvae_jax-{version}.dist-info/licenses/LICENSE' in names
  assert not [n for n in names if 'torch' in n or n.startswith(
      ('tests/', 'configs/', 'bench/', 'docs/', 'main.py'))], sorted(names)

  venv = tmp_path / 'venv'
  _run([sys.executable, '-m', 'venv', str(venv)], cwd=work, env=env)
  python, pip = str(venv / 'bin' / 'python'), [str(venv / 'bin' / 'python'),
                                               '-m', 'pip', 'install', '-q']
  never = tmp_path / 'never.txt'  # no version satisfies: pulling one fails
  never.write_text('torch<0\ntensorflow<0\n')
  constraints = ['-c', os.path.join(REPO, 'requirements.txt'),
                 '-c', str(never)]

  def install(extras):
    _run(pip + [wheel + extras] + constraints, cwd=work, env=env,
         timeout=INSTALL_TIMEOUT_S)

  def train(*flags, check=True):
    return _run([python, '-m', 'introvae_jax', '--config=faces',
                 f'--workdir={tmp_path / "run"}', '--config.num_train_steps=1',
                 '--config.eval_every_steps=0', *flags], cwd=work, env=env,
                check=check)

  # 1. The core alone: the README's snippet, from outside the checkout.
  install('')
  code = readme_snippet() + '''
import introvae_jax, sys
assert introvae_jax.__file__.startswith(sys.prefix), introvae_jax.__file__
assert int(state.step) == 1 and float(metrics['finite']) == 1.0, metrics
print('SNIPPET', introvae_jax.__version__, float(metrics['loss_e']))
'''
  proc = _run([python, '-c', code], cwd=work, env=env)
  assert f'SNIPPET {version} ' in proc.stdout, proc.stdout
  line = _one_error_line(train(check=False))
  assert 'The training program needs' in line and 'train extra' in line, line

  # 2. The train extra, no TensorFlow.
  install('[train]')
  line = _one_error_line(train(check=False))
  assert 'TensorFlow' in line and '[train,tf-cpu]' in line, line
  assert not (tmp_path / 'run').exists()

  # 3. With TensorFlow: the recipes, one training step.
  install('[train,tf-cpu]')
  code = '''
import json, introvae_jax
print(json.dumps({n: introvae_jax.load_recipe(n).to_json()
                  for n in introvae_jax.recipe_names()}))
'''
  installed = json.loads(_run([python, '-c', code], cwd=work,
                              env=env).stdout.splitlines()[-1])
  assert sorted(installed) == [r[:-3] for r in recipes if r != '__init__.py']
  for name, config in installed.items():
    assert config == introvae_jax.load_recipe(name).to_json(), name
  train()
  assert (tmp_path / 'run' / 'checkpoints' / '1' / 'commit_success.txt'
          ).exists()
  listed = _run([python, '-m', 'pip', 'list', '--format=json'], cwd=work,
                env=env).stdout
  packages = {re.sub(r'[-_.]+', '-', p['name']).lower()
              for p in json.loads(listed)}
  assert 'introvae-jax' in packages and 'tensorflow-cpu' in packages
  assert not {'torch', 'tensorflow'} & packages
