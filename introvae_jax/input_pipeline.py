"""tf.data input pipeline for TFDS names, image folders and the built-in sets.

Every source runs the same path: this host's shard of one split, reshuffled
every epoch with the seed, repeated, decoded, center-cropped to a square,
converted to `image_channels`, resized to `image_size` (bicubic, antialiased),
flipped at random and batched to this host's rows of the global batch,
float32 [local_batch, H, W, C] in [0, 1] (`parallel.global_batch` places them
on the mesh; a pmap caller reshapes them with `step.shard_batch`).

Exact resume: element p of a host's stream (p = step * local_batch + i) is
example order_e[p % n] of epoch e = p // n, where n is the size of the host's
shard and order_e depends only on (seed, host, e); the flip of element p
depends only on (seed, host, p). So `start_step=k` starts at epoch
k * local_batch // n, skips to the offset inside it, and yields exactly the
batches k, k+1, ... of a run started at 0. Folders and built-in sets shuffle
indices (a full permutation per epoch), so the skip costs nothing. TFDS records
have no random access: each epoch reads the split in file order through a
`shuffle_buffer` seeded with (seed, host, epoch), so resuming reads, without
decoding, up to one epoch of the host's records.

Image folders are searched recursively, following symbolic links; a folder
reached twice (a symlink loop such as `ln -s . self`, or a second link to
one folder) is searched once, and the link is named in a warning. A
subfolder that cannot be read is named in a warning and its images are left
out (an error with `on_corrupt_image='error'`, as for corrupt files).

A source with fewer training examples per host than the per-host batch is an
error (every batch would repeat images), naming both numbers.

Data a user can get wrong (a missing, empty or unreadable folder, an unknown
or unprepared TFDS name, too few images) raises `DataError`, inconsistent
fields `errors.ConfigError`; both are ValueErrors whose message names the
field or path and the fix.

`eval_split_fraction` holds out a fixed random subset of a folder or built-in
set (the same for every seed), or the tail of a TFDS split (TFDS shuffles
examples when it prepares a split).

TensorFlow is kept off the GPUs (JAX owns them) and off most CPU threads.
"""

import contextlib
import dataclasses
import difflib
import io
import math
import os
import threading
import warnings
from typing import Callable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow as tf
import tensorflow_datasets as tfds

from introvae_jax import errors
from introvae_jax import offline_datasets
from introvae_jax.configuration import check_batch_divides

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# Decode/resize threads: enough to feed an accelerator while leaving cores to
# JAX and to other jobs on a shared machine.
NUM_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
# A fixed depth keeps host memory predictable with 1024 px batches.
PREFETCH_BATCHES = 2
# ITU-R BT.601 luma, the weights of tf.image.rgb_to_grayscale and PIL.
_LUMA = (0.2989, 0.5870, 0.1140)
# Fixed, so the held-out images stay the same when config.seed changes.
_HOLDOUT_SEED = 2018
_SHUFFLE, _FLIP = 0, 1  # purposes of the random keys


def _configure_tensorflow() -> None:
  """Hides GPUs from TF (it would reserve their memory) and caps its threads."""
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.threading.set_inter_op_parallelism_threads(NUM_THREADS)
    tf.config.threading.set_intra_op_parallelism_threads(NUM_THREADS)
  except RuntimeError:  # TF was initialized before this module was imported.
    if tf.config.get_visible_devices('GPU'):
      logging.warning(
          'TensorFlow was initialized before introvae_jax.input_pipeline was '
          'imported and can see GPUs, so it may take GPU memory JAX needs; '
          'import the input pipeline before using TensorFlow.')


_configure_tensorflow()


class DataError(errors.UserError, ValueError):
  """The data a config names is missing, unreadable, unknown or too small."""


@dataclasses.dataclass(frozen=True)
class _Source:
  """One shard of one split in a fixed order.

  Attributes:
    num_examples: examples in the shard (one epoch).
    keys: the examples in fixed order, as keys (indices or encoded images).
    epoch_keys: epoch (int64 tensor) -> the keys in that epoch's order.
    load: key -> image [h, w, c], uint8 or float in [0, 1], c in 1..4.
    decoder: the image-file decoder (it tracks corrupt files), if any.
  """
  num_examples: int
  keys: tf.data.Dataset
  epoch_keys: Callable[[tf.Tensor], tf.data.Dataset]
  load: Callable[[tf.Tensor], tf.Tensor]
  decoder: '_FileDecoder | None' = None


