"""TrainState and the pure IntroVAE train step.

`train_step(state, batch, config)` is a pure function: call it directly, wrap
it in `jax.jit`, in `jax.shard_map` over a mesh axis 'batch' or in
`jax.pmap(..., axis_name='batch')`, with `axis_name='batch'` (see
`make_train_step`: the mesh step by default, `pmap=True` for pmap). In
reference mode it performs the authors' iteration exactly (paper Algorithm 1,
hhb072/IntroVAE `main.py`):

1. encoder update on L_E, with ng(.) = `jax.lax.stop_gradient` on the
   reconstructions and prior samples it sees as fakes;
2. decoder update on L_G, whose KLs come from the *updated* encoder, plus the
   w_rec * L_AE gradient the reference keeps (it never zeroes the decoder's
   gradient between its two backward passes).

The work is arranged so nothing is computed twice (docs: introvae.md 3c): one
VJP of the two decoder calls serves both the reconstruction cotangent and the
G-step cotangents, and the G step differentiates the updated encoder with
respect to its inputs only. BatchNorm runs in train mode for every call, each
call normalising its own batch and updating running statistics in the
reference's call order: decoder(z_p), decoder(z); encoder(x), encoder(ng x_r),
encoder(ng x_p), encoder'(x_r), encoder'(x_p).

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

from introvae_jax import losses
from introvae_jax import models
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


def make_optimizers(config):
  """The reference's two Adams (E and G): no schedule, clipping or decay."""
  adam = lambda lr: optax.adam(lr, b1=config.adam_b1, b2=config.adam_b2,
                               eps=config.adam_eps)
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


def _apply(module, params, stats, x):
  """One train-mode call; returns (output, updated batch_stats)."""
  out, upd = module.apply({'params': params, 'batch_stats': stats}, x,
                          train=True, mutable=['batch_stats'])
  return out, upd.get('batch_stats', stats)


def _select(pred, on_true, on_false):
  """tree-wise jnp.where; `pred` may be a Python bool."""
  if pred is False:
    return on_false
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b),
                                on_true, on_false)


