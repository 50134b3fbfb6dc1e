"""Sampling tools: grids, interpolation, BatchNorm modes, the CLI on a workdir."""

import os

import jax
import numpy as np
from PIL import Image
import pytest

from introvae_jax import base_config, create_train_state, errors, sampling
from introvae_jax import input_pipeline
from introvae_jax import sample as sample_cli
from introvae_jax import train


def _config(**kw):
  c = base_config()
  c.dataset, c.image_size, c.image_channels = 'mnist_offline', 8, 1
  c.channels, c.hdim, c.batch_size, c.num_image_samples = (4,), 4, 4, 4
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_image_grid_layout():
  imgs = np.zeros((5, 2, 3, 1), np.float32)
  for i in range(5):
    imgs[i] = i / 4
  grid = sampling.image_grid(imgs, ncol=2)
  assert grid.shape == (6, 6, 1) and grid.dtype == np.uint8
  assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == round(0.25 * 255)
  assert grid[4, 0, 0] == 255 and grid[4, 3, 0] == 255  # 5th image, then padding


def test_slerp_endpoints_and_constant_norm():
  rs = np.random.RandomState(0)
  z0, z1 = rs.randn(16), rs.randn(16)
  z1 *= np.linalg.norm(z0) / np.linalg.norm(z1)
  np.testing.assert_allclose(sampling.slerp(z0, z1, 0.0), z0, atol=1e-12)
  np.testing.assert_allclose(sampling.slerp(z0, z1, 1.0), z1, atol=1e-12)
  for t in (0.25, 0.5, 0.75):  # on the great circle: the norm is kept
    np.testing.assert_allclose(np.linalg.norm(sampling.slerp(z0, z1, t)),
                               np.linalg.norm(z0), rtol=1e-12)
  np.testing.assert_allclose(sampling.slerp(z0, 2 * z0, 0.5), 1.5 * z0)


def test_running_average_mode_is_per_example_and_batch_mode_is_not():
  config = _config()
  state = create_train_state(config, jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1))
  alone = sampling.encode(state, x[:1], config, use_running_average=True)[0]
  in_batch = sampling.encode(state, x, config, use_running_average=True)[0]
  np.testing.assert_allclose(alone[0], in_batch[0], rtol=1e-5, atol=1e-6)
  batch_a = sampling.encode(state, x[:3], config)[0]
  batch_b = sampling.encode(state, x, config)[0]
  assert np.abs(batch_a[0] - batch_b[0]).max() > 1e-3


def test_sample_cli_writes_grids_from_a_workdir(tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(num_train_steps=2, log_every_steps=1, image_every_steps=100,
                   checkpoint_every_steps=2)
  train.train_and_evaluate(config, workdir)
  out = str(tmp_path / 'out')
  written = sample_cli.generate(workdir, out, num=6, interpolation_steps=5)
  names = {os.path.relpath(p, out) for p in written}
  assert {'samples.png', 'reconstructions.png', 'interpolation_linear.png',
          'interpolation_slerp.png', os.path.join('samples', '0005.png')} <= names
  grid = np.asarray(Image.open(os.path.join(out, 'interpolation_slerp.png')))
  assert grid.shape == (3 * 8, 5 * 8)  # 3 pairs of the 6 images, 5 steps each
  recs = np.asarray(Image.open(os.path.join(out, 'reconstructions.png')))
  assert recs.shape == (8, 12 * 8)     # 6 (real, reconstruction) pairs in a row


def test_generate_checks_arguments_and_files_before_loading(tmp_path):
  """num=0 used to fail in image_grid (ZeroDivisionError), num=-1 in XLA."""
  missing, out = str(tmp_path / 'no_run'), str(tmp_path / 'out')
  with pytest.raises(errors.UserError, match=r'num=0: .*\(--num>=1\)'):
    sample_cli.generate(missing, out, num=0)
  with pytest.raises(errors.UserError, match='interpolation_steps=1: '):
    sample_cli.generate(missing, out, interpolation_steps=1)
  empty = tmp_path / 'empty'
  empty.mkdir()
  # The --images folder is checked before the (here missing) run loads.
  with pytest.raises(input_pipeline.DataError,
                     match=f"data_dir='{empty}' holds no image files"):
    sample_cli.generate(missing, out, images=str(empty))
  with pytest.raises(errors.WorkdirError, match='does not exist'):
    sample_cli.generate(missing, out)
  assert not os.path.exists(out)