class InputIterator:
  """Yields {'image': float32 [local_batch, H, W, C]} forever."""

  def __init__(self, dataset: tf.data.Dataset, decoder: '_FileDecoder | None'):
    self._batches = dataset.as_numpy_iterator()
    self._decoder = decoder

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    with _decode_errors(self._decoder):
      return next(self._batches)

  @property
  def corrupt_files(self) -> list[str]:
    """Image files skipped so far because they could not be decoded."""
    return self._decoder.corrupt_files if self._decoder else []


def create_input_iter(config: ml_collections.ConfigDict, *, start_step: int = 0,
                      num_local_devices: int | None = None) -> InputIterator:
  """This host's training batches from step `start_step` on.

  Args:
    config: the run's config (`dataset`, `data_dir`, `batch_size`, ...).
    start_step: first step to yield; batches equal those of a run from step 0.
    num_local_devices: the devices this host's rows are split over (checked to
      divide them); default `jax.local_device_count()`.

  Returns:
    An iterator of dicts whose 'image' is float32 [local_batch, H, W, C] in
    [0, 1], local_batch = batch_size / process_count (this host's rows of
    each global batch).
  """
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  if num_local_devices is None:
    num_local_devices = jax.local_device_count()
  host, num_hosts = jax.process_index(), jax.process_count()
  per_device = check_batch_divides(config.batch_size,
                                   num_hosts * num_local_devices)
  local_batch = per_device * num_local_devices
  source = _source(config, held_out=False, host=host, num_hosts=num_hosts,
                   shuffle_key=_random_key(config.seed, host, _SHUFFLE))
  if source.num_examples < local_batch:
    raise DataError(_too_few_message(config, source.num_examples, num_hosts,
                                     num_local_devices, local_batch))
  flip_key = tf.constant(_random_key(config.seed, host, _FLIP), tf.int64)

  def example(position, key):
    image = _preprocess(source.load(key), config)
    if config.random_flip:
      image = _random_flip(image, flip_key, position)
    return image

  start = start_step * local_batch
  first_epoch, offset = divmod(start, source.num_examples)
  ds = tf.data.Dataset.counter(first_epoch).flat_map(source.epoch_keys)
  # Skip keys, before decoding, to reach the first element of start_step.
  ds = ds.skip(offset).enumerate(start)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(lambda images: {'image': images})
  ds = ds.with_options(_options()).prefetch(PREFETCH_BATCHES)
  return InputIterator(ds, source.decoder)


