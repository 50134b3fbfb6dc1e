"""The training program: main.py end to end, resume, preemption, bad input.

Runs the real program (`main.py` in a child process, or
`train_and_evaluate` in this one) on the built-in offline digits with a tiny
model (16 px, channels (4, 8), hdim 4). Child processes share a persistent
compilation cache so each pays for XLA compilation once.
"""

import glob
import importlib.util
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from introvae_jax import base_config, checkpointing, create_train_state, train
from introvae_jax.errors import WorkdirError

from train_utils import (REPO, SCALAR_TAGS, complete_steps,
                         dir_digest, env, main_cmd, run_main, scalars,
                         tiny_config)


@pytest.fixture(autouse=True)
def _use_cache(cache_dir):
  del cache_dir


def test_main_end_to_end_and_kill9_resume_is_exact(tmp_path, cache_dir):
  """Uninterrupted run vs a run killed with SIGKILL and resumed."""
  flags = ['--config.log_every_steps=1', '--config.checkpoint_every_steps=2',
           '--config.image_every_steps=3']
  full = str(tmp_path / 'full')
  run_main(cache_dir, full, 6, *flags)

  # The program's outputs.
  assert complete_steps(full) == [2, 4, 6]
  values = scalars(full)
  assert SCALAR_TAGS <= set(values), SCALAR_TAGS - set(values)
  assert {'eval/rec_psnr', 'eval/kl_real', 'eval/kl_fake'} <= set(values), sorted(values)
  assert sorted(values['eval/rec_psnr']) == [3, 6]
  assert sorted(values['loss_e']) == [1, 2, 3, 4, 5, 6]
  assert values['vae_phase'][1] == 1.0 and values['vae_phase'][3] == 0.0
  for kind in ('real', 'reconstruction', 'samples'):
    assert os.path.exists(os.path.join(full, 'images', f'{kind}_00000003.png'))
  assert os.path.exists(os.path.join(full, 'config.json'))

  # Killed (SIGKILL) once the step-2 checkpoint is complete, then resumed.
  resumed = str(tmp_path / 'resumed')
  proc = subprocess.Popen(main_cmd(resumed, 6, *flags), cwd=REPO,
                          env=env(cache_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not complete_steps(resumed) and time.time() < deadline:
    if proc.poll() is not None:
      break
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  killed_at = complete_steps(resumed)
  assert killed_at, 'the run ended before its first checkpoint'
  run_main(cache_dir, resumed, 6, *flags)
  again = scalars(resumed)
  for tag in ('loss_e', 'loss_g', 'kl_rec', 'kl_fake', 'grad_norm_g'):
    for step in range(killed_at[-1] + 1, 7):
      np.testing.assert_equal(again[tag][step], values[tag][step],
                              err_msg=f'{tag} at step {step}')


def test_sigterm_saves_a_complete_checkpoint(tmp_path, cache_dir):
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(
      main_cmd(workdir, 100_000, '--config.checkpoint_every_steps=3',
                '--config.log_every_steps=1000', '--config.image_every_steps=1000'),
      cwd=REPO, env=env(cache_dir), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not complete_steps(workdir) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM received' in err
  steps = complete_steps(workdir)
  # The stop saved its own step (not only the periodic multiples of 3).
  state = checkpointing.latest_state(workdir, tiny_config())
  assert int(state.step) == steps[-1]


def test_half_written_checkpoint_is_ignored(tmp_path):
  config = tiny_config(num_train_steps=2, checkpoint_every_steps=2,
                        log_every_steps=1, image_every_steps=100)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  # An interrupted save leaves a temporary folder, or a step without its commit marker.
  ckpt = os.path.join(workdir, 'checkpoints')
  os.makedirs(os.path.join(ckpt, '7.orbax-checkpoint-tmp-123', 'default'))
  with open(os.path.join(ckpt, '7.orbax-checkpoint-tmp-123', 'default', 'x'), 'w') as f:
    f.write('partial')
  manager = checkpointing.make_manager(workdir)
  assert manager.latest_step() == 2
  assert int(checkpointing.restore(manager, config).step) == 2


def test_other_architecture_checkpoint_is_refused_and_kept(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_config(num_train_steps=1, log_every_steps=1,
                        image_every_steps=100)
  train.train_and_evaluate(config, workdir)
  before = dir_digest(os.path.join(workdir, 'checkpoints'))
  other = tiny_config(channels=(4, 16), num_train_steps=2)
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match='different model.*left untouched'):
    train.train_and_evaluate(other, workdir)
  assert dir_digest(os.path.join(workdir, 'checkpoints')) == before


def test_nonfinite_loss_stops_with_step_and_term(tmp_path):
  # An infinite margin makes loss_e infinite from the first adversarial step.
  config = tiny_config(m_plus=float('inf'), num_vae_steps=0, num_train_steps=3,
                        log_every_steps=1, image_every_steps=100)
  with pytest.raises(train.NonFiniteLossError, match=r'step 1: .*loss_e'):
    train.train_and_evaluate(config, str(tmp_path / 'stop'))
  assert not complete_steps(str(tmp_path / 'stop'))


def test_nonfinite_updates_are_skipped_and_counted(tmp_path):
  config = tiny_config(m_plus=float('inf'), num_vae_steps=0, num_train_steps=2,
                        log_every_steps=1, image_every_steps=100,
                        on_nonfinite='skip')
  final = train.train_and_evaluate(config, str(tmp_path / 'skip'))
  initial = create_train_state(config, jax.random.PRNGKey(config.seed))
  assert int(final.step) == 2 and int(final.skipped_steps) == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, final.params_g,
                         initial.params_g)


def test_unknown_config_field_fails_clearly(tmp_path, cache_dir):
  proc = run_main(cache_dir, str(tmp_path / 'run'), 1, '--config.m_plu=3',
                   check=False)
  assert proc.returncode != 0
  assert 'm_plu' in proc.stderr and 'm_plus' in proc.stderr
  c = base_config()
  with pytest.raises(AttributeError, match='weight_recc'):
    c.weight_recc = 1.0


def test_unwritable_workdir_fails_clearly(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(WorkdirError, match='Cannot write to --workdir'):
    train.train_and_evaluate(tiny_config(), str(blocker / 'run'))


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'configs', '[!_]*.py'))),
                         ids=os.path.basename)
def test_every_config_loads_and_builds(path):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  state = checkpointing.abstract_state(config)  # validates, builds, no compute
  leaves = jax.tree_util.tree_leaves(state.params_e)
  assert leaves and all(leaf.dtype == np.float32 for leaf in leaves)
  if config.arch == 'conv':
    assert config.image_size == 4 * 2 ** len(config.channels)
