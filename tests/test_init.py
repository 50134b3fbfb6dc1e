"""`config.init`: 'pytorch' draws what torch's own layers draw at
construction (`reset_parameters` of `nn.Conv2d` and `nn.Linear`), compared
by sample against torch; 'flax' is flax's own initializers, the parameters
of every earlier version."""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import introvae_jax
from introvae_jax import models
from conftest import tiny_config

torch = pytest.importorskip('torch', reason='the init tests compare with '
                            'torch: pip install -r requirements-dev.txt')

QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
MAX_COMPARED = 1_000_000  # values per sample in the comparisons


def _torch_bound(weight):
  """The bound of torch's kaiming_uniform_(a=sqrt(5)) for `weight`, from
  torch's own fan and gain; and its bias bound (`reset_parameters`)."""
  fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(weight)  # pylint: disable=protected-access
  gain = torch.nn.init.calculate_gain('leaky_relu', math.sqrt(5))
  return gain * math.sqrt(3.0 / fan_in), 1.0 / math.sqrt(fan_in)


# Layers of the project's models as torch builds them: (torch layer, draws).
# The 5x5 conv with bias has conv_out's fan-in (32 channels in, at 256 px)
# and 1024 outputs, so that its biases make a sample.
LAYERS = {
    'conv3x3_64_128': (lambda: torch.nn.Conv2d(64, 128, 3, bias=False), 2),
    'conv_in_5x5_3_32': (lambda: torch.nn.Conv2d(3, 32, 5, bias=False), 48),
    'conv_expand_1x1_256_512': (
        lambda: torch.nn.Conv2d(256, 512, 1, bias=False), 1),
    'conv_out_5x5_32_bias': (lambda: torch.nn.Conv2d(32, 1024, 5), 8),
    'encoder_fc_8192_1024': (lambda: torch.nn.Linear(512 * 4 * 4, 1024), 2),
    'mlp_dense_2_256': (lambda: torch.nn.Linear(2, 256), 400),
}


def _torch_draws(make, draws):
  """{'weight': values, 'bias': values} of `draws` torch initialisations."""
  torch.manual_seed(0)
  layer, out = make(), {}
  for i in range(draws):
    if i:
      layer.reset_parameters()
    for name, p in layer.named_parameters():
      out.setdefault(name, []).append(p.detach().numpy().ravel().copy())
  return layer, {k: np.concatenate(v) for k, v in out.items()}


def _our_draws(layer, draws):
  """The same layer from the project's modules with init='pytorch': `Conv`,
  and the Dense layers (`MLPEncoder` without hidden layers is one)."""
  if isinstance(layer, torch.nn.Conv2d):
    k = layer.kernel_size[0]
    module = models.Conv(layer.out_channels, k, layer.bias is not None,
                         param_init='pytorch')
    x = jnp.zeros((1, 4, 4, layer.in_channels))
    pick = lambda p: p
  else:
    module = models.MLPEncoder(layer.out_features // 2, hidden=(),
                               param_init='pytorch')
    x = jnp.zeros((1, layer.in_features))
    pick = lambda p: p['fc_out']
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  params = jax.vmap(lambda key: pick(module.init(key, x)['params']))(keys)
  return {('weight' if name == 'kernel' else name): np.asarray(v).ravel()
          for name, v in params.items()}


@pytest.mark.parametrize('name', list(LAYERS))
def test_pytorch_init_draws_what_torch_draws(name):
  """Weights and biases: the same bound (the largest |value| of each large
  sample within 10/N of the other's, and within torch's bound), mean 0, the
  same std and the same quantiles, each within 5 standard errors of a
  two-sample comparison of N uniform values."""
  make, draws = LAYERS[name]
  layer, theirs = _torch_draws(make, draws)
  ours = _our_draws(layer, draws)
  assert set(ours) == set(theirs)
  w_bound, b_bound = _torch_bound(layer.weight)
  # kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as
  # torch's comment in nn.Linear says.
  assert w_bound == pytest.approx(b_bound, rel=1e-12)
  for pname, bound in (('weight', w_bound), ('bias', b_bound)):
    if pname not in theirs:
      continue
    a = ours[pname][:MAX_COMPARED] / bound
    b = theirs[pname][:MAX_COMPARED] / bound
    n = min(a.size, b.size)
    assert n >= 2000, (name, pname, n)
    # float32 values of a float64 bound: 1e-6 for the rounding.
    assert max(np.abs(a).max(), np.abs(b).max()) <= 1 + 1e-6
    assert abs(np.abs(a).max() / np.abs(b).max() - 1) < 10 / n
    assert abs(a.mean()) < 5 / math.sqrt(3 * n)
    # Sample std of N uniform values: relative standard error 0.447/sqrt(N).
    assert abs(a.std() / b.std() - 1) < 5 * 0.632 / math.sqrt(n), (
        name, pname, a.std() * bound, b.std() * bound)
    assert abs(b.std() * math.sqrt(3) - 1) < 5 * 0.447 / math.sqrt(n)
    np.testing.assert_allclose(np.quantile(a, QUANTILES),
                               np.quantile(b, QUANTILES),
                               atol=7 / math.sqrt(n))