def eval_images(config: ml_collections.ConfigDict,
                num_images: int) -> np.ndarray:
  """Up to `num_images` fixed images, float32 [k, H, W, C], for image grids.

  They are the held-out images when `eval_split_fraction > 0`, else the first
  training images; never flipped; the same on every host and every call.
  """
  source = _source(config, held_out=config.eval_split_fraction > 0, host=0,
                   num_hosts=1, shuffle_key=0)
  ds = source.keys.take(num_images).map(
      lambda key: _preprocess(source.load(key), config),
      num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(num_images).with_options(_options())
  with _decode_errors(source.decoder):
    return next(ds.as_numpy_iterator())


def _too_few_message(config, per_host: int, num_hosts: int,
                     num_local_devices: int, local_batch: int) -> str:
  if config.dataset == 'folder':
    source = f'dataset=folder, data_dir={config.data_dir!r}'
  elif config.dataset in offline_datasets.DATASETS:
    source = f'dataset={config.dataset!r}'
  else:
    source = f'dataset={config.dataset!r}, split={config.split!r}'
  found = f'{per_host} training images'
  if num_hosts > 1:
    found += f' per host ({num_hosts} hosts)'
  if config.eval_split_fraction:
    found += (' after holding out '
              f'eval_split_fraction={config.eval_split_fraction:g}')
  largest = per_host // num_local_devices * num_local_devices * num_hosts
  fix = (f'lower --config.batch_size to {largest} or less, or use more data'
         if largest else 'use more data')
  return (f'{source} has {found}, fewer than one batch per host '
          f'(batch_size={config.batch_size} // {num_hosts} '
          f'host{"s" if num_hosts > 1 else ""} = {local_batch}), so every '
          f'batch would repeat images; {fix}.')


def dataset_size(config: ml_collections.ConfigDict) -> int:
  """Training examples over all hosts (held-out examples excluded)."""
  return _source(config, held_out=False, host=0, num_hosts=1,
                 shuffle_key=0).num_examples


def _source(config, *, held_out: bool, host: int, num_hosts: int,
            shuffle_key: int) -> _Source:
  """The host's shard of the training examples, or of the held-out ones."""
  fraction = config.eval_split_fraction
  if not 0 <= fraction < 1:
    raise errors.ConfigError(
        f'eval_split_fraction={fraction} must be in [0, 1).')
  if config.dataset == 'folder' or config.dataset in offline_datasets.DATASETS:
    if config.split != 'train':
      raise errors.ConfigError(
          f"split={config.split!r}: dataset={config.dataset!r} has one split, "
          "'train'; hold out images with --config.eval_split_fraction.")
    if config.dataset == 'folder':
      files = list_images(config.data_dir, config.on_corrupt_image)
      indices = _shard(_holdout(len(files), fraction, held_out), host,
                       num_hosts)
      decoder = _FileDecoder([files[i] for i in indices],
                             config.on_corrupt_image)
      return _indexed_source(len(indices), decoder.load, shuffle_key, decoder)
    images = offline_datasets.DATASETS[config.dataset]()
    indices = _shard(_holdout(len(images), fraction, held_out), host,
                     num_hosts)
    subset = tf.constant(images[indices])
    return _indexed_source(len(indices), lambda i: tf.gather(subset, i),
                           shuffle_key)
  return _tfds_source(config, held_out=held_out, host=host, num_hosts=num_hosts,
                      shuffle_key=shuffle_key)


def _holdout(num_examples: int, fraction: float, held_out: bool) -> np.ndarray:
  """Sorted indices of the training part, or of the held-out random part."""
  num_eval = math.ceil(fraction * num_examples)
  order = np.random.default_rng(_HOLDOUT_SEED).permutation(num_examples)
  return np.sort(order[:num_eval] if held_out else order[num_eval:])


def _shard(indices: np.ndarray, host: int, num_hosts: int) -> np.ndarray:
  if len(indices) < num_hosts:
    raise DataError(f'{len(indices)} examples cannot be shared by {num_hosts} '
                    'hosts; use more data or fewer hosts.')
  return indices[host::num_hosts]


def _indexed_source(num_examples: int, load, shuffle_key: int,
                    decoder: '_FileDecoder | None' = None) -> _Source:
  """A source with random access: each epoch is a seeded permutation."""
  key = tf.constant(shuffle_key, tf.int64)

  def epoch_keys(epoch):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64), seed=tf.stack([key, epoch]))
    return tf.data.Dataset.from_tensor_slices(order)

  return _Source(num_examples, tf.data.Dataset.range(num_examples), epoch_keys,
                 load, decoder)


def _tfds_source(config, *, held_out: bool, host: int, num_hosts: int,
                 shuffle_key: int) -> _Source:
  """Records of a prepared TFDS split, reordered each epoch by a buffer."""
  builder = _tfds_builder(config)
  split = tfds.even_splits(_tfds_split(builder, config, held_out), n=num_hosts,
                           drop_remainder=True)[host]
  num_examples = builder.info.splits[split].num_examples
  if not num_examples:
    raise DataError(f'split={config.split!r} of {config.dataset!r} has too '
                    f'few examples for {num_hosts} hosts.')
  image_key = _image_feature(builder)
  # Images stay encoded until after shuffle and skip, so skipping is cheap.
  records = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False),
  ).map(lambda example: example[image_key])
  key = tf.constant(shuffle_key, tf.int64)

  def epoch_keys(epoch):
    seed = tf.random.stateless_uniform([], seed=tf.stack([key, epoch]),
                                       minval=None, maxval=None, dtype=tf.int64)
    return records.shuffle(config.shuffle_buffer, seed=seed)

  return _Source(num_examples, records, epoch_keys,
                 builder.info.features[image_key].decode_example)


