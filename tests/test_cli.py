"""The command-line tools on bad arguments: one line on stderr, exit status 2.

Each tool runs in its own process, as a user runs it (no JAX_PLATFORMS or
logging settings added), and every line of stderr counts: the user sees it.
Where libtpu is installed (for the TPU plan's compile test) the tools run
with JAX_PLATFORMS=cpu: on a host without a TPU, libtpu prints its own
initialisation warnings when JAX looks for one, which are not the tools'.
The cases run in parallel; the one that proves an early check by its time
runs alone first. Config-file errors are also checked in-process, through
`cli._parse_flags` with a fresh set of flags.
"""

import collections
import importlib.util
import os
import re
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import pytest

from conftest import REPO_ROOT
from introvae_jax import cli

_HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
_ENV_DROP = () if _HAS_LIBTPU else ('JAX_PLATFORMS',)


def _start_command(command):
  env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO_ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  return time.time(), subprocess.Popen(
      command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _start(module, *args):
  return _start_command([sys.executable, '-m', f'introvae_jax.{module}', *args])


def _start_main(*args):
  return _start_command([sys.executable, os.path.join(REPO_ROOT, 'main.py'),
                         *args])


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
      'generate_num_0': ('generate', [f'--workdir={p["missing"]}', '--num=0'],
                         'flag --num=0: --num must be >= 1'),
      'generate_missing_workdir': ('generate', [f'--workdir={p["missing"]}'],
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
      'plan_unknown_chip': ('plan', ['--config=configs/default.py',
                                     '--topology=v9x:2x2'],
                            "--topology=v9x:2x2: unknown chip 'v9x'"),
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


# --------------------------------------------------------------------------
# main.py: config values and config files.

# TensorFlow's C++ logging when main.py imports it (before any flag is
# read), not a line of ours.
_TF_IMPORT_NOISE = re.compile(
    r'^(WARNING: All log messages before absl::InitializeLog\(\)|'
    r'I\d{4} .*oneDNN custom operations are on)')


def _user_lines(stderr):
  return [l for l in stderr.splitlines() if not _TF_IMPORT_NOISE.match(l)]


_BAD_FILES = {
    'syntax': ('def get_config():\n  c = dict(\n  return c\n',
               'line 2: syntax'),
    'no_get_config': ('def config():\n  return None\n', 'has no get_config()'),
    'unknown_field': (
        'from introvae_jax.configuration import base_config\n\n\n'
        'def get_config():\n  c = base_config()\n  c.hdimm = 3\n  return c\n',
        "line 6: unknown config field 'hdimm' (did you mean 'hdim'?)"),
    'wrong_type': (
        'from introvae_jax.configuration import base_config\n\n\n'
        "def get_config():\n  c = base_config()\n  c.hdim = 'big'\n"
        '  return c\n',
        "line 6: config field 'hdim' needs type int, not str"),
    'raises': ('def get_config():\n  return 1 / 0\n',
               'line 2: ZeroDivisionError: division by zero'),
    'returns_none': ('def get_config():\n  pass\n', 'returned None'),
}


@pytest.fixture(scope='module')
def config_files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('config_files')
  paths = {}
  for name, (text, _) in _BAD_FILES.items():
    paths[name] = str(tmp / f'{name}.py')
    with open(paths[name], 'w') as f:
      f.write(text)
  return paths


def _parse_in_process(capsys, *args):
  """cli._parse_flags on main.py's flags, fresh: (exit code, stderr)."""
  argv = ['main.py', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)  # overrides are found in it
  flags.DEFINE_string('workdir', None, 'Run directory.',
                      flag_values=flag_values)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli._parse_flags(argv, flag_values)  # pylint: disable=protected-access
  return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize('name', sorted(_BAD_FILES))
def test_config_file_errors_name_the_file_in_one_line(capsys, config_files,
                                                      name):
  """A config file that does not parse, lacks get_config(), sets an unknown
  or wrong-typed field, raises or returns None: exit 2 and one line of at
  most 200 characters (the path aside) naming the file (and the line).
  Before the fix a syntax error named neither file nor line, a missing
  get_config() and an unknown field were blamed on 'a --config override'
  (the latter in a 1,300-character line listing every field), a wrong type
  printed a traceback's text."""
  path = config_files[name]
  code, stderr = _parse_in_process(capsys, f'--config={path}',
                                   '--workdir=/nonexistent')
  assert code == 2, stderr
  lines = _user_lines(stderr)
  assert len(lines) == 1 and ': error: --config' in lines[0], stderr
  assert path in lines[0] and _BAD_FILES[name][1] in lines[0], lines[0]
  # The bound is on the message: the temporary path's length is the host's.
  message = lines[0].replace(path, '<file>')
  assert 'override' not in message and len(message) <= 200, lines[0]


def _line_of(text, path='configs/toy2d.py'):
  """The 1-based line of `path` (in the repository) holding `text`."""
  with open(os.path.join(REPO_ROOT, path)) as f:
    return next(i for i, line in enumerate(f, 1) if text in line)


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/default.py', '--config.hdimm=3'],
     "--config.hdimm: unknown config field 'hdimm'"),
    (['--config=configs/missing.py'],
     "--config: cannot load the config file ([Errno 2] No such file"),
    (['--config=configs/missing.py', '--config.hdim=3'],
     "--config: cannot load the config file ([Errno 2] No such file"),
    (['--config=configs/toy2d.py:moons'],
     f"--config: configs/toy2d.py line {_line_of('return toy_config')}: "
     "dataset='moons'; use one of"),
], ids=['override', 'missing', 'missing-with-override', 'get-config-arg'])
def test_override_and_missing_file_errors_keep_their_message(capsys, args,
                                                              expected):
  """An unknown --config.<field> is still blamed on that flag and a missing
  file is still 'cannot load the config file', now that errors from a loaded
  file name the file; a get_config() argument's ConfigError keeps its text."""
  code, stderr = _parse_in_process(capsys, *args, '--workdir=/nonexistent')
  assert code == 2, stderr
  lines = _user_lines(stderr)
  assert len(lines) == 1 and expected in lines[0], stderr


