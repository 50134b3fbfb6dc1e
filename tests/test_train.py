"""The training program: main.py end to end, resume, preemption, bad input.

Runs the real program (`main.py` in a child process, or
`train_and_evaluate` in this one) on the built-in offline digits with a tiny
model (16 px, channels (4, 8), hdim 4). Child processes share a persistent
compilation cache so each pays for XLA compilation once.
"""

import contextlib
import glob
import importlib.util
import json
import logging
import os
import signal
import subprocess
import threading
import time
import types

from absl import logging as absl_logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from introvae_jax import base_config, checkpointing, create_train_state, train
from introvae_jax import step as step_lib
from introvae_jax import stopping
from introvae_jax.errors import WorkdirError

from train_utils import (REPO, SCALAR_TAGS, complete_steps,
                         dir_digest, env, main_cmd, run_main, scalars,
                         tiny_config)


@pytest.fixture(autouse=True)
def _use_cache(cache_dir):
  del cache_dir


@pytest.mark.slow
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
  assert {'eval/rec_psnr', 'eval/kl_real', 'eval/kl_fake'} <= set(values), (
      sorted(values))
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


@pytest.mark.slow
def test_sigterm_saves_a_complete_checkpoint(tmp_path, cache_dir):
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(
      main_cmd(workdir, 100_000, '--config.checkpoint_every_steps=3',
                '--config.log_every_steps=1000',
                '--config.image_every_steps=1000'),
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
  # An interrupted save leaves a temporary folder, or a step without its
  # commit marker.
  ckpt = os.path.join(workdir, 'checkpoints')
  os.makedirs(os.path.join(ckpt, '7.orbax-checkpoint-tmp-123', 'default'))
  with open(os.path.join(ckpt, '7.orbax-checkpoint-tmp-123', 'default', 'x'),
            'w') as f:
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


# A margin and negative weight whose product overflows float32 make loss_e
# infinite from the first adversarial step (validation refuses inf itself).
OVERFLOWING_HINGE = dict(m_plus=1e30, weight_neg=1e10)


def test_nonfinite_loss_stops_with_step_and_term(tmp_path):
  config = tiny_config(**OVERFLOWING_HINGE, num_vae_steps=0, num_train_steps=3,
                        log_every_steps=1, image_every_steps=100)
  with pytest.raises(train.NonFiniteLossError, match=r'step 1: .*loss_e'):
    train.train_and_evaluate(config, str(tmp_path / 'stop'))
  assert not complete_steps(str(tmp_path / 'stop'))


def test_nonfinite_updates_are_skipped_and_counted(tmp_path):
  config = tiny_config(**OVERFLOWING_HINGE, num_vae_steps=0, num_train_steps=2,
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


@pytest.mark.parametrize(
    'path', sorted(glob.glob(os.path.join(REPO, 'configs', '[!_]*.py'))),
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
    assert config.image_size == config.base_size * 2 ** len(config.channels)


# --------------------------------------------------------------------------
# Divergence: a checkpoint is written only from a finite state.

def _overflow_from(monkeypatch, first, last=None):
  """The decoder's Adam takes a learning rate of 1e39 at steps first..last
  (1-based): a real update that overflows float32 while the step's losses,
  computed before it, are still finite."""
  make_optimizers = step_lib.make_optimizers

  def overflowing(config, step=None):
    tx_e, _ = make_optimizers(config, step)
    def lr(count):  # count: updates made before this one
      hit = count + 1 >= first
      if last is not None:
        hit &= count + 1 <= last
      return jnp.where(hit, 1e39, config.lr_g)
    return tx_e, optax.adam(lr, b1=config.adam_b1, b2=config.adam_b2,
                            eps=config.adam_eps)
  monkeypatch.setattr(step_lib, 'make_optimizers', overflowing)


def _assert_checkpoints_finite(workdir, config, steps):
  assert complete_steps(workdir) == steps
  manager = checkpointing.make_manager(workdir, max_to_keep=None,
                                       read_only=True)
  for step in steps:
    state = checkpointing.restore(manager, config, step)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      assert np.isfinite(np.asarray(leaf)).all(), (step, path)


def test_overflow_with_finite_losses_stops_before_saving(tmp_path,
                                                         monkeypatch):
  """on_nonfinite='stop': an update that overflows at step 3 (losses still
  finite) stops the run naming step 3 and the state, and the newest
  checkpoint is step 2's, finite. Before the fix only the losses were
  checked: step 3's NaN weights were saved and called good."""
  _overflow_from(monkeypatch, 3)
  config = tiny_config(num_train_steps=5, checkpoint_every_steps=1,
                       log_every_steps=1, image_every_steps=100, max_to_keep=10)
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.NonFiniteLossError,
                     match=r'at step 3: the updated parameters or optimiser '
                     r'state became NaN/inf.*last good checkpoint \(step 2\)'):
    train.train_and_evaluate(config, workdir)
  _assert_checkpoints_finite(workdir, config, [1, 2])


def test_divergence_at_the_first_step_names_no_checkpoint(tmp_path,
                                                          monkeypatch):
  """Before the fix the message said '(step None)'."""
  _overflow_from(monkeypatch, 1)
  config = tiny_config(num_train_steps=3, checkpoint_every_steps=1,
                       log_every_steps=1, image_every_steps=100)
  with pytest.raises(train.NonFiniteLossError,
                     match='at step 1: .*no checkpoint had been saved yet'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not complete_steps(str(tmp_path / 'run'))


def _poisoned_batch_at(monkeypatch, bad_step):
  """The training step sees a batch scaled by 1e30 at step `bad_step` (its
  reconstruction loss overflows): a one-off non-finite step."""
  compile_step = train.compile_step

  def poisoning(config, mesh, state):
    compiled = compile_step(config, mesh, state)
    def call(state, batch):
      if int(state.step) + 1 == bad_step:
        batch = jax.device_put(batch * 1e30, batch.sharding)
      return compiled(state, batch)
    return call
  monkeypatch.setattr(train, 'compile_step', poisoning)


@pytest.mark.slow  # 80 s; the fast set skips and counts (test above)
def test_skip_keeps_the_state_and_stops_after_consecutive_skips(
    tmp_path, monkeypatch):
  """on_nonfinite='skip': a one-off non-finite step (2) is skipped, the state
  before it kept and the run finishes; an overflowing update that persists
  stops the run after max_consecutive_skips (2) skips. Every checkpoint is
  finite. Before the fix a run with an overflowing update ended with exit 0
  and an all-NaN decoder."""
  config = tiny_config(num_train_steps=3, checkpoint_every_steps=1,
                       log_every_steps=1, image_every_steps=100,
                       on_nonfinite='skip', max_consecutive_skips=2,
                       max_to_keep=10)
  workdir = str(tmp_path / 'run')
  _overflow_from(monkeypatch, 1000)  # the same optimiser structure throughout
  with monkeypatch.context() as patch:
    _poisoned_batch_at(patch, 2)
    final = train.train_and_evaluate(config, workdir)
  assert int(final.step) == 3 and int(final.skipped_steps) == 1
  _assert_checkpoints_finite(workdir, config, [1, 2, 3])
  manager = checkpointing.make_manager(workdir, max_to_keep=None,
                                       read_only=True)
  one, two = (checkpointing.restore(manager, config, s) for s in (1, 2))
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         (one.params_e, one.params_g, one.opt_state_g,
                          one.batch_stats_e),
                         (two.params_e, two.params_g, two.opt_state_g,
                          two.batch_stats_e))

  # Adam's count lags the step by the one skip: its 4th update is step 5's,
  # and a skipped update leaves the count, so it overflows from then on.
  _overflow_from(monkeypatch, 4)
  longer = config.copy_and_resolve_references()
  longer.num_train_steps = 8
  with pytest.raises(train.NonFiniteLossError,
                     match=r'2 consecutive updates \(steps 5 to 6\) were '
                     r'non-finite.*last good checkpoint \(step 5\)'):
    train.train_and_evaluate(longer, workdir)
  # Step 5 was skipped (its state is step 4's, finite) and saved.
  _assert_checkpoints_finite(workdir, config, [1, 2, 3, 4, 5])


# --------------------------------------------------------------------------
# Resume identity, finished runs, stopping during an evaluation.

def test_identity_is_checked_from_the_checkpoint_when_config_json_is_lost(
    tmp_path):
  """Each checkpoint records its run's config: with config.json deleted, a
  resume under another seed and batch size is refused, naming both, and
  nothing is written; the original command resumes and writes config.json
  again. A finished run rerun says it is complete and writes nothing.
  Before the fix the changed run resumed silently and wrote the new values
  as its identity, and a rerun logged 'Resuming' and added an event file."""
  workdir = str(tmp_path / 'run')
  config = tiny_config(num_train_steps=2, checkpoint_every_steps=1,
                       log_every_steps=1, image_every_steps=100)
  train.train_and_evaluate(config, workdir)
  os.remove(os.path.join(workdir, 'config.json'))
  before = dir_digest(workdir)
  recorded, state = checkpointing.load_run(workdir)  # what the tools open
  assert json.loads(recorded.to_json()) == json.loads(config.to_json())
  assert int(state.step) == 2
  changed = tiny_config(num_train_steps=3, seed=7, batch_size=4,
                        checkpoint_every_steps=1, log_every_steps=1,
                        image_every_steps=100)
  with pytest.raises(ValueError, match=r'batch_size: 8 -> 4; seed: 0 -> 7'):
    train.train_and_evaluate(changed, workdir)
  assert dir_digest(workdir) == before

  events = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  with _captured_log() as log:
    state = train.train_and_evaluate(config, workdir)  # 2 of 2: complete
  assert int(state.step) == 2
  assert 'complete: step 2 of 2' in log.text
  assert dir_digest(workdir) == before
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*')) == events

  longer = tiny_config(num_train_steps=3, checkpoint_every_steps=1,
                       log_every_steps=1, image_every_steps=100)
  train.train_and_evaluate(longer, workdir)
  assert complete_steps(workdir)[-1] == 3
  assert checkpointing.configuration.read_json(
      os.path.join(workdir, 'config.json'))['seed'] == 0


def test_a_workdir_without_identity_records_is_checked_against_config_json(
    tmp_path):
  """Checkpoints written by 0.2.0 carry no config record (Orbax's
  custom_metadata is empty): the resume is checked against config.json, as
  0.2.0 did, and refused for a new seed; the same config resumes."""
  workdir = str(tmp_path / 'run')
  base = dict(checkpoint_every_steps=1, log_every_steps=1,
              image_every_steps=100)
  train.train_and_evaluate(tiny_config(num_train_steps=2, **base), workdir)
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '*',
                                     '_CHECKPOINT_METADATA')):
    with open(path) as f:
      metadata = json.load(f)
    assert checkpointing.CONFIG_KEY in metadata['custom_metadata']
    metadata['custom_metadata'] = {}
    with open(path, 'w') as f:
      json.dump(metadata, f)
  with pytest.raises(ValueError, match=r'seed: 0 -> 3'):
    train.train_and_evaluate(tiny_config(num_train_steps=3, seed=3, **base),
                             workdir)
  train.train_and_evaluate(tiny_config(num_train_steps=3, **base), workdir)
  assert complete_steps(workdir)[-1] == 3


