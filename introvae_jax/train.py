"""The training program: where data, step, checkpoints and writers meet.

`train_and_evaluate(config, workdir)` trains (or resumes) a run. It writes
`<workdir>/config.json`, TensorBoard events and log lines for every metric,
image grids (TensorBoard and `<workdir>/images/*.png`) and Orbax checkpoints
under `<workdir>/checkpoints/`. SIGTERM (preemption) saves and returns.

Steps are dispatched asynchronously, but never more than
`config.max_steps_in_flight` ahead of the computation (`StepsInFlight`): the
host waits for step t-1 while step t runs, so a stop signal, a flush and the
progress report all see the device at most that many steps behind.

The engine is the mesh of `parallel`: the state lives as global arrays
replicated on a mesh of every device, each global batch is sharded over it
and placed on the devices while the step before it runs, and the step is
`step.make_train_step(config, mesh=mesh)` (jit + shard_map), compiled once
before the first batch (`compile_step`: on an accelerator its memory plan is
logged, and an out-of-memory is one line with the fix); on a TPU or GPU the
logged metrics include `mfu`, the model FLOPs utilisation. Multi-process
runs (`config.distributed`) run it in every process, each feeding its share
of the global batch; only process 0 writes `config.json`, events, images and
evaluations, and every process takes part in each checkpoint (Orbax writes
the global arrays once).
"""

import collections
import contextlib
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

from absl import logging
from etils import epath
import jax
import numpy as np

from introvae_jax import extras

try:  # the train extra and TensorFlow: a missing one is named
  from clu import metric_writers
  from clu import periodic_actions
  from tensorboard.compat.proto import event_pb2
  import tensorflow as tf
  import tqdm
except ModuleNotFoundError as e:
  raise extras.missing(e, 'introvae_jax.train') from e

from introvae_jax import checkpointing
from introvae_jax import configuration
from introvae_jax import evaluation
from introvae_jax import hardware
from introvae_jax import input_pipeline
from introvae_jax import objectives
from introvae_jax import parallel
from introvae_jax import plan
from introvae_jax import sampling
from introvae_jax import step as step_lib
from introvae_jax import stopping
from introvae_jax import workdir as workdir_lib
from introvae_jax.configuration import check_batch_divides, validate
from introvae_jax.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
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


def _nonfinite(metrics: Dict[str, float]) -> str:
  """What became NaN/inf in a step's metrics, in words."""
  bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
  if metrics.get('finite_state', 1.0) < 1:
    bad.append('the updated parameters or optimiser state')
  return ', '.join(bad) or 'the update'


def _kept(last_good) -> str:
  return (f'the last good checkpoint (step {last_good}) is kept'
          if last_good is not None else
          'no checkpoint had been saved yet, so none is kept')


def _check_finite(history: List[Tuple[int, Dict]], last_good,
                  advice: str) -> None:
  """Raises NonFiniteLossError naming the first bad step and its terms;
  `advice` is the objective's (`DIVERGED`)."""
  for step, metrics in history:
    if metrics['finite'] < 1:
      raise NonFiniteLossError(
          f'Non-finite values at step {step}: {_nonfinite(metrics)} became '
          f'NaN/inf. Training stopped; {_kept(last_good)}. {advice}, or set '
          '--config.on_nonfinite=skip to skip such updates.')


def _count_skips(history: List[Tuple[int, Dict]], run: List[int], limit: int,
                 last_good, advice: str) -> None:
  """Tracks the current run of skipped (non-finite) steps in `run` ([first
  step, length]); raises NonFiniteLossError once it reaches `limit`."""
  for step, metrics in history:
    if metrics['finite'] >= 1:
      run[:] = [0, 0]
      continue
    run[:] = [run[0] or step, run[1] + 1]
    if run[1] >= limit:
      raise NonFiniteLossError(
          f'{limit} consecutive updates (steps {run[0]} to {step}) were '
          f'non-finite ({_nonfinite(metrics)}) and skipped. Training stopped; '
          f'{_kept(last_good)}. {advice}, or raise '
          '--config.max_consecutive_skips.')


