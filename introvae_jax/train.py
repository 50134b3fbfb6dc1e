"""The training program: where data, step, checkpoints and writers meet.

`train_and_evaluate(config, workdir)` trains (or resumes) a run. It writes
`<workdir>/config.json`, TensorBoard events and log lines for every metric,
image grids (TensorBoard and `<workdir>/images/*.png`) and Orbax checkpoints
under `<workdir>/checkpoints/`. SIGTERM (preemption) saves and returns.

Multi-process runs (`config.distributed`) run it in every process, each
feeding its share of the global batch; only process 0 writes `config.json`,
events and images, and every process takes part in each checkpoint.
"""

import os
import signal
import sys
from typing import Dict, List, Tuple

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import jax
import numpy as np
import tqdm

from introvae_jax import checkpointing
from introvae_jax import evaluation
from introvae_jax import input_pipeline
from introvae_jax import sampling
from introvae_jax import step as step_lib
from introvae_jax.configuration import check_batch_divides, validate


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or infinite (config.on_nonfinite='stop')."""


def initialize_distributed(config) -> None:
  """Joins the job's other processes; call it before any other JAX use.

  Runs when `config.distributed` is set or JAX_COORDINATOR_ADDRESS is; fields
  left '' / -1 go to JAX, which detects them on TPU pods, SLURM and Open MPI.
  A no-op otherwise, and when already initialised.
  """
  if not (config.distributed or os.environ.get('JAX_COORDINATOR_ADDRESS')):
    return
  if not jax.distributed.is_initialized():
    given = lambda value: None if value in ('', -1) else value
    jax.distributed.initialize(
        coordinator_address=given(config.coordinator_address),
        num_processes=given(config.num_processes),
        process_id=given(config.process_id))
  logging.info('Process %d of %d, with %d of the %d devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def _prepare_workdir(workdir: str) -> None:
  """Creates the workdir (local, or gs:// through etils.epath) and checks it
  is writable."""
  try:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: hosts may share the workdir.
    probe = path / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise PermissionError(
        f'Cannot write to --workdir={workdir} ({e.strerror or e}); pass a '
        'directory you can write to.') from e


def _check_finite(history: List[Tuple[int, Dict]], last_good) -> None:
  """Raises NonFiniteLossError naming the first bad step and its terms."""
  for step, metrics in history:
    if metrics['finite'] < 1:
      bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
      raise NonFiniteLossError(
          f'Non-finite loss at step {step}: {", ".join(bad) or "loss"} became '
          f'NaN/inf. Training stopped; the last good checkpoint (step '
          f'{last_good}) is kept. Lower lr_e/lr_g or weight_rec, or set '
          '--config.on_nonfinite=skip to skip such updates.')


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      # All processes must stop at the same step: JAX's preemption service
      # catches SIGTERM there, and `manager.reached_preemption` agrees a step.
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler can be installed.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and exiting.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _write_images(writer, workdir, step, state, reals, z_fixed, config):
  """Real images, their reconstructions and samples of fixed prior noise."""
  grids = {
      'real': sampling.image_grid(reals),
      'reconstruction': sampling.image_grid(
          sampling.reconstruct(state, reals, config)),
      'samples': sampling.image_grid(sampling.decode(state, z_fixed, config)),
  }
  writer.write_images(step, {k: v[None] for k, v in grids.items()})
  for name, grid in grids.items():
    sampling.save_png(
        os.path.join(workdir, 'images', f'{name}_{step:08d}.png'), grid)


def _make_evaluator(config, writer):
  """evaluate(step, state): metrics of `evaluation.evaluate_model` on fixed
  (held-out when configured) images, written as eval/<name> scalars."""
  reals = input_pipeline.eval_images(config, config.eval_num_images)
  extractors, real_features = evaluation.feature_extractors_for(
      config, reals, inception_path=config.fid_weights or None,
      classifier_path=config.digit_classifier or None, log=logging.info)

  def evaluate(step, state):
    metrics = evaluation.evaluate_model(
        state, config, reals, jax.random.PRNGKey(config.seed + 2),
        feature_extractors=extractors, real_features=real_features)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})

  return evaluate


def train_and_evaluate(config, workdir: str) -> step_lib.TrainState:
  """Trains until `config.num_train_steps`, resuming from the latest checkpoint."""
  validate(config)
  initialize_distributed(config)
  check_batch_divides(config.batch_size, jax.device_count())
  _prepare_workdir(workdir)
  is_host0 = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=not is_host0)
  if is_host0:
    (epath.Path(workdir) / 'config.json').write_text(
        config.to_json_best_effort(indent=2))

  manager = checkpointing.make_manager(workdir, max_to_keep=config.max_to_keep)
  state = checkpointing.restore(manager, config)
  if state is None:
    state = step_lib.create_train_state(config, jax.random.PRNGKey(config.seed))
  else:
    logging.info('Resuming from step %d.', int(state.step))
  start = int(jax.device_get(state.step))
  last_good = manager.latest_step()

  reals = input_pipeline.eval_images(config, config.num_image_samples)
  z_fixed = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                              (config.num_image_samples, config.hdim))
  # Images and evaluation are local work for host 0's writer only.
  evaluate = (_make_evaluator(config, writer)
              if config.eval_every_steps and is_host0 else None)
  data = input_pipeline.create_input_iter(config, start_step=start)
  p_step = step_lib.make_train_step(config, pmap=True)
  p_state = step_lib.replicate(state)
  del state

  progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_train_steps, writer=writer,
      every_steps=config.log_every_steps, every_secs=None)
  bar = tqdm.tqdm(total=config.num_train_steps, initial=start, unit='step',
                  disable=not (is_host0 and sys.stderr.isatty()))
  history: List[Tuple[int, Dict]] = []

  def flush(step):
    host = [(s, {k: float(v[0]) for k, v in jax.device_get(m).items()})
            for s, m in history]
    history.clear()
    if config.on_nonfinite == 'stop':
      _check_finite(host, last_good)
    if host:
      mean = {k: np.mean([m[k] for _, m in host]) for k in host[-1][1]}
      mean['skipped_steps'] = int(jax.device_get(p_state.skipped_steps)[0])
      mean['corrupt_images_skipped'] = len(data.corrupt_files)
      writer.write_scalars(step, mean)
      bar.set_postfix(loss_e=f"{mean['loss_e']:.4g}",
                      loss_g=f"{mean['loss_g']:.4g}")

  try:
    with _Preemption() as preemption:
      for step in range(start + 1, config.num_train_steps + 1):
        batch = next(data)
        p_state, metrics = p_step(p_state, batch['image'])
        history.append((step, metrics))
        progress(step)
        bar.update(1)
        last = step == config.num_train_steps
        stop = preemption.requested or manager.reached_preemption(step)
        if step % config.log_every_steps == 0 or last or stop:
          flush(step)
        if is_host0 and (step % config.image_every_steps == 0 or last):
          _write_images(writer, workdir, step, step_lib.unreplicate(p_state),
                        reals, z_fixed, config)
        if evaluate and (step % config.eval_every_steps == 0 or last):
          evaluate(step, step_lib.unreplicate(p_state))
        if step % config.checkpoint_every_steps == 0 or last or stop:
          flush(step)  # Never save a state that saw a non-finite loss.
          checkpointing.save(manager, step_lib.unreplicate(p_state), force=True)
          last_good = step
        if stop:
          logging.warning('Stopped at step %d after preemption.', step)
          break
  finally:
    bar.close()
    manager.wait_until_finished()
    writer.flush()
  return step_lib.unreplicate(p_state)