def test_a_diverged_allowed_change_does_not_become_the_identity(tmp_path):
  """A resume with --config.allow_changes=m_plus,weight_neg whose new values
  make the loss infinite stops before any checkpoint under them: config.json and
  the checkpoints' record keep the old margin, so the original command still
  resumes. Before the fix config.json recorded the new margin at the start and
  the original command was refused from then on."""
  workdir = str(tmp_path / 'run')
  base = dict(checkpoint_every_steps=1, log_every_steps=1,
              image_every_steps=100)
  original = tiny_config(num_train_steps=2, **base)
  train.train_and_evaluate(original, workdir)
  diverging = tiny_config(num_train_steps=4, **OVERFLOWING_HINGE,
                          allow_changes='m_plus,weight_neg', **base)
  with pytest.raises(train.NonFiniteLossError, match='at step 3'):
    train.train_and_evaluate(diverging, workdir)
  assert checkpointing.configuration.read_json(
      os.path.join(workdir, 'config.json'))['m_plus'] == 5.0
  assert not glob.glob(os.path.join(workdir, 'config.*.json'))
  resumed = tiny_config(num_train_steps=3, **base)
  train.train_and_evaluate(resumed, workdir)
  assert complete_steps(workdir)[-1] == 3


def test_stop_signal_during_evaluation_saves_within_seconds(tmp_path,
                                                            monkeypatch):
  """SIGTERM while an in-training evaluation runs abandons the evaluation,
  saves the step's checkpoint and returns within 10 s; the resumed run
  evaluates that step. Before the fix the loop waited for the whole
  evaluation (28 s on the default recipe) first.
  The stand-in evaluation is a 60 s Python loop, as the real one is many
  short device calls."""
  started = []

  def slow_evaluator(config):
    del config
    def evaluate(state):
      del state
      started.append(time.monotonic())
      threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
      for _ in range(600):
        time.sleep(0.1)
      return {'eval/never': 0.0}
    return evaluate

  monkeypatch.setattr(train, '_make_evaluator', slow_evaluator)
  workdir = str(tmp_path / 'run')
  config = tiny_config(num_train_steps=4, eval_every_steps=2,
                       checkpoint_every_steps=4, log_every_steps=1,
                       image_every_steps=100)
  signals = stopping.StopSignals()
  state = train.train_and_evaluate(config, workdir, signals=signals)
  assert time.monotonic() - started[0] < 10
  assert signals.stopped == signal.SIGTERM
  assert int(state.step) == 2 and complete_steps(workdir) == [2]
  assert 'eval/never' not in scalars(workdir)

  # The resumed run evaluates step 2 first (once), then goes on.
  monkeypatch.setattr(train, '_make_evaluator', lambda config: (
      lambda state: {'eval/step': float(state.step)}))
  train.train_and_evaluate(config, workdir)
  assert scalars(workdir)['eval/step'] == {2: 2.0, 4: 4.0}


