"""Tests for introvae_jax.input_pipeline: sources, pixels, resume, bad input."""

import logging
import os
import signal
import struct
import warnings
import zlib

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from introvae_jax import configuration
from introvae_jax import input_pipeline
from introvae_jax import offline_datasets


def _config(**overrides):
  config = configuration.base_config()
  config.update({'image_size': 8, 'image_channels': 1, 'batch_size': 4,
                 'shuffle_buffer': 8, **overrides})
  return config


def _images(config, num_steps, **kwargs):
  """num_steps batches stacked: [num_steps, local_batch, H, W, C]."""
  batches = input_pipeline.create_input_iter(config, **kwargs)
  return np.stack([next(batches)['image'] for _ in range(num_steps)])


def _levels(images):
  """Grey level 0..255 of each constant image, in stream order."""
  flat = images.reshape(-1, np.prod(images.shape[-3:]))
  return np.round(flat.mean(axis=1) * 255).astype(int).tolist()


def _write(path, pixels):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


@pytest.fixture
def levels_folder(tmp_path):
  """12 constant grey 4x4 PNGs with distinct levels 5, 25, ..., 225."""
  for i in range(12):
    _write(str(tmp_path / f'sub{i % 3}' / f'{i:02d}.png'),
           np.full((4, 4), 5 + 20 * i))
  return str(tmp_path)


LEVELS = [5 + 20 * i for i in range(12)]


