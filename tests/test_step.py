"""The train step against independent computations.

The main check is a naive reference written here: separate `jax.grad` calls
per network, explicit parameter splitting, no jit, a hand-written Adam, and
BatchNorm statistics threaded in the reference code's call order. It agrees
with `train_step` over 3 adversarial steps, and over 3 warm-up steps plus the
switch to the adversarial phase: losses, gradients and running statistics in
float32 (each step started from the state under test), parameters and
optimiser states in float64 (independent runs; spec section 3b explains why
only float64 allows a tight comparison after Adam steps).

Gradients of the step under test are read from its Adam state: with
`adam_b1=0` the first moment after a step *is* that step's gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import introvae_jax
from introvae_jax import step as step_lib
from conftest import (adam_moments, assert_trees_close, in_subprocess,
                      initial_state, jitted_step, step_gradients, tiny_batch,
                      tiny_config, to_numpy)

tree_map = jax.tree_util.tree_map
sg = jax.lax.stop_gradient

X64 = in_subprocess('x64', {'JAX_ENABLE_X64': '1'})

# --------------------------------------------------------------------------
# The naive reference.

def kl(mu, logvar):
  """Per-example KL to N(0, I), spec section 2."""
  return -0.5 * jnp.sum(1 + logvar - mu ** 2 - jnp.exp(logvar), axis=-1)


def sse(x, x_rec):
  """Per-example sum of squared errors, spec section 2 (no factor 1/2)."""
  return jnp.sum((x_rec - x) ** 2, axis=tuple(range(1, x.ndim)))


def call(module, params, stats, inputs):
  """One train-mode call of a network: (output, its new batch_stats)."""
  variables = {'params': params}
  if stats:
    variables['batch_stats'] = stats
  out, new = module.apply(variables, inputs, train=True,
                          mutable=['batch_stats'])
  return out, new.get('batch_stats', stats)


def adam(params, grads, opt, lr, config):
  """Adam (Kingma & Ba) written out; opt = {'count', 'mu', 'nu'}."""
  b1, b2, eps = config.adam_b1, config.adam_b2, config.adam_eps
  count = opt['count'] + 1
  mu = tree_map(lambda m, g: b1 * m + (1 - b1) * g, opt['mu'], grads)
  nu = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, opt['nu'], grads)
  def new_param(p, m, v):
    m_hat = m / (1 - b1 ** count)
    v_hat = v / (1 - b2 ** count)
    return p - lr * m_hat / (jnp.sqrt(v_hat) + eps)
  return tree_map(new_param, params, mu, nu), dict(count=count, mu=mu, nu=nu)


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(tree)))


def naive_state(state):
  """A TrainState's contents as the plain dicts the naive reference uses."""
  def opt(o):
    count, mu, nu = adam_moments(o)
    return dict(count=int(count), mu=mu, nu=nu)
  return dict(step=int(state.step), pe=state.params_e, se=state.batch_stats_e,
              pg=state.params_g, sg=state.batch_stats_g,
              opt_e=opt(state.opt_state_e), opt_g=opt(state.opt_state_g))


