"""Samples, reconstructions and interpolations from a training workdir.

  python -m introvae_jax.generate --workdir=runs/default --num=64 --out=samples/

Loads `<workdir>/config.json` and the newest checkpoint (or `--step`), and
writes PNG grids plus one PNG per prior sample under `--out` (local or
gs://). A converted checkpoint's workdir (`introvae_jax.convert`) works the
same. Flags, the workdir and the `--images` folder are checked before any
model work; a mistake is one line on stderr, exit status 2. A float64 run is
sampled in float64 (64-bit JAX is turned on, as main.py does).

Any --num is made `sampling.CHUNK_SIZE` (250) images per network call and
written chunk by chunk, so memory stays bounded; up to 250 the samples are
one call, as before chunking. The grids (samples.png, reconstructions.png)
show the first chunk only. A request above `MAX_NUM` images, or whose PNGs
would not fit in --out's free space, is refused up front with its estimate.
"""

import os
import shutil
import time

from absl import flags
from absl import logging
from etils import epath

from introvae_jax import cli
from introvae_jax import errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_OUT = flags.DEFINE_string('out', None,
                           'Output folder (default <workdir>/samples).')
_NUM = flags.DEFINE_integer('num', 64, 'Prior samples, one PNG each (at most '
                            '1,000,000); the grids show the first 250 and as '
                            'many reconstructions.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Prior std multiplier.')
_IMAGES = flags.DEFINE_string('images', None, 'Folder of images to reconstruct '
                              '(default: the run\'s own data set).')
_INTERPOLATION_STEPS = flags.DEFINE_integer(
    'interpolation_steps', 8, 'Images per interpolation row (2 to 250).')
_BN = flags.DEFINE_enum('batch_norm', 'batch', ['batch', 'running'],
                        'BatchNorm statistics at sampling time.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the prior noise.')
flags.mark_flag_as_required('workdir')
flags.register_validator(
    'num', lambda n: n >= 1,
    '--num must be >= 1 (images to sample and reconstruct)')
flags.register_validator(
    'interpolation_steps', lambda n: n >= 2,
    '--interpolation_steps must be >= 2 (both end points are included)')
flags.register_validator(
    'temperature', lambda t: t >= 0,
    '--temperature must be >= 0 (the prior std multiplier)')
flags.register_validator('step', lambda s: s is None or s >= 0,
                         '--step must be >= 0')


# The most samples one run writes: past a million files in one folder most
# file systems slow down, and it is hours of work on a CPU. More: run again
# with another --seed.
MAX_NUM = 1_000_000
# An interpolation row is one decode call: at most one chunk
# (sampling.CHUNK_SIZE) of images.
MAX_INTERPOLATION_STEPS = 250


def check_arguments(num: int, interpolation_steps: int) -> None:
  """The flag checks, for callers of `generate` that bypass the flags."""
  if num < 1:
    raise errors.UserError(f'num={num}: sample at least 1 image (--num>=1).')
  if interpolation_steps < 2:
    raise errors.UserError(f'interpolation_steps={interpolation_steps}: an '
                           'interpolation needs >= 2 images (its end points).')
  if interpolation_steps > MAX_INTERPOLATION_STEPS:
    raise errors.UserError(
        f'interpolation_steps={interpolation_steps}: a row holds at most '
        f'{MAX_INTERPOLATION_STEPS} images (one network call); lower '
        '--interpolation_steps.')


def _check_images(folder: str) -> None:
  """DataError naming `folder` if it is missing or holds no images."""
  from introvae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.list_images(folder)


def _free_bytes(out: str):
  """Free space of the local folder `out` or its nearest existing parent;
  None for gs:// and other remote paths."""
  if '://' in out:
    return None
  path = os.path.abspath(out)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _png_cost(image_size: int, channels: int):
  """(bytes, seconds) of one sample's PNG, measured on noise: incompressible,
  so at most the size of a sample's."""
  from introvae_jax import sampling  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  noise = np.random.RandomState(0).randint(
      0, 256, (image_size, image_size, channels)).astype(np.uint8)
  size = len(sampling.png_bytes(noise))  # untimed: the first call warms up
  start, reps = time.perf_counter(), 3
  for _ in range(reps):
    sampling.png_bytes(noise)
  return size, (time.perf_counter() - start) / reps


def _duration(seconds: float) -> str:
  for unit, length in (('days', 86400), ('h', 3600), ('min', 60)):
    if seconds >= length:
      return f'{seconds / length:.1f} {unit}'
  return f'{seconds:.1f} s'