def _plain_dense_and_conv():
  """flax's own Dense, under the name `MLPEncoder` gives its only layer,
  and flax's own Conv."""
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(6, name='fc_out')(x)
  return Plain(), nn.Conv(7, (3, 3), padding='SAME')


@pytest.mark.parametrize('init', [None, 'flax'])
def test_flax_init_is_flax_own_initializers(init):
  """init='flax' (and a module's default) draws exactly what flax's own
  `nn.Conv` and `nn.Dense` draw with the same key at the same path."""
  kw = {} if init is None else dict(param_init=init)
  key = jax.random.PRNGKey(3)
  plain_dense, plain_conv = _plain_dense_and_conv()
  x = jnp.ones((1, 8, 8, 5))
  ours = models.Conv(7, 3, True, **kw).init(key, x)['params']
  want = plain_conv.init(key, x)['params']
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours, want)
  v = jnp.ones((1, 11))
  ours = models.MLPEncoder(3, hidden=(), **kw).init(key, v)['params']
  want = plain_dense.init(key, v)['params']
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours, want)


def _checksum(tree):
  """A projection of every value on a fixed cosine: another draw, order or
  sign gives another number."""
  return sum(float(np.sum(np.asarray(a, np.float64).ravel()
                          * np.cos(np.arange(np.size(a)))))
             for a in jax.tree_util.tree_leaves(tree))


# _checksum of (params_e, params_g) of create_train_state(PRNGKey(0)),
# recorded before config.init existed (flax's initializers only).
FLAX_STATES = {
    'conv': (3.213164201920619, -1.0669638778356774),
    'mlp': (0.5870699656241363, -1.0364999098057366),
}


@pytest.mark.parametrize('arch', list(FLAX_STATES))
def test_flax_init_state_is_unchanged(arch):
  """The default, init='flax', gives the initial TrainState of the versions
  before the field existed."""
  assert introvae_jax.base_config().init == 'flax'
  state = introvae_jax.create_train_state(tiny_config(arch),
                                          jax.random.PRNGKey(0))
  got = (_checksum(state.params_e), _checksum(state.params_g))
  np.testing.assert_allclose(got, FLAX_STATES[arch], rtol=1e-6)


def _torch_layer(kernel_shape, has_bias):
  """The torch layer of a flax kernel: HWIO convolution, or (in, out)."""
  if len(kernel_shape) == 4:
    k, _, c_in, c_out = kernel_shape
    return torch.nn.Conv2d(c_in, c_out, k, bias=has_bias)
  return torch.nn.Linear(*kernel_shape, bias=has_bias)


# Every module that makes parameters: conv_in, the blocks' convolutions
# (conv_expand is built as conv1 and conv2 are: a second stage would double
# the compile time), both dense layers, conv_out with its bias.
PYTORCH_STATES = {
    'conv': (dict(channels=(16,), hdim=8), 10),
    'mlp': (dict(mlp_hidden=(64, 64)), 6),
}


@pytest.mark.parametrize('arch', list(PYTORCH_STATES))
def test_every_layer_of_a_pytorch_state_starts_as_torch_would(arch):
  """create_train_state with init='pytorch': every convolution and dense
  kernel lies within the bound torch gives its layer, reaches it (its
  largest |w| within 10/N), and has uniform's std (5 standard errors);
  biases within their bound where torch's layer has one; BatchNorm scale 1,
  bias 0."""
  overrides, num_layers = PYTORCH_STATES[arch]
  config = tiny_config(arch, init='pytorch', **overrides)
  state = introvae_jax.create_train_state(config, jax.random.PRNGKey(0))
  layers = 0
  for params in (state.params_e, state.params_g):
    flat = flax.traverse_util.flatten_dict(params)
    for path, value in flat.items():
      owner, leaf = path[:-1], path[-1]
      value = np.asarray(value)
      if owner[-1].startswith('bn'):
        want = np.ones_like(value) if leaf == 'scale' else 0 * value
        np.testing.assert_array_equal(value, want)
        continue
      if leaf != 'kernel':
        continue
      layers += 1
      has_bias = owner + ('bias',) in flat
      # The reference's layers: no bias on conv_in and the blocks' convs.
      assert has_bias == (value.ndim == 2 or owner[-1] == 'conv_out'), path
      layer = _torch_layer(value.shape, has_bias)
      w_bound, b_bound = _torch_bound(layer.weight)
      n = value.size
      top = np.abs(value).max()
      assert w_bound * (1 - 10 / n) <= top <= w_bound * (1 + 1e-6), (
          path, top, w_bound)
      assert abs(value.std() * math.sqrt(3) / w_bound - 1) < (
          5 * 0.447 / math.sqrt(n)), path
      if has_bias:
        bias = np.asarray(flat[owner + ('bias',)])
        assert 0 < np.abs(bias).max() <= b_bound * (1 + 1e-6), path
  assert layers == num_layers