def naive_step(config, st, x, eps, z_p, *, g_step_encoder='updated',
               hinge='batch_mean'):
  """One IntroVAE iteration as the reference PyTorch loop computes it.

  Returns (new naive state, metrics, (grad_e, grad_g)). `g_step_encoder`
  'initial' gives the fused variant's decoder update (KLs from the pre-update
  encoder); `hinge='per_example'` is the wrong reduction, for contrast.
  """
  encoder, decoder = introvae_jax.build_models(config)
  pe, se, pg, sgs = st['pe'], st['se'], st['pg'], st['sg']
  w_rec, w_kl, w_neg, m = (config.weight_rec, config.weight_kl,
                           config.weight_neg, config.m_plus)
  new = dict(st, step=st['step'] + 1)

  if st['step'] < config.num_vae_steps:
    # Warm-up (reference `train_vae`): model(real), loss = L_AE + KL, each
    # term weighted by vae_weight_rec / vae_weight_kl (reference: 1 and 1).
    a, b = config.vae_weight_rec, config.vae_weight_kl
    def vae_loss(pe, pg):
      (mu, lv), _ = call(encoder, pe, se, x)
      x_rec, _ = call(decoder, pg, sgs, mu + eps * jnp.exp(0.5 * lv))
      return a * sse(x, x_rec).mean() + b * kl(mu, lv).mean()
    g_e = jax.grad(vae_loss, argnums=0)(pe, pg)
    g_g = jax.grad(vae_loss, argnums=1)(pe, pg)
    (mu, lv), new['se'] = call(encoder, pe, se, x)
    x_rec, new['sg'] = call(decoder, pg, sgs, mu + eps * jnp.exp(0.5 * lv))
    loss_rec, kl_real = sse(x, x_rec).mean(), kl(mu, lv).mean()
    new['pe'], new['opt_e'] = adam(pe, g_e, st['opt_e'], config.lr_e, config)
    new['pg'], new['opt_g'] = adam(pg, g_g, st['opt_g'], config.lr_g, config)
    # Only the quantities the warm-up defines (the fakes' KLs and a separate
    # decoder loss do not exist in the reference's `train_vae`).
    metrics = dict(loss_rec=loss_rec, kl_real=kl_real,
                   loss_e=a * loss_rec + b * kl_real,
                   grad_norm_e=global_norm(g_e), grad_norm_g=global_norm(g_g),
                   mu_mean=mu.mean(), logvar_mean=lv.mean(), vae_phase=1.0)
    return new, metrics, (g_e, g_g)

  # Forward in the reference order, threading BatchNorm running statistics:
  # fake = G(z_p); E(x); G(z); E(ng x_rec); E(ng x_fake).
  x_fake, sg1 = call(decoder, pg, sgs, z_p)
  (mu, lv), se1 = call(encoder, pe, se, x)
  z = mu + eps * jnp.exp(0.5 * lv)
  x_rec, sg2 = call(decoder, pg, sg1, z)
  _, se2 = call(encoder, pe, se1, x_rec)
  _, se3 = call(encoder, pe, se2, x_fake)

  def hinge_of(per_example_kl):
    if hinge == 'batch_mean':
      return jax.nn.relu(m - per_example_kl.mean())
    return jax.nn.relu(m - per_example_kl).mean()

  def encoder_loss(pe, pg):
    x_fake = call(decoder, pg, sgs, z_p)[0]
    mu, lv = call(encoder, pe, se, x)[0]
    x_rec = call(decoder, pg, sg1, mu + eps * jnp.exp(0.5 * lv))[0]
    kl_rec = kl(*call(encoder, pe, se1, sg(x_rec))[0])
    kl_fake = kl(*call(encoder, pe, se2, sg(x_fake))[0])
    margin = kl(mu, lv).mean() + 0.5 * w_neg * (
        hinge_of(kl_rec) + hinge_of(kl_fake))
    return w_rec * sse(x, x_rec).mean() + w_kl * margin

  g_e = jax.grad(encoder_loss, argnums=0)(pe, pg)
  # lossE.backward() also fills the decoder's .grad, which the reference never
  # zeroes before lossG.backward(): that gradient is part of the G update.
  g_g_from_e_step = jax.grad(encoder_loss, argnums=1)(pe, pg)
  new['pe'], new['opt_e'] = adam(pe, g_e, st['opt_e'], config.lr_e, config)
  pe_g = new['pe'] if g_step_encoder == 'updated' else pe

  # G step: E'(x_rec), E'(x_fake).
  (mu_rg, lv_rg), se4 = call(encoder, pe_g, se3, x_rec)
  (mu_fg, lv_fg), se5 = call(encoder, pe_g, se4, x_fake)
  new['se'], new['sg'] = se5, sg2

  def decoder_kl_loss(pg):
    x_fake = call(decoder, pg, sgs, z_p)[0]
    x_rec = call(decoder, pg, sg1, z)[0]
    kl_rec = kl(*call(encoder, pe_g, se3, x_rec)[0]).mean()
    kl_fake = kl(*call(encoder, pe_g, se4, x_fake)[0]).mean()
    return 0.5 * w_kl * (kl_rec + kl_fake)

  g_g = tree_map(jnp.add, g_g_from_e_step, jax.grad(decoder_kl_loss)(pg))
  new['pg'], new['opt_g'] = adam(pg, g_g, st['opt_g'], config.lr_g, config)

  loss_rec, kl_real = sse(x, x_rec).mean(), kl(mu, lv).mean()
  kl_rec = kl(*call(encoder, pe, se1, x_rec)[0]).mean()
  kl_fake = kl(*call(encoder, pe, se2, x_fake)[0]).mean()
  kl_rec_g, kl_fake_g = kl(mu_rg, lv_rg).mean(), kl(mu_fg, lv_fg).mean()
  relu = lambda v: jnp.maximum(v, 0.0)
  metrics = dict(
      loss_rec=loss_rec, kl_real=kl_real, kl_rec=kl_rec, kl_fake=kl_fake,
      kl_rec_g=kl_rec_g, kl_fake_g=kl_fake_g,
      loss_e=w_rec * loss_rec + w_kl * (
          kl_real + 0.5 * w_neg * (relu(m - kl_rec) + relu(m - kl_fake))),
      loss_g=w_rec * loss_rec + 0.5 * w_kl * (kl_rec_g + kl_fake_g),
      grad_norm_e=global_norm(g_e), grad_norm_g=global_norm(g_g),
      mu_mean=mu.mean(), logvar_mean=lv.mean(), vae_phase=0.0)
  return new, metrics, (g_e, g_g)