def _all_finite(tree) -> jax.Array:
  """True when every float leaf of `tree` is finite (one fused reduction)."""
  leaves = [jnp.isfinite(a).all() for a in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def _pmean(tree, axis_name):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def draw_noise(rng, step, local_batch, hdim, axis_name=None):
  """(eps, z_p) for this step, [local_batch, hdim] each.

  Drawn for the global batch and sliced per device, so a step gives the same
  numbers on any number of devices.
  """
  k_eps, k_prior = jax.random.split(jax.random.fold_in(rng, step))
  n_dev, idx = 1, 0
  if axis_name is not None:
    n_dev, idx = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  draw = lambda k: jax.lax.dynamic_slice_in_dim(
      jax.random.normal(k, (n_dev * local_batch, hdim), jnp.float32),
      idx * local_batch, local_batch)
  return draw(k_eps), draw(k_prior)


def _adam_step(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _update(nets, state, x, eps, z_p, config, axis_name):
  """One iteration, reference ('reference') or one-pass ('fused') mode.

  The VAE warm-up is this same computation with w_rec = vae_weight_rec,
  w_kl = vae_weight_kl (the reference's 1 and 1) and no adversarial terms (so
  L_E = w_rec*L_AE + w_kl*KL and the decoder's gradient is that of
  w_rec*L_AE), the running statistics of the fake-image calls discarded.
  Selecting weights, rather than branching with `lax.cond`, keeps one
  compiled function and XLA:CPU fast (a conditional made the step 15x slower
  there).
  """
  (encoder, decoder), (tx_e, tx_g) = nets
  warmup = (state.step < config.num_vae_steps) if config.num_vae_steps else False
  ct = jnp.promote_types(jnp.dtype(config.dtype), jnp.float32)
  phase = lambda warm, adv: jnp.where(warmup, warm, adv).astype(ct) if config.num_vae_steps \
      else jnp.asarray(adv, ct)
  w_rec = phase(config.vae_weight_rec, config.weight_rec)
  w_kl = phase(config.vae_weight_kl, config.weight_kl)
  w_neg, m = config.weight_neg, config.m_plus
  w_adv = phase(0.0, w_kl * 0.5 * w_neg)     # on each hinge term in L_E
  w_kl_g = phase(0.0, 0.5 * w_kl)            # on each KL term in L_G

  # Encoder on real images, with the reparameterised sample.
  def encode_real(params_e):
    (mu, logvar), stats = _apply(encoder, params_e, state.batch_stats_e, x)
    return (mu, logvar, losses.reparameterize(mu, logvar, eps)), stats

  (mu, logvar, z), enc_real_vjp, stats_e_real = jax.vjp(
      encode_real, state.params_e, has_aux=True)
  stats_e = stats_e_real

  # Both decoder calls under one VJP. Each starts from the old running
  # statistics; chaining them as the reference does (prior samples first) is
  # linear, r2 = s_rec + (1 - momentum) * (s_fake - r), and the warm-up keeps
  # s_rec alone.
  def decode(params_g, z):
    r = state.batch_stats_g
    x_fake, s_fake = _apply(decoder, params_g, r, z_p)
    x_rec, s_rec = _apply(decoder, params_g, r, z)
    keep = 1.0 - models.BN_MOMENTUM
    chained = jax.tree_util.tree_map(lambda a, b, c: a + keep * (b - c),
                                     s_rec, s_fake, r)
    return (x_rec, x_fake), _select(warmup, s_rec, chained)

  (x_rec, x_fake), dec_vjp, stats_g = jax.vjp(decode, state.params_g, z,
                                              has_aux=True)

  loss_rec, g_x_rec = jax.value_and_grad(
      lambda xr: losses.reconstruction_loss(x, xr).mean())(x_rec)
  kl_real, (g_mu, g_logvar) = jax.value_and_grad(
      lambda a, b: losses.kl_divergence(a, b).mean(), argnums=(0, 1))(mu, logvar)

  # Encoder on the fakes. E-step: gradients to params_e only (ng on inputs).
  def encode_fakes(params_e, stats, x_r, x_p):
    (mu_r, lv_r), stats = _apply(encoder, params_e, stats, x_r)
    (mu_p, lv_p), stats = _apply(encoder, params_e, stats, x_p)
    kl_r = losses.kl_divergence(mu_r, lv_r).mean()
    kl_p = losses.kl_divergence(mu_p, lv_p).mean()
    return (kl_r, kl_p), stats

  def hinge_cotangent(kl_r, kl_p):
    """d L_E / d (kl_rec, kl_fake) for the hinge on the *global* batch-mean KL.

    Each device uses the global hinge's active side with its local KL mean;
    averaging gradients over devices then gives the global-batch gradient.
    """
    scale = -w_adv
    return (scale * (m - _pmean(kl_r, axis_name) > 0).astype(kl_r.dtype),
            scale * (m - _pmean(kl_p, axis_name) > 0).astype(kl_p.dtype))

  sg = jax.lax.stop_gradient
  if config.mode == 'reference':
    (kl_rec, kl_fake), fakes_vjp, stats_e = jax.vjp(
        lambda p: encode_fakes(p, stats_e, sg(x_rec), sg(x_fake)),
        state.params_e, has_aux=True)
    (g_e_adv,) = fakes_vjp(hinge_cotangent(kl_rec, kl_fake))
  else:  # 'fused': one forward of E on the fakes, shared by both updates.
    (kl_rec, kl_fake), fakes_vjp, stats_e = jax.vjp(
        lambda p, xr, xp: encode_fakes(p, stats_e, xr, xp),
        state.params_e, x_rec, x_fake, has_aux=True)
    g_e_adv = fakes_vjp(hinge_cotangent(kl_rec, kl_fake))[0]

  # The reconstruction term reaches the encoder through z.
  _, g_z = dec_vjp((w_rec * g_x_rec, jnp.zeros_like(x_fake)))
  (g_e_real,) = enc_real_vjp((w_kl * g_mu, w_kl * g_logvar, g_z))
  g_e = _pmean(jax.tree_util.tree_map(jnp.add, g_e_real, g_e_adv), axis_name)
  params_e, opt_e = _adam_step(tx_e, g_e, state.opt_state_e, state.params_e)
  loss_e = losses.encoder_loss(
      loss_rec, kl_real, _pmean(kl_rec, axis_name), _pmean(kl_fake, axis_name),
      m_plus=m, weight_rec=w_rec, weight_kl=w_kl, weight_neg=phase(0.0, w_neg))

  # Decoder step: KLs of the fakes under the updated encoder (reference) or
  # the same forward (fused), differentiated w.r.t. the images only.
  half = w_kl_g
  if config.mode == 'reference':
    (kl_rec_g, kl_fake_g), g_vjp, stats_e = jax.vjp(
        lambda xr, xp: encode_fakes(params_e, stats_e, xr, xp),
        x_rec, x_fake, has_aux=True)
    g_xr_g, g_xp_g = g_vjp((half, half))
  else:
    kl_rec_g, kl_fake_g = kl_rec, kl_fake
    _, g_xr_g, g_xp_g = fakes_vjp((half, half))
  g_g, _ = dec_vjp((w_rec * g_x_rec + g_xr_g, g_xp_g))
  g_g = _pmean(g_g, axis_name)
  params_g, opt_g = _adam_step(tx_g, g_g, state.opt_state_g, state.params_g)
  loss_g = losses.decoder_loss(loss_rec, kl_rec_g, kl_fake_g,
                               weight_rec=w_rec, weight_kl=2.0 * w_kl_g)
  stats_e = _select(warmup, stats_e_real, stats_e)

  metrics = dict(
      loss_rec=loss_rec, kl_real=kl_real, kl_rec=kl_rec, kl_fake=kl_fake,
      kl_rec_g=kl_rec_g, kl_fake_g=kl_fake_g, loss_e=loss_e, loss_g=loss_g,
      grad_norm_e=optax.global_norm(g_e), grad_norm_g=optax.global_norm(g_g),
      mu_mean=mu.mean(), logvar_mean=logvar.mean(),
      vae_phase=jnp.asarray(warmup, jnp.float32))
  return (params_e, stats_e, opt_e, params_g, stats_g, opt_g), metrics


def train_step(state: TrainState, batch, config: ml_collections.ConfigDict, *,
               axis_name: Optional[str] = None, noise=None):
  """One IntroVAE iteration: (state, batch) -> (new_state, metrics).

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
    noise: optional (eps, z_p), each [B, hdim], to inject the random draws
      (parity tests); by default drawn from `state.rng` and `state.step`.

  Returns:
    The new state and a dict of scalar float32 metrics (global means);
    `finite` is 1 when both losses and every parameter, BatchNorm statistic
    and optimiser moment of the new state are finite (`finite_state`: the
    state alone). With `config.on_nonfinite='skip'` a step that is not
    finite keeps the previous state (only `step` and `skipped_steps` move).
  """
  x = batch['image'] if isinstance(batch, Mapping) else batch
  ct = jnp.promote_types(jnp.dtype(config.dtype), jnp.float32)
  x = jnp.asarray(x).astype(ct)
  bn_axis = axis_name if config.sync_batch_stats else None
  nets = (models.build_models(config, bn_axis), make_optimizers(config))
  if noise is None:
    noise = draw_noise(state.rng, state.step, x.shape[0], config.hdim, axis_name)
  eps, z_p = (jnp.asarray(a).astype(ct) for a in noise)
  new, metrics = _update(nets, state, x, eps, z_p, config, axis_name)
  params_e, stats_e, opt_e, params_g, stats_g, opt_g = new
  # BatchNorm running statistics: the mean of the devices' updates. Each
  # device updated them from its own rows; the replicated state must hold one
  # value, and the mean (an EMA of the devices' mean batch statistics, since
  # the update is linear) uses every device's data, where keeping device 0's,
  # as torch's DataParallel does, would discard the others' (docs in README,
  # "Data parallelism"). With sync_batch_stats the devices agree already.
  stats_e, stats_g = _pmean((stats_e, stats_g), axis_name)
  metrics = _pmean(metrics, axis_name)
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
  too in single-process runs), optionally `noise=(eps, z_p)` [B, hdim] each
  as `train_step` takes it, and returns the replicated new state and
  metrics. Each device runs `train_step` on its B / devices rows, exactly as
  under pmap: BatchNorm normalises per device (across devices with
  `sync_batch_stats`), the hinge sees the global batch means, gradients and
  running statistics are averaged over devices. The state's buffers are
  donated.

  `pmap=True`: `jax.pmap(train_step, axis_name='batch')` over the local
  devices, taking a `replicate`d state and batches [devices, per_device, ...].
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
  mapped = jax.shard_map(lambda state, batch, noise: fn(state, batch, noise=noise),
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
  first = lambda a: a.addressable_data(0)[0] if isinstance(a, jax.Array) else a[0]
  return jax.tree_util.tree_map(first, state)


def shard_batch(batch, num_devices: Optional[int] = None):
  """[B, ...] -> [devices, B // devices, ...] for the pmapped step, with a
  clear error if B does not divide."""
  n = num_devices or jax.local_device_count()
  def reshape(a):
    per = check_batch_divides(a.shape[0], n)
    return a.reshape((n, per) + a.shape[1:])
  return jax.tree_util.tree_map(reshape, batch)
