"""The plain VAE: the warm-up of the introspective objectives, at every step.

L = vae_weight_rec * L_AE + vae_weight_kl * KL(E(x)), one gradient for both
networks, both Adams stepping on it (hhb072/IntroVAE `main.py` `train_vae`;
compare's `betavae` sets the weights to the recipe's). It is the same
iteration as IntroVAE's warm-up steps (tests/test_objectives.py checks
them equal), computed without the adversarial terms. For the introspective
signal in the logs and compare's figures it also measures, without
gradients, the KL of the encoder on its reconstructions and on prior
samples; those calls leave the running statistics as they were, as the
warm-up does.
"""

import jax
import jax.numpy as jnp
import optax

from introvae_jax import losses
from introvae_jax.objectives import base

NOISE = ('eps', 'z_p')
# What to change when a step diverges (the training loop's message).
DIVERGED = 'Lower lr_e/lr_g or vae_weight_rec'
FUSED = False
# Forward-pass equivalents per example: encoder E(x) fwd + both grads (3) and
# the two measuring calls (2); decoder G(z) 3 and G(z_p) 1.
PASSES = (5, 4)
READS = frozenset({'vae_weight_rec', 'vae_weight_kl'})


def update(nets, state, x, noise, config, axis_name):
  """One VAE iteration; see the module docstring."""
  encoder, decoder, tx_e, tx_g = nets
  ct = base.compute_dtype(config)
  w_rec = jnp.asarray(config.vae_weight_rec, ct)
  w_kl = jnp.asarray(config.vae_weight_kl, ct)

  def loss_fn(params_e, params_g):
    (mu, logvar), stats_e = base.apply(encoder, params_e, state.batch_stats_e,
                                       x)
    z = losses.reparameterize(mu, logvar, noise['eps'])
    x_rec, stats_g = base.apply(decoder, params_g, state.batch_stats_g, z)
    loss_rec = losses.reconstruction_loss(x, x_rec).mean()
    kl_real = losses.kl_divergence(mu, logvar).mean()
    aux = dict(stats_e=stats_e, stats_g=stats_g, x_rec=x_rec, loss_rec=loss_rec,
               kl_real=kl_real, mu_mean=mu.mean(), logvar_mean=logvar.mean())
    return w_rec * loss_rec + w_kl * kl_real, aux

  (loss, aux), (g_e, g_g) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params_e, state.params_g)
  g_e, g_g = base.pmean((g_e, g_g), axis_name)
  params_e, opt_e = base.adam_step(tx_e, g_e, state.opt_state_e, state.params_e)
  params_g, opt_g = base.adam_step(tx_g, g_g, state.opt_state_g, state.params_g)

  # The introspective signal, measured only (statistics discarded).
  sg = jax.lax.stop_gradient
  x_fake, _ = base.apply(decoder, state.params_g, state.batch_stats_g,
                         noise['z_p'])
  kl = lambda images, stats: base.apply(encoder, state.params_e, stats,
                                        sg(images))
  (mu_r, lv_r), stats = kl(aux['x_rec'], aux['stats_e'])
  (mu_p, lv_p), _ = kl(x_fake, stats)
  metrics = dict(
      loss_rec=aux['loss_rec'], kl_real=aux['kl_real'],
      kl_rec=losses.kl_divergence(mu_r, lv_r).mean(),
      kl_fake=losses.kl_divergence(mu_p, lv_p).mean(),
      loss_e=loss, loss_g=w_rec * aux['loss_rec'],
      grad_norm_e=optax.global_norm(g_e), grad_norm_g=optax.global_norm(g_g),
      mu_mean=aux['mu_mean'], logvar_mean=aux['logvar_mean'],
      vae_phase=jnp.ones((), jnp.float32))
  return (params_e, aux['stats_e'], opt_e, params_g, aux['stats_g'],
          opt_g), metrics