def noise_for(state, config, batch_size=None):
  return step_lib.draw_noise(state.rng, state.step,
                             batch_size or config.batch_size, config.hdim)


def assert_metrics_close(got, expected, rtol):
  """Every metric the naive reference defines (all but `finite` in the
  adversarial phase)."""
  assert set(expected) <= set(got), set(expected) - set(got)
  for k in expected:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(expected[k]),
                               rtol=rtol, atol=rtol * 1e-2, err_msg=k)


# --------------------------------------------------------------------------
# Float32: losses, gradients and running statistics, step by step.

# (config fields, number of steps compared)
PHASES = {
    # 3 warm-up steps then the switch to the adversarial phase, in one
    # compiled function.
    'warmup': (dict(num_vae_steps=3), 4),
    # The warm-up weighted like a beta-VAE (compare's `betavae`).
    'warmup_weighted': (dict(num_vae_steps=3, vae_weight_rec=3.0,
                             vae_weight_kl=0.5), 4),
    'adversarial': (dict(num_vae_steps=0), 3),
}
# A margin the tiny conv model's KLs cross: at the first adversarial step one
# hinge term is active and the other is not.
MARGIN = 2.5


@pytest.mark.parametrize('phase', list(PHASES))
def test_matches_naive_reference_float32(phase):
  fields, num_steps = PHASES[phase]
  config = tiny_config('conv', adam_b1=0.0, m_plus=MARGIN, **fields)
  state = initial_state('conv')
  step = jitted_step(config)
  for t in range(num_steps):
    x = tiny_batch(config, seed=t)
    new_state, metrics = step(state, x)   # draws its own noise
    eps, z_p = noise_for(state, config)
    ref_state, ref_metrics, (g_e, g_g) = naive_step(
        config, naive_state(state), x, eps, z_p)
    assert float(metrics['vae_phase']) == float(t < config.num_vae_steps)
    assert_metrics_close(metrics, ref_metrics, rtol=1e-5)
    got_e, got_g = step_gradients(new_state)
    assert_trees_close(got_e, g_e, rtol=1e-5, atol_scale=1e-5,
                       what=f'{t} grad E')
    assert_trees_close(got_g, g_g, rtol=1e-5, atol_scale=1e-5,
                       what=f'{t} grad G')
    assert_trees_close(new_state.batch_stats_e, ref_state['se'], rtol=1e-5,
                       atol_scale=1e-5, what=f'{t} stats E')
    assert_trees_close(new_state.batch_stats_g, ref_state['sg'], rtol=1e-5,
                       atol_scale=1e-5, what=f'{t} stats G')
    assert int(new_state.step) == t + 1
    state = new_state


