"""Orbax checkpoints of a `TrainState`.

One `CheckpointManager` per workdir (`<workdir>/checkpoints/<step>/`), saving
asynchronously and keeping `max_to_keep`. Restores go through an abstract
target (shapes and dtypes from `jax.eval_shape`), so optax states come back as
their own types, and a checkpoint of another model is refused with a message
before anything is written.
"""

import logging as std_logging
import os
from typing import Optional

from absl import logging
import jax
import orbax.checkpoint as ocp

from introvae_jax import configuration
from introvae_jax import step as step_lib


def quiet_orbax_logs() -> None:
  """Hides Orbax's many INFO lines per save/restore; warnings still show."""
  def keep(record) -> bool:
    return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname
  logging.get_absl_logger().addFilter(keep)


class IncompatibleCheckpointError(ValueError):
  """The checkpoint holds a different model than the config describes."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, max_to_keep: Optional[int] = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only)
  # Naming the handler lets a fresh manager read metadata before any save.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def abstract_state(config) -> step_lib.TrainState:
  """ShapeDtypeStructs of the config's TrainState (nothing is computed)."""
  return jax.eval_shape(lambda rng: step_lib.create_train_state(config, rng),
                        jax.random.PRNGKey(0))


def save(manager: ocp.CheckpointManager, state: step_lib.TrainState,
         *, force: bool = False) -> bool:
  """Saves an (unreplicated) state at its own step; async unless forced.

  Every process calls it with the same state. It goes to Orbax as host NumPy
  arrays, which process 0 writes: Orbax refuses device arrays local to one
  process of several (such as pmap's).
  """
  state = jax.device_get(state)
  return manager.save(int(state.step), args=ocp.args.StandardSave(state),
                      force=force)


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


def check_compatible(manager: ocp.CheckpointManager, step: int, target) -> None:
  """Raises IncompatibleCheckpointError if the stored tree differs from target."""
  stored = describe(manager.item_metadata(step))
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


def restore(manager: ocp.CheckpointManager, config,
            step: Optional[int] = None) -> Optional[step_lib.TrainState]:
  """The latest (or given) complete checkpoint as a TrainState, or None."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  target = abstract_state(config)
  check_compatible(manager, step, target)
  # Every process reads a whole copy onto its first local device.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target)
  return manager.restore(step, args=ocp.args.StandardRestore(target))


def latest_state(workdir: str, config, step: Optional[int] = None
                 ) -> step_lib.TrainState:
  """Loads the newest (or given) checkpoint of a workdir (sampling, tools)."""
  manager = make_manager(workdir, max_to_keep=None, read_only=True)
  state = restore(manager, config, step)
  if state is None:
    raise FileNotFoundError(
        f'No checkpoint in {checkpoint_dir(workdir)}; train first with '
        f'`python main.py --config=... --workdir={workdir}`.')
  return state


def load_run(workdir: str, step: Optional[int] = None):
  """(config, state) of a training run: its config.json and a checkpoint."""
  config = configuration.load_json(os.path.join(workdir, 'config.json'))
  return config, latest_state(workdir, config, step)