def _tfds_builder(config) -> tfds.core.DatasetBuilder:
  """The builder of a prepared TFDS dataset; never downloads."""
  name = config.dataset
  try:
    builder = tfds.builder(name, data_dir=config.data_dir or None)
  except tfds.core.DatasetNotFoundError:
    close = difflib.get_close_matches(
        name, tfds.list_builders(with_community_datasets=False), n=3)
    hint = f' Did you mean {" or ".join(close)}?' if close else ''
    raise DataError(
        f"dataset={name!r} is not a TFDS name, 'folder', or a built-in set "
        f'({", ".join(offline_datasets.DATASETS)}).{hint} List TFDS names with '
        'tensorflow_datasets.list_builders() or at '
        'https://www.tensorflow.org/datasets/catalog/overview.') from None
  if not builder.is_prepared():
    # Training never downloads: offline, TFDS would retry for minutes.
    command = f'tfds build {name} --data_dir={builder.data_dir_root}'
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      command += f' --manual_dir={config.manual_dir or "MANUAL_DIR"}'
      how = (f'\n{name} needs files you download yourself into MANUAL_DIR:\n'
             f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}')
    else:
      how = ''
    raise DataError(
        f'TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare '
        f'it once (this downloads and converts it), then rerun:\n  {command}'
        f'{how}')
  return builder


def _tfds_split(builder, config, held_out: bool) -> str:
  """The split name, sliced to its training part or held-out tail."""
  split = config.split
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise DataError(
        f'split={split!r} is not a split of {config.dataset!r}; it has '
        f'{sorted(builder.info.splits)}.') from e
  if not config.eval_split_fraction:
    return split
  if '[' in split:
    raise errors.ConfigError(
        f'split={split!r}: eval_split_fraction needs a plain split name (it '
        'slices off the held-out tail itself).')
  # TFDS shuffles examples when it prepares a split, so the tail is random.
  num_eval = math.ceil(config.eval_split_fraction * num_examples)
  first_eval = num_examples - num_eval
  return f'{split}[{first_eval}:]' if held_out else f'{split}[:{first_eval}]'


def _image_feature(builder) -> str:
  """The key of the dataset's image feature ('image', or its only image)."""
  features = builder.info.features
  images = [key for key, feature in features.items()
            if isinstance(feature, tfds.features.Image)]
  if 'image' in images:
    return 'image'
  if len(images) == 1:
    return images[0]
  raise DataError(f'{builder.name!r} has no single image feature to train on; '
                  f'its features are {list(features)}.')


def list_images(folder: str, on_unreadable: str = 'skip') -> list[str]:
  """PNG and JPEG files under `folder`, recursively, in sorted order.

  Symbolic links are followed, each real folder once: a link to a folder
  already searched (a loop such as `ln -s . self`, or a second link to the
  same folder) is skipped with a warning naming it, so nothing is listed
  twice and a loop cannot recurse forever. A subfolder that cannot be read
  is named in a warning and left out; with on_unreadable='error' it raises.

  Raises:
    DataError: `folder` is unset, missing, unreadable or holds no images.
  """
  if not folder:
    raise DataError("dataset='folder' needs the image folder: set "
                    '--config.data_dir=/path/to/images.')
  if not tf.io.gfile.isdir(folder):
    raise DataError(f'data_dir={folder!r} is not a directory '
                    '(dataset=folder); point data_dir at the training images.')
  unreadable: list[OSError] = []
  if '://' in folder:  # gs:// and other stores: no symbolic links there.
    files = [os.path.join(root, name) for root, _, names
             in tf.io.gfile.walk(folder, onerror=unreadable.append)
             for name in names]
  else:
    files = _walk_local(folder, unreadable.append)
  _report_unreadable(folder, unreadable, on_unreadable)
  files = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise DataError(
        f'data_dir={folder!r} holds no image files (searched recursively '
        f'for {", ".join(IMAGE_EXTENSIONS)}); point data_dir at the training '
        'images.')
  return files


