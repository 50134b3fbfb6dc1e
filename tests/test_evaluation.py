"""Metrics against closed forms and independent computations."""

import json
import os
import warnings

import numpy as np
import pytest
from scipy import linalg
from scipy import ndimage

from introvae_jax import digit_classifier
from introvae_jax import evaluation
from introvae_jax import offline_datasets

# --------------------------------------------------------------------------
# Frechet distance.


def _random_cov(rs, d, rank=None):
  a = rs.randn(d, rank or d)
  return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def test_frechet_distance_diagonal_closed_form():
  rs = np.random.RandomState(0)
  mu1, mu2 = rs.randn(6), rs.randn(6)
  s1, s2 = rs.rand(6) + 0.1, rs.rand(6) + 0.1
  expected = (np.sum((mu1 - mu2) ** 2)
              + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
  got = evaluation.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_full_covariance_symmetric_form():
  # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), via eigh only.
  rs = np.random.RandomState(1)
  d = 8
  mu1, mu2 = rs.randn(d), rs.randn(d)
  s1, s2 = _random_cov(rs, d), _random_cov(rs, d)
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(w)) @ v.T
  inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))
  np.testing.assert_allclose(
      evaluation.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
  feats = np.random.RandomState(2).randn(400, 16) @ np.diag(np.arange(1, 17))
  assert abs(evaluation.frechet_distance_from_features(feats, feats)) < 1e-8
  # Fewer samples than dimensions: singular covariances, still ~0 and finite
  # (sqrt of round-off eigenvalues ~1e-12 leaves ~1e-6 per dimension).
  few = feats[:10]
  fd = evaluation.frechet_distance_from_features(few, few)
  scale = 2 * np.trace(np.cov(few, rowvar=False))
  assert np.isfinite(fd) and abs(fd) < 1e-6 * scale


def test_feature_statistics_is_float64_numpy_cov():
  feats = np.random.RandomState(3).randn(50, 4).astype(np.float32)
  mu, sigma = evaluation.feature_statistics(feats)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(sigma,
                             np.cov(feats.astype(np.float64), rowvar=False))


def test_frechet_distance_offsets_a_singular_product(monkeypatch):
  rs = np.random.RandomState(4)
  mu1, mu2 = rs.randn(5), rs.randn(5)
  s1, s2 = _random_cov(rs, 5), _random_cov(rs, 5)
  calls = []
  real_sqrtm = evaluation._sqrtm

  def failing_first(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(evaluation, '_sqrtm', failing_first)
  with pytest.warns(UserWarning, match='singular'):
    got = evaluation.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
  offset = 1e-3 * np.eye(5)
  np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
  covmean = linalg.sqrtm(calls[1]).real
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(covmean))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_imaginary_part(monkeypatch):
  eye = np.eye(3)
  monkeypatch.setattr(evaluation, '_sqrtm', lambda a: eye + 1e-6j)
  np.testing.assert_allclose(
      evaluation.frechet_distance(np.zeros(3), eye, np.zeros(3), eye), 0.0,
      atol=1e-12)
  monkeypatch.setattr(evaluation, '_sqrtm', lambda a: eye + 0.1j)
  with pytest.raises(ValueError, match='imaginary'):
    evaluation.frechet_distance(np.zeros(3), eye, np.zeros(3), eye)


def test_frechet_distance_shape_errors():
  with pytest.raises(ValueError, match='Mean vectors'):
    evaluation.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_frechet_distance_matches_pytorch_fid_when_installed():
  fid_score = pytest.importorskip('pytorch_fid.fid_score')
  rs = np.random.RandomState(5)
  args = (rs.randn(7), _random_cov(rs, 7), rs.randn(7), _random_cov(rs, 7))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    expected = fid_score.calculate_frechet_distance(*args)
  np.testing.assert_allclose(evaluation.frechet_distance(*args), expected,
                             rtol=1e-10)


def test_statistics_cache_round_trip(tmp_path):
  mu, sigma = np.arange(3.0), np.eye(3)
  path = os.path.join(tmp_path, 'stats.npz')
  evaluation.save_statistics(path, mu, sigma)
  mu2, sigma2 = evaluation.load_statistics(path)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)


