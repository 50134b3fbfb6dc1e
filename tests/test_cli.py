"""The command-line tools on bad arguments: one line on stderr, exit status 2.

Each tool runs in its own process, as a user runs it (no JAX_PLATFORMS or
logging settings added), and every line of stderr counts: the user sees it.
The cases run in parallel; the one that proves an early check by its time
runs alone first.
"""

import collections
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

_ENV_DROP = ('JAX_PLATFORMS',)


def _start(module, *args):
  env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO_ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  return time.time(), subprocess.Popen(
      [sys.executable, '-m', f'introvae_jax.{module}', *args], cwd=REPO_ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(started):
  start, proc = started
  _, stderr = proc.communicate(timeout=300)
  return proc.returncode, stderr, time.time() - start


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('cli')
  (tmp / 'not_a_zip.npz').write_bytes(b'\x93NUMPY garbage, not a zip archive')
  return {'missing': str(tmp / 'missing'), 'tmp': str(tmp),
          'bad_npz': str(tmp / 'not_a_zip.npz')}


# name -> (module, args, text the one line must contain). One process per
# case costs seconds of imports on a small machine, so these are one or two
# per tool; the tests beside each module check the other errors' messages.
def _cases(p):
  return {
      'sample_num_0': ('sample', [f'--workdir={p["missing"]}', '--num=0'],
                       'flag --num=0: --num must be >= 1'),
      'sample_missing_workdir': ('sample', [f'--workdir={p["missing"]}'],
                                 f'--workdir={p["missing"]} does not exist'),
      'evaluation_damaged_npz': (
          'evaluation', [f'--workdir={p["missing"]}',
                         f'--inception={p["bad_npz"]}'],
          f'{p["bad_npz"]} is not an .npz archive'),
      'convert_missing_pth': (
          'convert', [f'--torch_checkpoint={p["missing"]}.pth',
                      f'--out={p["tmp"]}/converted'],
          f'No file at --torch_checkpoint={p["missing"]}.pth'),
      'digit_classifier_num_steps': ('digit_classifier', ['--num_steps=0'],
                                     'flag --num_steps=0'),
      'toy2d_dataset': ('toy2d', ['--dataset=moons'],
                        '--dataset must be one of 8gaussians'),
  }


@pytest.fixture(scope='module')
def results(paths):
  # Alone, so its time says when the check happened: the weights file is
  # checked before the workdir (missing too), its checkpoint and its images
  # load; it used to be reported after ~80 s of that work.
  missing_weights = _finish(_start(
      'evaluation', f'--workdir={paths["missing"]}',
      f'--inception={paths["missing"]}.pth'))
  cases = _cases(paths)
  started = {name: _start(module, *args)
             for name, (module, args, _) in cases.items()}
  out = {name: _finish(proc) for name, proc in started.items()}
  out['evaluation_missing_weights'] = missing_weights
  return out


def _expected(paths, name):
  if name == 'evaluation_missing_weights':
    return f'No InceptionV3 weights at {paths["missing"]}.pth'
  return _cases(paths)[name][2]


_NAMES = sorted(_cases(collections.defaultdict(str))) + [
    'evaluation_missing_weights']


@pytest.mark.parametrize('name', _NAMES)
def test_user_error_is_one_line_with_exit_status_2(results, paths, name):
  returncode, stderr, _ = results[name]
  assert 'Traceback' not in stderr, stderr
  assert returncode == 2, stderr
  lines = stderr.splitlines()
  assert len(lines) == 1, stderr
  assert ': error: ' in lines[0] and _expected(paths, name) in lines[0], stderr
  assert 'allow_pickle' not in lines[0]


def test_weights_are_checked_before_other_work(results):
  _, _, seconds = results['evaluation_missing_weights']
  print(f'missing --inception reported after {seconds:.1f} s')
  assert seconds < 40  # package imports only; the old order took ~80 s