@pytest.fixture(scope='module')
def main_results(tmp_path_factory, config_files):
  """main.py on a bad config value and on a config file with an unknown
  field, in parallel: {case: (exit status, stderr, workdir)}."""
  tmp = tmp_path_factory.mktemp('main')
  cases = {
      'bad_value': ([f'--config={REPO_ROOT}/configs/default.py',
                     '--config.hdim=0'], str(tmp / 'bad_value')),
      'bad_file': ([f'--config={config_files["unknown_field"]}'],
                   str(tmp / 'bad_file')),
  }
  started = {name: _start_main(*args, f'--workdir={workdir}')
             for name, (args, workdir) in cases.items()}
  return {name: (*_finish(proc)[:2], cases[name][1])
          for name, proc in started.items()}


def test_main_refuses_a_bad_config_value_before_creating_the_workdir(
    main_results):
  """`main.py --config.hdim=0`: exit 2, one line naming the field, the value
  and what is allowed, and no workdir. Before the fix it failed with a
  ZeroDivisionError traceback after creating the workdir, its lock and
  checkpoints/."""
  returncode, stderr, workdir = main_results['bad_value']
  assert returncode == 2 and 'Traceback' not in stderr, stderr
  lines = _user_lines(stderr)
  assert lines == [
      'main.py: error: Invalid config: hdim=0 must be >= 1.'], stderr
  assert not os.path.exists(workdir)


def test_main_names_a_bad_config_file_and_its_line(main_results, config_files):
  """`main.py --config=<file with c.hdimm = 3>`: exit 2 and one short line
  naming the file, the line and the field, no workdir. Before the fix it
  blamed 'a --config override' in a 1,300-character line."""
  returncode, stderr, workdir = main_results['bad_file']
  assert returncode == 2 and 'Traceback' not in stderr, stderr
  lines = _user_lines(stderr)
  message = lines[0].replace(config_files['unknown_field'], '<file>')
  assert len(lines) == 1 and len(message) <= 200, stderr
  assert lines[0] == (
      f'main.py: error: --config: {config_files["unknown_field"]} line 6: '
      "unknown config field 'hdimm' (did you mean 'hdim'?)"), lines[0]
  assert not os.path.exists(workdir)