def _drop_orphaned_events(workdir, start: int) -> set:
  """Removes the events of steps after `start` from the run's event files;
  returns the tags logged at step `start`.

  A run killed after its last checkpoint (step `start`) has logged steps
  that the resumed run logs again (with the same values: resuming is exact).
  Dropping the first copies keeps one value per step for every reader
  (TensorBoard, tbparse, pandas). Each file is rewritten to a temporary name
  that no reader looks at, then renamed over the original, so a crash at
  any point leaves either version, and the next resume finishes the job.
  """
  pattern = str(workdir_lib.path(workdir, 'events.out.tfevents.*'))
  tags_at_start = set()
  for number, name in enumerate(sorted(tf.io.gfile.glob(pattern))):
    kept, dropped = [], 0
    try:
      for record in tf.data.TFRecordDataset(name).as_numpy_iterator():
        event = event_pb2.Event.FromString(record)
        if event.step > start:
          dropped += 1
        else:
          kept.append(record)
          if event.step == start:
            tags_at_start.update(v.tag for v in event.summary.value)
    except tf.errors.DataLossError:  # the last record, cut by a kill
      dropped += 1
    if not dropped:
      continue
    temporary = str(workdir_lib.path(workdir, f'.events-rewrite-{number}.tmp'))
    with tf.io.TFRecordWriter(temporary) as out:
      for record in kept:
        out.write(record)
    tf.io.gfile.rename(temporary, name, overwrite=True)
    logging.info('Dropped %d events after step %d from %s (logged after the '
                 'last checkpoint by an interrupted run).', dropped, start,
                 name)
  return tags_at_start


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
        str(workdir_lib.path(workdir, 'images', f'{name}_{step:08d}.png')),
        grid)


def _make_evaluator(config):
  """evaluate(state) -> {'eval/<name>': value}: `evaluation.evaluate_model`
  on fixed (held-out when configured) images."""
  reals = input_pipeline.eval_images(config, config.eval_num_images)
  extractors, real_features = evaluation.feature_extractors_for(
      config, reals, inception_path=config.fid_weights or None,
      classifier_path=config.digit_classifier or None, log=logging.info)

  def evaluate(state):
    metrics = evaluation.evaluate_model(
        state, config, reals, jax.random.PRNGKey(config.seed + 2),
        feature_extractors=extractors, real_features=real_features)
    return {f'eval/{k}': v for k, v in metrics.items()}

  return evaluate


