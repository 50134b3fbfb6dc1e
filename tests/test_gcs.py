"""A gs:// workdir end to end, against a Cloud Storage API served locally.

docs/tpu.md tells TPU-pod users to pass a bucket as --workdir. Here main.py
trains into gs://<bucket>/run on fake-gcs-server (tests/gcs_emulator.py),
is killed (SIGKILL) once its first checkpoint is in the bucket, resumes in a
fresh process whose local scratch (cwd, TMPDIR) is new, and must then match
an uninterrupted run step for step. `introvae_jax.evaluation` and
`introvae_jax.generate` then read runs from the bucket and write their JSON
(into the run) and PNGs (into another gs:// folder) there. Every writer
(Orbax through TensorStore and etils, clu's events through tf.io.gfile,
config.json, images and results through etils) reaches the emulator only if it
really goes through Cloud Storage: a path that slips through `os.path`
lands in a local `gs:/` folder, which the test looks for.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from train_utils import REPO, SCALAR_TAGS, TINY_FLAGS, scalars

STEPS = 6
RUN_FLAGS = ['--config.log_every_steps=1', '--config.checkpoint_every_steps=2',
             '--config.image_every_steps=3']
PNG = b'\x89PNG\r\n\x1a\n'
CHILD_TIMEOUT_S = 300


class _Scratch:
  """A child's local scratch: its cwd and TMPDIR, deleted after it ends."""

  def __init__(self, root, name):
    self.root = str(root / f'scratch_{name}')
    self.cwd = os.path.join(self.root, 'cwd')
    self.tmp = os.path.join(self.root, 'tmp')
    os.makedirs(self.cwd)
    os.makedirs(self.tmp)
    self.log = str(root / f'{name}.log')  # kept, for failure messages

  def local_gs_folders(self):
    """Folders a gs:// path turned into by os.path (abspath, makedirs)."""
    return [os.path.join(self.cwd, n) for n in os.listdir(self.cwd)
            if n.startswith('gs')]

  def tail(self, n=4000):
    with open(self.log, errors='replace') as f:
      return f.read()[-n:]

  def delete(self):
    shutil.rmtree(self.root)


def _env(emulator, cache_dir, scratch):
  env = emulator.child_env()
  env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             TMPDIR=scratch.tmp)  # INTROVAE_CACHE: conftest's
  env.pop('XLA_FLAGS', None)
  return env


def _train_cmd(workdir):
  return [sys.executable, os.path.join(REPO, 'main.py'),
          '--config=' + os.path.join(REPO, 'configs', 'default.py'),
          f'--workdir={workdir}', f'--config.num_train_steps={STEPS}',
          *TINY_FLAGS, *RUN_FLAGS]