class InputPipelineTestImages(tfds.core.GeneratorBasedBuilder):
  """20 constant RGB images of varying sizes; grey level 10 * (i + 1)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {'image': tfds.features.Image(shape=(None, None, 3))}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(20):
      yield i, {'image': np.full((6 + i % 3, 5 + i % 4, 3), 10 * (i + 1),
                                 np.uint8)}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('input_pipeline_test_images', data_dir=data_dir
               ).download_and_prepare()
  return data_dir


# Shapes and pixel values.


@pytest.mark.parametrize('channels', [1, 3])
def test_offline_batches_have_shape_dtype_and_range(channels):
  config = _config(image_channels=channels, batch_size=8)
  batch = next(input_pipeline.create_input_iter(config, num_local_devices=2))
  assert list(batch) == ['image']
  image = batch['image']
  # This host's rows of the global batch (the pmap-era [devices,
  # per_device, ...] layout is gone: pmap callers use step.shard_batch).
  assert image.shape == (8, 8, 8, channels)
  assert image.dtype == np.float32
  assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.5


@pytest.mark.parametrize('name', ['mnist_offline', 'faces_offline'])
def test_offline_sets_yield_the_real_images(name):
  """One unflipped epoch: its mean image is the resized mean source image."""
  source = offline_datasets.DATASETS[name]()
  size = 16
  config = _config(dataset=name, image_size=size, image_channels=3,
                   random_flip=False, batch_size=len(source) // 5)
  epoch = _images(config, 5, num_local_devices=1).reshape(-1, size, size, 3)
  np.testing.assert_array_equal(epoch[..., 0], epoch[..., 2])  # grey as RGB
  expected = tf.image.resize(source.mean(0), [size, size], method='bicubic',
                             antialias=True).numpy()
  np.testing.assert_allclose(epoch.mean(0)[..., :1], expected, atol=0.02)
  assert abs(epoch.mean() - source.mean()) < 0.005


def test_folder_pixels_match_hand_computation(tmp_path):
  """PNG/JPEG, grey/RGB/RGBA, odd sizes, nested dirs, center crop."""
  center = np.zeros((8, 16), np.uint8)
  center[:, 4:12] = 255  # only the center 8x8 square is white
  _write(str(tmp_path / 'a_rgb.png'), np.full((10, 13, 3), (200, 100, 50)))
  _write(str(tmp_path / 'b_center.png'), center)
  _write(str(tmp_path / 'c_green.JPG'), np.full((9, 9, 3), (0, 255, 0)))
  _write(str(tmp_path / 'nested' / 'd_rgba.png'),
         np.full((7, 5, 4), (10, 20, 30, 0)))
  _write(str(tmp_path / 'nested' / 'deeper' / 'e_grey.jpg'),
         np.full((11, 8), 77))
  (tmp_path / 'notes.txt').write_text('not an image')
  rgb = np.array([[200, 100, 50], [255] * 3, [0, 255, 0], [10, 20, 30],
                  [77] * 3]) / 255

  config = _config(dataset='folder', data_dir=str(tmp_path), image_channels=3)
  assert input_pipeline.dataset_size(config) == 5
  images = input_pipeline.eval_images(config, 10)
  assert images.shape == (5, 8, 8, 3)
  exact = [0, 1, 3]  # PNGs; JPEG is lossy
  np.testing.assert_allclose(images[exact], np.broadcast_to(
      rgb[exact, None, None], (3, 8, 8, 3)), atol=1e-5)
  np.testing.assert_allclose(images[[2, 4]], np.broadcast_to(
      rgb[[2, 4], None, None], (2, 8, 8, 3)), atol=3 / 255)

  config.image_channels = 1
  grey = input_pipeline.eval_images(config, 5)[..., 0]
  np.testing.assert_allclose(grey[0], (rgb[0] @ (0.2989, 0.5870, 0.1140)),
                             atol=1e-5)
  np.testing.assert_allclose(grey[4], 77 / 255, atol=3 / 255)


# Order, determinism, resume, sharding.


def test_each_epoch_is_a_new_permutation(levels_folder):
  config = _config(dataset='folder', data_dir=levels_folder, image_size=4)
  levels = _levels(_images(config, 6, num_local_devices=2))  # two epochs
  first, second = levels[:12], levels[12:]
  assert sorted(first) == sorted(second) == LEVELS
  assert first != second
  assert levels == _levels(_images(config, 6, num_local_devices=2))
  config.seed = 1
  assert _levels(_images(config, 3, num_local_devices=2)) != first


@pytest.mark.parametrize('start_step', [0, 9, 12])
def test_resume_yields_the_same_batches_flips_included(start_step):
  """90 training faces, 8 per step: steps 11 and 12 cross an epoch boundary."""
  config = _config(dataset='faces_offline', eval_split_fraction=0.1,
                   batch_size=8, random_flip=True)
  full = _images(config, 15, num_local_devices=2)
  resumed = _images(config, 15 - start_step, num_local_devices=2,
                    start_step=start_step)
  np.testing.assert_array_equal(resumed, full[start_step:])


def test_random_flip_mirrors_about_half_of_the_images():
  config = _config(dataset='faces_offline', batch_size=32, random_flip=False)
  plain = _images(config, 1)[0, 0]
  config.random_flip = True
  flipped = _images(config, 1)[0, 0]
  same = [np.array_equal(a, b) for a, b in zip(plain, flipped)]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 4 <= sum(mirrored) <= 28


def test_hosts_get_disjoint_shards(levels_folder, monkeypatch):
  config = _config(dataset='folder', data_dir=levels_folder, image_size=4)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  shards = []
  for host in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    # 4 per step over 2 hosts: 2 per host and step, 6 images per host epoch.
    shards.append(_levels(_images(config, 3, num_local_devices=1)))
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == LEVELS


def test_tfds_source_resumes_exactly_and_reshuffles(tfds_dir):
  config = _config(dataset='input_pipeline_test_images', data_dir=tfds_dir,
                   image_size=4, random_flip=True)
  assert input_pipeline.dataset_size(config) == 20
  levels = _levels(_images(config, 12, num_local_devices=1))  # 2.4 epochs
  every_image = list(range(10, 210, 10))
  assert sorted(levels[:20]) == sorted(levels[20:40]) == every_image
  assert levels[:20] != levels[20:40]
  resumed = _levels(_images(config, 4, num_local_devices=1, start_step=8))
  assert resumed == levels[32:]


def test_tfds_holdout_and_host_shards(tfds_dir, monkeypatch):
  config = _config(dataset='input_pipeline_test_images', data_dir=tfds_dir,
                   image_size=4, eval_split_fraction=0.25)
  assert input_pipeline.dataset_size(config) == 15
  held_out = _levels(input_pipeline.eval_images(config, 10))
  assert len(held_out) == 5
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  shards = []
  for host in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    shards.append(set(_levels(_images(config, 7, num_local_devices=1))))
  assert len(shards[0]) == len(shards[1]) == 7  # 15 // 2 each
  assert not shards[0] & shards[1]
  assert not (shards[0] | shards[1]) & set(held_out)


# Bad input.


def test_batch_that_does_not_divide_over_devices_is_rejected():
  with pytest.raises(ValueError, match='batch_size=5 does not divide over 2'):
    input_pipeline.create_input_iter(_config(batch_size=5), num_local_devices=2)


@pytest.mark.parametrize('make', ['empty', 'no_images', 'missing', 'unset'])
def test_folder_without_images_is_rejected(tmp_path, make):
  data_dir = str(tmp_path / 'images')
  if make == 'no_images':
    os.makedirs(os.path.join(data_dir, 'sub'))
    (tmp_path / 'images' / 'sub' / 'readme.txt').write_text('x')
  elif make == 'empty':
    os.makedirs(data_dir)
  elif make == 'unset':
    data_dir = ''
  config = _config(dataset='folder', data_dir=data_dir)
  match = {'empty': 'holds no image files', 'no_images': 'holds no image files',
           'missing': 'is not a directory', 'unset': 'needs the image folder'}
  with pytest.raises(ValueError, match=match[make]):
    input_pipeline.create_input_iter(config)


def _corrupt_folder(tmp_path):
  for i in range(3):
    _write(str(tmp_path / f'good{i}.png'), np.full((4, 4), 100 + 50 * i))
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
  return str(tmp_path / 'bad.png')


def test_corrupt_image_is_skipped_with_warning_and_counted(tmp_path, caplog):
  bad = _corrupt_folder(tmp_path)
  config = _config(dataset='folder', data_dir=str(tmp_path), image_size=4)
  batches = input_pipeline.create_input_iter(config, num_local_devices=1)
  with caplog.at_level(logging.WARNING):
    levels = _levels(np.stack([next(batches)['image'] for _ in range(2)]))
  assert set(levels) == {100, 150, 200}  # the bad slot holds a good image
  assert batches.corrupt_files == [bad]
  assert 'Skipping corrupt image file' in caplog.text and bad in caplog.text


def test_corrupt_image_raises_in_error_mode(tmp_path):
  bad = _corrupt_folder(tmp_path)
  config = _config(dataset='folder', data_dir=str(tmp_path), image_size=4,
                   on_corrupt_image='error')
  batches = input_pipeline.create_input_iter(config, num_local_devices=1)
  with pytest.raises(ValueError, match=f'Cannot decode image file {bad}'):
    for _ in range(2):
      next(batches)


def _png_claiming(path, width, height):
  """A small PNG whose header claims width x height pixels (its data is that
  of a 1x1 image): what a decompression bomb looks like before decoding."""
  _write(str(path), [[7]])
  data = bytearray(path.read_bytes())
  ihdr = data[12:29]  # b'IHDR' + 13 bytes, then its CRC
  ihdr[4:12] = struct.pack('>II', width, height)
  data[12:29] = ihdr
  data[29:33] = struct.pack('>I', zlib.crc32(bytes(ihdr)))
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('side', [12000, 20000])  # PIL: warning / error
def test_decompression_bomb_is_skipped_with_our_message(tmp_path, caplog, side):
  """An image over MAX_IMAGE_PIXELS is treated as corrupt before decoding, in
  the project's words, with no PIL DecompressionBombWarning (before the fix
  12000x12000 was decoded at 3.5x the usual memory after PIL's raw warning;
  20000x20000 got PIL's own error text)."""
  for i in range(3):
    _write(str(tmp_path / f'good{i}.png'), np.full((4, 4), 100 + 50 * i))
  bomb = tmp_path / 'bomb.png'
  _png_claiming(bomb, side, side)
  config = _config(dataset='folder', data_dir=str(tmp_path), image_size=4)
  batches = input_pipeline.create_input_iter(config, num_local_devices=1)
  with caplog.at_level(logging.WARNING), warnings.catch_warnings():
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    levels = _levels(np.stack([next(batches)['image'] for _ in range(2)]))
  assert set(levels) == {100, 150, 200}
  assert batches.corrupt_files == [str(bomb)]
  size = f'{side}x{side}' if side < 15000 else 'its'
  assert f'{size} pixels are over the limit of 67,108,864' in caplog.text