def test_hinge_acts_on_the_batch_mean_kl_in_the_step():
  """With the fakes' mean KL past m but some examples inside it, the encoder
  gradient is that of relu(m - mean KL), not of mean(relu(m - KL_i))."""
  base = tiny_config('mlp', adam_b1=0.0)
  state = initial_state('mlp')
  x = tiny_batch(base)
  eps, z_p = noise_for(state, base)
  encoder, decoder = introvae_jax.build_models(base)
  kl_fake = np.asarray(kl(*encoder.apply(
      {'params': state.params_e},
      decoder.apply({'params': state.params_g}, z_p))))
  margin = 0.5 * (kl_fake.min() + kl_fake.mean())
  assert kl_fake.min() < margin < kl_fake.mean()
  config = tiny_config('mlp', adam_b1=0.0, m_plus=float(margin))
  new_state, _ = introvae_jax.train_step(state, x, config, noise=(eps, z_p))
  got_e, _ = step_gradients(new_state)
  st = naive_state(state)
  _, _, (on_mean, _) = naive_step(config, st, x, eps, z_p)
  _, _, (per_example, _) = naive_step(config, st, x, eps, z_p,
                                      hinge='per_example')
  assert_trees_close(got_e, on_mean, rtol=1e-5, atol_scale=1e-5, what='grad E')
  difference = global_norm(tree_map(jnp.subtract, on_mean, per_example))
  assert difference > 1e-3 * global_norm(on_mean)   # 100x the tolerance


# --------------------------------------------------------------------------
# Gradient routing, each against its own independent computation.

def reconstruction_grad(config, state, x, eps):
  """d(w_rec * L_AE)/d decoder params, with z from the initial encoder."""
  encoder, decoder = introvae_jax.build_models(config)
  (mu, lv), _ = call(encoder, state.params_e, state.batch_stats_e, x)
  z = mu + eps * jnp.exp(0.5 * lv)
  return jax.grad(lambda pg: config.weight_rec * sse(
      x, call(decoder, pg, state.batch_stats_g, z)[0]).mean())(state.params_g)


def g_step_kl_grad(config, state, params_e, x, eps, z_p):
  """d(0.5 w_kl (KL(E(G(z))) + KL(E(G(z_p)))))/d decoder params,
  E = params_e."""
  encoder, decoder = introvae_jax.build_models(config)
  (mu, lv), _ = call(encoder, state.params_e, state.batch_stats_e, x)
  z = mu + eps * jnp.exp(0.5 * lv)
  def loss(pg):
    kls = [kl(*call(encoder, params_e, state.batch_stats_e,
                    call(decoder, pg, state.batch_stats_g, zz)[0])[0]).mean()
           for zz in (z, z_p)]
    return 0.5 * config.weight_kl * (kls[0] + kls[1])
  return jax.grad(loss)(state.params_g)


def routing_setup(**overrides):
  config = tiny_config('conv', adam_b1=0.0, **overrides)
  state = initial_state('conv')
  x = tiny_batch(config, seed=5)
  eps, z_p = noise_for(state, config)
  # Unjitted: each config would otherwise compile its own step.
  new_state, metrics = introvae_jax.train_step(state, x, config,
                                               noise=(eps, z_p))
  return config, state, x, eps, z_p, new_state, metrics


def test_decoder_moves_by_an_adam_step_on_the_reconstruction_gradient_alone():
  """(a) weight_kl=0: the decoder still gets w_rec * dL_AE (the gradient the
  reference keeps from lossE.backward()), and one Adam step on exactly that."""
  config, state, x, eps, _, new_state, _ = routing_setup(weight_kl=0.0)
  expected = reconstruction_grad(config, state, x, eps)
  _, got = step_gradients(new_state)
  assert_trees_close(got, expected, rtol=1e-5, atol_scale=1e-5, what='grad G')
  # The parameter change is one Adam step (from a zero state) on that gradient.
  adam_step = tree_map(
      lambda g: -config.lr_g * g / (jnp.sqrt(g * g) + config.adam_eps),
      expected)
  change = tree_map(jnp.subtract, new_state.params_g, state.params_g)
  well_conditioned = tree_map(lambda g: np.abs(g) > 1e-4 * np.abs(g).max(),
                              expected)
  for c, a, ok in zip(*(jax.tree_util.tree_leaves(t) for t in
                        (change, adam_step, well_conditioned))):
    np.testing.assert_allclose(np.asarray(c)[ok], np.asarray(a)[ok], rtol=1e-3)
  assert global_norm(change) > 0.5 * config.lr_g


