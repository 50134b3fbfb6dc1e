"""Shared tiny configs, tree comparisons, and child-process tests.

Everything here is sized for a 2-core CPU: 8 px images with channels (4,),
hdim 4, batch 4; the MLP model with hidden widths (16, 16, 16).

Tests that need a different JAX process setup (float64, or 4 host devices)
use `in_subprocess`: the parent pytest runs all tests of one module with the
same setup in one child pytest process and reports each result under its own
name, so no process-wide JAX flag leaks into the rest of the suite.
"""

import functools
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

# The suite runs on the CPU, also where a GPU or libtpu is installed (libtpu
# would otherwise probe for TPU metadata, and lock itself to one process,
# where the plan tests only compile); child processes inherit these.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402  (after the platform choice above)
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # tests run without `pip install -e .` too
  sys.path.insert(0, REPO_ROOT)

import introvae_jax  # noqa: E402  (needs the path above)

CONV_BATCH = 4
MLP_BATCH = 8


def tiny_config(arch='conv', **overrides):
  """A locked config for a tiny model; `overrides` set any schema field."""
  c = introvae_jax.base_config()  # locked: a misspelled field raises
  if arch == 'conv':
    c.image_size, c.channels, c.hdim = 8, (4,), 4
    c.batch_size = CONV_BATCH
  else:
    c.arch, c.hdim, c.data_dim, c.mlp_hidden = 'mlp', 2, 2, (16, 16, 16)
    c.batch_size = MLP_BATCH
  for name, value in overrides.items():
    setattr(c, name, value)
  return c


def tiny_batch(config, seed=0, batch_size=None, dtype=np.float32):
  """Images in [0, 1] (conv) or 2-D points (mlp), as NumPy."""
  rs = np.random.RandomState(seed)
  n = batch_size or config.batch_size
  if config.arch == 'mlp':
    return (rs.randn(n, config.data_dim) * 1.5).astype(dtype)
  s, ch = config.image_size, config.image_channels
  return rs.rand(n, s, s, ch).astype(dtype)


@functools.lru_cache(maxsize=None)
def _initial_state(arch, seed):
  return introvae_jax.create_train_state(tiny_config(arch),
                                         jax.random.PRNGKey(seed))


def initial_state(arch='conv', seed=0):
  """The tiny model's initial TrainState (cached: init compiles per call).

  The state depends only on the model fields and the seed, so every test
  config built by `tiny_config(arch)` with other objective/optimiser fields
  can start from it.
  """
  return _initial_state(arch, seed)


