"""Evaluation metrics for generated images, as plain functions of arrays.

- `frechet_distance` / `feature_statistics`: FID's formula computed as
  `pytorch-fid` computes it (float64 statistics, scipy's matrix square root,
  an eps * I offset when the product is singular, the imaginary part dropped
  only when it is negligible).
- `kernel_inception_distance`: KID (Binkowski et al., ICLR 2018), the
  unbiased MMD^2 with the cubic polynomial kernel averaged over random
  subsets, as `torch-fidelity` computes it (100 subsets of 1,000, seed 2020).
- `sliced_wasserstein_distance`: SWD on Laplacian-pyramid 7x7 patches as in
  Progressive GAN (Karras et al., ICLR 2018, `metrics/sliced_wasserstein.py`),
  the metric the IntroVAE paper reports, vectorised in NumPy.
- `mse`, `psnr`: reconstruction error per image.

Any feature extractor works with the first two: `inception.features`
(pytorch-fid's InceptionV3 pool3) for FID/KID proper, or
`digit_classifier.digit_features` for the offline digits. The KL statistics
of real, reconstructed and sampled images are `sampling.kl_stats`.
`evaluate_model` computes all of them for a TrainState (for the training
loop), `evaluate_workdir` for a workdir's checkpoint:

    python -m introvae_jax.evaluation --workdir=runs/default --num_images=1000
    # add --inception=<pytorch-fid's .pth> for FID and KID

The weights files are checked (and loaded) before the checkpoint and the
images, so a wrong path fails at once. The networks run `sampling.CHUNK_SIZE`
(250) images per call; SWD and KID compare whole sets, so the real and
generated images are held in memory: more than `MAX_EVAL_IMAGES`, or more than
the memory available (`memory_estimate`), is refused before any work. A
float64 run is evaluated in float64 (the CLI turns on 64-bit JAX). Files go
through `etils.epath` (local or gs://). Caches this program writes (the real
images' Inception features and statistics, the .npz converted from the
Inception .pth) are rebuilt, with a warning, when they cannot be read; a
damaged file the user supplied is an error naming it.
"""

import hashlib
import json
import os
import warnings
from typing import Dict, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import numpy as np
from scipy import linalg

from introvae_jax import configuration
from introvae_jax import errors
from introvae_jax.cache import cache_dir  # noqa: F401  (also evaluation.cache_dir)
# Also evaluation.<name>, where earlier versions defined them:
from introvae_jax.errors import BadFileError, MissingFileError  # noqa: F401
from introvae_jax.files import read_npz, write_npz  # noqa: F401


# --------------------------------------------------------------------------
# Frechet distance.