# --------------------------------------------------------------------------
# KID.


def test_mmd2_unbiased_against_a_naive_sum():
  rs = np.random.RandomState(6)
  x, y = rs.randn(12, 5), rs.randn(12, 5) + 0.3
  k = lambda a, b: (a @ b / 5 + 1) ** 3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  expected = (xx + yy) / (m * (m - 1)) - 2 * xy / m ** 2
  kern = evaluation.polynomial_kernel
  got = evaluation.mmd2_unbiased(kern(x, x), kern(x, y), kern(y, y))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_polynomial_kernel_matches_sklearn():
  pairwise = pytest.importorskip('sklearn.metrics.pairwise')
  rs = np.random.RandomState(7)
  x, y = rs.randn(9, 4), rs.randn(6, 4)
  np.testing.assert_allclose(
      evaluation.polynomial_kernel(x, y),
      pairwise.polynomial_kernel(x, y, degree=3, coef0=1))


def test_kid_is_unbiased_on_equal_distributions():
  # Over independent draws the unbiased estimate averages to 0, while the
  # biased (V-statistic) one stays clearly positive.
  rs = np.random.RandomState(8)
  kern = evaluation.polynomial_kernel
  unbiased, biased = [], []
  for _ in range(200):
    x, y = rs.randn(40, 8), rs.randn(40, 8)
    kid = evaluation.kernel_inception_distance(x, y, num_subsets=1,
                                               subset_size=40)['kid_mean']
    unbiased.append(kid)
    biased.append(kern(x, x).mean() + kern(y, y).mean() - 2 * kern(x, y).mean())
  se = np.std(unbiased) / np.sqrt(len(unbiased))
  assert abs(np.mean(unbiased)) < 3.5 * se
  assert np.mean(biased) > 10 * se


def test_kid_positive_on_different_distributions():
  rs = np.random.RandomState(9)
  x = rs.randn(300, 8)
  same = evaluation.kernel_inception_distance(x, rs.randn(300, 8),
                                              num_subsets=20, subset_size=100)
  shifted = evaluation.kernel_inception_distance(
      x, rs.randn(300, 8) + 0.5, num_subsets=20, subset_size=100)
  assert shifted['kid_mean'] > 3 * shifted['kid_std'] > 0
  assert shifted['kid_mean'] > 20 * abs(same['kid_mean'])


def test_kid_subset_size_error():
  with pytest.raises(ValueError, match='subset_size'):
    evaluation.kernel_inception_distance(np.zeros((5, 2)), np.zeros((5, 2)),
                                         subset_size=10)


# --------------------------------------------------------------------------
# Sliced Wasserstein distance.


def _digits32(n, start=0):
  """Real offline digits padded to 32 px (pyramid levels 32 and 16)."""
  d = np.asarray(offline_datasets.mnist()[start:start + n])
  return np.pad(d, ((0, 0), (2, 2), (2, 2), (0, 0)))


def test_blur_matches_scipy_mirror_convolution():
  x = np.random.RandomState(10).rand(2, 9, 11, 3).astype(np.float64)
  kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.
  expected = ndimage.convolve(x, kernel[None, :, :, None], mode='mirror')
  np.testing.assert_allclose(evaluation._blur(x), expected, rtol=1e-12)


def test_laplacian_pyramid_reconstructs_the_image():
  x = _digits32(3)
  pyramid = evaluation.laplacian_pyramid(x, 3)
  assert [p.shape[1] for p in pyramid] == [32, 16, 8]
  recon = pyramid[-1]
  for band in reversed(pyramid[:-1]):
    recon = band + evaluation._pyr_up(recon)
  np.testing.assert_allclose(recon, x, atol=1e-5)


