"""Soft-IntroVAE (Daniel & Tamar, CVPR 2021): the authors' iteration, exactly.

taldatech/soft-intro-vae-pytorch at b6dbf16, `soft_intro_vae/
train_soft_intro_vae.py` (`train_soft_intro_vae`; the 2-D version in
`soft_intro_vae_2d/train_soft_intro_vae_2d.py` is the same iteration, with
fakes encoded before reconstructions). The method, with each term's source
line: docs/introvae.md, section 5. Per iteration, with s = 1 / (C*H*W)
(`scale`, l. 456; 0.5 for 2-D points, `dim_scale`):

1. Encoder step, decoder frozen (l. 551-589): x_p = G(z_p), (mu, logvar) =
   E(x), x_r = G(z); for y in (x_r, x_p): (mu_y, lv_y) = E(ng y), y_r =
   G(reparam(mu_y, lv_y)) -- the frozen decoder, so gradients reach E through
   it -- and expELBO_y = mean exp(-2 s (b_rec ||y_r - y||^2 + b_neg KL_y))
   (l. 580-581; for y = x_r the target x_r is *not* detached, so that term
   also reaches E through z).
   L_E = s (b_rec L_AE + b_kl KL_real) + 0.25 (expELBO_r + expELBO_p)
   (l. 583-586).
2. Decoder step, encoder frozen, the *updated* encoder E' (l. 591-624):
   KL_y = KL(E'(y)) for y in (x_r, x_p) with gradients to G through y;
   y_rr = G(ng reparam(E'(y))); L_G = s (b_rec L_AE + 0.5 b_kl (KL_r + KL_p)
   + gamma_r 0.5 b_rec (||x_rr - ng x_r||^2 + ||x_pr - ng x_p||^2))
   (l. 618-620).
3. Warm-up (`num_vae_steps`, l. 512-533): one joint step of
   b_rec L_AE + b_kl KL_real (no scale) for both networks.

Five reparameterisation draws (`NOISE`) and one prior draw, shared by both
steps. The decoder step's x_p = G(z_p) and x_r = G(ng z) (l. 597-598) repeat
the encoder step's calls with unchanged parameters: they are reused, one VJP
serving both steps, and the running statistics end as the repeated calls
leave them (`base.chain_stats`). Decoder calls, in order: G(z_p), G(z),
G(z_rr), G(z_pr), [G(z_p), G(z) again], G(z_rr'), G(z_pr'); encoder calls:
E(x), E(x_r), E(x_p), E'(x_r), E'(x_p). The warm-up keeps E(x)'s and
G(z)'s. There is no fused form.
"""

import math

import jax
import jax.numpy as jnp
import optax

from introvae_jax import losses
from introvae_jax.objectives import base

NOISE = ('eps', 'z_p', 'eps_rec', 'eps_fake', 'eps_rec_g', 'eps_fake_g')
# What to change when a step diverges (the training loop's message).
DIVERGED = ("Raise soft_introvae.beta_neg (the authors' advice for NaN) or "
            'lower lr_e/lr_g')
FUSED = False
# Model FLOPs per example in forward-pass equivalents (as in introvae.py):
# encoder: E(x) 3, E(x_r) and E(x_p) in the E-step 3 each, E' on both in the
# D-step fwd + input grad 2 each: 13. Decoder: G(z_p), G(z) fwd 2; the
# E-step's input grad of G(z) 1; G(z_rr), G(z_pr) fwd + input grad 2 each;
# the D-step's both grads of G(z_p), G(z) 4; G(z_rr'), G(z_pr') fwd + both
# grads 3 each: 17.
PASSES = (13, 17)
READS = frozenset({'num_vae_steps', 'soft_introvae.beta_rec',
                   'soft_introvae.beta_kl', 'soft_introvae.beta_neg',
                   'soft_introvae.gamma_r'})