def test_a_stop_during_evaluation_survives_a_library_rewrapping_it():
  """Was (CI): Ctrl-C landed inside JAX's comparison of a jit's static
  arguments, which raised a ValueError of its own, and the run died with
  status 1 instead of saving."""
  def evaluate():
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(30)  # the handler raises from here
    except Exception as e:  # what JAX does with an error it did not expect
      raise ValueError('static arguments should be comparable') from e

  with stopping.StopSignals() as signals:
    started = time.monotonic()
    assert signals.call_interruptible(evaluate) is None
    assert time.monotonic() - started < 10
    assert signals.received == signal.SIGINT
  # An error of the call's own, with no signal, still reaches the caller.
  with stopping.StopSignals() as signals:
    with pytest.raises(ZeroDivisionError):
      signals.call_interruptible(lambda: 1 / 0)


def _stop_with_a_backlog(workdir, monkeypatch, in_flight, signal_at=12):
  """Trains the tiny digits model at batch 64 (a step takes many times the
  host's dispatch time), sends this process SIGTERM right after step
  `signal_at` is dispatched, and returns (steps not yet complete at the
  signal, for each step counted by the progress report whether it had
  finished, the stopped run's signals, its state)."""
  dispatched, at_signal = [], []
  compile_step = train.compile_step

  def counted(config, mesh, state):
    step = compile_step(config, mesh, state)
    def run(state, batch):
      state, metrics = step(state, batch)
      dispatched.append(metrics['loss_e'])
      if len(dispatched) == signal_at:
        at_signal.append(sum(not m.is_ready() for m in dispatched))
        os.kill(os.getpid(), signal.SIGTERM)
      return state, metrics
    return run

  class Progress(train.periodic_actions.ReportProgress):
    def __call__(self, step, t=None):  # was this step complete when counted?
      reported.append(dispatched[step - 1].is_ready())
      return super().__call__(step, t)

  reported = []
  monkeypatch.setattr(train, 'compile_step', counted)
  monkeypatch.setattr(train.periodic_actions, 'ReportProgress', Progress)
  config = tiny_config(batch_size=64,
                       num_train_steps=1000, log_every_steps=1000,
                       image_every_steps=1000, checkpoint_every_steps=1000,
                       max_steps_in_flight=in_flight)
  signals = stopping.StopSignals()
  state = train.train_and_evaluate(config, workdir, signals=signals)
  return at_signal[0], reported, signals, state