def test_sliced_wasserstein_of_1d_sets_is_wasserstein_1():
  # In one dimension every unit direction is +-1: W1 of equal-size samples
  # is the mean gap between sorted values.
  rs = np.random.RandomState(11)
  a = rs.randn(500, 1).astype(np.float32)
  b = (2 * rs.randn(500, 1) + 1).astype(np.float32)
  expected = np.mean(np.abs(np.sort(a[:, 0]) - np.sort(b[:, 0])))
  got = evaluation.sliced_wasserstein(a, b, np.random.RandomState(0))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_swd_self_near_zero_and_ordered():
  # Patches are drawn at random for each set, so SWD of a set with itself is
  # sampling noise: it is as small as for other real digits, shrinks as
  # descriptors grow, and sits far below blurred or noisy copies.
  x = _digits32(64)
  rs = np.random.RandomState(12)

  def swd(y, patches=128):
    return evaluation.sliced_wasserstein_distance(
        x, y, nhoods_per_image=patches, dir_repeats=2,
        dirs_per_repeat=64)['swd_mean']

  noise = rs.randn(*x.shape).astype(np.float32)
  self_d, self_few = swd(x), swd(x, patches=8)
  other_digits = swd(_digits32(64, start=1000))
  light, heavy = swd(x + 0.05 * noise), swd(x + 0.2 * noise)
  blurred = swd(ndimage.gaussian_filter(x, sigma=(0, 1, 1, 0)))
  assert self_d < 0.6 * self_few          # ~1/sqrt(#descriptors) noise floor
  assert max(self_d, other_digits) < 0.6 * min(light, blurred)
  assert light < 0.6 * heavy
  out = evaluation.sliced_wasserstein_distance(x, x, nhoods_per_image=4)
  assert sorted(out) == ['swd_16', 'swd_32', 'swd_mean']


def test_swd_shape_errors():
  with pytest.raises(ValueError, match='one shape'):
    evaluation.sliced_wasserstein_distance(np.zeros((2, 16, 16, 1)),
                                           np.zeros((3, 16, 16, 1)))
  with pytest.raises(ValueError, match='min_resolution'):
    evaluation.sliced_wasserstein_distance(np.zeros((2, 8, 8, 1)),
                                           np.zeros((2, 8, 8, 1)))


# --------------------------------------------------------------------------
# Reconstruction error.


def test_psnr_and_mse_closed_form():
  x = np.zeros((2, 4, 4, 1))
  y = np.concatenate([np.full((1, 4, 4, 1), 0.1), np.full((1, 4, 4, 1), 0.01)])
  np.testing.assert_allclose(evaluation.mse(x, y), [0.01, 1e-4])
  np.testing.assert_allclose(evaluation.psnr(x, y), [20.0, 40.0])
  np.testing.assert_allclose(evaluation.psnr(255 * x, 255 * y, data_range=255),
                             [20.0, 40.0])


# --------------------------------------------------------------------------
# Digit classifier features.


def test_labelled_digits_are_the_offline_digits():
  # Same images in the same order; that labels pair with their images is
  # shown by the accuracy of the short training below.
  images, labels = digit_classifier.labelled_digits()
  np.testing.assert_array_equal(images, offline_datasets.mnist())
  assert labels.shape == (5000,) and np.all(np.bincount(labels) == 500)
  held_out = digit_classifier.split()[1][1]
  assert len(held_out) == 1000 and len(np.unique(held_out)) == 10


