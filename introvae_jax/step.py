"""TrainState and the pure train step: the shell around the objectives.

`train_step(state, batch, config)` is a pure function: call it directly, wrap
it in `jax.jit`, in `jax.shard_map` over a mesh axis 'batch' or in
`jax.pmap(..., axis_name='batch')`, with `axis_name='batch'` (see
`make_train_step`: the mesh step by default, `pmap=True` for pmap). It runs
one iteration of `config.objective` (`introvae_jax.objectives`: 'introvae',
the authors' iteration exactly in reference mode; 'soft_introvae'; 'vae')
and does what every objective shares: the compute dtype, the random draws
(for the global batch, so any device count gives the same numbers),
averaging BatchNorm statistics and metrics over devices, the finiteness
check and skipping.

Example, unmapped, from other JAX code::

  state = create_train_state(config, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(train_step, config=config))
  state, metrics = step(state, images)          # images [B, H, W, C] in [0, 1]
"""

import functools
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from introvae_jax import layout
from introvae_jax import models
from introvae_jax import objectives
from introvae_jax import parallel
from introvae_jax.configuration import check_batch_divides, validate
from introvae_jax.parallel import AXIS_NAME


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree of arrays only."""
  step: jax.Array
  params_e: Any
  batch_stats_e: Any
  params_g: Any
  batch_stats_g: Any
  opt_state_e: Any
  opt_state_g: Any
  rng: jax.Array
  skipped_steps: jax.Array   # non-finite updates skipped (on_nonfinite='skip')


def learning_rate_factor(config, step):
  """The factor on both learning rates at iteration `step`: an optax step
  schedule, x `lr_decay` at each of `lr_boundaries` (torch `MultiStepLR`
  stepped once per iteration, as Soft-IntroVAE's 2-D code does)."""
  return optax.piecewise_constant_schedule(
      1.0, {b: config.lr_decay for b in config.lr_boundaries})(step)


def make_optimizers(config, step=None):
  """The reference's two Adams (E and G): no clipping or decay; at iteration
  `step` (the state's, so a resumed run continues the schedule) with the
  learning rates of the step schedule. The schedule scales Adam's update
  (its moments do not depend on the rate), so the optimiser states have the
  same structure with or without one."""
  factor = (learning_rate_factor(config, step)
            if step is not None and config.lr_boundaries else 1.0)
  adam = lambda lr: optax.adam(lr * factor, b1=config.adam_b1,
                               b2=config.adam_b2, eps=config.adam_eps)
  return adam(config.lr_e), adam(config.lr_g)


def create_train_state(config, rng, *, mesh=None) -> TrainState:
  """Initialises both networks and optimisers (jitted; no data needed).

  With `mesh`, the state comes out as global arrays replicated on it (every
  process calls this with the same `rng`).
  """
  validate(config)
  encoder, decoder = models.build_models(config)
  tx_e, tx_g = make_optimizers(config)
  shape = (2,) + models.input_shape(config)

  @jax.jit
  def init(rng):
    rng, k_e, k_g = jax.random.split(rng, 3)
    vars_e = encoder.init(k_e, jnp.zeros(shape, jnp.float32))
    vars_g = decoder.init(k_g, jnp.zeros((2, config.hdim), jnp.float32))
    params_e, params_g = vars_e['params'], vars_g['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params_e=params_e, batch_stats_e=vars_e.get('batch_stats', {}),
        params_g=params_g, batch_stats_g=vars_g.get('batch_stats', {}),
        opt_state_e=tx_e.init(params_e), opt_state_g=tx_g.init(params_g),
        rng=rng, skipped_steps=jnp.zeros((), jnp.int32))

  if mesh is None:
    return init(rng)
  # The key goes in as host data, the same on every process.
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(
      np.asarray(jax.random.key_data(rng) if jnp.issubdtype(
          rng.dtype, jax.dtypes.prng_key) else rng))


def abstract_train_state(config, *, mesh=None) -> TrainState:
  """The config's TrainState as ShapeDtypeStructs (nothing is computed); with
  `mesh`, carrying the state's sharding there (replicated), so the mesh step
  can be lowered and compiled without initialising anything, also for
  devices this host does not have (`parallel.make_mesh(devices=...)`)::

    state = abstract_train_state(config, mesh=mesh)
    batch = jax.ShapeDtypeStruct((config.batch_size, *image_shape), jnp.float32,
                                 sharding=parallel.batch_sharded(mesh))
    compiled = make_train_step(config, mesh=mesh).lower(state, batch).compile()
  """
  shapes = jax.eval_shape(lambda rng: create_train_state(config, rng),
                          jax.random.PRNGKey(0))
  if mesh is None:
    return shapes
  sharding = parallel.replicated(parallel.explicit_mesh(mesh))
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      shapes)


