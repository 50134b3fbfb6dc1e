"""The space-to-depth (pixel-unshuffled) layout of the convolutional models.

A map [B, H, W, C] held with block `b` is [B, H/b, W/b, b*b*C]: each b x b
patch of pixels becomes one position whose channels are the patch's pixels
in row-major order, each with its C channels (`pack`). A TPU stores the last
dimension in 128-lane tiles, so a 16-channel map at 1024 px fills 1/8 of
every tile it occupies; packed with b = 4 it fills all 256 lanes it uses.

Every layer of the models has an exact counterpart on packed maps, with the
same parameters, so checkpoints do not depend on the layout:

* a k x k 'SAME' convolution is a convolution of the packed map with a
  larger, partly zero kernel gathered from the original one
  (`packed_kernel`): output pixel (u, v) of a block reads input pixel
  (u + dy, v + dx), which lies in the same block or a neighbouring one;
* BatchNorm's per-channel statistics reduce over the b*b pixels of each
  position as well (`unpack_channels`);
* a 2 x 2 average pool from block b to block b/2 on the same grid of
  positions averages channel groups (`pool`), and nearest-neighbour
  upsampling from b to 2b copies them (`upsample`): neither moves a pixel
  between positions.
"""

import functools

import jax.numpy as jnp
import numpy as np


def pack(x, b: int):
  """[B, H, W, C] -> [B, H/b, W/b, b*b*C] (pixel-unshuffle)."""
  if b == 1:
    return x
  n, h, w, c = x.shape
  x = x.reshape(n, h // b, b, w // b, b, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h // b, w // b, b * b * c)


def unpack(x, b: int):
  """The inverse of `pack`: [B, h, w, b*b*C] -> [B, h*b, w*b, C]."""
  if b == 1:
    return x
  n, h, w, bbc = x.shape
  c = bbc // (b * b)
  x = x.reshape(n, h, w, b, b, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * b, w * b, c)


def unpack_channels(x, b: int):
  """[..., b*b*C] -> [..., b*b, C]: a packed map's pixels and channels."""
  return x.reshape(x.shape[:-1] + (b * b, x.shape[-1] // (b * b)))


def packed_kernel_size(k: int, b: int) -> int:
  """The side of the packed kernel of a k x k convolution at block `b`: the
  k x k window reaches ceil((k // 2) / b) blocks each side."""
  return 2 * -(-(k // 2) // b) + 1


@functools.lru_cache(maxsize=None)
def _kernel_index(k: int, b: int, c: int, f: int) -> np.ndarray:
  """For each entry of the packed kernel [K, K, b*b*c, b*b*f], its index in
  the flattened k x k kernel [k, k, c, f], or k*k*c*f (a zero) where the
  input pixel is outside the output pixel's k x k window."""
  r, kb = k // 2, packed_kernel_size(k, b)
  rb = kb // 2  # the window's reach in blocks
  index = np.full((kb, kb, b, b, c, b, b, f), k * k * c * f, np.int32)
  taps = np.arange(c)[:, None] * f + np.arange(f)[None, :]
  for di in range(-rb, rb + 1):
    for dj in range(-rb, rb + 1):
      for ui in range(b):      # input pixel in its block
        for vi in range(b):
          for uo in range(b):  # output pixel in its block
            for vo in range(b):
              dy, dx = b * di + ui - uo, b * dj + vi - vo
              if abs(dy) <= r and abs(dx) <= r:
                tap = ((dy + r) * k + dx + r) * c * f
                index[di + rb, dj + rb, ui, vi, :, uo, vo, :] = tap + taps
  return index.reshape(kb, kb, b * b * c, b * b * f)


def packed_kernel(kernel, b: int):
  """The HWIO kernel [k, k, C, F] of a stride-1 'SAME' convolution as the
  kernel that computes it on maps packed with block `b` (a gather: exact,
  and its gradient sums back into the original taps)."""
  if b == 1:
    return kernel
  k, _, c, f = kernel.shape
  flat = jnp.concatenate([kernel.reshape(-1), jnp.zeros((1,), kernel.dtype)])
  return flat[_kernel_index(k, b, c, f)]


def pool(x, b: int):
  """2 x 2 average pool of a map packed with block b >= 2, to block b/2 on
  the same positions."""
  lead, c = x.shape[:-1], x.shape[-1] // (b * b)
  h = b // 2
  x = x.reshape(lead + (h, 2, h, 2, c)).mean(axis=(-4, -2))
  return x.reshape(lead + (h * h * c,))


def upsample(x, b: int):
  """Nearest-neighbour x2 upsampling of a map packed with block b >= 1, to
  block 2b on the same positions."""
  lead, c = x.shape[:-1], x.shape[-1] // (b * b)
  x = x.reshape(lead + (b, 1, b, 1, c))
  x = jnp.broadcast_to(x, lead + (b, 2, b, 2, c))
  return x.reshape(lead + (4 * b * b * c,))


def block_at(space_to_depth: int, image_size: int, size: int) -> int:
  """The block of a `size` px map in a model whose `image_size` px maps are
  packed with block `space_to_depth`: halved with each halving of the size,
  down to 1 (the plain layout)."""
  return max(space_to_depth * size // image_size, 1)
