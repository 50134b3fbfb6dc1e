"""FID InceptionV3 against PyTorch operators (random weights).

`pytorch-fid` needs torchvision, which is not installed beside the CPU torch
here; its network is rebuilt below from torch.nn layers with pytorch-fid's
names and pooling choices (`count_include_pad=False` average pools, a max
pool in the last block), so the conversion, BatchNorm folding, padding and
pools are checked against PyTorch's own operators. Where pytorch-fid is
installed, `test_matches_pytorch_fid` compares with the real thing.
"""

import os

import numpy as np
import pytest

from introvae_jax import evaluation
from introvae_jax import inception

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg(x))], 1)


class BlockB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    row = dict(kernel_size=(1, 7), padding=(0, 3))
    col = dict(kernel_size=(7, 1), padding=(3, 0))
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, **row)
    self.branch7x7_3 = BasicConv2d(c7, 192, **col)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    d = self.branch7x7dbl_1(x)
    for i in range(2, 6):
      d = getattr(self, f'branch7x7dbl_{i}')(d)
    return torch.cat([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        d, self.branch_pool(_avg(x))], 1)


class BlockD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7),
                                     padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1),
                                     padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = self.branch7x7x3_1(x)
    for i in range(2, 5):
      b7 = getattr(self, f'branch7x7x3_{i}')(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3),
                                    padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1),
                                    padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3),
                                       padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1),
                                       padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
    pool = (F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool
            else _avg(x))
    return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
  """pytorch-fid's InceptionV3([3]) layer for layer, torchvision's names."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
        BlockA(192, 32), BlockA(256, 64), BlockA(288, 64))
    self.Mixed_6a = BlockB(288)
    self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (
        BlockC(768, 128), BlockC(768, 160), BlockC(768, 160), BlockC(768, 192))
    self.Mixed_7a = BlockD(768)
    self.Mixed_7b, self.Mixed_7c = BlockE(1280, False), BlockE(2048, True)

  def forward(self, x):  # x in [0, 1], NCHW
    x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b',
                 '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _randomize(model, seed=0):
  """Random conv weights and BatchNorm statistics at sensible scales."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      fan_in = m.weight[0].numel()
      m.weight.data = (torch.randn(m.weight.shape, generator=g)
                       * (2 / fan_in) ** 0.5)
    elif isinstance(m, nn.BatchNorm2d):
      n = m.num_features
      m.weight.data = 0.5 + torch.rand(n, generator=g)
      m.bias.data = 0.1 * torch.randn(n, generator=g)
      m.running_mean.data = 0.1 * torch.randn(n, generator=g)
      m.running_var.data = 0.5 + torch.rand(n, generator=g)
  return model.eval()


@pytest.fixture(scope='module')
def models():
  torch.manual_seed(0)
  model = _randomize(FIDInception()).double()
  return model, inception.from_state_dict(model.state_dict())


def test_features_match_the_torch_network(models, tmp_path):
  model, params = models
  rs = np.random.RandomState(0)
  images = rs.rand(2, 32, 32, 3)    # upsampled to 299 like small images
  with torch.no_grad():
    expected = model(torch.tensor(images.transpose(0, 3, 1, 2))).numpy()
  got = inception.features(params, images)
  assert got.shape == (2, inception.FEATURE_DIM)
  assert expected.std() > 0.1 * np.abs(expected).mean() > 0  # not degenerate
  np.testing.assert_allclose(got, expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  # The .npz round trip gives the same features.
  path = os.path.join(tmp_path, 'w.npz')
  inception.save_npz(params, path)
  np.testing.assert_array_equal(
      inception.features(inception.load(path), images), got)


def test_pools_and_resize_match_torch():
  rs = np.random.RandomState(1)
  x = rs.randn(2, 9, 7, 3).astype(np.float32)
  t = torch.tensor(x.transpose(0, 3, 1, 2))
  back = lambda y: y.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(
      inception.avg_pool_exclude_pad(x),
      back(F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)), rtol=1e-6)
  np.testing.assert_allclose(inception.max_pool(x), back(F.max_pool2d(t, 3, 2)))
  np.testing.assert_allclose(inception.max_pool(x, stride=1, padding=1),
                             back(F.max_pool2d(t, 3, 1, 1)))
  for size in (299, 5):  # up and down, no antialiasing
    sq = rs.rand(1, 16, 16, 3).astype(np.float32)
    expected = F.interpolate(torch.tensor(sq.transpose(0, 3, 1, 2)),
                             size=(size, size), mode='bilinear',
                             align_corners=False)
    np.testing.assert_allclose(inception.resize_bilinear(sq, size),
                               back(expected), rtol=1e-5, atol=1e-6)


def test_gray_images_are_tiled(models):
  _, params = models
  gray = np.random.RandomState(2).rand(2, 32, 32, 1)  # same compiled shape
  np.testing.assert_allclose(
      inception.features(params, gray),
      inception.features(params, np.tile(gray, (1, 1, 1, 3))), rtol=1e-6)


