"""Nothing lost, nothing silent: damaged checkpoints, run identity, signals,
one writer per workdir, TensorBoard after resumes, float64, a full disk.

Each test first reproduces the failure the landed code had (described in its
docstring), on the tiny offline-digits model of `train_utils`.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from introvae_jax import checkpointing, configuration, train
from introvae_jax.errors import ConfigError, WorkdirError

from train_utils import (REPO, complete_steps, dir_digest, env,
                         main_cmd, per_file_steps, run_main, start_main,
                         tensorboard_scalars, tiny_config, wait_for)

QUIET = dict(log_every_steps=1, image_every_steps=1000)
TIMING_TAGS = {'steps_per_sec', 'uptime'}


@pytest.fixture(autouse=True)
def _use_cache(cache_dir):
  del cache_dir


def _train(workdir, steps, **overrides):
  config = tiny_config(num_train_steps=steps, **{
      **QUIET, 'checkpoint_every_steps': 1, 'max_to_keep': 5, **overrides})
  return train.train_and_evaluate(config, str(workdir))


def _largest_file(folder):
  files = [os.path.join(root, f) for root, _, names in os.walk(folder)
           for f in names]
  return max(files, key=os.path.getsize)


# --- 1. damaged checkpoints ------------------------------------------------

def test_damaged_checkpoints_are_skipped_moved_aside_and_run_resumes(tmp_path):
  """Was: a truncated data file gave a raw TensorStore OUT_OF_RANGE
  traceback, and a missing _METADATA the wrong "different model" diagnosis;
  the intact older checkpoints were never used."""
  workdir = tmp_path / 'run'
  _train(workdir, 3)
  ckpt = workdir / 'checkpoints'
  with open(_largest_file(ckpt / '3' / 'default'), 'r+b') as f:
    f.truncate(100)
  os.remove(ckpt / '2' / 'default' / '_METADATA')
  damaged_before = {s: dir_digest(ckpt / s) for s in ('2', '3')}

  # Read-only tools skip them too, and move nothing.
  config = tiny_config()
  state = checkpointing.latest_state(str(workdir), config)
  assert int(state.step) == 1 and sorted(os.listdir(ckpt)) == ['1', '2', '3']

  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match='step 2: its metadata'):
    checkpointing.restore(checkpointing.make_manager(str(workdir)), config,
                          step=2)

  final = _train(workdir, 4)
  assert int(final.step) == 4
  aside = workdir / checkpointing.DAMAGED_DIR
  moved = sorted(os.listdir(aside))
  assert [m.split('.')[0] for m in moved] == ['2', '3'], moved
  for name in moved:  # moved intact, byte for byte
    assert dir_digest(aside / name) == damaged_before[name.split('.')[0]]
  assert complete_steps(str(workdir)) == [1, 2, 3, 4]  # 2-4 written again


def test_no_restorable_checkpoint_is_one_clear_error_and_changes_nothing(
    tmp_path):
  workdir = tmp_path / 'run'
  _train(workdir, 2)
  for step in ('1', '2'):
    os.remove(workdir / 'checkpoints' / step / 'default' / '_METADATA')
  before = dir_digest(workdir)
  with pytest.raises(checkpointing.DamagedCheckpointError) as e:
    _train(workdir, 3)
  message = str(e.value)
  assert str(workdir) in message and 'step 1' in message and 'step 2' in message
  assert 'metadata' in message and 'different model' not in message
  assert 'afresh' in message  # says what to do
  assert dir_digest(workdir) == before


# --- 2, 3. run identity ------------------------------------------------------

def test_refused_resume_writes_nothing_and_lists_every_changed_field(tmp_path):
  """Was: config.json was overwritten before the checkpoint check, and a
  resume on another data set, batch size or objective went ahead silently."""
  workdir = tmp_path / 'run'
  _train(workdir, 1)
  before = dir_digest(workdir)
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match='hdim'):
    _train(workdir, 2, hdim=8, allow_changes='hdim')
  with pytest.raises(ConfigError) as e:
    _train(workdir, 2, dataset='faces_offline', batch_size=4, m_plus=7.0)
  message = str(e.value)
  for field in ('dataset', 'batch_size', 'm_plus'):
    assert field in message
  assert "'mnist_offline' -> 'faces_offline'" in message
  assert '--config.allow_changes=batch_size,dataset,m_plus' in message
  assert dir_digest(workdir) == before  # config.json, events, checkpoints


def test_allowed_change_is_logged_and_the_old_config_kept(tmp_path, caplog):
  workdir = tmp_path / 'run'
  _train(workdir, 1)
  old = json.loads((workdir / 'config.json').read_text())
  _train(workdir, 2, m_plus=7.0, allow_changes='m_plus', log_every_steps=2)
  assert json.loads((workdir / 'config.1.json').read_text()) == old
  new = json.loads((workdir / 'config.json').read_text())
  assert new['m_plus'] == 7.0 and old['m_plus'] == 5.0
  assert any('m_plus changed from 5.0 to 7.0' in r.getMessage()
             for r in caplog.records)


def test_identity_and_free_fields_partition_the_schema():
  config = configuration.base_config()
  free = configuration.FREE_ON_RESUME
  assert free <= set(config)
  for field in ('dataset', 'data_dir', 'image_size', 'image_channels',
                'channels', 'hdim', 'arch', 'm_plus', 'weight_rec',
                'weight_kl', 'weight_neg', 'num_vae_steps', 'vae_weight_rec',
                'vae_weight_kl', 'lr_e', 'lr_g',
                'batch_size', 'mode', 'dtype', 'seed', 'random_flip',
                'shuffle_buffer', 'eval_split_fraction'):
    assert field not in free, field
  stored = json.loads(config.to_json_best_effort())
  changed = config.copy_and_resolve_references()
  for field in sorted(free - {'allow_changes'}):
    value = changed[field]
    changed[field] = (not value if isinstance(value, bool) else
                      value + 1 if isinstance(value, (int, float)) else
                      value + 'x')
  assert configuration.check_resume(stored, changed, 'w') == []
  changed.seed = 1
  with pytest.raises(ConfigError, match=r'seed: 0 -> 1'):
    configuration.check_resume(stored, changed, 'w')
  changed.allow_changes = 'seed'
  assert configuration.check_resume(stored, changed, 'w') == [('seed', 0, 1)]
  config.allow_changes = 'seed,sede'
  with pytest.raises(ConfigError, match=r"allow_changes.*\['sede'\]"):
    configuration.validate(config)


# --- 5, 6, 7. signals, one writer, TensorBoard after kills -------------------

KILL_FLAGS = ['--config.log_every_steps=1',
              '--config.checkpoint_every_steps=50',
              '--config.image_every_steps=1000']


@pytest.mark.slow
def test_kills_and_ctrl_c_lose_nothing_and_tensorboard_has_one_value_per_step(
    tmp_path, cache_dir):
  """Was: Ctrl-C gave a KeyboardInterrupt traceback and lost the steps since
  the last checkpoint; after resumes TensorBoard files held the steps between
  the last checkpoint and each kill twice."""
  steps = 200
  full = str(tmp_path / 'full')
  run_main(cache_dir, full, steps, *KILL_FLAGS)
  expected = tensorboard_scalars(full)

  workdir = str(tmp_path / 'run')
  # Kill -9 soon after the first checkpoint: the steps after it are orphaned.
  proc = start_main(cache_dir, workdir, steps, *KILL_FLAGS)
  wait_for(lambda: complete_steps(workdir), proc, what='the first checkpoint')
  time.sleep(0.3)
  proc.kill()
  proc.wait()
  killed_at = complete_steps(workdir)[-1]
  logged = max(s for file_steps in per_file_steps(workdir) for s in file_steps)
  assert logged > killed_at, 'the kill left no orphaned step to test'

  # The dead process's lock is gone. Ctrl-C (a real SIGINT) mid-run saves the
  # current step and exits with 130, without a traceback.
  proc = start_main(cache_dir, workdir, steps, *KILL_FLAGS,
                    stderr=subprocess.PIPE)
  wait_for(lambda: complete_steps(workdir)[-1] > killed_at, proc,
           what='a checkpoint after the resume')
  time.sleep(0.3)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
  assert 'SIGINT received' in err and 'Traceback' not in err
  interrupted_at = complete_steps(workdir)[-1]
  assert interrupted_at % 50 and interrupted_at < steps, interrupted_at

  run_main(cache_dir, workdir, steps, *KILL_FLAGS)
  assert complete_steps(workdir)[-1] == steps

  # Each step once in the files, and TensorBoard's readers (the legacy one
  # and the server's) report the uninterrupted run's values.
  seen = [s for file_steps in per_file_steps(workdir) for s in file_steps]
  assert sorted(seen) == list(range(1, steps + 1))
  for server in (False, True):
    got = tensorboard_scalars(workdir, server)
    assert set(got) == set(expected)
    for tag, values in expected.items():
      got_steps = [s for s, _ in got[tag]]
      assert got_steps == sorted(set(got_steps)), tag
      if tag in TIMING_TAGS:  # a process reports its rate from its 2nd step
        continue
      assert got_steps == [s for s, _ in values], tag
      np.testing.assert_array_equal([v for _, v in got[tag]],
                                    [v for _, v in values], err_msg=tag)


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_running_one(tmp_path, cache_dir):
  """Was: a second process on the same workdir ran, and one of the two died
  on the other's temporary checkpoint folder."""
  workdir = str(tmp_path / 'run')
  proc = start_main(cache_dir, workdir, 1_000_000, *KILL_FLAGS)
  wait_for(lambda: complete_steps(workdir), proc, what='the first checkpoint')
  second = subprocess.run(main_cmd(workdir, 10, *KILL_FLAGS), cwd=REPO,
                          env=env(cache_dir), capture_output=True, text=True,
                          timeout=300)
  assert proc.poll() is None, 'the first run ended before the second started'
  assert second.returncode == 2, second.stderr[-2000:]
  last_line = second.stderr.strip().splitlines()[-1]
  assert 'in use by another training process' in last_line
  assert f'pid {proc.pid}' in last_line and 'Traceback' not in second.stderr
  proc.kill()
  proc.wait()


