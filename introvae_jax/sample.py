"""Samples, reconstructions and interpolations from a training workdir.

  python -m introvae_jax.sample --workdir=runs/default --num=64 --out=samples/

Loads `<workdir>/config.json` and the newest checkpoint (or `--step`), and
writes PNG grids plus one PNG per prior sample under `--out` (local or
gs://). A converted checkpoint's workdir (`introvae_jax.convert`) works the
same. Flags, the workdir and the `--images` folder are checked before any
model work; a mistake is one line on stderr, exit status 2.
"""

import os

from absl import flags
from etils import epath

from introvae_jax import cli
from introvae_jax import errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (default <workdir>/samples).')
_NUM = flags.DEFINE_integer('num', 64, 'Prior samples and reconstructions.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Prior std multiplier.')
_IMAGES = flags.DEFINE_string('images', None, 'Folder of images to reconstruct '
                              '(default: the run\'s own data set).')
_INTERPOLATION_STEPS = flags.DEFINE_integer('interpolation_steps', 8,
                                            'Images per interpolation row.')
_BN = flags.DEFINE_enum('batch_norm', 'batch', ['batch', 'running'],
                        'BatchNorm statistics at sampling time.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the prior noise.')
flags.mark_flag_as_required('workdir')
flags.register_validator('num', lambda n: n >= 1,
                         '--num must be >= 1 (images to sample and reconstruct)')
flags.register_validator(
    'interpolation_steps', lambda n: n >= 2,
    '--interpolation_steps must be >= 2 (both end points are included)')
flags.register_validator('temperature', lambda t: t >= 0,
                         '--temperature must be >= 0 (the prior std multiplier)')
flags.register_validator('step', lambda s: s is None or s >= 0,
                         '--step must be >= 0')


def check_arguments(num: int, interpolation_steps: int) -> None:
  """The flag checks, for callers of `generate` that bypass the flags."""
  if num < 1:
    raise errors.UserError(f'num={num}: sample at least 1 image (--num>=1).')
  if interpolation_steps < 2:
    raise errors.UserError(f'interpolation_steps={interpolation_steps}: an '
                           'interpolation needs >= 2 images (its end points).')


def _check_images(folder: str) -> None:
  """DataError naming `folder` if it is missing or holds no images."""
  from introvae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.list_images(folder)


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

  Raises `errors.UserError` (before any sampling) for a bad argument, a
  missing or empty workdir, or an `images` folder without images.
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
  if images:
    _check_images(images)
  config, state = checkpointing.load_run(workdir, step,
                                         mesh=parallel.make_mesh())
  from introvae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  source = config
  if images:
    source = config.copy_and_resolve_references()
    source.dataset, source.data_dir, source.eval_split_fraction = 'folder', images, 0.0
  _check_writable(out)
  bn = dict(use_running_average=use_running_average)
  written = []

  def save(name, grid):
    path = os.path.join(out, name)
    sampling.save_png(path, grid)
    written.append(path)

  reals = input_pipeline.eval_images(source, num)
  fakes = np.asarray(sampling.sample(state, jax.random.PRNGKey(seed), num,
                                     config, temperature, **bn))
  save('samples.png', sampling.image_grid(fakes))
  for i, img in enumerate(fakes):
    save(os.path.join('samples', f'{i:04d}.png'), sampling.image_grid(img[None]))

  recs = np.asarray(sampling.reconstruct(state, reals, config, **bn))
  pairs = np.stack([reals, recs], 1).reshape((-1,) + reals.shape[1:])
  save('reconstructions.png', sampling.image_grid(pairs, ncol=16))
  if len(reals) >= 2:
    for kind in ('linear', 'slerp'):
      rows = [sampling.interpolate(state, reals[2 * i], reals[2 * i + 1], config,
                                   interpolation_steps, kind, **bn)
              for i in range(min(4, len(reals) // 2))]
      save(f'interpolation_{kind}.png',
           sampling.image_grid(np.concatenate(rows), ncol=interpolation_steps))
  return written


def main(argv):
  del argv
  from introvae_jax import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logs()
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
