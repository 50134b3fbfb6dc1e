"""Two processes train as one: jax.distributed on this machine's CPU.

Each test starts two worker processes (this file run as a script), each with
2 host CPU devices, joined by `jax.distributed.initialize` on localhost with
gloo collectives: 4 devices over 2 processes, as on a 2-host pod. The mesh
spans both processes, so the step's collectives run across them.

- `test_two_processes_match_one_device`: float64 (jax_enable_x64). Each
  process makes global batches from its half of the same global batches of 8
  (`parallel.global_batch`) for the mesh step `make_train_step(mesh=...)`,
  3 steps; the states equal the jitted
  single-device step's on the whole batches to 1e-8 (docs/introvae.md 3b:
  after Adam steps float32 runs differ by ~lr, so parameters are compared in
  float64). The margin splits the devices' shards (see test_pmap), so a
  hinge decided per process would fail.
- `test_two_process_training_run`: `train_and_evaluate` on the offline digits
  with `--config.distributed`: one checkpoint, saved from global arrays, that
  both processes restore straight into the mesh's sharding and find equal to
  their final state; only process 0 writes images and TensorBoard events.
"""

import functools
import glob
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, assert_trees_close, tiny_batch, tiny_config
import introvae_jax
from introvae_jax import checkpointing, parallel, sampling, train
from test_pmap import config_for  # its margin splits the 4 devices' shards
# configs/default.py, tiny
from train_utils import tiny_config as default_tiny_config

PROCESSES = 2
LOCAL_DEVICES = 2
STEPS = 3
_TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_workers(mode, out_dir, log_dir, env=None):
  """Runs this file as PROCESSES cooperating workers; fails with their logs."""
  port = _free_port()
  worker_env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT,
                    XLA_FLAGS='--xla_force_host_platform_device_count='
                    f'{LOCAL_DEVICES}')
  worker_env.pop('JAX_ENABLE_X64', None)
  worker_env.update(env or {})
  logs = [os.path.join(log_dir, f'{mode}_{i}.log') for i in range(PROCESSES)]
  procs = []
  try:
    for i, log in enumerate(logs):
      with open(log, 'w') as f:  # files, not pipes: a full pipe would stall
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), mode, str(port),
             str(i), out_dir], env=worker_env, cwd=REPO_ROOT, stdout=f,
            stderr=subprocess.STDOUT))
    for proc in procs:
      proc.wait(timeout=_TIMEOUT_S)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, log) in enumerate(zip(procs, logs)):
    with open(log) as f:
      assert proc.returncode == 0, f'process {i} failed:\n{f.read()[-5000:]}'


def _load(path):
  with np.load(path) as f:
    return dict(f)


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path):
  _run_workers('step', str(tmp_path), str(tmp_path),
               env={'JAX_ENABLE_X64': '1'})
  hosts = [_load(tmp_path / f'state_{i}.npz') for i in range(PROCESSES)]
  single = _load(tmp_path / 'single.npz')
  assert int(hosts[0]['.step']) == STEPS
  assert all(a.dtype == np.float64 for k, a in single.items() if 'params' in k)
  for name in single:
    np.testing.assert_array_equal(hosts[1][name], hosts[0][name], err_msg=name)
  assert_trees_close(hosts[0], single, rtol=1e-8, atol_scale=1e-10,
                     what=f'state after {STEPS} steps')


@pytest.mark.slow
def test_two_process_training_run(tmp_path):
  workdir = tmp_path / 'run'
  _run_workers('train', str(workdir), str(tmp_path))
  hosts = [_load(workdir / f'state_{i}.npz') for i in range(PROCESSES)]
  for name in hosts[0]:
    np.testing.assert_array_equal(hosts[1][name], hosts[0][name], err_msg=name)
  assert int(hosts[0]['.step']) == STEPS
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(STEPS)]
  assert len(glob.glob(str(workdir / 'events.out.tfevents.*'))) == 1
  assert sorted(os.listdir(workdir / 'images')) == [
      f'{kind}_{STEPS:08d}.png'
      for kind in ('real', 'reconstruction', 'samples')]
  assert os.path.exists(workdir / 'config.json')


