"""FID's InceptionV3 (pool3 features) in JAX, as `pytorch-fid` computes it.

`pytorch_fid.inception.InceptionV3([3])` with its default flags: images in
[0, 1] are resized to 299x299 (bilinear, align_corners=False, no
antialiasing), scaled to [-1, 1], and run through the "FID" variant of
InceptionV3 (TF's 2015 graph: the FIDInceptionA/C/E blocks average-pool
without counting padding, the last E block max-pools), ending in a global
average pool: 2,048 features per image.

The weights are the user's `pt_inception-2015-12-05-6726825d.pth` (the file
pytorch-fid downloads), passed by path; nothing is downloaded here. The .pth
is read without PyTorch, and without running anything from it
(`files.read_pth`); `convert` writes an .npz that later runs load.
BatchNorm (eps 1e-3, inference statistics) is folded into each
convolution: kernel * gamma / sqrt(var + eps) and bias beta - mean * that.

    params = load('pt_inception-2015-12-05-6726825d.pth')   # or the .npz
    feats = features(params, images)                        # [N, 2048]
"""

import functools
import os
from typing import Dict, Tuple

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from introvae_jax import cache
from introvae_jax import errors
from introvae_jax import files

FEATURE_DIM = 2048
BN_EPS = 1e-3
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'

Params = Dict[str, Tuple[np.ndarray, np.ndarray]]  # name -> (HWIO kernel, bias)


# --------------------------------------------------------------------------
# Layers.

def _conv(params, name, x, stride=1, padding=(0, 0)):
  """torchvision `BasicConv2d` (conv, BatchNorm, ReLU) with BN folded."""
  kernel, bias = params[name]
  y = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride),
      ((padding[0], padding[0]), (padding[1], padding[1])),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
  return jax.nn.relu(y + bias)


def max_pool(x, size=3, stride=2, padding=0):
  """torch max_pool2d (padding with -inf, floor mode)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1),
                               (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x, size=3, stride=1, padding=1):
  """torch avg_pool2d(count_include_pad=False): padding is not averaged in."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  window, strides = (1, size, size, 1), (1, stride, stride, 1)
  total = jax.lax.reduce_window(x, 0., jax.lax.add, window, strides, pad)
  count = jax.lax.reduce_window(jnp.ones(x.shape[1:3] + (1,), x.dtype)[None],
                                0., jax.lax.add, window, strides, pad)
  return total / count


def resize_bilinear(images, size=299):
  """torch F.interpolate(mode='bilinear', align_corners=False), NHWC."""
  n, _, _, c = images.shape
  return jax.image.resize(images, (n, size, size, c), 'linear', antialias=False)


# --------------------------------------------------------------------------
# Blocks (torchvision names; pytorch-fid's FID variants where they differ).

def _inception_a(p, name, x):
  c = lambda sub, h, **kw: _conv(p, f'{name}.{sub}', h, **kw)
  b1 = c('branch1x1', x)
  b5 = c('branch5x5_2', c('branch5x5_1', x), padding=(2, 2))
  b3 = c('branch3x3dbl_1', x)
  b3 = c('branch3x3dbl_3', c('branch3x3dbl_2', b3, padding=(1, 1)),
         padding=(1, 1))
  bp = c('branch_pool', avg_pool_exclude_pad(x))
  return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _inception_b(p, name, x):
  c = lambda sub, h, **kw: _conv(p, f'{name}.{sub}', h, **kw)
  b3 = c('branch3x3', x, stride=2)
  bd = c('branch3x3dbl_2', c('branch3x3dbl_1', x), padding=(1, 1))
  bd = c('branch3x3dbl_3', bd, stride=2)
  return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


def _inception_c(p, name, x):
  c = lambda sub, h, **kw: _conv(p, f'{name}.{sub}', h, **kw)
  row, col = (0, 3), (3, 0)  # paddings of the 1x7 and 7x1 convolutions
  b1 = c('branch1x1', x)
  b7 = c('branch7x7_1', x)
  b7 = c('branch7x7_3', c('branch7x7_2', b7, padding=row), padding=col)
  bd = c('branch7x7dbl_1', x)
  for i, pad in zip(range(2, 6), (col, row, col, row)):
    bd = c(f'branch7x7dbl_{i}', bd, padding=pad)
  bp = c('branch_pool', avg_pool_exclude_pad(x))
  return jnp.concatenate([b1, b7, bd, bp], axis=-1)


