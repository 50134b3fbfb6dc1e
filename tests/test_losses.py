"""Loss terms against hand-written NumPy formulas (spec section 2 and 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from introvae_jax import losses


def np_kl(mu, logvar):
  """KL(N(mu, exp(logvar)) || N(0, I)) per example, written out in NumPy."""
  mu, logvar = np.float64(mu), np.float64(logvar)
  per_dim = 0.5 * (np.exp(logvar) + mu ** 2 - 1.0 - logvar)
  return per_dim.sum(axis=-1)


def np_sse(x, x_rec):
  """Sum over pixels and channels of (x_rec - x)^2, per example (no 1/2)."""
  d = np.float64(x_rec) - np.float64(x)
  return (d ** 2).reshape(len(d), -1).sum(axis=1)


def np_relu(v):
  return max(v, 0.0)


def test_kl_matches_numpy():
  rs = np.random.RandomState(0)
  mu = rs.randn(5, 7).astype(np.float32) * 2
  logvar = rs.randn(5, 7).astype(np.float32)
  kl = losses.kl_divergence(mu, logvar)
  assert kl.shape == (5,)
  np.testing.assert_allclose(kl, np_kl(mu, logvar), rtol=1e-6)


def test_kl_is_nonnegative_and_zero_at_the_prior():
  rs = np.random.RandomState(1)
  mu = rs.randn(200, 3).astype(np.float32) * rs.choice([1e-3, 1, 10], (200, 1))
  logvar = (rs.randn(200, 3)
            * rs.choice([1e-3, 1, 5], (200, 1))).astype(np.float32)
  assert np.all(np.asarray(losses.kl_divergence(mu, logvar)) >= 0)
  zero = np.zeros((2, 3), np.float32)
  np.testing.assert_array_equal(losses.kl_divergence(zero, zero), [0.0, 0.0])


def test_reconstruction_loss_matches_numpy():
  rs = np.random.RandomState(2)
  x = rs.rand(3, 4, 4, 3).astype(np.float32)
  x_rec = rs.randn(3, 4, 4, 3).astype(np.float32)
  got = losses.reconstruction_loss(x, x_rec)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, np_sse(x, x_rec), rtol=1e-6)
  points = rs.randn(6, 2).astype(np.float32)
  np.testing.assert_allclose(losses.reconstruction_loss(points, -points),
                             np_sse(points, -points), rtol=1e-6)


def test_reparameterize():
  rs = np.random.RandomState(3)
  mu, logvar, eps = (rs.randn(4, 3).astype(np.float32) for _ in range(3))
  np.testing.assert_allclose(losses.reparameterize(mu, logvar, eps),
                             mu + eps * np.exp(0.5 * logvar), rtol=1e-6)


# Per-example KLs of a batch of fakes whose batch mean (10.0) is above the
# margin while two of its examples are below it.
KL_FAKE_PER_EXAMPLE = np.array([2.0, 5.0, 14.0, 19.0])
MARGIN = 8.0


def test_hinge_acts_on_the_batch_mean_kl():
  w = dict(m_plus=MARGIN, weight_rec=0.3, weight_kl=0.7, weight_neg=0.9)
  kl_fake = KL_FAKE_PER_EXAMPLE.mean()
  kl_rec, kl_real, loss_rec = 3.0, 1.5, 40.0
  got = losses.encoder_loss(loss_rec, kl_real, kl_rec, kl_fake, **w)
  expected = 0.3 * loss_rec + 0.7 * (
      kl_real + 0.5 * 0.9 * (np_relu(MARGIN - kl_rec)
                             + np_relu(MARGIN - kl_fake)))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # The per-example hinge would give a different (larger) loss here.
  per_example = np.mean([np_relu(MARGIN - k) for k in KL_FAKE_PER_EXAMPLE])
  assert per_example > np_relu(MARGIN - kl_fake) + 1.0

  # And its gradient: zero for every fake example while the mean is past m.
  def loss_of_fake_kls(kls):
    return losses.encoder_loss(loss_rec, kl_real, kl_rec, kls.mean(), **w)
  grad = jax.grad(loss_of_fake_kls)(
      jnp.asarray(KL_FAKE_PER_EXAMPLE, jnp.float32))
  np.testing.assert_array_equal(grad, np.zeros(4))


def test_encoder_loss_inside_the_margin():
  w = dict(m_plus=100.0, weight_rec=0.05, weight_kl=1.0, weight_neg=0.5)
  got = losses.encoder_loss(200.0, 2.0, 30.0, 60.0, **w)
  expected = 0.05 * 200.0 + (2.0 + 0.25 * ((100 - 30.0) + (100 - 60.0)))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  grads = jax.grad(lambda r, f: losses.encoder_loss(200.0, 2.0, r, f, **w),
                   argnums=(0, 1))(30.0, 60.0)
  np.testing.assert_allclose(grads, (-0.25, -0.25), rtol=1e-6)


def test_decoder_loss_and_vae_loss():
  got = losses.decoder_loss(200.0, 30.0, 60.0, weight_rec=0.05, weight_kl=0.8)
  np.testing.assert_allclose(got, 0.05 * 200.0 + 0.5 * 0.8 * (30.0 + 60.0),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.vae_loss(200.0, 3.0), 203.0, rtol=1e-6)
  np.testing.assert_allclose(
      losses.vae_loss(200.0, 3.0, weight_rec=4.0, weight_kl=0.5), 801.5,
      rtol=1e-6)


@pytest.mark.parametrize('kl_mean,expected',
                         [(3.0, 5.0), (8.0, 0.0), (9.5, 0.0)])
def test_margin_hinge(kl_mean, expected):
  assert float(losses.margin_hinge(kl_mean, 8.0)) == expected