def test_encoder_step_gives_the_decoder_no_gradient_without_reconstruction():
  """(b) weight_rec=0: the decoder's gradient is the G-step KL term only."""
  config, _, x, eps, z_p, new_state, _ = routing_setup(weight_rec=0.0)
  state = initial_state('conv')
  expected = g_step_kl_grad(config, state, new_state.params_e, x, eps, z_p)
  _, got = step_gradients(new_state)
  assert_trees_close(got, expected, rtol=1e-5, atol_scale=1e-5, what='grad G')


def test_decoder_step_sees_the_updated_encoder():
  """(c) lr_e changes the decoder's update; with lr_e=0 it is the update
  computed with the initial encoder."""
  config, state, x, eps, z_p, frozen_e, _ = routing_setup(lr_e=0.0)
  assert_trees_close(frozen_e.params_e, state.params_e, rtol=0, what='params E')
  expected = tree_map(jnp.add, reconstruction_grad(config, state, x, eps),
                      g_step_kl_grad(config, state, state.params_e, x, eps,
                                     z_p))
  _, got_frozen = step_gradients(frozen_e)
  assert_trees_close(got_frozen, expected, rtol=1e-5, atol_scale=1e-5,
                     what='grad G')
  _, _, _, _, _, fast_e, _ = routing_setup(lr_e=5e-2)
  _, got_fast = step_gradients(fast_e)
  difference = global_norm(tree_map(jnp.subtract, got_fast, got_frozen))
  assert difference > 1e-3 * global_norm(got_frozen)


# --------------------------------------------------------------------------
# Fused mode (not the reference algorithm).

def test_fused_mode_encoder_update_and_pre_update_decoder_step():
  config = tiny_config('conv', adam_b1=0.0, mode='fused')
  reference = tiny_config('conv', adam_b1=0.0)
  state = initial_state('conv')
  x = tiny_batch(config, seed=6)
  eps, z_p = noise_for(state, config)
  fused_state, fused_metrics = introvae_jax.train_step(state, x, config,
                                                       noise=(eps, z_p))
  ref_state, ref_metrics = introvae_jax.train_step(state, x, reference,
                                                   noise=(eps, z_p))
  # Its encoder update is the reference mode's.
  assert_trees_close(step_gradients(fused_state)[0],
                     step_gradients(ref_state)[0],
                     rtol=1e-5, atol_scale=1e-5, what='grad E')
  assert_trees_close(fused_state.params_e, ref_state.params_e, rtol=1e-5,
                     atol_scale=1e-5, what='params E')
  # Its decoder step uses the pre-update encoder, as in the naive computation.
  _, naive_metrics, (_, naive_g) = naive_step(
      config, naive_state(state), x, eps, z_p, g_step_encoder='initial')
  assert_trees_close(step_gradients(fused_state)[1], naive_g, rtol=1e-5,
                     atol_scale=1e-5, what='grad G')
  assert_metrics_close(fused_metrics, naive_metrics, rtol=1e-5)
  np.testing.assert_allclose(fused_metrics['kl_rec_g'], fused_metrics['kl_rec'])
  assert abs(float(ref_metrics['kl_rec_g'] - ref_metrics['kl_rec'])) > 1e-6


# --------------------------------------------------------------------------
# Determinism.

