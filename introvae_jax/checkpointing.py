"""Orbax checkpoints of a `TrainState`.

One `CheckpointManager` per workdir (`<workdir>/checkpoints/<step>/`), saving
asynchronously and keeping `max_to_keep`. Restores go through an abstract
target (shapes and dtypes from `jax.eval_shape`), so optax states come back as
their own types, and a checkpoint of another model is refused with a message
before anything is written. A damaged checkpoint (unreadable metadata or
data) is skipped: resuming walks back to the newest one that restores and
moves the damaged ones to `<workdir>/checkpoints_damaged/`, never deleting
them. Paths go through `etils.epath`, so `gs://` workdirs work.
"""

import contextlib
import datetime
import errno
import json
import logging as std_logging
from typing import Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from introvae_jax import configuration
from introvae_jax import parallel
from introvae_jax import step as step_lib
from introvae_jax import workdir as workdir_lib
from introvae_jax.errors import UserError, WorkdirError

CONFIG_NAME = 'config.json'
CONFIG_KEY = 'introvae_jax_config'  # a checkpoint's record of its run's config
DAMAGED_DIR = 'checkpoints_damaged'


_READ_ONLY_NOISE = ('read_only=True, setting', 'Given directory is read only')


def quiet_orbax_logs() -> None:
  """Hides Orbax's many INFO lines per save/restore, and its warnings that a
  read-only manager (sampling, evaluation) is read-only; others still show."""
  def keep(record) -> bool:
    if 'orbax' not in record.pathname:
      return True
    return (record.levelno >= std_logging.WARNING and
            not any(n in record.getMessage() for n in _READ_ONLY_NOISE))
  logging.get_absl_logger().addFilter(keep)


class IncompatibleCheckpointError(UserError, ValueError):
  """The checkpoint holds a different model than the config describes."""


class DamagedCheckpointError(WorkdirError):
  """A checkpoint (or every checkpoint of a workdir) cannot be read."""


def checkpoint_dir(workdir: str) -> epath.Path:
  """The folder of the run's Orbax checkpoints, `<workdir>/checkpoints`."""
  return workdir_lib.path(workdir, 'checkpoints')