def test_sigterm_waits_for_at_most_max_steps_in_flight_steps(tmp_path,
                                                             monkeypatch):
  """Was: the loop only waited for the device at a flush, so between flushes
  the host dispatched up to `log_every_steps` steps ahead, and a SIGTERM
  waited for all of them before its save (46 s on a loaded 2-core host, where
  Cloud TPU and spot VMs give 30 s). The loop before the bound (any
  `max_steps_in_flight` >= log_every_steps) is run first, to show that this
  test's signal meets a backlog; at the default 2, at most 2 steps are still
  to run when the signal arrives, the saved step is the signal's, and the
  progress report (steps/s, ETA) has counted only steps that had finished."""
  unbounded, _, _, _ = _stop_with_a_backlog(str(tmp_path / 'before'),
                                            monkeypatch, in_flight=1000)
  assert unbounded > 5, f'no backlog to test: {unbounded} steps in flight'

  workdir = str(tmp_path / 'run')
  pending, reported, signals, state = _stop_with_a_backlog(
      workdir, monkeypatch, in_flight=2)
  assert pending <= 2, f'{pending} steps in flight at the signal'
  # steps/s and the ETA count finished steps (the loop before counted each
  # step as it was dispatched).
  assert reported == [True] * 12
  assert signals.stopped == signal.SIGTERM
  assert int(state.step) == 12 and complete_steps(workdir) == [12]
  saved = checkpointing.latest_state(workdir, tiny_config(
      batch_size=64))
  assert all(np.isfinite(np.asarray(a)).all()
             for a in jax.tree_util.tree_leaves(saved))