def test_same_seed_same_run_and_jit_matches_eager():
  config = tiny_config('conv', adam_b1=0.0, m_plus=MARGIN)   # compiled above
  x = tiny_batch(config, seed=0)
  fresh = introvae_jax.create_train_state(config, jax.random.PRNGKey(0))
  assert_trees_close(fresh, initial_state('conv'), rtol=0, what='init')
  runs = [to_numpy(jitted_step(config)(state, x))
          for state in (fresh, initial_state('conv'))]
  assert_trees_close(runs[0], runs[1], rtol=0, what='same seed')
  eager_state, eager_metrics = introvae_jax.train_step(fresh, x, config)
  jit_state, jit_metrics = runs[0]
  assert_metrics_close(eager_metrics, jit_metrics, rtol=1e-5)
  for got, expected in zip(step_gradients(eager_state),
                           step_gradients(jit_state)):
    assert_trees_close(got, expected, rtol=1e-5, atol_scale=1e-5, what='grads')
  assert_trees_close(eager_state.batch_stats_e, jit_state.batch_stats_e,
                     rtol=1e-5, atol_scale=1e-5, what='stats E')
  assert_trees_close(eager_state.batch_stats_g, jit_state.batch_stats_g,
                     rtol=1e-5, atol_scale=1e-5, what='stats G')


# --------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize('overrides,message', [
    (dict(image_size=48, channels=(4, 8)), 'image_size=48 is not 4'),
    (dict(image_size=32, channels=(4, 8)),
     'image_size=32 does not match channels'),
    (dict(mode='introspective'), "mode='introspective'"),
    (dict(arch='transformer'), "arch='transformer'"),
], ids=['size', 'channels', 'mode', 'arch'])
def test_invalid_config_raises_a_clear_error(overrides, message):
  config = tiny_config('conv')
  for name, value in overrides.items():
    setattr(config, name, value)
  with pytest.raises(ValueError, match=message):
    introvae_jax.validate(config)
  with pytest.raises(ValueError, match=message):
    introvae_jax.create_train_state(config, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=message):
    introvae_jax.make_train_step(config, pmap=False)


def test_misspelled_config_field_raises():
  config = introvae_jax.base_config()
  with pytest.raises(AttributeError, match='weight_recc'):
    config.weight_recc = 1.0
  with pytest.raises(AttributeError):
    tiny_config('conv', weight_recc=1.0)


def test_shard_batch_rejects_an_indivisible_batch():
  with pytest.raises(ValueError,
                     match='batch_size=6 does not divide over 4 devices'):
    introvae_jax.shard_batch(np.zeros((6, 2), np.float32), num_devices=4)
  assert introvae_jax.shard_batch(
      np.zeros((8, 2)), num_devices=4).shape == (4, 2, 2)


# --------------------------------------------------------------------------
# Float64 (child process with jax_enable_x64): parameters and optimiser
# states after 3 steps, and finite differences.

def to_float64(tree):
  return tree_map(lambda a: jnp.asarray(a, jnp.float64)
                  if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
                  tree)


def check_x64():
  assert jax.config.jax_enable_x64, 'this test needs JAX_ENABLE_X64=1'


@X64
@pytest.mark.parametrize('phase', [  # float32 runs every phase fast
    p if p == 'warmup' else pytest.param(p, marks=pytest.mark.slow)
    for p in PHASES])
def test_matches_naive_reference_float64(phase):
  check_x64()
  fields, num_steps = PHASES[phase]
  config = tiny_config('conv', dtype='float64', m_plus=MARGIN, **fields)
  state = to_float64(initial_state('conv'))
  ref = naive_state(state)
  step = jitted_step(config)
  for t in range(num_steps):
    x = tiny_batch(config, seed=t, dtype=np.float64)
    eps, z_p = to_float64(noise_for(state, config))
    state, metrics = step(state, x, noise=(eps, z_p))
    ref, ref_metrics, _ = naive_step(config, ref, x, eps, z_p)
    assert_metrics_close(metrics, ref_metrics, rtol=1e-8)
  assert metrics['loss_e'].dtype == jnp.float64
  for name, got, expected in [
      ('params E', state.params_e, ref['pe']),
      ('params G', state.params_g, ref['pg']),
      ('stats E', state.batch_stats_e, ref['se']),
      ('stats G', state.batch_stats_g, ref['sg'])]:
    assert_trees_close(got, expected, rtol=1e-8, atol_scale=1e-10, what=name)
  for name, opt, expected in [('Adam E', state.opt_state_e, ref['opt_e']),
                              ('Adam G', state.opt_state_g, ref['opt_g'])]:
    count, mu, nu = adam_moments(opt)
    assert int(count) == expected['count'] == num_steps
    assert_trees_close(mu, expected['mu'], rtol=1e-8, atol_scale=1e-10,
                       what=name)
    assert_trees_close(nu, expected['nu'], rtol=1e-8, atol_scale=1e-10,
                       what=name)