def _start(cmd, emulator, cache_dir, scratch):
  log = open(scratch.log, 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(cmd, cwd=scratch.cwd, stdin=subprocess.DEVNULL,
                          stdout=log, stderr=subprocess.STDOUT,
                          env=_env(emulator, cache_dir, scratch))
  log.close()
  return proc


def _finish(proc, scratch, what):
  try:
    proc.wait(timeout=CHILD_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(
        f'{what} timed out after {CHILD_TIMEOUT_S} s:\n{scratch.tail()}')
  assert proc.returncode == 0, (
      f'{what} failed (exit {proc.returncode}):\n{scratch.tail()}')
  assert not scratch.local_gs_folders(), (
      f'{what} wrote a gs:// path to the local disk: '
      f'{scratch.local_gs_folders()}\n{scratch.tail()}')


def _complete_steps(emulator, bucket, run):
  """Steps whose Orbax commit marker is in the bucket."""
  steps = set()
  for name in emulator.list(bucket, f'{run}/checkpoints/'):
    m = re.fullmatch(re.escape(run) + r'/checkpoints/(\d+)/commit_success\.txt',
                     name)
    if m:
      steps.add(int(m.group(1)))
  return sorted(steps)


def _bucket_scalars(emulator, bucket, run, dest):
  """The run's event files, copied out of the bucket and read."""
  os.makedirs(dest)
  for name in emulator.list(bucket, f'{run}/events.out.tfevents.'):
    with open(os.path.join(dest, os.path.basename(name)), 'wb') as f:
      f.write(emulator.read(bucket, name))
  return scalars(dest)


def _wait_for_checkpoint(emulator, bucket, run, proc, scratch):
  deadline = time.time() + CHILD_TIMEOUT_S
  while not _complete_steps(emulator, bucket, run):
    if proc.poll() is not None:
      pytest.fail(f'gs://{bucket}/{run} exited ({proc.returncode}) before its '
                  f'first checkpoint reached the bucket:\n{scratch.tail()}')
    if time.time() > deadline:
      pytest.fail(f'no checkpoint in gs://{bucket}/{run} after '
                  f'{CHILD_TIMEOUT_S} s:\n{scratch.tail()}')
    time.sleep(0.1)


def _first_logged_step(folder, tag='loss_e'):
  """The first step of `tag` in the newest event file (the last process)."""
  newest = sorted(os.listdir(folder))[-1]
  acc = event_accumulator.EventAccumulator(os.path.join(folder, newest),
                                           size_guidance={'tensors': 0})
  acc.Reload()
  return min(ev.step for ev in acc.Tensors(tag))


def _assert_run_outputs(emulator, bucket, run):
  names = set(emulator.list(bucket, f'{run}/'))
  assert _complete_steps(emulator, bucket, run) == [2, 4, 6], sorted(names)
  assert f'{run}/config.json' in names, sorted(names)
  assert b'"num_train_steps": 6' in emulator.read(bucket, f'{run}/config.json')
  assert any(n.startswith(f'{run}/events.out.tfevents.')
             for n in names), sorted(names)
  for kind in ('real', 'reconstruction', 'samples'):
    for step in (3, 6):
      image = f'{run}/images/{kind}_{step:08d}.png'
      assert image in names, sorted(names)
  assert emulator.read(
      bucket, f'{run}/images/samples_00000006.png').startswith(PNG)


@pytest.mark.slow
def test_every_writer_reaches_the_emulator(gcs_emulator, gcs_bucket, tmp_path):  # pylint: disable=redefined-outer-name
  """The emulator setup itself, library by library, in a child process: if
  this fails the environment is wrong; if only the end-to-end test fails,
  the package is."""
  root = f'gs://{gcs_bucket}/probe'
  script = textwrap.dedent(f'''
    import jax, numpy as np, orbax.checkpoint as ocp, tensorflow as tf
    import tensorstore as ts
    from etils import epath
    root = epath.Path({root!r})
    (root / 'a' / 'b').mkdir(parents=True, exist_ok=True)
    (root / 'a' / 'x.txt').write_text('hello')
    assert (root / 'a' / 'x.txt').read_text() == 'hello'
    assert sorted(p.name for p in (root / 'a').iterdir()) == ['b', 'x.txt']
    assert [p.name for p in root.glob('a/*.txt')] == ['x.txt']
    (root / 'a' / 'x.txt').rename(root / 'a' / 'y.txt')
    (root / 'a' / 'y.txt').unlink()
    (root / 'a').rmtree()
    assert not (root / 'a').exists()
    w = tf.summary.create_file_writer(str(root / 'events'))
    with w.as_default():
      tf.summary.scalar('x', 1.5, step=1)
    w.close()
    assert tf.io.gfile.glob(str(root / 'events' / 'events.out.tfevents.*'))
    spec = {{'driver': 'zarr', 'kvstore': {{'driver': 'gcs',
            'bucket': {gcs_bucket!r}, 'path': 'probe/ts/'}}}}
    arr = ts.open(spec, create=True, dtype=ts.float32, shape=[3]).result()
    arr[...] = np.arange(3, dtype=np.float32)
    assert ts.open(spec).result().read().result().tolist() == [0, 1, 2]
    tree = {{'w': jax.numpy.arange(4.0), 'n': 3}}
    options = ocp.CheckpointManagerOptions(max_to_keep=1)
    with ocp.CheckpointManager(str(root / 'ckpt'), options=options) as m:
      m.save(1, args=ocp.args.StandardSave(tree))
      m.save(2, args=ocp.args.StandardSave(tree))
      m.wait_until_finished()
    with ocp.CheckpointManager(str(root / 'ckpt'), options=options) as m:
      assert m.all_steps() == [2], m.all_steps()
      back = m.restore(2, args=ocp.args.StandardRestore(tree))
    assert back['w'].tolist() == [0, 1, 2, 3] and back['n'] == 3
    print('ALL WRITERS OK')
  ''')
  scratch = _Scratch(tmp_path, 'probe')
  env = gcs_emulator.child_env()
  env.update(JAX_PLATFORMS='cpu', TMPDIR=scratch.tmp)
  with open(scratch.log, 'w') as log:
    proc = subprocess.run([sys.executable, '-c', script], cwd=scratch.cwd,
                          env=env, stdout=log,
                          stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S)
  assert proc.returncode == 0 and 'ALL WRITERS OK' in scratch.tail(), (
      scratch.tail())
  assert not scratch.local_gs_folders()
  names = gcs_emulator.list(gcs_bucket, 'probe/')
  assert 'probe/ckpt/2/commit_success.txt' in names, names
  assert 'probe/ts/.zarray' in names, names


@pytest.fixture
def children():
  """Child processes a test starts; any still running at its end is killed."""
  procs = []
  yield procs
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.slow
def test_gs_workdir_train_kill9_resume_evaluate_sample(
    gcs_emulator, gcs_bucket, tmp_path, cache_dir, children):  # pylint: disable=redefined-outer-name
  emulator, bucket = gcs_emulator, gcs_bucket
  repo_gs = os.path.join(REPO, 'gs:')
  repo_had_gs = os.path.exists(repo_gs)

  def start(name, cmd):
    scratch = _Scratch(tmp_path, name)
    children.append(_start(cmd, emulator, cache_dir, scratch))
    return children[-1], scratch

  # The uninterrupted reference run; the run to kill starts once the
  # reference has its first checkpoint, when the shared compilation cache
  # holds the train step (compiling it twice at once costs more than it
  # saves on two cores).
  full, full_scratch = start('full', _train_cmd(f'gs://{bucket}/full'))
  _wait_for_checkpoint(emulator, bucket, 'full', full, full_scratch)
  proc, killed = start('killed', _train_cmd(f'gs://{bucket}/run'))

  # Killed (SIGKILL) once its first checkpoint is complete in the bucket.
  _wait_for_checkpoint(emulator, bucket, 'run', proc, killed)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _complete_steps(emulator, bucket, 'run')
  assert killed_at[-1] < STEPS, f'the run finished before the kill: {killed_at}'
  assert not killed.local_gs_folders(), killed.local_gs_folders()
  killed.delete()  # the resume has the bucket and nothing else

  resumed_proc, resumed = start('resumed', _train_cmd(f'gs://{bucket}/run'))
  _finish(full, full_scratch, 'the uninterrupted gs:// run')
  _assert_run_outputs(emulator, bucket, 'full')
  # Evaluation reads a run from the bucket and writes its JSON into it
  # (the finished reference run, while the resumed one trains).
  evaluate, evaluate_scratch = start('evaluate', [
      sys.executable, '-m', 'introvae_jax.evaluation',
      f'--workdir=gs://{bucket}/full', '--num_images=16'])
  _finish(resumed_proc, resumed, 'the resumed gs:// run')
  _assert_run_outputs(emulator, bucket, 'run')

  # The resumed run's metrics, read from the bucket, equal the reference's.
  want = _bucket_scalars(emulator, bucket, 'full',
                         str(tmp_path / 'events_full'))
  got = _bucket_scalars(emulator, bucket, 'run', str(tmp_path / 'events_run'))
  # It resumed (from the bucket's newest checkpoint), not started over.
  assert _first_logged_step(str(tmp_path / 'events_run')) == killed_at[-1] + 1
  assert SCALAR_TAGS <= set(want), SCALAR_TAGS - set(want)
  assert sorted(want['loss_e']) == list(range(1, STEPS + 1))
  assert sorted(got['loss_e']) == list(range(1, STEPS + 1)), (
      sorted(got['loss_e']))
  assert sorted(want['eval/rec_psnr']) == [3, 6]
  for tag in ('loss_e', 'loss_g', 'kl_rec', 'kl_fake', 'grad_norm_g'):
    for step in range(killed_at[-1] + 1, STEPS + 1):
      np.testing.assert_equal(got[tag][step], want[tag][step],
                              err_msg=f'{tag} at step {step}')
  np.testing.assert_equal(got['eval/rec_psnr'][6], want['eval/rec_psnr'][6])

  # Sampling reads the resumed run from the bucket and writes PNGs to it.
  sample, sample_scratch = start('sample', [
      sys.executable, '-m', 'introvae_jax.generate', f'--workdir=gs://{bucket}/run',
      f'--out=gs://{bucket}/samples', '--num=4', '--interpolation_steps=2'])
  _finish(evaluate, evaluate_scratch,
          'introvae_jax.evaluation on the gs:// run')
  results = json.loads(emulator.read(bucket, 'full/eval_00000006_batch.json'))
  assert results['step'] == STEPS and results['num_images'] == 16, results
  assert np.isfinite(results['rec_psnr']), results
  _finish(sample, sample_scratch, 'introvae_jax.generate on the gs:// run')
  names = emulator.list(bucket, 'samples/')
  for name in ('samples.png', 'reconstructions.png',
               'interpolation_linear.png', 'interpolation_slerp.png',
               'samples/0000.png', 'samples/0003.png'):
    assert f'samples/{name}' in names, names
    assert emulator.read(bucket, f'samples/{name}').startswith(PNG)
  if not repo_had_gs:
    assert not os.path.exists(repo_gs), (
        'a gs:// path was written under the repo')