def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of features [N, D] in float64 (pytorch-fid's np.cov)."""
  feats = np.asarray(features, np.float64)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise ValueError(f'features must be [N >= 2, D], got shape {feats.shape}.')
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as pytorch-fid.

  `pytorch_fid.fid_score.calculate_frechet_distance`: when sqrtm(S1 S2) is
  not finite, both covariances get eps * I added; a complex square root is
  accepted (real part kept) only if the imaginary parts of its diagonal are
  within 1e-3 of 0, else ValueError.
  """
  mu1 = np.atleast_1d(mu1).astype(np.float64)
  mu2 = np.atleast_1d(mu2).astype(np.float64)
  sigma1 = np.atleast_2d(sigma1).astype(np.float64)
  sigma2 = np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape:
    raise ValueError(
        f'Mean vectors differ in shape: {mu1.shape} vs {mu2.shape}.')
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'Covariances {sigma1.shape}, {sigma2.shape} do not match '
                     f'the means {mu1.shape}.')
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f'frechet_distance: singular product; adding {eps} to the '
                  'diagonal of both covariances.')
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError('frechet_distance: the matrix square root has an '
                       f'imaginary component {np.max(np.abs(covmean.imag)):g}.')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(covmean))


def _sqrtm(a):
  # pytorch-fid calls sqrtm(..., disp=False), which only suppresses scipy's
  # message (the argument is deprecated since scipy 1.16).
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    warnings.simplefilter('ignore', RuntimeWarning)
    return linalg.sqrtm(a)


def frechet_distance_from_features(features1, features2) -> float:
  """Frechet distance between the Gaussians fitted to two feature sets."""
  return frechet_distance(*feature_statistics(features1),
                          *feature_statistics(features2))


def save_statistics(path: str, mu, sigma) -> None:
  """Caches (mu, sigma) as pytorch-fid's .npz layout (keys 'mu', 'sigma')."""
  write_npz(path, mu=mu, sigma=sigma)


def load_statistics(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a pytorch-fid statistics .npz; BadFileError naming it."""
  fix = 'delete it and compute the statistics again.'
  arrays = read_npz(path, "statistics file (pytorch-fid's 'mu', 'sigma')", fix)
  if not {'mu', 'sigma'} <= set(arrays):
    raise BadFileError(f'{path} has no mu and sigma arrays (it has '
                       f'{sorted(arrays)}); {fix}')
  return arrays['mu'], arrays['sigma']


# --------------------------------------------------------------------------
# Kernel inception distance.

def polynomial_kernel(x, y, degree: int = 3, gamma: Optional[float] = None,
                      coef0: float = 1.0) -> np.ndarray:
  """(gamma <x, y> + coef0)^degree, gamma = 1/D by default."""
  if gamma is None:
    gamma = 1.0 / x.shape[1]
  return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx, k_xy, k_yy) -> float:
  """Unbiased MMD^2 from kernel matrices of two equal-size samples (m x m).

  sum_{i != j} k(x_i, x_j) / (m (m - 1)) + the same for y
  - 2 sum_{i, j} k(x_i, y_j) / m^2   (torch-fidelity `mmd2`, 'unbiased').
  """
  m = k_xx.shape[0]
  sum_xx = k_xx.sum() - np.trace(k_xx)
  sum_yy = k_yy.sum() - np.trace(k_yy)
  return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(features1, features2, num_subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3,
                              gamma: Optional[float] = None, coef0: float = 1.0,
                              seed: int = 2020) -> Dict[str, float]:
  """KID: mean and std of the unbiased polynomial-kernel MMD^2 over subsets.

  Each subset draws `subset_size` rows of each set without replacement
  (np.random.RandomState(seed).choice, as torch-fidelity). Its mean is an
  unbiased estimate of MMD^2, so it can be negative for equal distributions.
  """
  f1 = np.asarray(features1, np.float64)
  f2 = np.asarray(features2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f'features must be [N, D] with equal D, got {f1.shape} '
                     f'and {f2.shape}.')
  if min(len(f1), len(f2)) < subset_size:
    raise ValueError(f'subset_size={subset_size} is larger than the number of '
                     f'samples ({len(f1)}, {len(f2)}); lower subset_size or '
                     'use more samples.')
  if subset_size < 2:
    raise ValueError(f'subset_size={subset_size} must be at least 2.')
  rng = np.random.RandomState(seed)
  mmds = np.zeros(num_subsets)
  kernel = lambda a, b: polynomial_kernel(a, b, degree, gamma, coef0)
  for i in range(num_subsets):
    x = f1[rng.choice(len(f1), subset_size, replace=False)]
    y = f2[rng.choice(len(f2), subset_size, replace=False)]
    mmds[i] = mmd2_unbiased(kernel(x, x), kernel(x, y), kernel(y, y))
  return {'kid_mean': float(mmds.mean()), 'kid_std': float(mmds.std())}


# --------------------------------------------------------------------------
# Sliced Wasserstein distance on Laplacian pyramids (Progressive GAN).

_BINOMIAL = np.array([1., 4., 6., 4., 1.]) / 16.


def _blur(images, gain: float = 1.0):
  """5x5 binomial filter (separable), 'mirror' borders as scipy.ndimage."""
  k = _BINOMIAL * gain ** 0.5
  x = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  h, w = images.shape[1:3]
  x = sum(k[i] * x[:, i:i + h] for i in range(5))
  return sum(k[i] * x[:, :, i:i + w] for i in range(5))


def _pyr_down(images):
  return _blur(images)[:, ::2, ::2]


def _pyr_up(images):
  n, h, w, c = images.shape
  up = np.zeros((n, 2 * h, 2 * w, c), images.dtype)
  up[:, ::2, ::2] = images
  return _blur(up, gain=4.0)


def laplacian_pyramid(images, num_levels: int):
  """[N, H, W, C] -> num_levels arrays, finest band first, last the low-pass."""
  pyramid = [np.asarray(images, np.float32)]
  for _ in range(1, num_levels):
    pyramid.append(_pyr_down(pyramid[-1]))
    pyramid[-2] = pyramid[-2] - _pyr_up(pyramid[-1])
  return pyramid


def _patch_descriptors(level, rng, nhood_size, nhoods_per_image):
  """nhoods_per_image random patches per image: [N * k, size, size, C]."""
  n, h, w, _ = level.shape
  half = nhood_size // 2
  count = n * nhoods_per_image
  img = np.repeat(np.arange(n), nhoods_per_image)[:, None, None]
  ys = rng.randint(half, h - half, size=count)[:, None, None]
  xs = rng.randint(half, w - half, size=count)[:, None, None]
  offs = np.arange(-half, half + 1)
  return level[img, ys + offs[None, :, None], xs + offs[None, None, :]]


def _normalize_descriptors(desc):
  """Per channel to zero mean, unit std over all patches; flattened."""
  desc = desc - desc.mean(axis=(0, 1, 2), keepdims=True)
  desc = desc / desc.std(axis=(0, 1, 2), keepdims=True)
  return desc.reshape(desc.shape[0], -1)


def pyramid_descriptors(images, resolutions, rng, nhood_size: int = 7,
                        nhoods_per_image: int = 128):
  """Normalised patch descriptors per pyramid level, finest first."""
  pyramid = laplacian_pyramid(images, len(resolutions))
  return [_normalize_descriptors(
      _patch_descriptors(level, rng, nhood_size, nhoods_per_image))
          for level in pyramid]


def sliced_wasserstein(a, b, rng, dir_repeats: int = 4,
                       dirs_per_repeat: int = 128) -> float:
  """Mean over random unit directions of the 1-D Wasserstein-1 distance.

  Both sets are projected on the directions, sorted, and compared rank by
  rank (equal sizes needed).
  """
  if a.shape != b.shape:
    raise ValueError(f'Descriptor sets differ in shape: {a.shape} vs '
                     f'{b.shape}; use the same number of images for both.')
  results = []
  for _ in range(dir_repeats):
    dirs = rng.randn(a.shape[1], dirs_per_repeat).astype(np.float32)
    dirs /= np.sqrt(np.sum(np.square(dirs), axis=0, keepdims=True))
    # [directions, points], contiguous: sorting along rows is much faster.
    proj_a = np.sort(np.ascontiguousarray((a @ dirs).T), axis=1)
    proj_b = np.sort(np.ascontiguousarray((b @ dirs).T), axis=1)
    results.append(np.mean(np.abs(proj_a - proj_b)))
  return float(np.mean(results))


def swd_resolutions(image_size: int, min_resolution: int = 16) -> Sequence[int]:
  """Pyramid levels: image_size, image_size/2, ... while >= min_resolution."""
  res, out = image_size, []
  while res >= min_resolution:
    out.append(res)
    res //= 2
  if not out:
    raise ValueError(f'image_size={image_size} is below min_resolution='
                     f'{min_resolution}; lower min_resolution.')
  return out


def sliced_wasserstein_distance(images1, images2, seed: int = 0,
                                nhood_size: int = 7,
                                nhoods_per_image: int = 128,
                                dir_repeats: int = 4,
                                dirs_per_repeat: int = 128,
                                min_resolution: int = 16) -> Dict[str, float]:
  """SWD x 1e3 per pyramid level ('swd_<res>') and their mean ('swd_mean').

  images: [N, H, W, C] (any fixed range; descriptors are normalised per set
  and channel), the same N for both sets. Progressive GAN uses 16,384
  images per set (2^21 descriptors per level) and levels down to 16 px.
  """
  x1, x2 = np.asarray(images1, np.float32), np.asarray(images2, np.float32)
  if x1.ndim != 4 or x1.shape != x2.shape or x1.shape[1] != x1.shape[2]:
    raise ValueError(f'images must be two [N, S, S, C] arrays of one shape, '
                     f'got {x1.shape} and {x2.shape}.')
  resolutions = swd_resolutions(x1.shape[1], min_resolution)
  if resolutions[-1] < nhood_size:
    raise ValueError(f'min_resolution={min_resolution} is below nhood_size='
                     f'{nhood_size}.')
  rng = np.random.RandomState(seed)
  d1 = pyramid_descriptors(x1, resolutions, rng, nhood_size, nhoods_per_image)
  d2 = pyramid_descriptors(x2, resolutions, rng, nhood_size, nhoods_per_image)
  out = {f'swd_{res}': 1e3 * sliced_wasserstein(a, b, rng, dir_repeats,
                                                dirs_per_repeat)
         for res, a, b in zip(resolutions, d1, d2)}
  out['swd_mean'] = float(np.mean(list(out.values())))
  return out


# --------------------------------------------------------------------------
# Reconstruction error.

def mse(images, reconstructions) -> np.ndarray:
  """Mean squared error per image, [N]."""
  x = np.asarray(images, np.float64)
  y = np.asarray(reconstructions, np.float64)
  if x.shape != y.shape:
    raise ValueError(f'Shapes differ: {x.shape} vs {y.shape}.')
  return np.mean(np.square(x - y).reshape(len(x), -1), axis=1)


def psnr(images, reconstructions, data_range: float = 1.0) -> np.ndarray:
  """Peak signal-to-noise ratio per image in dB: 10 log10(range^2 / MSE)."""
  return _psnr_of_mse(mse(images, reconstructions), data_range)


def _psnr_of_mse(mse_values, data_range: float = 1.0) -> np.ndarray:
  return 10.0 * np.log10(data_range ** 2 / mse_values)


# --------------------------------------------------------------------------
# Memory.

MAX_EVAL_IMAGES = configuration.MAX_EVAL_IMAGES


def memory_estimate(num_images: int, image_size: int, channels: int,
                    feature_dim: int = 0) -> int:
  """Rough peak bytes of `evaluate_model` for num_images real and as many
  generated images: both sets and a working copy, SWD's patch descriptors and
  projections (images of 16 px or more), features and their float64 copies."""
  image = image_size ** 2 * channels * 4
  per_image = 3 * image
  if image_size >= 16:
    levels = len(swd_resolutions(image_size))
    per_image += 2 * levels * 128 * 49 * channels * 4 + 4 * 128 * 128 * 4
  return num_images * (per_image + 5 * feature_dim * 8)


def available_memory() -> Optional[int]:
  """MemAvailable of /proc/meminfo in bytes; None where there is none."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def check_num_images(num_images: int, image_size: Optional[int] = None,
                     channels: Optional[int] = None, feature_dim: int = 0,
                     available: Optional[int] = None) -> None:
  """Refuses (`sampling.RequestTooLargeError`, with the memory estimate) more
  than MAX_EVAL_IMAGES images, or more than `available` bytes (default: the
  memory available now) hold. Without the image shape only the count is
  checked."""
  from introvae_jax.sampling import RequestTooLargeError, format_bytes
  need = ''
  if image_size and channels:
    per_image = memory_estimate(1, image_size, channels, feature_dim)
    need = (f'~{format_bytes(num_images * per_image)} of memory for '
            f'{image_size} px images')
  if num_images > MAX_EVAL_IMAGES:
    raise RequestTooLargeError(
        f'--num_images={num_images}: evaluation holds every real and generated '
        'image in memory (SWD, KID compare whole sets)'
        f'{", " + need if need else ""}; use --num_images={MAX_EVAL_IMAGES} '
        'or less.')
  available = available_memory() if available is None else available
  if need and available is not None and num_images * per_image > available:
    fits = available // per_image
    raise RequestTooLargeError(
        f'--num_images={num_images} needs {need} (images, SWD descriptors, '
        f'features), more than the {format_bytes(available)} available; '
        + (f'use --num_images={fits} or less.' if fits >= 2 else
           'free some memory first.'))


# --------------------------------------------------------------------------
# A trained model.

def _batches(num: int, size: int):
  return [(i, min(i + size, num)) for i in range(0, num, size)]


def feature_metric_names(name: str) -> Tuple[str, str, str]:
  """Keys of a feature extractor's results: FID/KID proper for 'inception',
  fd_<name> / kid_<name>_mean / kid_<name>_std for any other."""
  if name == 'inception':
    return 'fid', 'kid_mean', 'kid_std'
  return f'fd_{name}', f'kid_{name}_mean', f'kid_{name}_std'


def feature_metrics(name: str, real_features, fake_features,
                    kid_subset_size: int = 1000) -> Dict[str, float]:
  """Frechet distance and KID between two feature sets, under `name`'s keys."""
  fd_key, kid_mean_key, kid_std_key = feature_metric_names(name)
  size = min(kid_subset_size, len(real_features), len(fake_features))
  kid = kernel_inception_distance(real_features, fake_features,
                                  subset_size=size)
  return {fd_key: frechet_distance_from_features(real_features, fake_features),
          kid_mean_key: kid['kid_mean'], kid_std_key: kid['kid_std']}


def evaluate_model(state, config, real_images, key, *, num_samples=None,
                   use_running_average: bool = False,
                   batch_size: Optional[int] = None,
                   swd_min_resolution: int = 16, swd_kwargs=None,
                   feature_extractors=None, real_features=None,
                   kid_subset_size: int = 1000) -> Dict[str, float]:
  """Reconstruction, KL, SWD and feature-distance metrics of one TrainState.

  Args:
    state, config: the model (conv, images in [0, 1]).
    real_images: float [N, H, W, C] in [0, 1], ideally held-out images.
    key: PRNG key for the prior samples.
    num_samples: generated images (default N; SWD needs N, so it is skipped
      for other values).
    use_running_average: BatchNorm mode for every network call.
    batch_size: images per network call (default `sampling.CHUNK_SIZE`,
      250). With batch statistics (use_running_average=False) outputs depend
      on it; keep it fixed when comparing runs. Reconstructions are reduced
      to their errors chunk by chunk; the generated images are kept (SWD and
      the features compare whole sets).
    swd_min_resolution: coarsest SWD pyramid level (Progressive GAN: 16);
      SWD is skipped for images smaller than this.
    swd_kwargs: other `sliced_wasserstein_distance` arguments.
    feature_extractors: {name: images -> features [N, D]}, e.g.
      {'inception': partial(inception.features, params)} (keys fid,
      kid_mean, kid_std) or {'digit': digit_classifier.digit_features}
      (fd_digit, kid_digit_mean, kid_digit_std).
    real_features: {name: features of real_images}, precomputed (cached), to
      skip the real images' pass for those extractors.

  Returns:
    A dict of scalars rec_mse, rec_psnr (dB, mean over images), kl_real,
    kl_rec, kl_fake (batch means), swd_<res>... and swd_mean, feature metrics.
  """
  import jax
  from introvae_jax import sampling

  real = np.asarray(real_images, np.float32)
  n = len(real)
  num_samples = n if num_samples is None else num_samples
  batch_size = batch_size or sampling.CHUNK_SIZE
  bn = dict(use_running_average=use_running_average)
  k_sample, k_kl = jax.random.split(key)
  # Per-image errors, not the reconstructions: one chunk of them at a time.
  rec_mse = np.concatenate([
      mse(real[i:j], sampling.reconstruct(state, real[i:j], config, **bn))
      for i, j in _batches(n, batch_size)])
  sample_batches = _batches(num_samples, batch_size)
  fake = np.concatenate([
      np.asarray(sampling.sample(state, k, j - i, config, **bn))
      for (i, j), k in zip(sample_batches,
                           jax.random.split(k_sample, len(sample_batches)))])
  out = {'rec_mse': float(rec_mse.mean()),
         'rec_psnr': float(_psnr_of_mse(rec_mse).mean())}
  # KL statistics per batch (as in training), weighted by batch size.
  real_batches = _batches(n, batch_size)
  kls = []
  for (i, j), k in zip(real_batches, jax.random.split(k_kl, len(real_batches))):
    z = jax.random.normal(k, (j - i, config.hdim))
    kls.append((j - i, sampling.kl_stats(state, real[i:j], z, config, **bn)))
  for name in ('kl_real', 'kl_rec', 'kl_fake'):
    out[name] = float(sum(w * s[name] for w, s in kls) / n)
  if real.shape[1] >= swd_min_resolution and num_samples == n:
    out.update(sliced_wasserstein_distance(
        real, fake, min_resolution=swd_min_resolution, **(swd_kwargs or {})))
  for name, extract in (feature_extractors or {}).items():
    f_real = (real_features or {}).get(name)
    f_real = np.asarray(extract(real) if f_real is None else f_real)
    out.update(feature_metrics(name, f_real, np.asarray(extract(fake)),
                               kid_subset_size))
  return out


def cached_features(path: str, images, extract) -> np.ndarray:
  """extract(images), cached in an .npz (with pytorch-fid's mu and sigma).

  The cache is this program's own: one that cannot be read (say, a write
  cut short by an older version) is rebuilt with a warning.
  """
  if epath.Path(path).exists():
    try:
      cached = read_npz(path, 'feature cache', 'it is rebuilt.')
      if len(cached['features']) == len(images):
        return cached['features']
    except (BadFileError, KeyError) as e:
      logging.warning('Rebuilding the feature cache %s: %s', path,
                      f'no features array ({e})' if isinstance(e, KeyError)
                      else e)
  feats = np.asarray(extract(images))
  mu, sigma = feature_statistics(feats)
  write_npz(path, mu=mu, sigma=sigma, features=feats)
  return feats


def load_feature_weights(config, *, inception_path: Optional[str] = None,
                         classifier_path: Optional[str] = None, log=print):
  """(Inception params or None, digit classifier params or None), loaded
  up front so that a missing or damaged file is reported before other work.

  Files the caller names must load. The digit classifier serves
  mnist_offline runs; without `classifier_path` it is read from the default
  cache path, trained there on first use (`digit_classifier.cached`).
  `config=None` loads only the named files.
  """
  from introvae_jax import digit_classifier
  from introvae_jax import inception

  params = inception.load(inception_path) if inception_path else None
  classifier = (digit_classifier.load(classifier_path) if classifier_path
                else None)
  if config is None:
    return params, classifier
  if config.dataset != 'mnist_offline':
    return params, None
  if classifier is None:
    classifier = digit_classifier.cached(log=log)
  return params, classifier


def feature_extractors_for(config, real_images, *,
                           inception_path: Optional[str] = None,
                           classifier_path: Optional[str] = None, log=print):
  """(feature_extractors, real_features) for `evaluate_model`, built once.

  InceptionV3 (FID/KID) when `inception_path` is given, its real features
  cached under <cache>/fid_stats; the digit classifier for mnist_offline
  (`load_feature_weights`). What is skipped is said
  through `log`.
  """
  from introvae_jax import digit_classifier
  from introvae_jax import inception

  params, clf = load_feature_weights(
      config, inception_path=inception_path, classifier_path=classifier_path,
      log=log)
  extractors, real_features = {}, {}
  if params is not None:
    extractors['inception'] = lambda x: inception.features(params, x)
    # One file per source, size, split and count of the real images.
    source = config.dataset
    if config.data_dir:
      source += '-' + hashlib.sha1(config.data_dir.encode()).hexdigest()[:8]
    split = (f'heldout{config.eval_split_fraction:g}'
             if config.eval_split_fraction else 'train')
    name = f'{source}_{config.image_size}px_{split}_{len(real_images)}.npz'
    stats = os.path.join(cache_dir(), 'fid_stats', name)
    real_features['inception'] = cached_features(stats, real_images,
                                                 extractors['inception'])
  elif log is not None:
    log('Skipping FID and KID: pass the path of pytorch-fid\'s '
        f'{inception.WEIGHTS_FILE}.')
  if clf is not None:
    extractors['digit'] = lambda x: digit_classifier.digit_features(x, clf)
    real_features['digit'] = extractors['digit'](real_images)
  return extractors, real_features


def evaluate_workdir(workdir: str, *, num_images: int = 1000, step=None,
                     seed: int = 0, batch_norm: str = 'batch',
                     inception_path: Optional[str] = None,
                     classifier_path: Optional[str] = None, log=print):
  """Evaluates a workdir's newest (or `step`) checkpoint; writes
  <workdir>/eval_<step>_<batch_norm>.json and returns (metrics, its path).

  Real images are the run's `input_pipeline.eval_images` (held out when
  eval_split_fraction > 0). FID/KID need `inception_path`; the digit
  distances need the digit classifier (mnist_offline only). Arguments and
  weights files are checked first: `errors.UserError` naming the mistake.
  """
  if batch_norm not in ('batch', 'running'):
    raise errors.UserError(
        f"batch_norm={batch_norm!r}; use 'batch' or 'running'.")
  if num_images < 2:
    raise errors.UserError(f'num_images={num_images}: the distances need at '
                           'least 2 images (--num_images>=2).')
  from introvae_jax import sampling
  saved = sampling.saved_config(workdir) or {}
  try:
    shape = int(saved['image_size']), int(saved['image_channels'])
  except (KeyError, TypeError, ValueError):
    shape = None, None  # loading the run says what is wrong
  check_num_images(num_images, *shape, feature_dim=(
      (2048 if inception_path else 0)
      + (128 if saved.get('dataset') == 'mnist_offline' else 0)))
  # The weights first: loading the run and its images takes much longer.
  load_feature_weights(None, inception_path=inception_path,
                       classifier_path=classifier_path, log=None)
  import jax

  from introvae_jax import checkpointing
  from introvae_jax import input_pipeline
  from introvae_jax import parallel
  from introvae_jax import workdir as workdir_lib

  config, state = checkpointing.load_run(workdir, step,
                                         mesh=parallel.make_mesh())
  workdir_lib.prepare(workdir)  # the results go there: fail now, not later
  real = input_pipeline.eval_images(config, num_images)
  extractors, real_features = feature_extractors_for(
      config, real, inception_path=inception_path,
      classifier_path=classifier_path, log=log)
  metrics = evaluate_model(
      state, config, real, jax.random.PRNGKey(seed),
      use_running_average=batch_norm == 'running',
      feature_extractors=extractors, real_features=real_features)
  step = int(jax.device_get(state.step))
  path = str(epath.Path(workdir) / f'eval_{step:08d}_{batch_norm}.json')
  workdir_lib.write_text(path, json.dumps(
      dict(metrics, step=step, num_images=len(real), batch_norm=batch_norm),
      indent=2))
  if log is not None:
    width = max(map(len, metrics))
    log(f'step {step}, {len(real)} real and generated images, '
        f'BatchNorm: {batch_norm} statistics')
    for name, value in metrics.items():
      log(f'  {name:<{width}}  {value:.6g}')
    log(f'written to {path}')
  return metrics, path


def main(argv):
  """`python -m introvae_jax.evaluation --workdir=DIR`: evaluates the run's
  newest checkpoint and writes `eval_<step>_<batch_norm>.json`."""
  from absl import flags
  from introvae_jax import checkpointing
  from introvae_jax import sampling
  del argv
  f = flags.FLAGS
  checkpointing.quiet_orbax_logs()
  sampling.enable_x64_for_run(f.workdir)  # before any array is made
  evaluate_workdir(f.workdir, num_images=f.num_images, step=f.step,
                   seed=f.seed, batch_norm=f.batch_norm,
                   inception_path=f.inception, classifier_path=f.classifier)


def _define_flags():
  from absl import flags
  flags.DEFINE_string('workdir', None, 'A training workdir (config.json and '
                      'checkpoints).', required=True)
  flags.DEFINE_integer('num_images', 1000, 'Real and generated images (>= 2, '
                       f'at most {MAX_EVAL_IMAGES:,}).', lower_bound=2)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).',
                       lower_bound=0)
  flags.DEFINE_integer('seed', 0, 'Seed of the prior samples.')
  flags.DEFINE_enum('batch_norm', 'batch', ['batch', 'running'],
                    'BatchNorm statistics at evaluation time.')
  flags.DEFINE_string('inception', None, 'pytorch-fid\'s InceptionV3 weights '
                      '(.pth, or the .npz converted from it); FID/KID are '
                      'skipped without it.')
  flags.DEFINE_string('classifier', None, 'Digit classifier weights (default: '
                      'the cache path of introvae_jax.digit_classifier).')


if __name__ == '__main__':
  from introvae_jax import cli
  _define_flags()
  cli.run(main)