def test_missing_weights_message(tmp_path):
  with pytest.raises(FileNotFoundError, match='pt_inception-2015-12-05'):
    inception.load(os.path.join(tmp_path, inception.WEIGHTS_FILE))


def test_matches_pytorch_fid():
  pf = pytest.importorskip('pytorch_fid.inception')
  model = _randomize(pf.InceptionV3([3])).double()
  params = inception.from_state_dict(
      {k.split('.', 1)[1]: v for k, v in model.state_dict().items()})
  images = np.random.RandomState(3).rand(2, 32, 32, 3)
  with torch.no_grad():
    expected = model(
        torch.tensor(images.transpose(0, 3, 1, 2)))[0].flatten(1).numpy()
  np.testing.assert_allclose(inception.features(params, images), expected,
                             rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_damaged_weights_files_are_named(tmp_path, monkeypatch):
  monkeypatch.setenv('INTROVAE_CACHE', str(tmp_path / 'cache'))
  npz = tmp_path / 'weights.npz'
  npz.write_bytes(b'\x93NUMPY not a zip')
  with pytest.raises(evaluation.BadFileError,
                     match=f'{npz} is not an .npz archive.*delete it'):
    inception.load(str(npz))
  stats = tmp_path / 'stats.npz'
  np.savez(stats, mu=np.zeros(2), sigma=np.eye(2))
  with pytest.raises(evaluation.BadFileError,
                     match=f'{stats} holds no InceptionV3 weights'):
    inception.load(str(stats))
  pth = tmp_path / inception.WEIGHTS_FILE
  pth.write_bytes(b'truncated download')
  with pytest.raises(evaluation.BadFileError,
                     match=f"{pth} is not pytorch-fid's InceptionV3 weights"):
    inception.load(str(pth))


def test_damaged_converted_cache_is_converted_again(tmp_path, monkeypatch,
                                                    caplog):
  """The .npz made from the .pth is the program's own cache: rebuilt."""
  import logging
  monkeypatch.setenv('INTROVAE_CACHE', str(tmp_path / 'cache'))
  params = {'Mixed_7c.branch_pool': (np.ones((1, 1, 2, 2), np.float32),
                                     np.zeros(2, np.float32))}
  calls = []

  def fake_convert(pth_path, npz_path):
    calls.append(pth_path)
    inception.save_npz(params, npz_path)
    return params

  monkeypatch.setattr(inception, 'convert', fake_convert)
  pth = str(tmp_path / inception.WEIGHTS_FILE)
  open(pth, 'wb').close()
  inception.load(pth)
  cached = tmp_path / 'cache' / (inception.WEIGHTS_FILE[:-4] + '.npz')
  assert cached.exists() and len(calls) == 1
  cached.write_bytes(cached.read_bytes()[:50])
  inception.load.cache_clear()
  with caplog.at_level(logging.WARNING):
    loaded = inception.load(pth)
  assert len(calls) == 2 and f'Converting {pth} again' in caplog.text
  np.testing.assert_array_equal(loaded['Mixed_7c.branch_pool'][0],
                                params['Mixed_7c.branch_pool'][0])


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_pth_is_read_without_torch(tmp_path, monkeypatch, zip_format):
  """pytorch-fid's .pth (a state dict, in either format torch writes) is
  read by `files.read_pth`: the folded params equal those of the state dict
  torch holds, bit for bit, while torch.load and torch.jit.load raise. Fails
  before the fix, which read it with torch.load."""
  g = torch.Generator().manual_seed(4)
  state_dict = {}
  for name, (cout, cin) in {'Conv2d_1a_3x3': (4, 3),
                            'Mixed_7c.branch_pool': (2, 4)}.items():
    state_dict[f'{name}.conv.weight'] = torch.randn(cout, cin, 3, 3,
                                                    generator=g)
    state_dict[f'{name}.bn.weight'] = torch.rand(cout, generator=g) + 0.5
    state_dict[f'{name}.bn.bias'] = torch.randn(cout, generator=g)
    state_dict[f'{name}.bn.running_mean'] = torch.randn(cout, generator=g)
    state_dict[f'{name}.bn.running_var'] = torch.rand(cout, generator=g) + 0.5
    state_dict[f'{name}.bn.num_batches_tracked'] = torch.tensor(5)
  expected = inception.from_state_dict(state_dict)
  pth = str(tmp_path / inception.WEIGHTS_FILE)
  torch.save(state_dict, pth, _use_new_zipfile_serialization=zip_format)

  def refuse(*args, **kwargs):
    raise AssertionError('torch.load or torch.jit.load was called')

  for owner in (torch, torch.serialization, torch.jit):
    monkeypatch.setattr(owner, 'load', refuse)
  params = inception.convert(pth, str(tmp_path / 'w.npz'))
  assert sorted(params) == sorted(expected)
  for name, (kernel, bias) in expected.items():
    assert params[name][0].dtype == kernel.dtype
    np.testing.assert_array_equal(params[name][0], kernel)
    np.testing.assert_array_equal(params[name][1], bias)