def test_stop_before_the_first_step_saves_nothing_and_returns(tmp_path,
                                                              monkeypatch):
  """A stop signal during start-up (here: while the step compiles) is kept
  as a flag, and the run returns before step 1 without writing a checkpoint
  (no step has run; rerunning the command starts the run), where it used to
  kill the process."""
  compile_step = train.compile_step

  def signalled(config, mesh, state):
    os.kill(os.getpid(), signal.SIGTERM)
    return compile_step(config, mesh, state)

  monkeypatch.setattr(train, 'compile_step', signalled)
  workdir = str(tmp_path / 'run')
  signals = stopping.StopSignals()
  state = train.train_and_evaluate(tiny_config(num_train_steps=3), workdir,
                                   signals=signals)
  assert signals.stopped == signal.SIGTERM and int(state.step) == 0
  assert complete_steps(workdir) == []
  monkeypatch.setattr(train, 'compile_step', compile_step)
  train.train_and_evaluate(tiny_config(num_train_steps=3), workdir)
  assert complete_steps(workdir) == [3]


@contextlib.contextmanager
def _captured_log():
  """absl INFO lines logged inside the block, as `.text`."""
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  logger = absl_logging.get_absl_logger()
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  result = types.SimpleNamespace(text='')
  try:
    yield result
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
    result.text = '\n'.join(records)


class _CompileLog(logging.Handler):
  """Collects JAX's 'Compiling jit(<name>)' log lines (jax_log_compiles)."""

  def __init__(self):
    super().__init__()
    self.names = []

  def emit(self, record):
    text = record.getMessage()
    if text.startswith('Compiling jit('):
      self.names.append(text[len('Compiling jit('):].split(')')[0])


def test_the_loop_runs_the_step_compiled_before_training(tmp_path):
  config = tiny_config(num_train_steps=3, log_every_steps=1,
                       image_every_steps=100, checkpoint_every_steps=100)
  log = _CompileLog()
  logger = logging.getLogger('jax._src.interpreters.pxla')
  logger.addHandler(log)
  try:
    with jax.log_compiles(True):
      final = train.train_and_evaluate(config, str(tmp_path / 'run'))
  finally:
    logger.removeHandler(log)
  assert int(final.step) == 3
  # Compiled once, before the first batch, and that executable ran 3 steps.
  assert log.names.count('mesh_step') == 1, log.names


def test_out_of_memory_at_compile_is_one_line_and_keeps_checkpoints(
    tmp_path, monkeypatch):
  config = tiny_config(num_train_steps=2, log_every_steps=1,
                       image_every_steps=100, checkpoint_every_steps=1)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  before = dir_digest(os.path.join(workdir, 'checkpoints'))
  # XLA:TPU's compile-time error text (ffhq1024 on v5e, 3 images per chip).
  text = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of '
          'memory in memory space hbm. Used 15.91G of 15.75G hbm. Exceeded '
          'hbm capacity by 164.5M.\n\nTotal hbm usage >= 16.16G: ...')

  def compile_fails(self, *args, **kwargs):
    raise jax.errors.JaxRuntimeError(text)

  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_fails)
  with pytest.raises(train.UserError) as e:
    train.train_and_evaluate(tiny_config(
        num_train_steps=4, log_every_steps=1, image_every_steps=100,
        checkpoint_every_steps=1), workdir)
  message = str(e.value)
  assert '\n' not in message
  assert 'needs 15.91G of 15.75G HBM' in message and 'remat=True' in message
  assert dir_digest(os.path.join(workdir, 'checkpoints')) == before