def _walk_local(folder: str, onerror) -> list[str]:
  """Every file under a local folder, following links to unvisited folders."""
  visited = {os.path.realpath(folder)}
  files = []
  for root, dirs, names in os.walk(folder, onerror=onerror, followlinks=True):
    keep = []
    # Real subfolders before links, so a folder keeps its own path.
    for name in sorted(dirs, key=lambda d: (os.path.islink(
        os.path.join(root, d)), d)):
      path = os.path.join(root, name)
      real = os.path.realpath(path)
      if real not in visited:
        visited.add(real)
        keep.append(name)
        continue
      here = os.path.realpath(root)
      kind = ('a symlink loop' if here == real or here.startswith(real + os.sep)
              else 'a second path to the same folder')
      logging.warning(
          'Image folder %s: not following %s -> %s, %s; its images are '
          'listed once. Remove the link to silence this warning.',
          folder, path, real, kind)
    dirs[:] = keep
    files.extend(os.path.join(root, name) for name in names)
  return files


def _report_unreadable(folder: str, failures: list[OSError],
                       on_unreadable: str) -> None:
  """Unreadable folders: an error for the top one or in error mode, else a
  warning naming them."""
  if not failures:
    return
  first = failures[0]
  names = [getattr(e, 'filename', None) or folder for e in failures]
  path = names[0]
  why = getattr(first, 'strerror', None) or str(first)
  if os.path.normpath(path) == os.path.normpath(folder):
    raise DataError(f'Cannot read data_dir={folder!r} ({why}); fix its '
                    'permissions or point data_dir at a readable folder.')
  paths = ', '.join(str(name) for name in names[:5])
  more = f' and {len(failures) - 5} more' if len(failures) > 5 else ''
  if on_unreadable == 'error':
    raise DataError(
        f'Cannot read {len(failures)} subfolder(s) of data_dir={folder!r}: '
        f'{paths}{more} ({why}); fix their permissions (e.g. chmod -R u+rX '
        f'{path}), move them out of data_dir, or set '
        '--config.on_corrupt_image=skip to train without their images.')
  logging.warning(
      'Image folder %s: cannot read %d subfolder(s), their images are left '
      'out: %s%s (%s). Fix their permissions (e.g. chmod -R u+rX %s), or set '
      '--config.on_corrupt_image=error to stop on this.',
      folder, len(failures), paths, more, why, path)


class _FileDecoder:
  """Decodes image files with PIL inside tf.data.

  A corrupt file is warned about and counted, and its slot gets the next
  decodable file of the list, so every position still yields one image and
  resume stays exact (the file next to it is seen twice per epoch instead).
  With on_corrupt='error' the first corrupt file stops the pipeline.
  """

  def __init__(self, files: list[str], on_corrupt: str):
    self.files = files
    self.on_corrupt = on_corrupt
    self.error: DataError | None = None
    self._corrupt: set[str] = set()
    self._lock = threading.Lock()  # tf.data decodes on several threads.

  @property
  def corrupt_files(self) -> list[str]:
    with self._lock:
      return sorted(self._corrupt)

  def load(self, index: tf.Tensor) -> tf.Tensor:
    image = tf.numpy_function(self._decode, [index], tf.uint8)
    image.set_shape([None, None, None])
    return image

  def _decode(self, index: np.ndarray) -> np.ndarray:
    for step in range(len(self.files)):
      path = self.files[(int(index) + step) % len(self.files)]
      if path in self._corrupt:
        continue
      try:
        return _decode_file(path)
      except Exception as e:  # pylint: disable=broad-except
        # Undecodable bytes surface as many exception types in PIL.
        self._record_corrupt(path, e)
    raise self._error(f'None of the {len(self.files)} image files could be '
                      f'decoded, e.g. {self.files[0]}.')

  def _record_corrupt(self, path: str, error: Exception) -> None:
    if self.on_corrupt == 'error':
      raise self._error(
          f'Cannot decode image file {path}: {error}. Remove it, or set '
          '--config.on_corrupt_image=skip to skip corrupt files.')
    with self._lock:
      new = path not in self._corrupt
      self._corrupt.add(path)
      count = len(self._corrupt)
    if new:
      logging.warning('Skipping corrupt image file %s (%s); %d skipped so far.',
                      path, error, count)

  def _error(self, message: str) -> 'DataError':
    # Kept so the caller can raise it instead of TF's wrapped copy.
    self.error = DataError(message)
    return self.error