def test_short_training_learns_and_features_round_trip(tmp_path):
  params, accuracy = digit_classifier.train(num_steps=60, log=None)
  assert accuracy > 0.5
  path = os.path.join(tmp_path, 'clf.msgpack')
  digit_classifier.save(params, path, {'held_out_accuracy': accuracy})
  digits = np.asarray(offline_datasets.mnist()[:8])
  feats = digit_classifier.digit_features(digits, path=path)
  assert feats.shape == (8, digit_classifier.FEATURE_DIM)
  np.testing.assert_allclose(
      feats, digit_classifier.digit_features(digits, params), rtol=1e-6)
  # 32 px inputs (the offline default's size) are resized to 28 px.
  big = np.pad(digits, ((0, 0), (2, 2), (2, 2), (0, 0)))
  assert digit_classifier.digit_features(big, params).shape == feats.shape


def test_missing_classifier_says_how_to_train(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match='python -m introvae_jax.digit_classifier'):
    digit_classifier.load(os.path.join(tmp_path, 'none.msgpack'))


# --------------------------------------------------------------------------
# A model end to end.


def test_evaluate_model_on_a_tiny_model():
  import jax
  from conftest import initial_state, tiny_config
  config = tiny_config('conv')
  state = initial_state('conv')
  real = np.random.RandomState(13).rand(20, 8, 8, 3).astype(np.float32)
  out = evaluation.evaluate_model(
      state, config, real, jax.random.PRNGKey(2), batch_size=20,
      swd_min_resolution=8, kid_subset_size=10,
      feature_extractors={
          'pixel': lambda x: np.asarray(x).reshape(len(x), -1)[:, :6]},
      swd_kwargs=dict(nhoods_per_image=4, dir_repeats=1, dirs_per_repeat=8))
  assert set(out) == {'rec_mse', 'rec_psnr', 'kl_real', 'kl_rec', 'kl_fake',
                      'swd_8', 'swd_mean', 'fd_pixel', 'kid_pixel_mean',
                      'kid_pixel_std'}
  assert all(np.isfinite(v) for v in out.values())
  # One batch of 20: the same BatchNorm batch statistics as this call.
  from introvae_jax import sampling
  rec = np.asarray(sampling.reconstruct(state, real, config))
  np.testing.assert_allclose(out['rec_psnr'],
                             np.mean(-10 * np.log10(evaluation.mse(real, rec))),
                             rtol=1e-4)


def test_evaluate_model_runs_the_networks_one_chunk_at_a_time(monkeypatch):
  """10 images with a chunk of 4: every network call takes at most 4 images,
  and the reconstruction error is the mean of each chunk's own (BatchNorm
  batch statistics per chunk), computed here by hand. Before, the default
  batch was a literal 250, not the sampling tools' CHUNK_SIZE, so this call
  was one batch of 10 and its error differed."""
  import jax
  from conftest import initial_state, tiny_config
  from introvae_jax import sampling
  config, state = tiny_config('conv'), initial_state('conv')
  real = np.random.RandomState(16).rand(10, 8, 8, 3).astype(np.float32)
  by_hand = np.concatenate([
      evaluation.mse(real[i:i + 4], sampling.reconstruct(state, real[i:i + 4],
                                                         config))
      for i in (0, 4, 8)])
  monkeypatch.setattr(sampling, 'CHUNK_SIZE', 4)
  sizes = []
  for name in ('encode', 'decode'):
    def counting(state, x, *args, _fn=getattr(sampling, name), **kwargs):
      sizes.append(len(x))
      return _fn(state, x, *args, **kwargs)
    monkeypatch.setattr(sampling, name, counting)
  out = evaluation.evaluate_model(state, config, real, jax.random.PRNGKey(2))
  monkeypatch.undo()
  assert sizes and max(sizes) <= 4
  np.testing.assert_allclose(out['rec_mse'], by_hand.mean(), rtol=1e-6)
  one_batch = evaluation.mse(real, sampling.reconstruct(state, real, config))
  assert abs(one_batch.mean() - by_hand.mean()) > 1e-4 * by_hand.mean()


