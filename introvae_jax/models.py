"""IntroVAE encoder and decoder as pure Flax modules.

The convolutional models follow the authors' `networks.py` (hhb072/IntroVAE):
residual blocks with BatchNorm and LeakyReLU(0.2) after the skip addition,
average-pool downsampling, nearest-neighbour upsampling and a linear output.
All state lives in the variables `params` and `batch_stats`. Convolution
and dense parameters start from flax's defaults or PyTorch's (`INITS`).
"""

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from introvae_jax import layout

# Widths of the reference 256 px model; smaller sizes keep its last entries so
# every spatial resolution has the same width as in the 256 px model.
_CHANNELS_256 = (32, 64, 128, 256, 512, 512)
_CHANNELS_512 = (16, 32, 64, 128, 256, 512, 512)
_CHANNELS_1024 = (16, 32, 64, 128, 256, 512, 512, 512)

# CPython caches small ints, so the reference's `inc is not outc` test is only
# true for equal widths above this value that come from two list entries.
_PY_SMALL_INT_MAX = 256

# config.residual_block -> bn_before_add: IntroVAE's block normalises after
# the skip add, Soft-IntroVAE's before it (ResidualBlock).
RESIDUAL_BLOCKS = {'introvae': False, 'soft_introvae': True}

# PyTorch's BatchNorm momentum: weight of the new batch in the running stats.
BN_MOMENTUM = 0.1

# config.init: how convolution and dense parameters start (`initializers`).
INITS = ('flax', 'pytorch')


def channels_for(image_size: int) -> Tuple[int, ...]:
  """Reference channel widths for a square image size (32 ... 1024 px)."""
  if image_size == 1024:
    return _CHANNELS_1024
  if image_size == 512:
    return _CHANNELS_512
  depth = {32: 3, 64: 4, 128: 5, 256: 6}.get(image_size)
  if depth is None:
    raise ValueError(
        f'No reference channel recipe for image_size={image_size}; choose one '
        'of 32, 64, 128, 256, 512, 1024 or set config.channels explicitly.')
  return _CHANNELS_256[len(_CHANNELS_256) - depth:]


def image_size_for(channels: Sequence[int], base: int = 4) -> int:
  """Image size implied by a channel list: base * 2**len(channels)."""
  return base * 2 ** len(channels)


def _has_skip_conv(c_in: int, c_out: int, from_two_entries: bool,
                   reference_layout: bool) -> bool:
  if c_in != c_out:
    return True
  return reference_layout and from_two_entries and c_in > _PY_SMALL_INT_MAX


def _float(dtype):
  """Parameter/statistics dtype: float32, or float64 for a float64 model."""
  return jnp.promote_types(dtype, jnp.float32)


