"""IntroVAE (Huang et al., NeurIPS 2018): the authors' iteration, exactly.

hhb072/IntroVAE at c8ce5d2, `main.py` (paper Algorithm 1); the method, with
every formula and its source line: docs/introvae.md, sections 2-4.

1. encoder update on L_E (l. 181-201), with ng(.) = `jax.lax.stop_gradient`
   on the reconstructions and prior samples it sees as fakes;
2. decoder update on L_G (l. 204-215), whose KLs come from the *updated*
   encoder, plus the w_rec * L_AE gradient the reference keeps (its
   `optimizerG.zero_grad()` is commented out, l. 212);
3. warm-up (`num_vae_steps`, `train_vae`, l. 129-153): L_AE + KL for both.

Nothing is computed twice (docs/introvae.md, section 3c): one VJP of the
two decoder calls serves both the reconstruction cotangent and the G-step
cotangents, and the G step differentiates the updated encoder with respect
to its inputs only. BatchNorm runs in train mode for every call, each
normalising its own batch and updating running statistics in the
reference's call order: decoder(z_p), decoder(z); encoder(x),
encoder(ng x_r), encoder(ng x_p), encoder'(x_r), encoder'(x_p).
"""

import jax
import jax.numpy as jnp
import optax

from introvae_jax import losses
from introvae_jax.objectives import base

NOISE = ('eps', 'z_p')
# What to change when a step diverges (the training loop's message).
DIVERGED = 'Lower lr_e/lr_g or weight_rec'
FUSED = True
# Model FLOPs per example in forward-pass equivalents (a backward is one
# forward for the input gradient plus one for the weight gradient), reference
# mode: encoder: E(x) fwd + both grads (3); the E-step on the two fakes, fwd +
# both grads each (6); the G-step with E' on the two fakes, fwd + input grad
# each (4): 13. Decoder: G(z_p), G(z) fwd (2); the encoder's gradient through
# z, input grad of G(z) (1); the G-step, both grads of both calls (4): 7. The
# authors' loop runs 8 (it back-propagates the reconstruction through the
# decoder's weights twice); XLA's count of this step matches 13 + 7
# (docs/performance.md, "Speed against the PyTorch reference").
PASSES = (13, 7)
READS = frozenset({'mode', 'm_plus', 'weight_rec', 'weight_kl', 'weight_neg',
                   'num_vae_steps', 'vae_weight_rec', 'vae_weight_kl'})


def update(nets, state, x, noise, config, axis_name):
  """One iteration, reference ('reference') or one-pass ('fused') mode.

  The VAE warm-up is this same computation with w_rec = vae_weight_rec,
  w_kl = vae_weight_kl (the reference's 1 and 1) and no adversarial terms (so
  L_E = w_rec*L_AE + w_kl*KL and the decoder's gradient is that of
  w_rec*L_AE), the running statistics of the fake-image calls discarded.
  Selecting weights, rather than branching with `lax.cond`, keeps one
  compiled function and XLA:CPU fast (a conditional made the step 15x slower
  there).
  """
  encoder, decoder, tx_e, tx_g = nets
  eps, z_p = noise['eps'], noise['z_p']
  warmup, phase = base.warmup_phase(state, config, base.compute_dtype(config))
  w_rec = phase(config.vae_weight_rec, config.weight_rec)
  w_kl = phase(config.vae_weight_kl, config.weight_kl)
  w_neg, m = config.weight_neg, config.m_plus
  w_adv = phase(0.0, w_kl * 0.5 * w_neg)     # on each hinge term in L_E
  w_kl_g = phase(0.0, 0.5 * w_kl)            # on each KL term in L_G

  # Encoder on real images, with the reparameterised sample.
  def encode_real(params_e):
    (mu, logvar), stats = base.apply(encoder, params_e, state.batch_stats_e, x)
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
    x_fake, s_fake = base.apply(decoder, params_g, r, z_p)
    x_rec, s_rec = base.apply(decoder, params_g, r, z)
    return (x_rec, x_fake), base.select(warmup, s_rec,
                                        base.chain_stats(r, s_fake, s_rec))

  (x_rec, x_fake), dec_vjp, stats_g = jax.vjp(decode, state.params_g, z,
                                              has_aux=True)

  loss_rec, g_x_rec = jax.value_and_grad(
      lambda xr: losses.reconstruction_loss(x, xr).mean())(x_rec)
  kl_real, (g_mu, g_logvar) = jax.value_and_grad(
      lambda a, b: losses.kl_divergence(a, b).mean(),
      argnums=(0, 1))(mu, logvar)

  # Encoder on the fakes. E-step: gradients to params_e only (ng on inputs).
  def encode_fakes(params_e, stats, x_r, x_p):
    (mu_r, lv_r), stats = base.apply(encoder, params_e, stats, x_r)
    (mu_p, lv_p), stats = base.apply(encoder, params_e, stats, x_p)
    kl_r = losses.kl_divergence(mu_r, lv_r).mean()
    kl_p = losses.kl_divergence(mu_p, lv_p).mean()
    return (kl_r, kl_p), stats

  def hinge_cotangent(kl_r, kl_p):
    """d L_E / d (kl_rec, kl_fake) for the hinge on the *global* batch-mean KL.

    Each device uses the global hinge's active side with its local KL mean;
    averaging gradients over devices then gives the global-batch gradient.
    """
    scale = -w_adv
    return (scale * (m - base.pmean(kl_r, axis_name) > 0).astype(kl_r.dtype),
            scale * (m - base.pmean(kl_p, axis_name) > 0).astype(kl_p.dtype))

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
  g_e = base.pmean(jax.tree_util.tree_map(jnp.add, g_e_real, g_e_adv),
                   axis_name)
  params_e, opt_e = base.adam_step(tx_e, g_e, state.opt_state_e, state.params_e)
  loss_e = losses.encoder_loss(
      loss_rec, kl_real, base.pmean(kl_rec, axis_name),
      base.pmean(kl_fake, axis_name),
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
  g_g = base.pmean(g_g, axis_name)
  params_g, opt_g = base.adam_step(tx_g, g_g, state.opt_state_g, state.params_g)
  loss_g = losses.decoder_loss(loss_rec, kl_rec_g, kl_fake_g,
                               weight_rec=w_rec, weight_kl=2.0 * w_kl_g)
  stats_e = base.select(warmup, stats_e_real, stats_e)

  metrics = dict(
      loss_rec=loss_rec, kl_real=kl_real, kl_rec=kl_rec, kl_fake=kl_fake,
      kl_rec_g=kl_rec_g, kl_fake_g=kl_fake_g, loss_e=loss_e, loss_g=loss_g,
      grad_norm_e=optax.global_norm(g_e), grad_norm_g=optax.global_norm(g_g),
      mu_mean=mu.mean(), logvar_mean=logvar.mean(),
      vae_phase=jnp.asarray(warmup, jnp.float32))
  return (params_e, stats_e, opt_e, params_g, stats_g, opt_g), metrics