def test_memory_estimate_bounds_the_measured_peak():
  """`memory_estimate`, which refuses evaluations that would not fit, is
  within a small factor above the peak NumPy memory (tracemalloc) of the
  array work it counts (SWD, features' statistics and KID) for 64 images."""
  import tracemalloc
  rs = np.random.RandomState(17)
  real, fake = (rs.rand(64, 16, 16, 1).astype(np.float32) for _ in range(2))
  f_real, f_fake = rs.randn(64, 128), rs.randn(64, 128)
  tracemalloc.start()
  evaluation.sliced_wasserstein_distance(real, fake)
  evaluation.feature_metrics('digit', f_real, f_fake, 10)
  peak = tracemalloc.get_traced_memory()[1] + real.nbytes + fake.nbytes
  tracemalloc.stop()
  estimate = evaluation.memory_estimate(64, 16, 1, feature_dim=128)
  assert peak <= estimate <= 4 * peak


def test_evaluate_workdir_refuses_too_many_images_at_once(tmp_path,
                                                          monkeypatch):
  """--num_images=1000000000 is refused in an instant with the memory it
  would take (it used to load and generate until memory ran out), and so is
  a count whose estimate exceeds the memory available."""
  import time
  import introvae_jax
  from introvae_jax import sampling
  workdir = tmp_path / 'run'  # config.json only: refused before the checkpoint
  workdir.mkdir()
  config = introvae_jax.base_config()
  config.image_size, config.image_channels, config.channels = 32, 1, (4, 4, 4)
  config.dataset = 'mnist_offline'  # the digit features: 128 per image
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  start = time.time()
  with pytest.raises(sampling.RequestTooLargeError, match=(
      r'--num_images=1000000000: evaluation holds every real and generated '
      r'image in memory .*, ~\S+ TiB of memory for 32 px images; use '
      r'--num_images=50000 or less')):
    evaluation.evaluate_workdir(str(workdir), num_images=10**9)
  assert time.time() - start < 5
  per_image = evaluation.memory_estimate(1, 32, 1, feature_dim=128)
  monkeypatch.setattr(evaluation, 'available_memory', lambda: 10 * per_image)
  with pytest.raises(sampling.RequestTooLargeError, match=(
      r'--num_images=1000 needs ~\S+ MiB of memory .* more than the \S+ MiB '
      'available; use --num_images=10 or less')):
    evaluation.evaluate_workdir(str(workdir), num_images=1000)
  assert os.listdir(workdir) == ['config.json']


def test_feature_metric_names_and_cache(tmp_path):
  rs = np.random.RandomState(14)
  a, b = rs.randn(30, 3), rs.randn(30, 3) + 1
  assert set(evaluation.feature_metrics('inception', a, b, 10)) == {
      'fid', 'kid_mean', 'kid_std'}
  assert set(evaluation.feature_metrics('digit', a, b, 10)) == {
      'fd_digit', 'kid_digit_mean', 'kid_digit_std'}
  calls = []
  extract = lambda x: calls.append(1) or x * 2
  path = os.path.join(tmp_path, 'stats', 'real.npz')
  first = evaluation.cached_features(path, a, extract)
  np.testing.assert_array_equal(evaluation.cached_features(path, a, extract),
                                first)
  assert len(calls) == 1
  mu, sigma = evaluation.load_statistics(path)  # pytorch-fid's .npz keys
  np.testing.assert_allclose(mu, (2 * a).mean(0))