def _inception_d(p, name, x):
  c = lambda sub, h, **kw: _conv(p, f'{name}.{sub}', h, **kw)
  b3 = c('branch3x3_2', c('branch3x3_1', x), stride=2)
  b7 = c('branch7x7x3_1', x)
  b7 = c('branch7x7x3_3', c('branch7x7x3_2', b7, padding=(0, 3)),
         padding=(3, 0))
  b7 = c('branch7x7x3_4', b7, stride=2)
  return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


def _inception_e(p, name, x, pool):
  c = lambda sub, h, **kw: _conv(p, f'{name}.{sub}', h, **kw)
  split = lambda h, a, b: jnp.concatenate(
      [c(a, h, padding=(0, 1)), c(b, h, padding=(1, 0))], axis=-1)
  b1 = c('branch1x1', x)
  b3 = split(c('branch3x3_1', x), 'branch3x3_2a', 'branch3x3_2b')
  bd = c('branch3x3dbl_2', c('branch3x3dbl_1', x), padding=(1, 1))
  bd = split(bd, 'branch3x3dbl_3a', 'branch3x3dbl_3b')
  bp = c('branch_pool', pool(x))
  return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def network(params: Params, x):
  """FID InceptionV3 on [-1, 1] images [N, 299, 299, 3] -> [N, 2048]."""
  c = lambda name, h, **kw: _conv(params, name, h, **kw)
  x = c('Conv2d_1a_3x3', x, stride=2)
  x = c('Conv2d_2b_3x3', c('Conv2d_2a_3x3', x), padding=(1, 1))
  x = max_pool(x)
  x = max_pool(c('Conv2d_4a_3x3', c('Conv2d_3b_1x1', x)))
  for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
    x = _inception_a(params, name, x)
  x = _inception_b(params, 'Mixed_6a', x)
  for name in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):
    x = _inception_c(params, name, x)
  x = _inception_d(params, 'Mixed_7a', x)
  x = _inception_e(params, 'Mixed_7b', x, avg_pool_exclude_pad)
  x = _inception_e(params, 'Mixed_7c', x,
                   functools.partial(max_pool, stride=1, padding=1))
  return jnp.mean(x, axis=(1, 2))


@jax.jit
def _forward(params, images):
  return network(params, 2 * resize_bilinear(images.astype(jnp.float32)) - 1)


