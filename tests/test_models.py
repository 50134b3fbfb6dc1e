"""Model structure: parameter counts, BatchNorm semantics, block layout,
shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import introvae_jax
from introvae_jax import models


def param_shapes(module, *input_shape):
  """The module's variables as shapes only (jax.eval_shape: nothing
  compiles)."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct(input_shape, jnp.float32))


def count(tree):
  return sum(int(np.prod(leaf.shape))
             for leaf in jax.tree_util.tree_leaves(tree))


def encoder_decoder(channels, reference_layout=True, hdim=512):
  kw = dict(channels=channels, hdim=hdim, reference_layout=reference_layout)
  return models.Encoder(**kw), models.Decoder(image_channels=3, **kw)


# Counts of the reference PyTorch model (hhb072/IntroVAE networks.py, channels
# parsed from the run scripts' strings, hdim 512, 3 image channels).
REFERENCE_COUNTS = [
    (256, (32, 64, 128, 256, 512, 512), 22_973_600, 16_452_963),
    (1024, (16, 32, 64, 128, 256, 512, 512, 512), 27_969_616, 21_428_147),
    (64, (128, 256, 512, 512), 22_693_504, 16_588_163),
]


@pytest.mark.parametrize('size,channels,n_enc,n_dec', REFERENCE_COUNTS,
                         ids=[f'{r[0]}px' for r in REFERENCE_COUNTS])
def test_parameter_counts_match_the_reference(size, channels, n_enc, n_dec):
  encoder, decoder = encoder_decoder(channels)
  assert count(param_shapes(encoder, 1, size, size, 3)['params']) == n_enc
  assert count(param_shapes(decoder, 1, 512)['params']) == n_dec


# The reference's `inc is not outc` is true for two equal list entries above
# 256 (CPython caches small ints): those blocks carry an extra 1x1 conv.
EXTRA_CONVS = {
    (32, 64, 128, 256, 512, 512): (['block_5'], ['block_1']),
    (16, 32, 64, 128, 256, 512, 512, 512): (['block_6', 'block_7'],
                                            ['block_1', 'block_2']),
    (128, 256, 512, 512): (['block_3'], ['block_1']),
}


@pytest.mark.parametrize('channels', list(EXTRA_CONVS), ids=str)
def test_reference_layout_off_drops_exactly_the_extra_1x1_convs(channels):
  size = models.image_size_for(channels)
  shapes = {}
  for layout in (True, False):
    encoder, decoder = encoder_decoder(channels, layout)
    shapes[layout] = (param_shapes(encoder, 1, size, size, 3)['params'],
                      param_shapes(decoder, 1, 512)['params'])
  for net, extra_blocks in enumerate(EXTRA_CONVS[channels]):
    with_extra, without = shapes[True][net], shapes[False][net]
    paths = lambda t: {jax.tree_util.keystr(p): leaf.shape for p, leaf in
                       jax.tree_util.tree_flatten_with_path(t)[0]}
    dropped = set(paths(with_extra)) - set(paths(without))
    assert dropped == {f"['{b}']['conv_expand']['kernel']"
                       for b in extra_blocks}
    assert not set(paths(without)) - set(paths(with_extra))
    for p, shape in paths(without).items():
      assert paths(with_extra)[p] == shape
    assert count(with_extra) - count(without) == 512 * 512 * len(extra_blocks)


def test_channels_for_gives_the_reference_recipes():
  assert models.channels_for(256) == (32, 64, 128, 256, 512, 512)
  assert models.channels_for(1024) == (16, 32, 64, 128, 256, 512, 512, 512)
  assert models.channels_for(64) == (128, 256, 512, 512)
  assert models.channels_for(32) == (256, 512, 512)
  assert models.channels_for(128) == (64, 128, 256, 512, 512)
  for size in (32, 64, 128, 256, 512, 1024):
    assert models.image_size_for(models.channels_for(size)) == size
  with pytest.raises(ValueError, match='image_size=48'):
    models.channels_for(48)


# --------------------------------------------------------------------------
# BatchNorm: PyTorch BatchNorm2d training-mode semantics, in NumPy.

def torch_batchnorm(x, scale, bias, running_mean, running_var,
                    momentum=0.1, eps=1e-5):
  """Normalise with the biased batch variance, track the unbiased one."""
  x = np.float64(x)
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  mean = x.mean(axes)
  var_biased = ((x - mean) ** 2).mean(axes)
  y = (x - mean) / np.sqrt(var_biased + eps) * scale + bias
  new_mean = (1 - momentum) * running_mean + momentum * mean
  new_var = (1 - momentum) * running_var + momentum * var_biased * n / (n - 1)
  return y, new_mean, new_var