def test_unknown_tfds_name_is_rejected_with_hints():
  with pytest.raises(ValueError, match='not a TFDS name') as error:
    input_pipeline.create_input_iter(_config(dataset='cifar1O'))
  assert 'cifar10' in str(error.value) and 'list_builders' in str(error.value)


@pytest.mark.parametrize('name, hint', [
    ('cifar10', ''), ('celeb_a_hq/64', ' --manual_dir=MANUAL_DIR')])
def test_unprepared_tfds_fails_without_downloading(tmp_path, monkeypatch,
                                                   name, hint):
  def no_download(*args, **kwargs):
    raise AssertionError('the input pipeline tried to download')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      no_download)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', no_download)
  config = _config(dataset=name, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='is not prepared') as error:
    input_pipeline.create_input_iter(config)
  assert f'tfds build {name} --data_dir={tmp_path}{hint}' in str(error.value)
  assert not os.listdir(tmp_path)  # nothing downloaded or created


def test_bad_split_and_holdout_are_rejected(tfds_dir):
  with pytest.raises(ValueError, match="has one split, 'train'"):
    input_pipeline.dataset_size(_config(split='test'))
  with pytest.raises(ValueError, match='eval_split_fraction=1.0 must be'):
    input_pipeline.dataset_size(_config(eval_split_fraction=1.0))
  config = _config(dataset='input_pipeline_test_images', data_dir=tfds_dir,
                   split='test')
  with pytest.raises(ValueError, match="split='test' is not a split"):
    input_pipeline.dataset_size(config)