def exp_elbo(rec_err, kl, *, scale, beta_rec, beta_neg):
  """mean over the batch of exp(-2 s (b_rec * rec_err + b_neg * KL)), from
  per-example terms (l. 580-581)."""
  return jnp.exp(-2.0 * scale * (beta_rec * rec_err + beta_neg * kl)).mean()


def update(nets, state, x, noise, config, axis_name):
  """One iteration; see the module docstring."""
  encoder, decoder, tx_e, tx_g = nets
  hp = config.soft_introvae
  b_rec, b_kl, b_neg = hp.beta_rec, hp.beta_kl, hp.beta_neg
  scale = 1.0 / math.prod(x.shape[1:])
  warmup, phase = base.warmup_phase(state, config, base.compute_dtype(config))
  w_real = phase(1.0, scale)               # on b_rec*L_AE + b_kl*KL in L_E
  w_exp = phase(0.0, 0.25)                 # on each expELBO in L_E
  w_rec_g = phase(b_rec, scale * b_rec)    # on L_AE in L_G
  w_kl_g = phase(0.0, scale * 0.5 * b_kl)  # on each KL in L_G
  w_gamma = phase(0.0, scale * hp.gamma_r * 0.5 * b_rec)
  kl_mean = lambda mu, lv: losses.kl_divergence(mu, lv).mean()
  rec_err = losses.reconstruction_loss         # per example
  sg = jax.lax.stop_gradient
  r_g = state.batch_stats_g

  def encode_real(params_e):
    (mu, logvar), stats = base.apply(encoder, params_e, state.batch_stats_e, x)
    return (mu, logvar, losses.reparameterize(mu, logvar, noise['eps'])), stats

  (mu, logvar, z), enc_real_vjp, stats_e_real = jax.vjp(
      encode_real, state.params_e, has_aux=True)

  # G(z_p) and G(z) under one VJP (w.r.t. the decoder and z), for both steps.
  def decode(params_g, z):
    x_fake, s_fake = base.apply(decoder, params_g, r_g, noise['z_p'])
    x_rec, s_rec = base.apply(decoder, params_g, r_g, z)
    return (x_rec, x_fake), (s_fake, s_rec)

  (x_rec, x_fake), dec_vjp, (s_fake, s_rec) = jax.vjp(
      decode, state.params_g, z, has_aux=True)
  loss_rec, g_x_rec = jax.value_and_grad(
      lambda xr: rec_err(x, xr).mean())(x_rec)
  kl_real, (g_mu, g_logvar) = jax.value_and_grad(kl_mean, argnums=(0, 1))(
      mu, logvar)

  # Encoder step: the fakes through E and the frozen decoder. Differentiated
  # w.r.t. the encoder and the target x_r of the reconstructions' error.
  def exp_elbos(params_e, target_rec):
    (mu_r, lv_r), stats = base.apply(encoder, params_e, stats_e_real,
                                     sg(x_rec))
    x_rr, s_rr = base.apply(decoder, state.params_g, r_g,
                            losses.reparameterize(mu_r, lv_r, noise['eps_rec']))
    (mu_p, lv_p), stats = base.apply(encoder, params_e, stats, sg(x_fake))
    x_pr, s_pr = base.apply(decoder, state.params_g, r_g,
                            losses.reparameterize(mu_p, lv_p,
                                                  noise['eps_fake']))
    kl_r = losses.kl_divergence(mu_r, lv_r)
    kl_p = losses.kl_divergence(mu_p, lv_p)
    terms = dict(scale=scale, beta_rec=b_rec, beta_neg=b_neg)
    elbos = (exp_elbo(rec_err(target_rec, x_rr), kl_r, **terms),
             exp_elbo(rec_err(x_fake, x_pr), kl_p, **terms))
    return elbos, (stats, s_rr, s_pr, kl_r.mean(), kl_p.mean())

  (elbo_rec, elbo_fake), elbo_vjp, (stats_e, s_rr, s_pr, kl_rec, kl_fake) = (
      jax.vjp(exp_elbos, state.params_e, x_rec, has_aux=True))
  g_e_fake, g_target = elbo_vjp((w_exp, w_exp))
  _, g_z = dec_vjp((w_real * b_rec * g_x_rec + g_target,
                    jnp.zeros_like(x_fake)))
  (g_e_real,) = enc_real_vjp((w_real * b_kl * g_mu, w_real * b_kl * g_logvar,
                              g_z))
  g_e = base.pmean(jax.tree_util.tree_map(jnp.add, g_e_real, g_e_fake),
                   axis_name)
  params_e, opt_e = base.adam_step(tx_e, g_e, state.opt_state_e, state.params_e)
  loss_e = (w_real * (b_rec * loss_rec + b_kl * kl_real)
            + w_exp * (elbo_rec + elbo_fake))

  # Decoder step: the updated encoder on the fakes (gradients to the images),
  # then the fakes' reconstructions from detached codes.
  def encode_fakes(x_r, x_p):
    (mu_r, lv_r), stats = base.apply(encoder, params_e, stats_e, x_r)
    (mu_p, lv_p), stats = base.apply(encoder, params_e, stats, x_p)
    return (kl_mean(mu_r, lv_r), kl_mean(mu_p, lv_p)), (stats, mu_r, lv_r,
                                                        mu_p, lv_p)

  (kl_rec_g, kl_fake_g), fakes_vjp, (stats_e, mu_r, lv_r, mu_p, lv_p) = (
      jax.vjp(encode_fakes, x_rec, x_fake, has_aux=True))
  g_xr, g_xp = fakes_vjp((w_kl_g, w_kl_g))
  z_rr = sg(losses.reparameterize(mu_r, lv_r, noise['eps_rec_g']))
  z_pr = sg(losses.reparameterize(mu_p, lv_p, noise['eps_fake_g']))

  def rereconstruct(params_g):
    x_rr, s_rr_g = base.apply(decoder, params_g, r_g, z_rr)
    x_pr, s_pr_g = base.apply(decoder, params_g, r_g, z_pr)
    err_r = rec_err(sg(x_rec), x_rr).mean()
    err_p = rec_err(sg(x_fake), x_pr).mean()
    return w_gamma * (err_r + err_p), (err_r, err_p, s_rr_g, s_pr_g)

  (_, (loss_rec_rec, loss_fake_rec, s_rr_g, s_pr_g)), g_g_gamma = (
      jax.value_and_grad(rereconstruct, has_aux=True)(state.params_g))
  g_g, _ = dec_vjp((w_rec_g * g_x_rec + g_xr, g_xp))
  g_g = base.pmean(jax.tree_util.tree_map(jnp.add, g_g, g_g_gamma), axis_name)
  params_g, opt_g = base.adam_step(tx_g, g_g, state.opt_state_g, state.params_g)
  loss_g = (w_rec_g * loss_rec + w_kl_g * (kl_rec_g + kl_fake_g)
            + w_gamma * (loss_rec_rec + loss_fake_rec))

  stats_e = base.select(warmup, stats_e_real, stats_e)
  stats_g = base.select(
      warmup, base.chain_stats(r_g, s_rec),
      base.chain_stats(r_g, s_fake, s_rec, s_rr, s_pr, s_fake, s_rec, s_rr_g,
                       s_pr_g))
  metrics = dict(
      loss_rec=loss_rec, kl_real=kl_real, kl_rec=kl_rec, kl_fake=kl_fake,
      kl_rec_g=kl_rec_g, kl_fake_g=kl_fake_g, kl_gap=kl_fake_g - kl_real,
      expelbo_rec=elbo_rec, expelbo_fake=elbo_fake,
      loss_rec_rec=loss_rec_rec, loss_fake_rec=loss_fake_rec,
      loss_e=loss_e, loss_g=loss_g,
      grad_norm_e=optax.global_norm(g_e), grad_norm_g=optax.global_norm(g_g),
      mu_mean=mu.mean(), logvar_mean=logvar.mean(),
      vae_phase=jnp.asarray(warmup, jnp.float32))
  return (params_e, stats_e, opt_e, params_g, stats_g, opt_g), metrics