@pytest.mark.slow
def test_evaluate_workdir(tmp_path):
  import jax
  import introvae_jax
  from introvae_jax import checkpointing
  config = introvae_jax.base_config()
  config.dataset, config.image_size, config.image_channels = (
      'mnist_offline', 8, 1)
  config.channels, config.hdim, config.batch_size = (4,), 4, 4
  # A workdir as the training loop leaves it: config.json and a checkpoint.
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  state = introvae_jax.create_train_state(config, jax.random.PRNGKey(0))
  manager = checkpointing.make_manager(workdir)
  checkpointing.save(manager, state.replace(step=state.step + 3), force=True)
  manager.wait_until_finished()
  clf = os.path.join(tmp_path, 'clf.msgpack')
  digit_classifier.save(digit_classifier.DigitCNN().init(
      jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1)))['params'], clf, {})
  lines = []
  metrics, path = evaluation.evaluate_workdir(
      workdir, num_images=12, classifier_path=clf, log=lines.append)
  assert {'rec_psnr', 'kl_fake', 'fd_digit', 'kid_digit_mean'} <= set(metrics)
  assert 'swd_mean' not in metrics  # 8 px < the 16 px SWD level
  assert any('Skipping FID' in line for line in lines)
  with open(path) as f:
    assert json.load(f)['step'] == 3


# --------------------------------------------------------------------------
# Damaged and missing files.


def test_damaged_files_are_named_with_the_fix(tmp_path):
  """A non-zip .npz used to fail with numpy's 'allow_pickle' message."""
  garbage = tmp_path / 'stats.npz'
  garbage.write_bytes(b'\x93NUMPY not a zip archive')
  with pytest.raises(evaluation.BadFileError, match=(
      f'{garbage} is not an .npz archive, so not a statistics file.*'
      'delete it')) as error:
    evaluation.load_statistics(str(garbage))
  assert 'allow_pickle' not in str(error.value)
  good = tmp_path / 'good.npz'
  evaluation.save_statistics(str(good), np.zeros(3), np.eye(3))
  cut = tmp_path / 'cut.npz'
  cut.write_bytes(good.read_bytes()[:100])
  with pytest.raises(evaluation.BadFileError, match=f'{cut} is a damaged .npz'):
    evaluation.load_statistics(str(cut))
  with pytest.raises(FileNotFoundError, match='No statistics file'):
    evaluation.load_statistics(str(tmp_path / 'none.npz'))
  weights = tmp_path / 'clf.msgpack'
  weights.write_bytes(b'\xc1 not msgpack')
  with pytest.raises(evaluation.BadFileError, match=(
      f'{weights} is not digit classifier weights .*delete it and train '
      f'again: python -m introvae_jax.digit_classifier --out={weights}')):
    digit_classifier.load(str(weights))


def test_damaged_feature_cache_is_rebuilt(tmp_path, caplog):
  """The cache is the program's own, so it is rebuilt rather than refused."""
  import logging
  features = np.random.RandomState(15).randn(10, 3)
  path = tmp_path / 'fid_stats' / 'real.npz'
  path.parent.mkdir()
  path.write_bytes(b'half a file')
  with caplog.at_level(logging.WARNING):
    got = evaluation.cached_features(str(path), features, lambda x: x + 1)
  np.testing.assert_array_equal(got, features + 1)
  assert f'Rebuilding the feature cache {path}' in caplog.text
  np.testing.assert_array_equal(evaluation.load_statistics(str(path))[0],
                                (features + 1).mean(0))
  assert os.listdir(path.parent) == ['real.npz']  # no partial file left


def test_evaluate_workdir_checks_weights_before_the_run(tmp_path):
  """A missing --inception file used to be reported after ~80 s of work."""
  from introvae_jax import errors
  no_run = str(tmp_path / 'no_run')  # never read: the checks come first
  with pytest.raises(evaluation.MissingFileError,
                     match=f'No InceptionV3 weights at {tmp_path}/none.pth'):
    evaluation.evaluate_workdir(no_run,
                                inception_path=str(tmp_path / 'none.pth'))
  with pytest.raises(evaluation.MissingFileError, match=(
      f'No digit classifier at {tmp_path}/none.msgpack')):
    evaluation.evaluate_workdir(no_run,
                                classifier_path=str(tmp_path / 'none.msgpack'))
  with pytest.raises(errors.UserError, match='num_images=1: '):
    evaluation.evaluate_workdir(no_run, num_images=1)