@pytest.fixture
def no_hang():
  """Fails a test that runs longer than 60 s instead of hanging the suite."""
  def timeout(signum, frame):
    raise TimeoutError('listing the folder did not finish in 60 s')
  previous = signal.signal(signal.SIGALRM, timeout)
  signal.alarm(60)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def test_symlink_loops_are_searched_once_and_named(tmp_path, caplog, no_hang):
  """`ln -s . self` used to recurse without end (growing memory, no output)."""
  _write(str(tmp_path / 'a.png'), np.zeros((4, 4)))
  _write(str(tmp_path / 'sub' / 'b.png'), np.zeros((4, 4)))
  os.symlink('.', tmp_path / 'self')
  os.symlink('..', tmp_path / 'sub' / 'up')
  os.symlink('sub', tmp_path / 'alias')  # a second path, not a loop
  with caplog.at_level(logging.WARNING):
    files = input_pipeline.list_images(str(tmp_path))
  assert files == [str(tmp_path / 'a.png'), str(tmp_path / 'sub' / 'b.png')]
  log = caplog.text
  for link in ('self', os.path.join('sub', 'up')):
    assert (f'not following {tmp_path / link} -> {tmp_path}, '
            'a symlink loop') in log
  assert f'{tmp_path / "alias"} -> {tmp_path / "sub"}, a second path' in log


@pytest.fixture
def unreadable_subfolder(tmp_path, monkeypatch):
  """tmp_path/locked that cannot be listed, beside tmp_path/ok/1.png.

  chmod 000 where it blocks reading; as root (where it does not) listing
  the folder fails as it would: os.scandir raises PermissionError.
  """
  _write(str(tmp_path / 'ok' / '1.png'), np.zeros((4, 4)))
  _write(str(tmp_path / 'locked' / '2.png'), np.zeros((4, 4)))
  locked = str(tmp_path / 'locked')
  os.chmod(locked, 0)
  if os.access(locked, os.R_OK):  # root
    scandir = os.scandir
    def failing_scandir(path='.'):
      if os.fspath(path) == locked:
        raise PermissionError(13, 'Permission denied', locked)
      return scandir(path)
    monkeypatch.setattr(os, 'scandir', failing_scandir)
  yield locked
  os.chmod(locked, 0o755)


def test_unreadable_subfolder_is_reported(tmp_path, unreadable_subfolder,
                                          caplog):
  with caplog.at_level(logging.WARNING):
    files = input_pipeline.list_images(str(tmp_path))
  assert files == [str(tmp_path / 'ok' / '1.png')]
  assert (f'cannot read 1 subfolder(s), their images are left out: '
          f'{unreadable_subfolder} (Permission denied)') in caplog.text
  with pytest.raises(input_pipeline.DataError,
                     match=f'Cannot read 1 subfolder.*{unreadable_subfolder}'):
    input_pipeline.list_images(str(tmp_path), on_unreadable='error')
  with pytest.raises(input_pipeline.DataError,
                     match=f"Cannot read data_dir='{unreadable_subfolder}'"):
    input_pipeline.list_images(unreadable_subfolder)


def test_fewer_examples_than_one_batch_is_an_error(tmp_path, tfds_dir,
                                                   monkeypatch):
  """It used to train on, each batch repeating the few images."""
  for i in range(3):
    _write(str(tmp_path / f'{i}.png'), np.zeros((4, 4)))
  config = _config(dataset='folder', data_dir=str(tmp_path), batch_size=4)
  with pytest.raises(input_pipeline.DataError, match=(
      f"data_dir='{tmp_path}' has 3 training images, fewer than one batch "
      r'per host \(batch_size=4 // 1 host = 4\).*batch_size to 3 or less')):
    input_pipeline.create_input_iter(config, num_local_devices=1)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  config.batch_size = 8  # 4 per host, 3 per host's shard (6 images / 2 hosts)
  for i in range(3, 6):
    _write(str(tmp_path / f'{i}.png'), np.zeros((4, 4)))
  with pytest.raises(input_pipeline.DataError, match=(
      r'3 training images per host \(2 hosts\), fewer than one batch per '
      r'host \(batch_size=8 // 2 hosts = 4\).*batch_size to 6 or less')):
    input_pipeline.create_input_iter(config, num_local_devices=1)
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  for config, found in [
      (_config(dataset='faces_offline', batch_size=128),
       "dataset='faces_offline' has 100 training images"),
      (_config(dataset='faces_offline', batch_size=96, eval_split_fraction=0.1),
       'has 90 training images after holding out eval_split_fraction=0.1'),
      (_config(dataset='input_pipeline_test_images', data_dir=tfds_dir,
               batch_size=32),
       "split='train' has 20 training images")]:
    with pytest.raises(ValueError, match=found):
      input_pipeline.create_input_iter(config, num_local_devices=1)
