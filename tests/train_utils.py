"""Helpers for tests that run the training program (main.py or
`train_and_evaluate`) on the built-in offline digits with a tiny model
(16 px, channels (4, 8), hdim 4).

Use them with conftest's module-scoped `cache_dir` fixture: one persistent
compilation cache for a test module and its child processes, so each pays
for XLA compilation once.
"""

import glob
import hashlib
import importlib.util
import os
import subprocess
import sys
import time

import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import plugin_event_accumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ['--config.image_size=16', '--config.channels=(4,8)',
              '--config.hdim=4', '--config.batch_size=8',
              '--config.num_image_samples=4', '--config.num_vae_steps=2',
              '--config.m_plus=5.0', '--config.shuffle_buffer=64',
              '--config.eval_every_steps=3', '--config.eval_num_images=16',
              '--config.eval_split_fraction=0.2']
SCALAR_TAGS = {'loss_rec', 'kl_real', 'kl_rec', 'kl_fake', 'kl_rec_g',
               'kl_fake_g', 'loss_e', 'loss_g', 'grad_norm_e', 'grad_norm_g',
               'mu_mean', 'logvar_mean', 'vae_phase', 'steps_per_sec'}


def env(cache_dir):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO)  # INTROVAE_CACHE: conftest's
  env.pop('XLA_FLAGS', None)
  return env


def main_cmd(workdir, steps, *extra):
  return [sys.executable, os.path.join(REPO, 'main.py'),
          '--config=' + os.path.join(REPO, 'configs', 'default.py'),
          f'--workdir={workdir}', f'--config.num_train_steps={steps}',
          *TINY_FLAGS, *extra]


def run_main(cache_dir, workdir, steps, *extra, check=True):
  proc = subprocess.run(main_cmd(workdir, steps, *extra), cwd=REPO,
                        env=env(cache_dir), capture_output=True, text=True,
                        timeout=600)
  if check and proc.returncode:
    raise AssertionError(f'main.py failed:\n{proc.stderr[-4000:]}')
  return proc


def scalars(workdir):
  """{tag: {step: value}} from every event file (later files win)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    acc = event_accumulator.EventAccumulator(path, size_guidance={'tensors': 0})
    acc.Reload()
    for tag in acc.Tags()['tensors']:
      for ev in acc.Tensors(tag):
        value = tf.make_ndarray(ev.tensor_proto)
        if value.ndim == 0:  # images are tensors too
          out.setdefault(tag, {})[ev.step] = float(value)
  return out


def complete_steps(workdir):
  """Steps whose checkpoint is finalised (Orbax's temporary folders, which
  can hold commit_success.txt just before their rename, are not)."""
  names = (os.path.basename(os.path.dirname(p)) for p in glob.glob(
      os.path.join(workdir, 'checkpoints', '*', 'commit_success.txt')))
  return sorted(int(name) for name in names if name.isdigit())


def tiny_config(**overrides):
  spec = importlib.util.spec_from_file_location(
      'default_cfg', os.path.join(REPO, 'configs', 'default.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.image_size, c.channels, c.hdim, c.batch_size = 16, (4, 8), 4, 8
  c.num_image_samples, c.num_vae_steps, c.m_plus = 4, 2, 5.0
  c.shuffle_buffer, c.eval_every_steps = 64, 0
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def dir_digest(path):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      with open(os.path.join(root, name), 'rb') as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


def wait_for(predicate, proc=None, timeout=300.0, what='the condition'):
  """Polls `predicate` until true; fails if `proc` exits or time runs out."""
  deadline = time.time() + timeout
  while not predicate():
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f'the process exited (status {proc.returncode}) '
                           f'before {what}')
    if time.time() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.05)


def start_main(cache_dir, workdir, steps, *extra, **popen):
  """main.py as a child process (stdout/stderr to DEVNULL unless given)."""
  popen.setdefault('stdout', subprocess.DEVNULL)
  popen.setdefault('stderr', subprocess.DEVNULL)
  return subprocess.Popen(main_cmd(workdir, steps, *extra), cwd=REPO,
                          env=env(cache_dir), text=True, **popen)


def tensorboard_scalars(workdir, server=False):
  """{tag: [(step, value), ...]} as TensorBoard's reader reports the whole
  workdir: the legacy `event_accumulator`, or (`server`) the
  `plugin_event_accumulator` that the TensorBoard server uses."""
  module = plugin_event_accumulator if server else event_accumulator
  acc = module.EventAccumulator(workdir, size_guidance={'tensors': 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()['tensors']:
    for ev in acc.Tensors(tag):
      value = tf.make_ndarray(ev.tensor_proto)
      if value.ndim == 0:
        out.setdefault(tag, []).append((ev.step, float(value)))
  return out


def per_file_steps(workdir, tag='loss_e'):
  """The steps of `tag` in each event file, read file by file (no purge)."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    acc = event_accumulator.EventAccumulator(path, size_guidance={'tensors': 0})
    acc.Reload()
    if tag in acc.Tags()['tensors']:
      out.append([ev.step for ev in acc.Tensors(tag)])
  return out