def train_and_evaluate(config, workdir: str, *,
                       signals: Optional[stopping.StopSignals] = None
                       ) -> step_lib.TrainState:
  """Trains until `config.num_train_steps`, resuming from the latest checkpoint.

  Nothing in the workdir is written before the run is known to match it (a
  checkpoint of the same model, the same identity fields as its config.json).
  One training process per workdir (`workdir.RunLock`). SIGTERM or SIGINT
  saves the current step and returns early (one arriving before the first
  step returns at once, with nothing new to save); `signals` (a fresh
  `StopSignals`) then says which (`signals.stopped`).
  """
  validate(config)
  initialize_distributed(config)
  check_batch_divides(config.batch_size, jax.device_count())
  workdir_lib.prepare(workdir, jax.process_index())
  lock = (workdir_lib.RunLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  signals = signals or stopping.StopSignals()
  with lock, signals:  # from here a stop signal is a flag the run checks
    manager = checkpointing.make_manager(workdir,
                                         max_to_keep=config.max_to_keep)
    with checkpointing.disk_full_is_a_user_error(manager):
      return _train(config, workdir, manager, signals)


def _check_weight_files(config) -> None:
  """Named evaluation weights must exist before any heavy work starts."""
  for field, what in (('fid_weights', "pytorch-fid's InceptionV3 .pth"),
                      ('digit_classifier', 'the digit classifier weights')):
    if config[field] and not epath.Path(config[field]).exists():
      raise configuration.ConfigError(
          f'{field}={config[field]!r}: no such file; give the path of {what}, '
          f'or --config.{field}= to skip those metrics.')


def compile_step(config, mesh, state):
  """The mesh train step for `state` and the config's global batch, compiled
  once (the loop runs this executable). On an accelerator, XLA's memory plan
  is logged against the device's memory; an HBM out-of-memory at compile
  (TPU) is one `UserError` line with the numbers and the fix."""
  device = mesh.devices.flat[0]
  per = check_batch_divides(config.batch_size, mesh.size)
  t0 = time.time()
  lowered = step_lib.make_train_step(config, mesh=mesh).lower(
      state, plan.abstract_batch(config, mesh))
  compiled = plan.compile_checked(lowered, device.device_kind, per)
  if device.platform != 'cpu':
    peak = plan.peak_bytes(compiled)
    stats = device.memory_stats() or {}
    key = hardware.chip_key(device.device_kind)
    limit = stats.get('bytes_limit') or (
        hardware.CHIPS[key].hbm_gib * plan.GIB if key else None)
    share = f' of {limit / plan.GIB:.2f} GiB ({100 * peak / limit:.1f}%)' \
        if limit else ''
    logging.info('Train step compiled for %s in %.1f s: %d images per '
                 'device, peak %.2f GiB%s per device; %s.', device.device_kind,
                 time.time() - t0, per, peak / plan.GIB, share,
                 plan.precision_text(config))
  return compiled


def _mfu(config, per_device: int):
  """A function (seconds per step) -> MFU on this run's accelerator, or
  None on a CPU or a chip without peaks in `hardware.CHIPS`."""
  key = hardware.chip_key(jax.devices()[0].device_kind)  # None on a CPU
  if key is None or config.arch != 'conv':
    return None
  return lambda seconds: hardware.mfu(config, per_device, seconds, key)


def _stopped_before_training(signals, state, start: int, config):
  """A stop signal arrived before step `start` + 1: no step has run, so
  there is nothing new to save (the checkpoint of `start`, if any, stands)."""
  signals.stopped = signals.received
  logging.warning('Stopped before training at step %d of %d (%s); nothing new '
                  'to save. Rerun the same command to %s.', start,
                  config.num_train_steps,
                  f'checkpoint {start} stands' if start else 'no step had run',
                  'resume' if start else 'start')
  signals.exit_if_asked()
  return state


class StepsInFlight:
  """The steps dispatched to the devices and not yet seen complete.

  `dispatched(step, outputs)` records a step's outputs, then waits (oldest
  first) until fewer than `limit` steps are in flight, calling
  `on_complete(step)` for each step it sees finish; `wait_all()` waits for
  every one. With limit 2 the host waits for step t-1 while step t runs:
  the device always has work queued, and the host is never more than two
  steps ahead of it.
  """

  def __init__(self, limit: int, on_complete):
    self.limit = limit
    self._on_complete = on_complete
    self._steps = collections.deque()

  def dispatched(self, step: int, outputs) -> None:
    """Records step `step`'s outputs; returns once fewer than `limit`
    steps are in flight."""
    self._steps.append((step, outputs))
    self._wait(self.limit - 1)

  def wait_all(self) -> None:
    """Returns once every dispatched step has finished."""
    self._wait(0)

  def _wait(self, keep: int) -> None:
    while len(self._steps) > keep:
      step, outputs = self._steps.popleft()
      jax.block_until_ready(outputs)
      self._on_complete(step)


def _train(config, workdir: str, manager,
           signals: stopping.StopSignals) -> step_lib.TrainState:
  is_host0 = jax.process_index() == 0
  checkpointing.check_model(manager, config)  # another model: say so first
  stored, changes = checkpointing.resume_identity(config, workdir, manager)
  if config.eval_every_steps:
    _check_weight_files(config)
  mesh = parallel.make_mesh()
  state = checkpointing.restore(manager, config, mesh=mesh,
                                move_damaged=is_host0)
  start = 0 if state is None else parallel.host_int(state.step)
  if start >= config.num_train_steps:
    logging.info('The run is complete: step %d of %d; nothing to do (raise '
                 '--config.num_train_steps to train further).', start,
                 config.num_train_steps)
    return state
  data = input_pipeline.create_input_iter(config, start_step=start)
  if state is None:
    state = step_lib.create_train_state(
        config, jax.random.PRNGKey(config.seed), mesh=mesh)
  else:
    logging.info('Resuming from step %d of %d.', start, config.num_train_steps)
  last_good = manager.latest_step()
  logged_at_start = set()
  if is_host0:
    # An identity change becomes the run's record only once a checkpoint is
    # saved under it (after the first save below).
    if not changes:
      checkpointing.write_config(config, workdir, start, stored, changes)
    if start:
      logged_at_start = _drop_orphaned_events(workdir, start)
  writer = metric_writers.create_default_writer(
      str(workdir_lib.path(workdir)), just_logging=not is_host0)

  reals = input_pipeline.eval_images(config, config.num_image_samples)
  z_fixed = jax.random.normal(jax.random.PRNGKey(config.seed + 1),
                              (config.num_image_samples, config.hdim))
  # Images and evaluation are local work for host 0's writer only. A stop
  # signal during this setup abandons it; the run then stops before step 1.
  evaluate = (signals.call_interruptible(_make_evaluator, config)
              if config.eval_every_steps and is_host0 else None)
  if not signals.requested:
    train_step = compile_step(config, mesh, state)
  if signals.requested:  # before or during the compile
    return _stopped_before_training(signals, state, start, config)
  mfu = _mfu(config, config.batch_size // mesh.size)
  clock = [time.time(), start]  # [time, step] at the last flush
  batches = parallel.prefetch_to_mesh((b['image'] for b in data), mesh)

  progress = periodic_actions.ReportProgress(
      num_train_steps=config.num_train_steps, writer=writer,
      every_steps=config.log_every_steps, every_secs=None)
  bar = tqdm.tqdm(total=config.num_train_steps, initial=start, unit='step',
                  disable=not (is_host0 and sys.stderr.isatty()))

  def completed(step):  # steps/s, the ETA and the bar count finished steps
    progress(step)
    bar.update(1)

  in_flight = StepsInFlight(config.max_steps_in_flight, completed)
  history: List[Tuple[int, Dict]] = []
  objective = objectives.get(config.objective)
  skips = [0, 0]  # the current run of skipped steps: [first step, length]

  def flush(step):
    in_flight.wait_all()
    host = [(s, {k: float(v) for k, v in
                 jax.device_get(parallel.local_copy(m)).items()})
            for s, m in history]
    history.clear()
    if config.on_nonfinite == 'stop':
      _check_finite(host, last_good, objective.DIVERGED)
    else:
      _count_skips(host, skips, config.max_consecutive_skips, last_good,
                   objective.DIVERGED)
    now = time.time()
    seconds, steps = now - clock[0], step - clock[1]
    clock[:] = now, step
    if host:
      mean = {k: np.mean([m[k] for _, m in host]) for k in host[-1][1]}
      if mfu and steps > 0:  # the wall time since the last flush
        mean['mfu'] = mfu(seconds / steps)
      mean['skipped_steps'] = parallel.host_int(state.skipped_steps)
      mean['corrupt_images_skipped'] = len(data.corrupt_files)
      writer.write_scalars(step, mean)
      bar.set_postfix(loss_e=f"{mean['loss_e']:.4g}",
                      loss_g=f"{mean['loss_g']:.4g}")

  def evaluate_and_write(step, signals):
    # A stop signal abandons the evaluation, so the save follows at once;
    # the resumed run evaluates that step again.
    results = signals.call_interruptible(evaluate, parallel.local_copy(state))
    if results is not None:
      writer.write_scalars(step, results)

  try:
    if (evaluate and start and start % config.eval_every_steps == 0 and
        not any(t.startswith('eval/') for t in logged_at_start)):
      evaluate_and_write(start, signals)  # a stop signal abandoned it
    for step in range(start + 1, config.num_train_steps + 1):
      state, metrics = train_step(state, next(batches))
      history.append((step, metrics))
      # Waits for step - 1 while this step runs (max_steps_in_flight 2), so
      # a stop signal is seen, and its step saved, within a few steps' time.
      in_flight.dispatched(step, metrics)
      last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last or signals.requested:
        flush(step)
      if is_host0 and (step % config.image_every_steps == 0 or last):
        _write_images(writer, workdir, step, parallel.local_copy(state),
                      reals, z_fixed, config)
        clock[:] = time.time(), step  # MFU times training steps only
      if evaluate and (step % config.eval_every_steps == 0 or last):
        evaluate_and_write(step, signals)
        clock[:] = time.time(), step
      stop = signals.requested or manager.reached_preemption(step)
      if step % config.checkpoint_every_steps == 0 or last or stop:
        flush(step)  # Never save a state that is not finite.
        checkpointing.save(manager, state, force=True, config=config)
        last_good = step
        clock[:] = time.time(), step
        if changes:  # every process: the wait may synchronise them
          manager.wait_until_finished()  # the new identity is on disk
          if is_host0:
            checkpointing.write_config(config, workdir, start, stored,
                                       changes)
          changes = []
      if stop:
        signals.stopped = signals.received or signal.SIGTERM
        logging.warning(
            'Stopped at step %d of %d (checkpoint saved); rerun the same '
            'command to resume.', step, config.num_train_steps)
        break
  finally:
    bar.close()
    writer.flush()
    manager.wait_until_finished()
    signals.exit_if_asked()  # after a stop: the checkpoint is on disk
  return state