@pytest.fixture(scope='session', autouse=True)
def introvae_cache(tmp_path_factory):
  """$INTROVAE_CACHE for the session and its children, never the user's
  ~/.cache, holding a digit classifier trained for 100 steps (seconds, not
  the 1.5 CPU-minutes of the real one: the tests check the plumbing, and
  tests/test_evaluation.py the first-use training)."""
  from introvae_jax import digit_classifier
  saved = os.environ.get('INTROVAE_CACHE')
  if in_child_process():  # the parent's
    yield saved
    return
  path = str(tmp_path_factory.mktemp('introvae_cache'))
  os.environ['INTROVAE_CACHE'] = path
  params, accuracy = digit_classifier.train(num_steps=100, log=None)
  digit_classifier.save(params, digit_classifier.default_path(),
                        dict(held_out_accuracy=accuracy, num_steps=100))
  yield path
  if saved is None:
    os.environ.pop('INTROVAE_CACHE')
  else:
    os.environ['INTROVAE_CACHE'] = saved


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
  """One persistent compilation cache for the session and its children."""
  path = str(tmp_path_factory.mktemp('xla_cache'))
  saved = {k: getattr(jax.config, k) for k in (
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_compile_time_secs')}
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  yield path
  for k, v in saved.items():
    jax.config.update(k, v)


_JITTED = {}


def jitted_step(config):
  """A jitted `train_step` for `config`, compiled once per distinct config."""
  key = config.to_json()
  if key not in _JITTED:
    _JITTED[key] = jax.jit(
        functools.partial(introvae_jax.train_step, config=config))
  return _JITTED[key]


def to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def assert_trees_close(actual, expected, rtol, atol_scale=None, what=''):
  """Leafwise allclose; `atol_scale` * max|expected leaf| as the atol floor.

  The floor keeps elements that are tiny next to the rest of their array
  (whose relative error means nothing) from failing the test.
  """
  leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  leaves_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
  assert tree_a == tree_e, f'{what}: tree structures differ'
  for (path, a), (_, e) in zip(leaves_a, leaves_e):
    a, e = np.asarray(a), np.asarray(e)
    atol = 0.0
    if atol_scale is not None and e.size:
      atol = atol_scale * float(np.max(np.abs(e)))
    np.testing.assert_allclose(
        a, e, rtol=rtol, atol=atol,
        err_msg=f'{what} {jax.tree_util.keystr(path)}')


def machine():
  """This host, for failure messages whose numbers depend on it: the
  architecture, CPU model and vector extensions, jaxlib's version."""
  model, flags = platform.processor() or '?', set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          model = value.strip()
        elif key.strip() in ('flags', 'Features'):
          flags = set(value.split())
          break
  except OSError:
    pass
  isa = sorted(f for f in flags if f.startswith(('avx', 'amx', 'sve', 'fma')))
  isa = ' '.join(isa) or 'no ISA flags read'
  return (f'{platform.machine()} {model} ({isa}), {os.cpu_count()} CPUs, '
          f'jaxlib {jax.lib.__version__}')


def adam_moments(opt_state):
  """(count, mu, nu) of an optax.adam state."""
  adam_state = opt_state[0]
  return adam_state.count, adam_state.mu, adam_state.nu


def step_gradients(new_state):
  """The gradients a step used, from its Adam state (needs adam_b1 = 0)."""
  return (adam_moments(new_state.opt_state_e)[1],
          adam_moments(new_state.opt_state_g)[1])


# --------------------------------------------------------------------------
# Tests that run in a child process with their own JAX setup.

_CHILD_TAG = 'INTROVAE_TEST_CHILD'
_CHILD_TIMEOUT_S = 900
_selected = {}   # (module file, tag) -> [node ids this session selected]
_results = {}    # (module file, tag) -> {test id: failure text or None}


def in_child_process():
  return _CHILD_TAG in os.environ


def in_subprocess(tag, env):
  """Decorator: run this test in a child pytest process with `env` set.

  The tests of a module with the same `tag` that this session selected
  (`-m`, `-k`, node ids) share one child process, which runs exactly those.
  In the parent the test reports the child's outcome (and its traceback).
  """
  def decorate(fn):
    module_file = os.path.abspath(sys.modules[fn.__module__].__file__)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if os.environ.get(_CHILD_TAG) == tag:
        return fn(*args, **kwargs)
      results = _run_child(module_file, tag, env)
      # "tests/test_x.py::test_name[param] (call)" -> "test_name[param]"
      test_id = (os.environ['PYTEST_CURRENT_TEST'].split('::')[-1]
                 .rsplit(' ', 1)[0])
      if test_id not in results:
        pytest.fail(f'{test_id} did not report from its child process:\n'
                    f'{results["<output>"]}', pytrace=False)
      if results[test_id] is not None:
        pytest.fail(f'[in child process, {tag}]\n{results[test_id]}',
                    pytrace=False)
    wrapper.child_key = (module_file, tag)
    return wrapper
  return decorate


def pytest_collection_finish(session):
  """Records, per child process, the tests this session selected."""
  for item in session.items:
    key = getattr(getattr(item, 'function', None), 'child_key', None)
    if key is not None:
      _selected.setdefault(key, []).append(item.nodeid)


def _run_child(module_file, tag, env):
  key = (module_file, tag)
  if key in _results:
    return _results[key]
  child_env = dict(os.environ)
  for name, value in env.items():
    if name == 'XLA_FLAGS':
      value = (child_env.get('XLA_FLAGS', '') + ' ' + value).strip()
    child_env[name] = value
  child_env[_CHILD_TAG] = tag
  child_env['PYTHONPATH'] = os.pathsep.join(
      [REPO_ROOT] + [p for p in [child_env.get('PYTHONPATH')] if p])
  child_env.setdefault('JAX_PLATFORMS', 'cpu')
  with tempfile.TemporaryDirectory() as tmp:
    xml_path = os.path.join(tmp, 'report.xml')
    # -m '': the parent already selected them (its -m may have been the
    # default one of pyproject.toml, which the child would apply again);
    # -n 0: the child runs them itself, not on workers of its own.
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
           '-m', '', '-n', '0', f'--junitxml={xml_path}',
           '--rootdir', REPO_ROOT] + _selected[key]
    proc = subprocess.run(cmd, env=child_env, cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=_CHILD_TIMEOUT_S)
    results = {'<output>': (proc.stdout + proc.stderr)[-6000:]}
    if os.path.exists(xml_path):
      for case in ET.parse(xml_path).getroot().iter('testcase'):
        problem = case.find('failure')
        if problem is None:
          problem = case.find('error')
        if problem is None and case.find('skipped') is not None:
          problem = case.find('skipped')
        results[case.get('name')] = (
            None if problem is None else
            f'{problem.get("message", "")}\n{problem.text or ""}')
  _results[key] = results
  return results
