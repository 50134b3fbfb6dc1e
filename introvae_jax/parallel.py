"""Data parallelism on a device mesh: global arrays and their placement.

The engine of the training program (JAX's `jax.shard_map` + `jax.jit`, the
way JAX documents data parallelism): a 1-D mesh over every device of every
process with the axis 'batch', the `TrainState` as global arrays replicated
on it (`NamedSharding(mesh, P())`) and each global batch sharded along its
first axis (`NamedSharding(mesh, P('batch'))`), made from each process's own
rows. `step.make_train_step(config, mesh=mesh)` builds the step over it.

  mesh = parallel.make_mesh()
  state = create_train_state(config, rng, mesh=mesh)
  step = make_train_step(config, mesh=mesh)
  for batch in parallel.prefetch_to_mesh(host_batches, mesh):
    state, metrics = step(state, batch)
"""

import collections
import itertools
from typing import Iterable, Iterator, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from introvae_jax.configuration import check_batch_divides

AXIS_NAME = 'batch'


def make_mesh(num_devices: Optional[int] = None, *,
              devices: Optional[Sequence] = None) -> Mesh:
  """A 1-D mesh ('batch',) over all devices of all processes (or the first
  `num_devices` of them, single-process only), or over `devices`: e.g. the
  compile-only devices of a TPU topology
  (`jax.experimental.topologies.get_topology_desc(...).devices`), to compile
  the step for hardware this host does not have."""
  if devices is not None:
    if num_devices is not None:
      raise ValueError('Pass num_devices or devices, not both.')
    devices = list(devices)
    return jax.make_mesh((len(devices),), (AXIS_NAME,), devices=devices)
  if num_devices is None:
    return jax.make_mesh((jax.device_count(),), (AXIS_NAME,))
  if jax.process_count() > 1:
    raise ValueError('num_devices is for single-process runs; a multi-process '
                     'mesh spans every device.')
  if not 1 <= num_devices <= jax.device_count():
    raise ValueError(f'num_devices={num_devices}: this process has '
                     f'{jax.device_count()} devices.')
  return jax.make_mesh((num_devices,), (AXIS_NAME,),
                       devices=jax.devices()[:num_devices])


def explicit_mesh(mesh: Mesh) -> Mesh:
  """`mesh` with its 'batch' axis of Explicit type, as the mesh step needs
  (`jax.reshard`): a `jax.sharding.Mesh` built by hand has Auto axes. The
  same devices in the same order, so shardings on either agree."""
  if AXIS_NAME not in mesh.axis_names:
    raise ValueError(f'The mesh has axes {mesh.axis_names}; the train step '
                     f"maps over an axis named '{AXIS_NAME}' (make_mesh() "
                     'builds one).')
  if all(t == AxisType.Explicit for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Explicit,) * len(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  """The state's sharding: a full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """A batch's sharding: its first axis split over the mesh's devices."""
  return NamedSharding(mesh, P(AXIS_NAME))


def global_batch(local, mesh: Mesh):
  """This process's rows [local_batch, ...] (a pytree of host arrays) -> the
  global batch [local_batch * process_count, ...] sharded on 'batch'.

  Row r of process p is global row p * local_batch + r; the transfer to the
  devices starts at once (asynchronously).
  """
  n_local = len(mesh.local_devices)
  sharding = batch_sharded(mesh)
  def place(a):
    a = np.asarray(a)
    check_batch_divides(a.shape[0] * jax.process_count(), mesh.size)
    if a.shape[0] % n_local:
      raise ValueError(f'A local batch of {a.shape[0]} rows does not divide '
                       f'over this process\'s {n_local} devices.')
    return jax.make_array_from_process_local_data(sharding, a)
  return jax.tree_util.tree_map(place, local)


def prefetch_to_mesh(local_batches: Iterable, mesh: Mesh,
                     size: int = 2) -> Iterator:
  """Yields `global_batch` of each local batch, `size` batches ahead.

  While the step on one batch runs, the next `size` are already being copied
  to their devices (the sharded counterpart of flax's `prefetch_to_device`).
  """
  queue = collections.deque()
  batches = iter(local_batches)
  def enqueue(n):
    for local in itertools.islice(batches, n):
      queue.append(global_batch(local, mesh))
  enqueue(size)
  while queue:
    batch = queue.popleft()
    enqueue(1)
    yield batch


def put_replicated(tree, mesh: Mesh):
  """A pytree of host (or single-device) arrays, the same on every process,
  as global arrays replicated on `mesh` (e.g. a state made outside it)."""
  sharding = replicated(mesh)
  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])
  return jax.tree_util.tree_map(put, tree)


def local_copy(tree):
  """This process's copy of a replicated pytree, as arrays on its first local
  device: for work one process does alone (image grids, evaluation). No data
  moves and nothing runs on the other processes."""
  def first(a):
    if isinstance(a, jax.Array) and len(a.sharding.device_set) > 1:
      if not a.sharding.is_fully_replicated:
        raise ValueError(
            f'local_copy needs replicated arrays, got {a.sharding}')
      return a.addressable_data(0)
    return a
  return jax.tree_util.tree_map(first, tree)


def host_int(scalar) -> int:
  """A replicated (or host) scalar's value, read on this process alone."""
  return int(jax.device_get(local_copy(scalar)))