def make_manager(workdir: str, *, max_to_keep: Optional[int] = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager on `checkpoint_dir(workdir)`: asynchronous
  saves keeping the newest `max_to_keep`, or `read_only` for the tools."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only)
  # Naming the handler lets a fresh manager read metadata before any save.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def abstract_state(config) -> step_lib.TrainState:
  """ShapeDtypeStructs of the config's TrainState (nothing is computed)."""
  return step_lib.abstract_train_state(config)


def _no_space(error: BaseException) -> bool:
  while error is not None:
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        'No space left on device' in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def disk_full_is_a_user_error(manager: ocp.CheckpointManager):
  """A full disk while writing (checkpoints, events, images) becomes one
  clear WorkdirError; Orbax writes into a temporary folder and renames it
  when complete, so the earlier checkpoints are untouched."""
  try:
    yield
  except Exception as e:
    if isinstance(e, WorkdirError) or not _no_space(e):
      raise
    kept = sorted(make_manager(str(manager.directory.parent), max_to_keep=None,
                               read_only=True).all_steps())
    raise WorkdirError(
        f'No space left on the device of {manager.directory.parent} while '
        f'writing the run; its complete checkpoints (steps {kept or "none"}) '
        'are intact. Free space (or lower max_to_keep) and rerun the same '
        'command to resume.') from e


def identity_record(config) -> dict:
  """The config as JSON-able data: what a checkpoint records of its run."""
  return json.loads(config.to_json_best_effort())


def save(manager: ocp.CheckpointManager, state: step_lib.TrainState,
         *, force: bool = False, config=None,
         extra: Optional[dict] = None) -> bool:
  """Saves a state at its own step; async unless forced.

  Every process calls it with the same state. Global arrays (the mesh
  engine's replicated state) go to Orbax as they are and are written once;
  arrays local to one process of several (an unreplicated pmap state) go as
  host NumPy, which Orbax writes from process 0. With `config`, the run's
  config is recorded in the step's own Orbax metadata (`stored_config`),
  finalised with the step, so a resume can check its identity even when
  config.json is lost. `extra` (JSON-able) joins that metadata, read back by
  `stored_extra`.
  """
  multiprocess = jax.process_count() > 1
  def for_orbax(a):
    if (isinstance(a, jax.Array)
        and not (multiprocess and a.is_fully_addressable)):
      return a
    return np.asarray(a)
  state = jax.tree_util.tree_map(for_orbax, state)
  custom = dict(extra or {})
  if config is not None:
    custom[CONFIG_KEY] = identity_record(config)
  return manager.save(parallel.host_int(state.step),
                      args=ocp.args.StandardSave(state), force=force,
                      custom_metadata=custom or None)


def stored_extra(manager: ocp.CheckpointManager, step: int, key: str):
  """The `extra[key]` saved with `step`, or None where it has none."""
  return (manager.metadata(step).custom_metadata or {}).get(key)


def stored_config(manager: ocp.CheckpointManager) -> Optional[tuple]:
  """(step, config dict) recorded with the newest checkpoint that has a
  record (`save(..., config=...)`), or None: a workdir of introvae-jax 0.2.0
  or `convert`'s step-0 import, or no checkpoint."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      custom = manager.metadata(step).custom_metadata or {}
    except Exception:  # pylint: disable=broad-except
      continue  # damaged: `restore` names it
    if isinstance(custom.get(CONFIG_KEY), dict):
      return step, custom[CONFIG_KEY]
  return None


def _key_name(entry) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def describe(tree):
  """{'params_e/block_1/conv1/kernel': shape}; stored metadata uses dicts
  where the live state uses dataclasses and tuples, so paths are normalised."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in flat}


def check_compatible(manager: ocp.CheckpointManager, step: int, metadata,
                     target) -> None:
  """Raises IncompatibleCheckpointError if the stored tree differs from
  target."""
  stored = describe(metadata)
  wanted = describe(target)
  missing = sorted(set(wanted) - set(stored))
  extra = sorted(set(stored) - set(wanted))
  changed = sorted(k for k in set(wanted) & set(stored)
                   if stored[k] != wanted[k])
  if missing or extra or changed:
    details = []
    for name, keys in (('missing', missing), ('unexpected', extra)):
      if keys:
        details.append(f'{len(keys)} {name} arrays, e.g. {keys[0]}')
    if changed:
      k = changed[0]
      details.append(f'{len(changed)} arrays of another shape, e.g. {k}: '
                     f'stored {stored[k]}, config wants {wanted[k]}')
    raise IncompatibleCheckpointError(
        f'The checkpoint at {manager.directory}/{step} was written for a '
        f'different model than this config describes ({"; ".join(details)}). '
        'It was left untouched. Use a new --workdir, or the config (channels, '
        'hdim, image_size, image_channels, reference_layout, arch) it was '
        'trained with.')


def _first_line(error: Exception, limit: int = 200) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = text or type(error).__name__
  return text if len(text) <= limit else text[:limit] + '...'


def _metadata(manager, step: int):
  """The stored tree's metadata; DamagedCheckpointError if it is unreadable."""
  try:
    metadata = manager.item_metadata(step)
  except Exception as e:  # Orbax/TensorStore raise many types here.
    raise DamagedCheckpointError(
        f'step {step}: its metadata cannot be read ({_first_line(e)})') from e
  if metadata is None:
    raise DamagedCheckpointError(
        f'step {step}: its metadata (default/_METADATA) is missing')
  return metadata


def _restore_step(manager, step: int, target, mesh) -> step_lib.TrainState:
  """The state at `step`; IncompatibleCheckpointError for another model,
  DamagedCheckpointError (naming what is wrong) for a broken checkpoint."""
  check_compatible(manager, step, _metadata(manager, step), target)
  # Straight into the mesh's replicated sharding (global arrays on every
  # process), or a whole copy on this process's first device.
  sharding = (parallel.replicated(mesh) if mesh is not None else
              jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  target = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      target)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:
    raise DamagedCheckpointError(
        f'step {step}: reading it failed ({_first_line(e)})') from e


def check_model(manager: ocp.CheckpointManager, config) -> None:
  """Refuses (IncompatibleCheckpointError) a workdir whose newest readable
  checkpoint holds another model; reads metadata only, writes nothing."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      metadata = _metadata(manager, step)
    except DamagedCheckpointError:  # `restore` names it
      continue
    check_compatible(manager, step, metadata, abstract_state(config))
    return


def _move_aside(manager, step: int) -> epath.Path:
  """Moves a damaged step out of the manager's folder (never deletes it)."""
  source = epath.Path(manager.directory) / str(step)
  aside = epath.Path(manager.directory).parent / DAMAGED_DIR
  aside.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  dest = aside / f'{step}.{stamp}'
  source.rename(dest)
  manager.reload()
  return dest


def restore(manager: ocp.CheckpointManager, config,
            step: Optional[int] = None, *, mesh=None,
            move_damaged: bool = False) -> Optional[step_lib.TrainState]:
  """The given step, or the newest checkpoint that restores, or None if none.

  With `mesh` the state is restored as global arrays replicated on it (every
  process calls this), else onto this process's first device.

  Without `step`, damaged checkpoints (unreadable metadata or array data) are
  skipped from the newest down, each with a warning; `move_damaged` (the
  training program, once an intact one is found) moves them to
  `<workdir>/checkpoints_damaged/` so the run continues from the intact one.
  When checkpoints exist but none restores, DamagedCheckpointError names each
  and touches nothing. Another model's checkpoint is refused
  (IncompatibleCheckpointError) at once.
  """
  target = abstract_state(config)
  if step is not None:
    if step not in manager.all_steps():
      raise WorkdirError(
          f'No checkpoint of step {step} in {manager.directory}; it has steps '
          f'{sorted(manager.all_steps()) or "none"}.')
    return _restore_step(manager, step, target, mesh)
  damaged = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      state = _restore_step(manager, candidate, target, mesh)
    except DamagedCheckpointError as e:
      logging.warning('Skipping the checkpoint of %s.', e)
      damaged.append((candidate, str(e)))
      continue
    for bad, _ in damaged if move_damaged else ():
      logging.warning('Moved the damaged checkpoint of step %d to %s.', bad,
                      _move_aside(manager, bad))
    return state
  if damaged:
    raise DamagedCheckpointError(
        f'No checkpoint in {manager.directory} can be restored: '
        f'{"; ".join(reason for _, reason in damaged)}. Nothing was changed. '
        'Copy intact checkpoints back from a backup, or move these folders '
        'aside (or use a new --workdir) to start the run afresh.')
  return None


def latest_state(workdir: str, config, step: Optional[int] = None, *,
                 mesh=None) -> step_lib.TrainState:
  """Loads the newest (or given) checkpoint of a workdir (sampling, tools),
  replicated on `mesh` when given."""
  manager = make_manager(workdir, max_to_keep=None, read_only=True)
  state = restore(manager, config, step, mesh=mesh)
  if state is None:
    raise WorkdirError(
        f'No checkpoint in {checkpoint_dir(workdir)}; train first with '
        f'`python main.py --config=... --workdir={workdir}`.')
  return state


def recorded_config(workdir: str) -> Optional[tuple]:
  """(where, config fields) of a run: its config.json, or when that is lost
  the config recorded with its newest checkpoint; None when it has neither.
  Reads no array; an unreadable config.json raises ConfigError."""
  config_path = workdir_lib.path(workdir, CONFIG_NAME)
  if config_path.exists():
    return str(config_path), configuration.read_json(str(config_path))
  if not checkpoint_dir(workdir).exists():
    return None
  record = stored_config(make_manager(workdir, max_to_keep=None,
                                      read_only=True))
  if record is None:
    return None
  return f'the config recorded with checkpoint {record[0]}', record[1]


def load_run(workdir: str, step: Optional[int] = None, *, mesh=None):
  """(config, state) of a training run: its config (`recorded_config`) and a
  checkpoint (replicated on `mesh` when given)."""
  found = recorded_config(workdir)
  if found is None:
    what = ('does not exist' if not workdir_lib.path(workdir).exists()
            else f'has no {CONFIG_NAME}')
    raise WorkdirError(
        f'--workdir={workdir} {what}: pass the folder that '
        '`python main.py --workdir=...` or `python -m introvae_jax.convert` '
        'wrote.')
  config = configuration.from_record(found[1], found[0])
  return config, latest_state(workdir, config, step, mesh=mesh)


def resume_identity(config, workdir, manager):
  """Checks the config against the run's recorded identity (before anything
  is written) and returns (stored config dict or None, changes to record).

  The identity is the config recorded with the newest checkpoint
  (`save(config=...)`), so a lost or edited config.json changes nothing;
  workdirs of 0.2.0 (no record) fall back on config.json.
  A step-0 checkpoint (`introvae_jax.convert`'s import of the authors'
  weights) has trained nothing yet: any recipe may start from it.
  """
  latest_step = manager.latest_step()
  if latest_step is None:
    return None, []
  record = stored_config(manager)
  path = workdir_lib.path(workdir, CONFIG_NAME)
  if record is not None:
    stored = record[1]
  elif path.exists():
    stored = configuration.read_json(str(path))
  else:
    logging.warning('%s has checkpoints but no record of their config; '
                    'resuming without checking the run identity.', workdir)
    return None, []
  if latest_step == 0:
    return stored, configuration.identity_changes(stored, config)
  return stored, configuration.check_resume(stored, config,
                                            f'--workdir={workdir}')


def write_config(config, workdir, start: int, stored, changes) -> None:
  """Writes config.json; after an allowed identity change the previous
  config (`stored`) is kept as config.<step>.json."""
  if changes:
    kept = workdir_lib.path(workdir, f'config.{start}.json')
    n = 1
    while kept.exists():
      kept, n = workdir_lib.path(workdir, f'config.{start}.{n}.json'), n + 1
    workdir_lib.write_text(kept, json.dumps(stored, indent=2))
    for name, old, new in changes:
      logging.warning('Resuming at step %d with %s changed from %r to %r; '
                      'the previous config is kept as %s.', start, name, old,
                      new, kept.name)
  workdir_lib.write_text(workdir_lib.path(workdir, CONFIG_NAME),
                         config.to_json_best_effort(indent=2))