def _uniform(bound: float):
  """An initializer drawing U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def initializers(init: str, fan_in: int):
  """(kernel_init, bias_init) of a convolution or dense layer with `fan_in`
  inputs per output (k * k * in_channels, or in_features).

  'flax': flax's defaults, LeCun normal and zeros. 'pytorch': the defaults
  of torch's `nn.Conv2d` and `nn.Linear` (`reset_parameters`), which the
  authors' code keeps: weights kaiming_uniform_(a=sqrt(5)), whose bound
  gain * sqrt(3 / fan_in) with gain sqrt(2 / (1 + 5)) is 1 / sqrt(fan_in),
  and biases U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)) too.
  """
  if init == 'flax':
    return nn.initializers.lecun_normal(), nn.initializers.zeros
  if init == 'pytorch':
    bound = 1.0 / fan_in ** 0.5
    return _uniform(bound), _uniform(bound)
  raise ValueError(f'config.init must be one of {INITS}, got {init!r}.')


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics (the reference's `nn.BatchNorm2d`).

  Normalises with the biased batch variance, but updates `var` with the
  unbiased one (n / (n - 1)) as PyTorch does; `momentum` is PyTorch's (weight
  of the new batch). With `axis_name`, statistics are averaged across devices.
  On a map packed with `block` (`layout`), a channel's statistics cover the
  block's pixels too.
  """
  momentum: float = BN_MOMENTUM
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  block: int = 1

  @nn.compact
  def __call__(self, x, use_running_average: bool = False):
    packed_shape = x.shape
    if self.block > 1:
      x = layout.unpack_channels(x, self.block)
    features = x.shape[-1]
    ftype = _float(self.dtype)
    scale = self.param('scale', nn.initializers.ones, (features,), ftype)
    bias = self.param('bias', nn.initializers.zeros, (features,), ftype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,),
                            ftype)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), ftype)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(ftype)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      count = x.size // features
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
        count = count * jax.lax.axis_size(self.axis_name)
      # Two passes (mean of squared deviations): E[x^2] - E[x]^2 loses
      # float32 precision and puts gradients 1e-3 off PyTorch's.
      var = jnp.mean(jnp.square(xf - mean), axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        ra_mean.value = ((1 - m) * ra_mean.value
                         + m * jax.lax.stop_gradient(mean))
        ra_var.value = ((1 - m) * ra_var.value
                        + m * jax.lax.stop_gradient(unbiased))
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = (x.astype(ftype) - mean) * mul + bias
    return y.astype(self.dtype).reshape(packed_shape)


class Conv(nn.Module):
  """Stride-1 'SAME' convolution, HWIO `kernel` (+ `bias`) as in `nn.Conv`.

  `impl='im2col'` computes the same result as one matrix multiply over the
  k*k shifted copies of the input (docs/introvae.md, section 3d); the
  parameters are identical either way, so checkpoints do not depend on the
  choice. XLA's own convolution ('xla') is the default on every backend: on
  this project's AMD EPYC (Zen 4) CPUs it also beats im2col (64 px reference
  step, batch 16: 11.8 vs 14.8 s, 1.6 vs 6.0 GiB of XLA temporaries).
  On a map packed with `block`, the same parameters act through
  `layout.packed_kernel`, and the output is packed too. `param_init`: how
  the parameters start (`initializers`).
  """
  features: int
  kernel_size: int
  use_bias: bool = False
  impl: str = 'xla'
  dtype: Any = jnp.float32
  precision: Any = None
  block: int = 1
  param_init: str = 'flax'

  @nn.compact
  def __call__(self, x):
    pr, bb = self.precision, self.block * self.block
    shape = (self.kernel_size, self.kernel_size, x.shape[-1] // bb,
             self.features)
    kernel_init, bias_init = initializers(self.param_init,
                                          shape[0] * shape[1] * shape[2])
    kernel = self.param('kernel', kernel_init, shape, _float(self.dtype))
    x = x.astype(self.dtype)
    kernel = layout.packed_kernel(kernel.astype(self.dtype), self.block)
    k, features = kernel.shape[0], kernel.shape[-1]
    if k == 1:
      y = jnp.einsum('bhwc,cf->bhwf', x, kernel[0, 0], precision=pr)
    elif self.impl == 'im2col':
      p = k // 2
      h, w = x.shape[1], x.shape[2]
      xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
      cols = jnp.concatenate([xp[:, dy:dy + h, dx:dx + w, :]
                              for dy in range(k) for dx in range(k)], axis=-1)
      y = jnp.einsum('bhwk,kf->bhwf', cols, kernel.reshape(-1, features),
                     precision=pr)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          precision=pr)
    if self.use_bias:
      bias = self.param('bias', bias_init, (self.features,),
                        _float(self.dtype))
      bias = bias.astype(self.dtype)
      y = y + (jnp.tile(bias, bb) if bb > 1 else bias)
    return y


class ResidualBlock(nn.Module):
  """Reference `_Residual_Block`: BN and activation come after the skip add;
  `bn_before_add` (Soft-IntroVAE's block, `train_soft_intro_vae.py` l. 65-75):
  the second BN on the branch, then the add and the activation. The
  parameters are the same either way, and so in any `block` (`layout`)."""
  features: int
  skip_conv: bool
  bn_axis_name: Optional[str] = None
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32
  precision: Any = None
  bn_before_add: bool = False
  block: int = 1
  param_init: str = 'flax'

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = lambda f, k, name: Conv(f, k, False, self.conv_impl, self.dtype,
                                   self.precision, self.block, self.param_init,
                                   name=name)
    bn = lambda name: BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype,
                                block=self.block, name=name)
    skip = conv(self.features, 1, 'conv_expand')(x) if self.skip_conv else x
    h = conv(self.features, 3, 'conv1')(x)
    h = nn.leaky_relu(bn('bn1')(h, not train), 0.2)
    h = conv(self.features, 3, 'conv2')(h)
    if self.bn_before_add:
      return nn.leaky_relu(bn('bn2')(h, not train) + skip, 0.2)
    return nn.leaky_relu(bn('bn2')(h + skip, not train), 0.2)


def upsample(h):
  """Nearest-neighbour x2 upsampling of [B, H, W, C] (`nn.Upsample`)."""
  return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


