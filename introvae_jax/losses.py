"""IntroVAE loss terms as plain functions of arrays.

Reductions follow the authors' code (hhb072/IntroVAE `networks.py`, `main.py`):
per-example sums over latent dimensions / pixels, then batch means, and the
margin hinge applied to the *batch-mean* KL. `ng(.)` of the paper is applied by
the caller (`jax.lax.stop_gradient` on the encoder's input) since it decides
which network a gradient reaches; these functions only do arithmetic.
"""

import jax
import jax.numpy as jnp


def kl_divergence(mu, logvar):
  """KL(N(mu, exp(logvar)) || N(0, I)) per example, summed over latents.

  -0.5 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j)); reference `kl_loss`.
  """
  dtype = jnp.promote_types(jnp.result_type(mu, logvar), jnp.float32)
  mu, logvar = mu.astype(dtype), logvar.astype(dtype)
  return -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar),
                        axis=-1)


def reconstruction_loss(x, x_rec):
  """Sum of squared errors per example (reference form, no factor 1/2)."""
  dtype = jnp.promote_types(jnp.result_type(x, x_rec), jnp.float32)
  diff = x_rec.astype(dtype) - x.astype(dtype)
  return jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)


def reparameterize(mu, logvar, eps):
  """z = mu + eps * exp(0.5 * logvar)."""
  return mu + eps * jnp.exp(0.5 * logvar)


def margin_hinge(kl_mean, m_plus):
  """relu(m_plus - KL) on a batch-mean KL (paper's [m - L_REG]^+)."""
  return jax.nn.relu(m_plus - kl_mean)


def encoder_loss(loss_rec, kl_real, kl_rec, kl_fake, *, m_plus, weight_rec,
                 weight_kl, weight_neg):
  """L_E = w_rec*L_AE + w_kl*(KL_real + 0.5*w_neg*(hinge(KL_rec) +
  hinge(KL_fake))).

  All arguments are batch means; `kl_rec`/`kl_fake` must come from the encoder
  applied to stop-gradient images (reference `lossE`).
  """
  adversarial = margin_hinge(kl_rec, m_plus) + margin_hinge(kl_fake, m_plus)
  return weight_rec * loss_rec + weight_kl * (
      kl_real + 0.5 * weight_neg * adversarial)


def decoder_loss(loss_rec, kl_rec, kl_fake, *, weight_rec, weight_kl):
  """L_G = w_rec*L_AE + 0.5*w_kl*(KL_rec + KL_fake), KLs from the updated
  encoder.

  The reference's `lossG` holds only the KL part; its decoder also receives the
  w_rec*L_AE gradient because `optimizerG.zero_grad()` is commented out.
  """
  return weight_rec * loss_rec + 0.5 * weight_kl * (kl_rec + kl_fake)


def vae_loss(loss_rec, kl_real, *, weight_rec=1.0, weight_kl=1.0):
  """Warm-up loss w_rec*L_AE + w_kl*KL (config vae_weight_rec/kl; the
  reference `train_vae` uses 1 and 1)."""
  return weight_rec * loss_rec + weight_kl * kl_real
