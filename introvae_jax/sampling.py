"""Prior samples, reconstructions and image grids from a TrainState.

BatchNorm at sampling time: `use_running_average=False` normalises each call
with its own batch statistics (the reference's behaviour: its images are made
in train mode); `True` uses the running averages kept in the state. Measured
on the offline-digits default (README): batch statistics give the better
samples (digit FD 210 vs 244, SWD 54 vs 59), so they are the default.
"""

import functools
import io

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from introvae_jax import losses
from introvae_jax import models


def _frozen(config):
  return ml_collections.FrozenConfigDict(config)


def _apply(module, params, stats, x, use_running_average):
  variables = {'params': params, 'batch_stats': stats}
  if use_running_average:
    return module.apply(variables, x, train=False)
  # Batch statistics; the running averages are left as they are.
  return module.apply(variables, x, train=True, mutable=['batch_stats'])[0]


@functools.partial(jax.jit, static_argnames=('config', 'use_running_average'))
def _decode(state, z, config, use_running_average):
  _, decoder = models.build_models(config)
  out = _apply(decoder, state.params_g, state.batch_stats_g, z,
               use_running_average)
  return jnp.clip(out, 0.0, 1.0) if config.arch == 'conv' else out


@functools.partial(jax.jit, static_argnames=('config', 'use_running_average'))
def _encode(state, x, config, use_running_average):
  encoder, _ = models.build_models(config)
  return _apply(encoder, state.params_e, state.batch_stats_e, x,
                use_running_average)


def decode(state, z, config, use_running_average=False):
  """G(z); images are clipped to [0, 1]."""
  return _decode(state, z, _frozen(config), use_running_average)


def encode(state, x, config, use_running_average=False):
  """(mu, logvar) of images x."""
  return _encode(state, x, _frozen(config), use_running_average)


def reconstruct(state, x, config, use_running_average=False):
  """G(mu(x)): the posterior mean decoded (no sampling noise)."""
  mu, _ = encode(state, x, config, use_running_average)
  return decode(state, mu, config, use_running_average)


def sample(state, rng, num, config, temperature=1.0, use_running_average=False):
  """Decoded prior samples z ~ N(0, temperature^2 I)."""
  z = temperature * jax.random.normal(rng, (num, config.hdim), jnp.float32)
  return decode(state, z, config, use_running_average)


def kl_stats(state, x, z, config, use_running_average=False):
  """Mean KL of real images, their reconstructions and decoded z (the
  introspective signal: fakes should sit near or above m_plus)."""
  kl = lambda imgs: float(losses.kl_divergence(
      *encode(state, imgs, config, use_running_average)).mean())
  return {'kl_real': kl(x),
          'kl_rec': kl(reconstruct(state, x, config, use_running_average)),
          'kl_fake': kl(decode(state, z, config, use_running_average))}


def image_grid(images, ncol: int = 8) -> np.ndarray:
  """[N, H, W, C] floats in [0, 1] -> one uint8 [rows*H, ncol*W, C] grid."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncol = min(ncol, n)
  rows = -(-n // ncol)
  grid = np.ones((rows * h, ncol * w, c), np.float32)
  for i, img in enumerate(images):
    r, q = divmod(i, ncol)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  return np.round(grid * 255).astype(np.uint8)


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a uint8 [H, W, 1 or 3] array as PNG (local or gs://), creating
  parent folders."""
  buffer = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
      buffer, format='PNG')
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


def slerp(z0, z1, t):
  """Spherical interpolation between latent vectors (falls back to linear
  when they are parallel)."""
  z0, z1 = np.asarray(z0, np.float64), np.asarray(z1, np.float64)
  cos = np.dot(z0, z1) / (np.linalg.norm(z0) * np.linalg.norm(z1))
  omega = np.arccos(np.clip(cos, -1.0, 1.0))
  if np.sin(omega) < 1e-6:
    return (1 - t) * z0 + t * z1
  return (np.sin((1 - t) * omega) * z0 + np.sin(t * omega) * z1) / np.sin(omega)


def interpolate(state, x0, x1, config, num: int = 8, kind: str = 'linear',
                use_running_average=False):
  """Decoded path between the posterior means of two images [H, W, C]."""
  mu, _ = encode(state, jnp.stack([x0, x1]), config, use_running_average)
  mu = np.asarray(mu)
  ts = np.linspace(0.0, 1.0, num)
  if kind == 'linear':
    zs = [(1 - t) * mu[0] + t * mu[1] for t in ts]
  elif kind == 'slerp':
    zs = [slerp(mu[0], mu[1], t) for t in ts]
  else:
    raise ValueError(f"kind must be 'linear' or 'slerp', got {kind!r}.")
  return decode(state, jnp.asarray(np.stack(zs), jnp.float32), config,
                use_running_average)