def _pool(h, block: int):
  """2 x 2 average pool of a map held with `block` (`layout.pool`)."""
  if block > 1:
    return layout.pool(h, block)
  return nn.avg_pool(h, (2, 2), (2, 2))


def _upsample(h, block: int, new_block: int):
  """x2 upsampling of a map held with `block`, to one held with
  `new_block` (2 * block on the same positions, or 1 as before)."""
  if new_block > 1:
    return layout.upsample(h, block)
  return upsample(h)


def _block(remat: bool):
  """ResidualBlock, or one that recomputes its activations in the backward
  pass (`nn.remat`: less memory, one more forward; same parameters)."""
  return (nn.remat(ResidualBlock, static_argnums=(2,)) if remat
          else ResidualBlock)


def _dense(features: int, owner: nn.Module, name: str,
           fan_in: int) -> nn.Dense:
  """A Dense layer in `owner`'s dtype, precision and `param_init` (float
  parameters) for `fan_in` input features."""
  kernel_init, bias_init = initializers(owner.param_init, fan_in)
  return nn.Dense(features, dtype=owner.dtype, param_dtype=_float(owner.dtype),
                  precision=owner.precision, kernel_init=kernel_init,
                  bias_init=bias_init, name=name)


class Encoder(nn.Module):
  """x [B, H, W, C] in [0, 1] -> (mu, logvar), each [B, hdim] in float32.

  `space_to_depth` > 1 runs the high-resolution stages on packed maps
  (`layout`): full-resolution maps with that block, halved per stage down
  to 1. The same parameters and, up to rounding, the same numbers. With
  `packed_io`, x comes packed already (the train step packs its batch once,
  so no 3-channel image is stored in 128-lane tiles)."""
  channels: Sequence[int]
  hdim: int
  reference_layout: bool = True
  bn_axis_name: Optional[str] = None
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32
  remat: bool = False
  precision: Any = None
  bn_before_add: bool = False
  base: int = 4
  space_to_depth: int = 1
  packed_io: bool = False
  param_init: str = 'flax'

  @nn.compact
  def __call__(self, x, train: bool = True):
    chans = tuple(self.channels)
    size = image_size_for(chans, self.base)
    at = functools.partial(layout.block_at, self.space_to_depth, size)
    side = size // at(size) if self.packed_io else size
    if x.shape[1] != side or x.shape[2] != x.shape[1]:
      packed = f' packed with block {at(size)}' if self.packed_io else ''
      raise ValueError(f'Encoder with channels={chans} and base={self.base} '
                       f'expects {size}px square images{packed}, got '
                       f'{x.shape}.')
    if not self.packed_io:
      x = layout.pack(x, at(size))
    block = lambda f, skip, px, name: _block(self.remat)(
        f, skip, self.bn_axis_name, self.conv_impl, self.dtype,
        self.precision, self.bn_before_add, at(px), self.param_init,
        name=name)
    px = size
    h = Conv(chans[0], 5, False, self.conv_impl, self.dtype, self.precision,
             at(px), self.param_init, name='conv_in')(x)
    h = BatchNorm(axis_name=self.bn_axis_name, dtype=self.dtype,
                  block=at(px), name='bn_in')(h, not train)
    h = _pool(nn.leaky_relu(h, 0.2), at(px))
    for i in range(1, len(chans)):
      px //= 2
      skip = _has_skip_conv(chans[i - 1], chans[i], True, self.reference_layout)
      h = block(chans[i], skip, px, f'block_{i}')(h, train)
      h = _pool(h, at(px))
    h = block(chans[-1], False, px // 2, f'block_{len(chans)}')(h, train)
    h = h.reshape((h.shape[0], -1))
    out = _dense(2 * self.hdim, self, 'fc', h.shape[-1])(h)
    mu, logvar = jnp.split(out.astype(_float(self.dtype)), 2, axis=-1)
    return mu, logvar


class Decoder(nn.Module):
  """z [B, hdim] -> image [B, H, W, image_channels] (linear output, float32).

  The dense layer writes a `base` x `base` map (Soft-IntroVAE sizes it as
  the encoder's last map: 7 for their 28 px networks). `space_to_depth` and
  `packed_io` (the output stays packed) as in `Encoder`."""
  channels: Sequence[int]
  hdim: int
  image_channels: int = 3
  reference_layout: bool = True
  bn_axis_name: Optional[str] = None
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32
  remat: bool = False
  precision: Any = None
  bn_before_add: bool = False
  base: int = 4
  space_to_depth: int = 1
  packed_io: bool = False
  param_init: str = 'flax'

  @nn.compact
  def __call__(self, z, train: bool = True):
    chans, b = tuple(self.channels), self.base
    at = functools.partial(layout.block_at, self.space_to_depth,
                           image_size_for(chans, b))
    block = lambda f, skip, px, name: _block(self.remat)(
        f, skip, self.bn_axis_name, self.conv_impl, self.dtype,
        self.precision, self.bn_before_add, at(px), self.param_init,
        name=name)
    h = _dense(chans[-1] * b * b, self, 'fc', z.shape[-1])(
        z.astype(self.dtype))
    h = nn.relu(h).reshape((z.shape[0], b, b, chans[-1]))
    # The reference walks the list backwards; its first block pairs the last
    # entry with itself (one list entry), later ones pair two adjacent entries.
    prev, px = len(chans) - 1, b
    for n, i in enumerate(reversed(range(len(chans)))):
      skip = _has_skip_conv(chans[prev], chans[i], prev != i,
                            self.reference_layout)
      h = block(chans[i], skip, px, f'block_{n}')(h, train)
      h = _upsample(h, at(px), at(2 * px))
      prev, px = i, 2 * px
    h = block(chans[0], False, px, f'block_{len(chans)}')(h, train)
    out = Conv(self.image_channels, 5, True, self.conv_impl, self.dtype,
               self.precision, at(px), self.param_init, name='conv_out')(h)
    if not self.packed_io:
      out = layout.unpack(out, at(px))
    return out.astype(_float(self.dtype))


class MLPEncoder(nn.Module):
  """2-D toy encoder (Soft-IntroVAE): x [B, D] -> (mu, logvar), each
  [B, zdim]."""
  zdim: int = 2
  hidden: Sequence[int] = (256, 256, 256)
  dtype: Any = jnp.float32
  precision: Any = None
  param_init: str = 'flax'

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # No BatchNorm; kept for a uniform interface.
    h = x.astype(self.dtype)
    for i, width in enumerate(self.hidden):
      h = nn.relu(_dense(width, self, f'fc_{i}', h.shape[-1])(h))
    out = _dense(2 * self.zdim, self, 'fc_out', h.shape[-1])(h)
    mu, logvar = jnp.split(out.astype(_float(self.dtype)), 2, axis=-1)
    return mu, logvar


class MLPDecoder(nn.Module):
  """2-D toy decoder, the encoder mirrored: z [B, zdim] -> x [B, D]."""
  data_dim: int = 2
  hidden: Sequence[int] = (256, 256, 256)
  dtype: Any = jnp.float32
  precision: Any = None
  param_init: str = 'flax'

  @nn.compact
  def __call__(self, z, train: bool = True):
    del train
    h = z.astype(self.dtype)
    for i, width in enumerate(reversed(tuple(self.hidden))):
      h = nn.relu(_dense(width, self, f'fc_{i}', h.shape[-1])(h))
    out = _dense(self.data_dim, self, 'fc_out', h.shape[-1])(h)
    return out.astype(_float(self.dtype))


def build_models(config, bn_axis_name: Optional[str] = None,
                 packed_io: bool = False):
  """(encoder, decoder) modules described by the model fields of `config`;
  `packed_io`: images in and out packed with `config.space_to_depth`."""
  m = config
  dtype = jnp.dtype(m.dtype)
  precision = jax.lax.Precision[m.precision.upper()]
  if m.arch == 'mlp':
    return (MLPEncoder(m.hdim, tuple(m.mlp_hidden), dtype, precision, m.init),
            MLPDecoder(m.data_dim, tuple(m.mlp_hidden), dtype, precision,
                       m.init))
  if m.arch != 'conv':
    raise ValueError(f"config.arch must be 'conv' or 'mlp', got {m.arch!r}.")
  kw = dict(channels=tuple(m.channels), hdim=m.hdim,
            reference_layout=m.reference_layout, bn_axis_name=bn_axis_name,
            conv_impl=m.conv_impl, dtype=dtype, remat=m.remat,
            precision=precision,
            bn_before_add=RESIDUAL_BLOCKS[m.residual_block],
            base=m.base_size, space_to_depth=m.space_to_depth,
            packed_io=packed_io, param_init=m.init)
  return Encoder(**kw), Decoder(image_channels=m.image_channels, **kw)


def input_shape(config) -> Tuple[int, ...]:
  """Shape of one example (no batch dimension) for `config`."""
  if config.arch == 'mlp':
    return (config.data_dim,)
  return (config.image_size, config.image_size, config.image_channels)