# A NumPy MLP, independent of Flax, for finite differences.

def np_mlp(params, h, n_hidden):
  for i in range(n_hidden):
    h = np.maximum(h @ params[f'fc_{i}']['kernel'] + params[f'fc_{i}']['bias'],
                   0)
  return h @ params['fc_out']['kernel'] + params['fc_out']['bias']


def np_kl(mu, logvar):
  return -0.5 * np.sum(1 + logvar - mu ** 2 - np.exp(logvar), axis=-1)


def finite_difference_grad(f, params, h=1e-6):
  grad = tree_map(np.zeros_like, params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    target = grad
    for k in path[:-1]:
      target = target[k.key]
    for idx in np.ndindex(leaf.shape):
      orig = leaf[idx]
      leaf[idx] = orig + h
      up = f(params)
      leaf[idx] = orig - h
      down = f(params)
      leaf[idx] = orig
      target[path[-1].key][idx] = (up - down) / (2 * h)
  return grad


@X64
def test_finite_difference_gradients_float64():
  """(d) Both networks' gradients in the step vs central differences of the
  losses written in NumPy (MLP model: no BatchNorm, no Flax)."""
  check_x64()
  state = to_float64(initial_state('mlp'))
  base = tiny_config('mlp')
  x = tiny_batch(base, seed=3, dtype=np.float64)
  eps, z_p = (np.asarray(a) for a in to_float64(noise_for(state, base)))
  n = len(base.mlp_hidden)
  encode = lambda pe, v: np.split(np_mlp(pe, v, n), 2, axis=-1)
  decode = lambda pg, v: np_mlp(pg, v, n)
  reparam = lambda mu, lv: mu + eps * np.exp(0.5 * lv)
  sse_mean = lambda a: np.mean(np.sum((a - x) ** 2, axis=-1))
  writable = lambda tree: tree_map(np.array, tree)
  pe0, pg0 = writable(state.params_e), writable(state.params_g)
  x_fake0 = decode(pg0, z_p)            # ng(.): held fixed in the E loss
  z0 = reparam(*encode(pe0, x))
  x_rec0 = decode(pg0, z0)
  # A margin between the fakes' two KLs: one hinge term active, one not.
  kls = sorted(np_kl(*encode(pe0, v)).mean() for v in (x_rec0, x_fake0))
  assert kls[1] - kls[0] > 1e-3, kls
  config = tiny_config('mlp', dtype='float64', adam_b1=0.0,
                       m_plus=float(np.mean(kls)))
  w_rec, w_kl, w_neg, m = (config.weight_rec, config.weight_kl,
                           config.weight_neg, config.m_plus)

  new_state, _ = jitted_step(config)(state, x, noise=(eps, z_p))
  got_e, got_g = step_gradients(new_state)
  assert jax.tree_util.tree_leaves(got_e)[0].dtype == jnp.float64

  def loss_e(pe):
    mu, lv = encode(pe, x)
    hinge = lambda v: max(m - np_kl(*encode(pe, v)).mean(), 0.0)
    return (w_rec * sse_mean(decode(pg0, reparam(mu, lv))) +
            w_kl * (np_kl(mu, lv).mean() +
                    0.5 * w_neg * (hinge(x_rec0) + hinge(x_fake0))))

  pe1 = to_numpy(new_state.params_e)
  def loss_g(pg):   # w_rec * L_AE (kept from the E step) + L_G with E'
    x_rec = decode(pg, z0)
    kls = [np_kl(*encode(pe1, v)).mean() for v in (x_rec, decode(pg, z_p))]
    return w_rec * sse_mean(x_rec) + 0.5 * w_kl * (kls[0] + kls[1])

  assert_trees_close(got_e, finite_difference_grad(loss_e, pe0), rtol=1e-6,
                     atol_scale=1e-7, what='grad E')
  assert_trees_close(got_g, finite_difference_grad(loss_g, pg0), rtol=1e-6,
                     atol_scale=1e-7, what='grad G')