def _all_finite(tree) -> jax.Array:
  """True when every float leaf of `tree` is finite (one fused reduction)."""
  leaves = [jnp.isfinite(a).all() for a in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def draw_noise(rng, step, local_batch, hdim, axis_name=None, num=2):
  """`num` standard-normal draws for this step, [local_batch, hdim] each:
  (eps, z_p) for IntroVAE, an objective's `NOISE` in order.

  Drawn for the global batch and sliced per device, so a step gives the same
  numbers on any number of devices.
  """
  keys = jax.random.split(jax.random.fold_in(rng, step), num)
  n_dev, idx = 1, 0
  if axis_name is not None:
    n_dev, idx = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  draw = lambda k: jax.lax.dynamic_slice_in_dim(
      jax.random.normal(k, (n_dev * local_batch, hdim), jnp.float32),
      idx * local_batch, local_batch)
  return tuple(draw(k) for k in keys)


def train_step(state: TrainState, batch, config: ml_collections.ConfigDict, *,
               axis_name: Optional[str] = None, noise=None):
  """One iteration of `config.objective`: (state, batch) -> (new_state,
  metrics).

  Args:
    state: a `TrainState`.
    batch: images [B, H, W, C] in [0, 1] (or 2-D points [B, D] for the MLP
      model), or a mapping with key 'image'. Under shard_map or pmap, the
      device's rows.
    config: the run's ConfigDict (closed over, never traced).
    axis_name: the mapped axis (shard_map's mesh axis or pmap's); gradients,
      KL means for the hinge, metrics and BatchNorm running statistics are
      averaged over it. BatchNorm statistics are synced over it too when
      `config.sync_batch_stats`.
    noise: optional draws to inject (parity tests), a sequence of [B, hdim]
      arrays in the order of the objective's `NOISE` ((eps, z_p) for
      IntroVAE); by default drawn from `state.rng` and `state.step`.

  Returns:
    The new state and a dict of scalar float32 metrics (global means);
    `finite` is 1 when both losses and every parameter, BatchNorm statistic
    and optimiser moment of the new state are finite (`finite_state`: the
    state alone). With `config.on_nonfinite='skip'` a step that is not
    finite keeps the previous state (only `step` and `skipped_steps` move).
  """
  x = batch['image'] if isinstance(batch, Mapping) else batch
  ct = objectives.base.compute_dtype(config)
  x = jnp.asarray(x).astype(ct)
  bn_axis = axis_name if config.sync_batch_stats else None
  objective = objectives.get(config.objective)
  # In the space-to-depth layout the images stay packed through the
  # objective (its losses sum over each image's pixels, in any order).
  packed = config.arch == 'conv' and config.space_to_depth > 1
  if packed:
    x = layout.pack(x, config.space_to_depth)
  nets = objectives.Nets(*models.build_models(config, bn_axis, packed),
                         *make_optimizers(config, state.step))
  if noise is None:
    noise = draw_noise(state.rng, state.step, x.shape[0], config.hdim,
                       axis_name, num=len(objective.NOISE))
  if len(noise) != len(objective.NOISE):
    raise ValueError(f'objective {config.objective!r} takes noise '
                     f'{objective.NOISE}; got {len(noise)} arrays.')
  noise = {name: jnp.asarray(a).astype(ct)
           for name, a in zip(objective.NOISE, noise)}
  new, metrics = objective.update(nets, state, x, noise, config, axis_name)
  params_e, stats_e, opt_e, params_g, stats_g, opt_g = new
  # BatchNorm running statistics: the mean of the devices' updates. Each
  # device updated them from its own rows; the replicated state must hold one
  # value, and the mean (an EMA of the devices' mean batch statistics, since
  # the update is linear) uses every device's data, where keeping device 0's,
  # as torch's DataParallel does, would discard the others'
  # (docs/train_step.md, "BatchNorm running statistics under data
  # parallelism"). With sync_batch_stats the devices agree already.
  stats_e, stats_g = objectives.base.pmean((stats_e, stats_g), axis_name)
  metrics = objectives.base.pmean(metrics, axis_name)
  # A loss can be finite while the update it drove overflowed (a huge
  # learning rate): the new parameters, statistics and moments count too.
  finite_state = _all_finite((params_e, stats_e, opt_e, params_g, stats_g,
                              opt_g))
  finite = (jnp.isfinite(metrics['loss_e']) & jnp.isfinite(metrics['loss_g'])
            & finite_state)
  metrics['finite'] = finite.astype(jnp.float32)
  metrics['finite_state'] = finite_state.astype(jnp.float32)
  new_state = state.replace(
      step=state.step + 1, params_e=params_e, batch_stats_e=stats_e,
      params_g=params_g, batch_stats_g=stats_g, opt_state_e=opt_e,
      opt_state_g=opt_g)
  if config.on_nonfinite == 'skip':
    keep = lambda new_leaf, old_leaf: jnp.where(finite, new_leaf, old_leaf)
    new_state = jax.tree_util.tree_map(keep, new_state, state).replace(
        step=state.step + 1,
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  return new_state, metrics


def make_train_step(config, *, mesh=None, pmap: bool = False,
                    donate: bool = True):
  """The compiled step: over a device mesh (default), or pmapped.

  Mesh step (`mesh`, default `parallel.make_mesh()`: every device): a `jax.jit`
  of `jax.shard_map(train_step)` over the mesh axis 'batch'. It takes the
  state as global arrays replicated on the mesh and the global batch [B, ...]
  sharded on 'batch' (`parallel.global_batch`; host arrays are placed there
  too in single-process runs), optionally `noise` ([B, hdim] arrays, the
  objective's `NOISE`) as `train_step` takes it, and returns the replicated new
  state and metrics. Each device runs `train_step` on its B / devices rows,
  exactly as under pmap: BatchNorm normalises per device (across devices with
  `sync_batch_stats`), the hinge sees the global batch means, gradients and
  running statistics are averaged over devices. The state's buffers are donated.

  `pmap=True`: `jax.pmap(train_step, axis_name='batch')` over the local
  devices, taking a state from `replicate` and batches [devices, per_device,
  ...].
  """
  validate(config)
  frozen = ml_collections.FrozenConfigDict(config)
  donate_argnums = (0,) if donate else ()
  fn = functools.partial(train_step, config=frozen, axis_name=AXIS_NAME)
  if pmap:
    if mesh is not None:
      raise ValueError('Pass either mesh or pmap=True, not both.')
    check_batch_divides(config.batch_size, jax.device_count())
    return jax.pmap(fn, axis_name=AXIS_NAME, donate_argnums=donate_argnums)
  mesh = (parallel.make_mesh() if mesh is None else
          parallel.explicit_mesh(mesh))
  check_batch_divides(config.batch_size, mesh.size)
  # check_vma=False: pmap's semantics (the step averages over the axis itself).
  mapped = jax.shard_map(
      lambda state, batch, noise: fn(state, batch, noise=noise),
      mesh=mesh, in_specs=(P(), P(AXIS_NAME), P(AXIS_NAME)),
      out_specs=(P(), P()), check_vma=False)
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  def mesh_step(state, batch, noise=None):
    # A no-op for inputs placed as documented; places host arrays.
    state, batch, noise = jax.reshard((state, batch, noise),
                                      (replicated, sharded, sharded))
    return mapped(state, batch, noise)

  return jax.jit(mesh_step, donate_argnums=donate_argnums,
                 out_shardings=(replicated, replicated))


def replicate(state: TrainState) -> TrainState:
  """Copies a state onto every local device for the pmapped step (the mesh
  step takes `create_train_state(..., mesh=mesh)` or `put_replicated`)."""
  n = jax.local_device_count()
  stack = lambda a: np.broadcast_to(np.asarray(a), (n,) + np.shape(a))
  return jax.pmap(lambda s: s)(jax.tree_util.tree_map(stack, state))


def unreplicate(state: TrainState) -> TrainState:
  """The first local device's copy of a pmap-replicated state.

  Reads that device's shard directly: indexing the pmapped array (`a[0]`)
  runs a gather over all local devices, which can hang in multi-process runs
  on XLA:CPU.
  """
  first = lambda a: (a.addressable_data(0)[0] if isinstance(a, jax.Array)
                     else a[0])
  return jax.tree_util.tree_map(first, state)


def shard_batch(batch, num_devices: Optional[int] = None):
  """[B, ...] -> [devices, B // devices, ...] for the pmapped step, with a
  clear error if B does not divide."""
  n = num_devices or jax.local_device_count()
  def reshape(a):
    per = check_batch_divides(a.shape[0], n)
    return a.reshape((n, per) + a.shape[1:])
  return jax.tree_util.tree_map(reshape, batch)