def features(params: Params, images, batch_size: int = 50) -> np.ndarray:
  """pool3 features [N, 2048] (float32) of images [N, H, W, 1 or 3] in
  [0, 1]."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Expected images [N, H, W, 1 or 3], got {images.shape}.')
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)  # gray images as RGB
  return np.concatenate([np.asarray(_forward(params, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------
# Weights.

def from_state_dict(state_dict) -> Params:
  """pytorch-fid's state dict (torch or NumPy arrays) -> folded JAX params.

  Every `<name>.conv.weight` with its `<name>.bn.*` becomes one entry; the
  classifier (`fc.*`) is not needed for pool3 features.
  """
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v,
                      np.float64) for k, v in state_dict.items()}
  params = {}
  for key in sd:
    if not key.endswith('.conv.weight'):
      continue
    name = key[:-len('.conv.weight')]
    gamma, beta = sd[f'{name}.bn.weight'], sd[f'{name}.bn.bias']
    mean, var = sd[f'{name}.bn.running_mean'], sd[f'{name}.bn.running_var']
    scale = gamma / np.sqrt(var + BN_EPS)
    kernel = np.transpose(sd[key], (2, 3, 1, 0)) * scale  # OIHW -> HWIO
    params[name] = (kernel.astype(np.float32),
                    (beta - mean * scale).astype(np.float32))
  if 'Mixed_7c.branch_pool' not in params:
    raise errors.BadFileError(
        'Not an InceptionV3 state dict (no Mixed_7c.branch_pool); pass '
        f'pytorch-fid\'s {WEIGHTS_FILE}.')
  return params


def save_npz(params: Params, path: str) -> None:
  """The folded params as an .npz (local or gs://), written atomically."""
  arrays = {}
  for name, (kernel, bias) in params.items():
    arrays[f'{name}/kernel'], arrays[f'{name}/bias'] = kernel, bias
  files.write_npz(path, **arrays)


def convert(pth_path: str, npz_path: str) -> Params:
  """Reads pytorch-fid's .pth and writes the folded .npz.

  The .pth is read by `files.read_pth`, which needs no torch and runs
  nothing from the file.
  """
  fix = (f'download {WEIGHTS_FILE} again (pytorch-fid\'s release page) and '
         'pass its path.')
  what = "pytorch-fid's InceptionV3 weights file"
  state_dict = files.read_pth(pth_path, what, fix)
  if not isinstance(state_dict, dict):
    got = getattr(state_dict, 'pickled_class', type(state_dict).__name__)
    raise errors.BadFileError(
        f'{pth_path} is not {what} (it holds a {got}, not a state dict); {fix}')
  for key, value in state_dict.items():
    if not isinstance(value, np.ndarray):  # only arrays reach from_state_dict
      got = getattr(value, 'pickled_class', type(value).__name__)
      raise errors.BadFileError(
          f'{pth_path} is not {what} (entry {key!r} is a {got}, not a '
          f'tensor); {fix}')
  try:
    params = from_state_dict(state_dict)
  except Exception as e:  # pylint: disable=broad-except
    # Missing keys, stand-ins in place of tensors, wrong shapes.
    raise errors.BadFileError(
        f'{pth_path} is not {what} ({type(e).__name__}: {_first_line(e)}); '
        f'{fix}') from e
  save_npz(params, npz_path)
  return params


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [''])[0]


def _params_from_npz(path: str, fix: str) -> Params:
  arrays = files.read_npz(path, 'InceptionV3 weights file', fix)
  names = {k.rsplit('/', 1)[0] for k in arrays}
  if 'Mixed_7c.branch_pool' not in names or not all(
      f'{n}/kernel' in arrays and f'{n}/bias' in arrays for n in names):
    raise errors.BadFileError(
        f'{path} holds no InceptionV3 weights (it has {len(arrays)} arrays, '
        f'e.g. {sorted(arrays)[:3]}); {fix}')
  return {n: (arrays[f'{n}/kernel'], arrays[f'{n}/bias'])
          for n in sorted(names)}


@functools.lru_cache(maxsize=2)
def load(path: str) -> Params:
  """Params from pytorch-fid's .pth or a converted .npz, on the device.

  A .pth is converted once to `<cache>/<name>.npz`, the cache
  being $INTROVAE_CACHE or ~/.cache/introvae_jax; that cache is rebuilt from
  the .pth, with a warning, if it cannot be read. A missing file, or one
  that holds no InceptionV3 weights, raises a `UserError` naming it.
  """
  path = os.path.expanduser(path)
  if not epath.Path(path).exists():
    raise errors.MissingFileError(
        f'No InceptionV3 weights at {path}. FID needs pytorch-fid\'s '
        f'{WEIGHTS_FILE}, supplied by path (nothing is downloaded).')
  if path.endswith('.pth'):
    name = os.path.basename(path)[:-len('.pth')] + '.npz'
    cached = os.path.join(cache.cache_dir(), name)
    if epath.Path(cached).exists():
      try:
        return jax.device_put(_params_from_npz(cached, 'it is rebuilt.'))
      except errors.BadFileError as e:
        logging.warning('Converting %s again: %s', path, e)
    return jax.device_put(convert(path, cached))
  return jax.device_put(_params_from_npz(
      path, f'delete it and pass pytorch-fid\'s {WEIGHTS_FILE} (the .pth), '
      'which is converted to a fresh .npz.'))