def test_batchnorm_matches_pytorch_semantics():
  rs = np.random.RandomState(0)
  x1 = (rs.randn(3, 4, 5, 6) * 2 + 1).astype(np.float32)
  x2 = (rs.randn(3, 4, 5, 6) * 0.5 - 2).astype(np.float32)
  bn = models.BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x1)
  params = {'scale': rs.rand(6).astype(np.float32) + 0.5,
            'bias': rs.randn(6).astype(np.float32)}
  stats = variables['batch_stats']
  np.testing.assert_array_equal(stats['mean'], np.zeros(6))   # torch init
  np.testing.assert_array_equal(stats['var'], np.ones(6))
  ref_mean, ref_var = np.zeros(6), np.ones(6)
  for x in (x1, x2):   # two calls: running statistics thread through
    y, upd = bn.apply({'params': params, 'batch_stats': stats}, x,
                      mutable=['batch_stats'])
    stats = upd['batch_stats']
    ref_y, ref_mean, ref_var = torch_batchnorm(
        x, params['scale'], params['bias'], ref_mean, ref_var)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats['mean'], ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['var'], ref_var, rtol=1e-5)
  # Inference mode: the running statistics, unchanged.
  y, upd = bn.apply({'params': params, 'batch_stats': stats}, x1,
                    use_running_average=True, mutable=['batch_stats'])
  expected = ((x1 - stats['mean']) / np.sqrt(np.asarray(stats['var']) + 1e-5)
              * params['scale'] + params['bias'])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(upd['batch_stats']['var'], stats['var'])


# --------------------------------------------------------------------------
# Residual block layout (reference `_Residual_Block`), written out in NumPy.

def np_conv_same(x, kernel):
  """Stride-1 'SAME' convolution, NHWC x HWIO, as a sum of shifted matmuls."""
  kh, kw = kernel.shape[:2]
  ph, pw = kh // 2, kw // 2
  xp = np.pad(np.float64(x), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  h, w = x.shape[1:3]
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      out = out + xp[:, i:i + h, j:j + w, :] @ np.float64(kernel[i, j])
  return out


def np_leaky_relu(v):
  return np.where(v >= 0, v, 0.2 * v)


@pytest.mark.parametrize('skip_conv', [True, False])
def test_residual_block_layout(skip_conv):
  """skip = 1x1(x) or x; h = lrelu(BN(conv3(x)));
  out = lrelu(BN(conv3(h) + skip))."""
  rs = np.random.RandomState(1)
  c_in = 3 if skip_conv else 5
  x = rs.randn(2, 4, 4, c_in).astype(np.float32)
  block = models.ResidualBlock(features=5, skip_conv=skip_conv)
  variables = jax.jit(block.init)(jax.random.PRNGKey(2), x)
  params = jax.tree_util.tree_map(
      lambda a: a + 0.3 * rs.randn(*a.shape).astype(np.float32),
      variables['params'])
  assert ('conv_expand' in params) == skip_conv
  apply = jax.jit(lambda v, x: block.apply(v, x, mutable=['batch_stats'])[0])
  out = apply({'params': params, 'batch_stats': variables['batch_stats']}, x)
  bn = lambda v, p: torch_batchnorm(v, p['scale'], p['bias'], 0.0, 1.0)[0]
  skip = np_conv_same(x, params['conv_expand']['kernel']) if skip_conv else x
  h = np_leaky_relu(bn(np_conv_same(x, params['conv1']['kernel']),
                       params['bn1']))
  h = np_conv_same(h, params['conv2']['kernel'])
  expected = np_leaky_relu(bn(h + skip, params['bn2']))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Shapes and input checks.

@pytest.mark.parametrize('image_channels', [1, 3])
def test_conv_model_shapes(image_channels):
  encoder = models.Encoder(channels=(4, 8), hdim=5)
  decoder = models.Decoder(channels=(4, 8), hdim=5,
                           image_channels=image_channels)
  enc_vars = param_shapes(encoder, 2, 16, 16, image_channels)
  dec_vars = param_shapes(decoder, 2, 5)
  (mu, logvar), _ = jax.eval_shape(
      lambda v, x: encoder.apply(v, x, mutable=['batch_stats']), enc_vars,
      jax.ShapeDtypeStruct((2, 16, 16, image_channels), jnp.float32))
  assert mu.shape == logvar.shape == (2, 5)
  out, _ = jax.eval_shape(
      lambda v, z: decoder.apply(v, z, mutable=['batch_stats']), dec_vars,
      jax.ShapeDtypeStruct((2, 5), jnp.float32))
  assert out.shape == (2, 16, 16, image_channels)
  assert set(enc_vars) == set(dec_vars) == {'params', 'batch_stats'}


def test_encoder_rejects_images_of_the_wrong_size():
  encoder = models.Encoder(channels=(4, 8), hdim=5)
  with pytest.raises(ValueError, match='16px'):
    param_shapes(encoder, 2, 32, 32, 3)


def test_mlp_shapes_and_layout():
  encoder = models.MLPEncoder(zdim=3, hidden=(16, 8, 4))
  decoder = models.MLPDecoder(data_dim=2, hidden=(16, 8, 4))
  enc = param_shapes(encoder, 5, 2)['params']
  dec = param_shapes(decoder, 5, 3)['params']
  assert [enc[f'fc_{i}']['kernel'].shape for i in range(3)] == [
      (2, 16), (16, 8), (8, 4)]
  assert enc['fc_out']['kernel'].shape == (4, 6)
  # The decoder mirrors the encoder.
  assert [dec[f'fc_{i}']['kernel'].shape for i in range(3)] == [
      (3, 4), (4, 8), (8, 16)]
  assert dec['fc_out']['kernel'].shape == (16, 2)


def test_build_models_from_config():
  from conftest import tiny_config
  encoder, decoder = models.build_models(tiny_config('conv'))
  assert isinstance(encoder, introvae_jax.Encoder)
  assert tuple(decoder.channels) == (4,) and decoder.hdim == 4
  encoder, decoder = models.build_models(tiny_config('mlp'))
  assert isinstance(encoder, introvae_jax.MLPEncoder)
  assert isinstance(decoder, introvae_jax.MLPDecoder)