def test_distributed_fields_are_validated():
  for fields, message in [
      (dict(num_processes=2), 'num_processes set but distributed=False'),
      (dict(distributed=True, num_processes=0), 'num_processes=0 must be >= 1'),
      (dict(distributed=True, num_processes=2, process_id=2),
       r'process_id=2 must be in \[0, num_processes=2\)'),
      (dict(distributed=True, process_id=-2), 'process_id=-2')]:
    with pytest.raises(ValueError, match=message):
      introvae_jax.validate(tiny_config(**fields))
  introvae_jax.validate(tiny_config(
      distributed=True, coordinator_address='10.0.0.1:1234', num_processes=2,
      process_id=1))


def test_initialize_distributed_passes_only_given_fields(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  train.initialize_distributed(tiny_config())                  # single process
  train.initialize_distributed(tiny_config(distributed=True, process_id=1))
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  train.initialize_distributed(tiny_config())                  # asked by env
  assert calls == [
      dict(coordinator_address=None, num_processes=None, process_id=1),
      dict(coordinator_address=None, num_processes=None, process_id=None)]


# --------------------------------------------------------------------------
# The workers: `python test_multihost.py MODE PORT PROCESS_ID OUT_DIR`.


def _save_state(path, state):
  """A TrainState as .npz, one array per path ('.params_g[...]...')."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      jax.device_get(parallel.local_copy(state)))
  np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def _step_worker(port, process_id, out_dir):
  """3 mesh steps on this process's half of each global batch; process 0
  also runs the jitted single-device step on the whole batches."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # default
  jax.distributed.initialize(coordinator_address=f'localhost:{port}',
                             num_processes=PROCESSES, process_id=process_id)
  assert jax.device_count() == PROCESSES * LOCAL_DEVICES
  config, state = config_for('conv_sync_bn', dtype='float64')
  state = jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating)
      else a, state)
  mesh = parallel.make_mesh()
  mesh_step = introvae_jax.make_train_step(config, mesh=mesh)
  single_step = jax.jit(functools.partial(introvae_jax.train_step,
                                          config=config))
  m_state = parallel.put_replicated(state, mesh)
  batches = [tiny_batch(config, seed=10 + t, dtype=np.float64)
             for t in range(STEPS)]
  rows = config.batch_size // PROCESSES
  for x in batches:
    mine = x[process_id * rows:(process_id + 1) * rows]
    m_state, _ = mesh_step(m_state, parallel.global_batch(mine, mesh))
  for leaf in jax.tree_util.tree_leaves(m_state):  # one copy per local device
    assert not leaf.is_fully_addressable
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    np.testing.assert_array_equal(shards[1], shards[0])
  _save_state(os.path.join(out_dir, f'state_{process_id}.npz'), m_state)
  if process_id == 0:
    for x in batches:
      state, _ = single_step(state, x)
    _save_state(os.path.join(out_dir, 'single.npz'), state)


def _train_worker(port, process_id, workdir):
  """train_and_evaluate with --config.distributed, then a restore."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # default
  config = default_tiny_config(
      image_size=8, channels=(4,), num_train_steps=STEPS, log_every_steps=1,
      checkpoint_every_steps=STEPS, image_every_steps=STEPS, distributed=True,
      coordinator_address=f'localhost:{port}', num_processes=PROCESSES,
      process_id=process_id)
  if process_id:
    def refuse(*args):
      raise AssertionError(f'process {process_id} wrote an image: {args[0]}')
    sampling.save_png = refuse
  final = train.train_and_evaluate(config, workdir)
  mesh = parallel.make_mesh()
  restored = checkpointing.restore(checkpointing.make_manager(workdir), config,
                                   mesh=mesh)
  for leaf in jax.tree_util.tree_leaves(restored):  # global, in place
    assert leaf.sharding == parallel.replicated(mesh)
    assert not leaf.is_fully_addressable
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(parallel.local_copy(restored)),
                         jax.device_get(parallel.local_copy(final)))
  _save_state(os.path.join(workdir, f'state_{process_id}.npz'), final)


if __name__ == '__main__':
  _mode, _port, _process_id, _out = sys.argv[1:]
  {'step': _step_worker, 'train': _train_worker}[_mode](
      int(_port), int(_process_id), _out)
