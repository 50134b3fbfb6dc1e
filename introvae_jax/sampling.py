"""Prior samples, reconstructions and image grids from a TrainState.

BatchNorm at sampling time: `use_running_average=False` normalises each call
with its own batch statistics (the reference's behaviour: its images are made
in train mode); `True` uses the running averages kept in the state. Measured
on the offline-digits default (README): batch statistics give the better
samples (digit FD 210 vs 244, SWD 54 vs 59), so they are the default.

Requests of any size are made `CHUNK_SIZE` images per network call
(`chunk_bounds`, `sample_chunks`), so memory stays bounded; `enable_x64_for_run`
lets a tool compute a float64 run in float64.
"""

import functools
import io
from typing import Iterator, Optional, Tuple

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from introvae_jax import configuration
from introvae_jax import errors
from introvae_jax import losses
from introvae_jax import models
from introvae_jax import workdir as workdir_lib

# Images per network call of the tools (`introvae_jax.generate`, evaluation),
# whatever the request: memory stays bounded. With batch statistics
# (use_running_average=False) an image depends on the others of its call, so
# this is fixed, not fitted to the machine. A request of up to CHUNK_SIZE
# images is one call, as it was before requests were chunked. 250 is the batch
# evaluation already used (its outputs are unchanged too) and is above the
# sample tool's default --num=64.
CHUNK_SIZE = 250


class RequestTooLargeError(errors.UserError, ValueError):
  """A request for more images than the tool makes, or than fits."""


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
  """Decoded prior samples z ~ N(0, temperature^2 I), in one call."""
  return decode(state, chunk_noise(rng, 0, num, config.hdim, temperature),
                config, use_running_average)


def format_bytes(num_bytes: float) -> str:
  """'3.7 TiB', '512 B': a size for messages."""
  units = ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB')
  i = 0
  while num_bytes >= 1024 and i < len(units) - 1:
    num_bytes /= 1024
    i += 1
  return f'{num_bytes:.0f} B' if i == 0 else f'{num_bytes:.1f} {units[i]}'


def chunk_bounds(num: int,
                 size: Optional[int] = None) -> Iterator[Tuple[int, int]]:
  """(start, stop) of consecutive chunks of `size` (CHUNK_SIZE) over num."""
  size = size or CHUNK_SIZE
  for start in range(0, num, size):
    yield start, min(start + size, num)


def chunk_noise(rng, index: int, size: int, hdim: int, temperature=1.0):
  """Prior noise [size, hdim] of chunk `index` of a request.

  Chunk 0 is drawn from `rng` itself, as `sample` draws it, so a request of
  one chunk is unchanged; chunk c >= 1 from fold_in(rng, c), so the first c
  chunks of a request do not depend on its size.
  """
  key = rng if index == 0 else jax.random.fold_in(rng, index)
  return temperature * jax.random.normal(key, (size, hdim), jnp.float32)


def sample_chunks(state, rng, num, config, temperature=1.0,
                  use_running_average=False
                  ) -> Iterator[Tuple[int, np.ndarray]]:
  """(start, images as NumPy) of `num` prior samples, one decode call of at
  most CHUNK_SIZE images at a time (noise of `chunk_noise`); for
  num <= CHUNK_SIZE the one chunk equals `sample(state, rng, num, ...)`."""
  for index, (start, stop) in enumerate(chunk_bounds(num)):
    z = chunk_noise(rng, index, stop - start, config.hdim, temperature)
    yield start, np.asarray(decode(state, z, config, use_running_average))


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


def png_bytes(grid: np.ndarray) -> bytes:
  """A uint8 [H, W, 1 or 3] array encoded as PNG."""
  buffer = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
      buffer, format='PNG')
  return buffer.getvalue()


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a uint8 [H, W, 1 or 3] array as PNG (local or gs://), creating
  parent folders; never through a link planted at `path`."""
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_bytes(path, png_bytes(grid))


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


def saved_config(workdir: str) -> Optional[dict]:
  """The fields of the run's config.json (or, when it is lost, the config
  recorded with its newest checkpoint), or None when neither can be read (a
  tool's loading of the run then says why). Cheap: no array is read."""
  from introvae_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    found = checkpointing.recorded_config(workdir)
    return None if found is None else found[1]
  except Exception:  # pylint: disable=broad-except
    return None  # whatever it is, loading the run reports it with context


def enable_x64_for_run(workdir: str) -> bool:
  """Turns on 64-bit JAX when the run in `workdir` is float64 (as main.py
  does), so that a tool computes in the run's precision; returns whether it
  is. Call it before any JAX array is made: the flag is process-wide."""
  dtype = (saved_config(workdir) or {}).get('dtype', 'float32')
  return configuration.enable_x64_for(dtype, f'The run in {workdir}')