def check_request(num: int, out: str, image_size: int, channels: int) -> None:
  """Refuses (`sampling.RequestTooLargeError`, with the estimate of disk and
  time) more than MAX_NUM samples, or PNGs that would not fit in `out`."""
  from introvae_jax import sampling  # pylint: disable=g-import-not-at-top
  per_png, per_second = _png_cost(image_size, channels)
  cost = (f'up to {sampling.format_bytes(num * per_png)} of PNGs '
          f'({sampling.format_bytes(per_png)} each) in {out}, '
          f'~{_duration(num * per_second)} of PNG encoding alone')
  if num > MAX_NUM:
    raise sampling.RequestTooLargeError(
        f'--num={num}: {cost}; one run writes at most {MAX_NUM:,} samples: '
        'lower --num, or run again with another --seed and --out.')
  free = _free_bytes(out)
  if free is not None and num * per_png > free:
    raise sampling.RequestTooLargeError(
        f'--num={num}: {cost}, but {sampling.format_bytes(free)} is free '
        f'there; lower --num to {free // per_png} or less, or pass an --out '
        'with more space.')


def _run_shape(workdir: str):
  """(image_size, image_channels) from the run's config.json, or None when
  it cannot be read (loading the run then says why)."""
  from introvae_jax import sampling  # pylint: disable=g-import-not-at-top
  saved = sampling.saved_config(workdir) or {}
  try:
    return int(saved['image_size']), int(saved['image_channels'])
  except (KeyError, TypeError, ValueError):
    return None


def _check_writable(out: str) -> None:
  try:
    epath.Path(out).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'Cannot create --out={out} ({e.strerror or e}); '
                           'pass a folder you can write to.') from e


def generate(workdir, out, *, num=64, temperature=1.0, images=None,
             interpolation_steps=8, use_running_average=False, step=None,
             seed=0):
  """Writes samples.png, samples/NNNN.png, reconstructions.png and
  interpolation_{linear,slerp}.png under `out`; returns their paths.

  The samples are made and written `sampling.CHUNK_SIZE` at a time
  (`sampling.sample_chunks`); the grids show the first chunk. Sample files
  are numbered with at least 4 digits, more when num > 10,000.

  Raises `errors.UserError` (before any sampling) for a bad argument, a
  request too large (`check_request`), a missing or empty workdir, or an
  `images` folder without images.
  """
  # Imported here, after the flags are checked: TensorFlow (the input
  # pipeline) takes ~10 s to import, so a bad --workdir is reported first
  # unless there is an --images folder to check before the checkpoint loads.
  import jax
  import numpy as np

  from introvae_jax import checkpointing
  from introvae_jax import parallel
  from introvae_jax import sampling

  check_arguments(num, interpolation_steps)
  shape = _run_shape(workdir)
  if shape:
    check_request(num, out, *shape)
  if images:
    _check_images(images)
  config, state = checkpointing.load_run(workdir, step,
                                         mesh=parallel.make_mesh())
  from introvae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  source = config
  if images:
    source = config.copy_and_resolve_references()
    source.dataset, source.data_dir, source.eval_split_fraction = (
        'folder', images, 0.0)
  _check_writable(out)
  bn = dict(use_running_average=use_running_average)
  written = []

  def save(name, grid):
    path = os.path.join(out, name)
    sampling.save_png(path, grid)
    written.append(path)

  # The grids hold the first chunk: bounded, and as before for one chunk.
  reals = input_pipeline.eval_images(source, min(num, sampling.CHUNK_SIZE))
  width = max(4, len(str(num - 1)))
  for start, fakes in sampling.sample_chunks(
      state, jax.random.PRNGKey(seed), num, config, temperature, **bn):
    if start == 0:
      save('samples.png', sampling.image_grid(fakes))
    for i, img in enumerate(fakes, start):
      save(os.path.join('samples', f'{i:0{width}d}.png'),
           sampling.image_grid(img[None]))
    if num > sampling.CHUNK_SIZE:
      logging.info('%d of %d samples written.', start + len(fakes), num)

  recs = np.asarray(sampling.reconstruct(state, reals, config, **bn))
  pairs = np.stack([reals, recs], 1).reshape((-1,) + reals.shape[1:])
  save('reconstructions.png', sampling.image_grid(pairs, ncol=16))
  if len(reals) >= 2:
    for kind in ('linear', 'slerp'):
      rows = [sampling.interpolate(state, reals[2 * i], reals[2 * i + 1],
                                   config, interpolation_steps, kind, **bn)
              for i in range(min(4, len(reals) // 2))]
      save(f'interpolation_{kind}.png',
           sampling.image_grid(np.concatenate(rows), ncol=interpolation_steps))
  return written


def main(argv):
  """`python -m introvae_jax.generate --workdir=DIR`: samples,
  reconstructions and interpolations of the run's newest checkpoint."""
  del argv
  from introvae_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from introvae_jax import sampling  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logs()
  sampling.enable_x64_for_run(_WORKDIR.value)  # before any array is made
  out = _OUT.value or os.path.join(_WORKDIR.value, 'samples')
  for path in generate(_WORKDIR.value, out, num=_NUM.value,
                       temperature=_TEMPERATURE.value, images=_IMAGES.value,
                       interpolation_steps=_INTERPOLATION_STEPS.value,
                       use_running_average=_BN.value == 'running',
                       step=_STEP.value, seed=_SEED.value):
    if not path.startswith(os.path.join(out, 'samples') + os.sep):
      print(path)


if __name__ == '__main__':
  cli.run(main)