def test_second_signal_aborts_at_once():
  """The first SIGINT only asks the loop to save and stop; a second one (a
  user pressing Ctrl-C again) kills the process at once."""
  snippet = textwrap.dedent("""
      import os, signal, time
      from introvae_jax import stopping
      with stopping.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs between bytecodes
        assert signals.received == signal.SIGINT
        print('saving', flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
      print('not aborted', flush=True)
  """)
  proc = subprocess.run([sys.executable, '-c', snippet], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.stdout.split() == ['saving'], proc.stdout + proc.stderr[-2000:]
  assert proc.returncode == -signal.SIGINT


# --- 8 (main.py), 11. user errors and float64 ---------------------------------

@pytest.mark.parametrize('flags, names', [
    (['--config.m_plu=3'], ['--config.m_plu', 'm_plus']),
    (['--config=configs/nonexistent.py'], ['--config', 'nonexistent.py']),
    (['--config.image_size=20'], ['image_size=20']),
    (['--config.batch_size=7'], ['batch_size=7', '2 devices']),
], ids=['unknown-field', 'missing-config-file', 'invalid-value',
        'batch-vs-devices'])
def test_main_user_errors_are_one_line_exit_2(tmp_path, flags, names,
                                              cache_dir):
  cmd = main_cmd(str(tmp_path / 'run'), 1) + flags
  child_env = dict(env(cache_dir),
                   XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.run(cmd, cwd=REPO, env=child_env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if 'error:' in l]
  assert len(errors) == 1, proc.stderr[-3000:]
  for name in names:
    assert name in errors[0], errors[0]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_float64_without_x64_is_refused_in_the_library():
  """Was: dtype='float64' silently computed in float32 without
  JAX_ENABLE_X64."""
  assert not jax.config.jax_enable_x64
  with pytest.raises(ConfigError, match='JAX_ENABLE_X64=1'):
    configuration.validate(tiny_config(dtype='float64'))


def test_main_enables_x64_for_float64(tmp_path):
  """main.py turns 64-bit JAX on before any array exists (checked by the
  training call it makes: a fresh float array is float64, and the model's
  parameters are)."""
  snippet = textwrap.dedent("""
      import sys
      import jax, jax.numpy as jnp
      from absl import app
      import main
      from introvae_jax import checkpointing, train
      def fake_train(config, workdir, signals=None):
        state = checkpointing.abstract_state(config)
        dtypes = {str(l.dtype)
                  for l in jax.tree_util.tree_leaves(state.params_e)}
        print('x64', jax.config.jax_enable_x64, jnp.zeros(1).dtype,
              sorted(dtypes))
      train.train_and_evaluate = fake_train
      app.run(main.main, argv=sys.argv)
  """)
  proc = subprocess.run(
      [sys.executable, '-c', snippet] + main_cmd(str(tmp_path / 'run'), 1)[2:]
      + ['--config.dtype=float64'], cwd=REPO, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "x64 True float64 ['float64']" in proc.stdout, proc.stdout


# --- a full disk -------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
  """A 4 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs',
                         str(mount)], capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({proc.stderr.strip()}); the '
                'full-disk case needs root')
  yield mount
  subprocess.run(['umount', '-l', str(mount)], check=False)


def _fill(folder, leave_bytes):
  """Fills the file system of `folder` until `leave_bytes` are free."""
  filler = os.path.join(folder, 'filler')
  with open(filler, 'wb') as f:
    try:
      while True:
        free = shutil.disk_usage(folder).free
        if free <= leave_bytes:
          break
        f.write(b'\0' * min(1 << 16, free - leave_bytes))
        f.flush()
    except OSError as e:
      assert e.errno == errno.ENOSPC
  return filler


def test_full_disk_during_a_checkpoint_keeps_the_previous_ones(tiny_disk):
  workdir = tiny_disk / 'run'
  _train(workdir, 2)
  before = {s: dir_digest(workdir / 'checkpoints' / s) for s in ('1', '2')}
  _fill(tiny_disk, leave_bytes=96 << 10)  # room for logs, not a checkpoint
  with pytest.raises(WorkdirError,
                     match=r'No space left.*steps \[1, 2\].*intact'):
    _train(workdir, 4, max_to_keep=2)
  for step, digest in before.items():
    assert dir_digest(workdir / 'checkpoints' / step) == digest
  os.remove(tiny_disk / 'filler')
  assert int(checkpointing.latest_state(str(workdir), tiny_config()).step) == 2
  assert int(_train(workdir, 4).step) == 4