# The largest image decoded (8192 x 8192 pixels, 256 MiB as RGB): a larger
# one is a decompression bomb or no training image, and is treated as corrupt
# before its pixels are decoded (PIL only warns below 2x its own limit).
MAX_IMAGE_PIXELS = 8192 * 8192


def _decode_file(path: str) -> np.ndarray:
  """uint8 [h, w, 1] for grayscale files, else [h, w, 3]; alpha dropped."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = f.read()
  with warnings.catch_warnings():  # the check below says it in our words
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    try:
      image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:  # over twice PIL's own limit
      image = None
  if image is None or image.width * image.height > MAX_IMAGE_PIXELS:
    size = f'{image.width}x{image.height}' if image else 'its'
    raise ValueError(
        f'{size} pixels are over the limit of {MAX_IMAGE_PIXELS:,} for one '
        'image (a decompression bomb?); downscale it or remove it')
  image = ImageOps.exif_transpose(image)  # cameras store rotation in EXIF.
  if image.mode.startswith('I'):  # 16-bit: convert('L') would clip at 255.
    pixels = np.asarray(image, np.float64) / 257
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)[..., None]
  if image.mode in ('1', 'L', 'LA'):
    return np.asarray(image.convert('L'))[..., None]
  return np.asarray(image.convert('RGB'))


@contextlib.contextmanager
def _decode_errors(decoder: '_FileDecoder | None'):
  """Raises a decoder's clear DataError instead of TF's wrapped copy."""
  try:
    yield
  except tf.errors.OpError:
    if decoder is not None and decoder.error is not None:
      raise decoder.error from None
    raise


def _preprocess(image: tf.Tensor, config) -> tf.Tensor:
  """[h, w, c] uint8 or float -> float32 [size, size, channels] in [0, 1]."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(height, width)
  image = tf.image.crop_to_bounding_box(image, (height - side) // 2,
                                        (width - side) // 2, side, side)
  image = _to_channels(tf.image.convert_image_dtype(image, tf.float32),
                       config.image_channels)
  size = config.image_size
  image = tf.image.resize(image, [size, size], method='bicubic', antialias=True)
  image = tf.clip_by_value(image, 0., 1.)  # bicubic overshoots at edges.
  return tf.ensure_shape(image, [size, size, config.image_channels])


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Gray (+alpha) or RGB(A) [h, w, c] -> [h, w, channels]; alpha dropped."""
  gray = tf.shape(image)[-1] < 3
  if channels == 1:
    return tf.cond(
        gray, lambda: image[..., :1],
        lambda: tf.reduce_sum(image[..., :3] * _LUMA, -1, keepdims=True))
  return tf.cond(gray, lambda: tf.tile(image[..., :1], [1, 1, 3]),
                 lambda: image[..., :3])


def _random_flip(image: tf.Tensor, key: tf.Tensor, position: tf.Tensor):
  """Mirrors with probability 1/2, decided by (key, position) alone."""
  coin = tf.random.stateless_uniform([], seed=tf.stack([key, position]))
  return tf.cond(coin < 0.5, lambda: tf.image.flip_left_right(image),
                 lambda: image)


def _random_key(seed: int, host: int, purpose: int) -> int:
  """A key for stateless random ops, distinct per seed, host and purpose."""
  state = np.random.SeedSequence([seed, host, purpose]).generate_state(
      1, np.uint64)
  return int(state[0] >> np.uint64(1))  # TF seeds are int64.


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # exact resume needs the same order every run.
  options.threading.private_threadpool_size = NUM_THREADS
  options.threading.max_intra_op_parallelism = 1
  return options
