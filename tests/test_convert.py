"""Reference checkpoints <-> this project's variables (`introvae_jax.convert`)."""

import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='checkpoint conversion tests need '
                            'torch: pip install -r requirements-dev.txt')

import jax  # pylint: disable=g-import-not-at-top

from introvae_jax import checkpointing, convert, models  # pylint: disable=g-import-not-at-top
from introvae_jax import torch_reference as tr  # pylint: disable=g-import-not-at-top
from test_parity_torch import jax_state, small_config  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    'narrow_32px': dict(),
    'quirk_512_16px': dict(image_size=16, channels=(512, 512), hdim=4),
}


def random_reference_model(config, seed=0):
  """The reference model with every parameter and BN statistic randomised."""
  torch.manual_seed(seed)
  model = tr.build_model(config)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_()
    for name, b in model.named_buffers():
      if 'running_var' in name:
        b.uniform_(0.5, 1.5)
      elif 'running_mean' in name:
        b.normal_()
      else:
        b.fill_(7)   # num_batches_tracked
  return model


def numpy_state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def save_as_the_reference_does(model, path, **kwargs):
  """torch.save({'epoch', 'model'}) with the model's classes re-labelled as
  the reference's own (`networks.IntroVAE`, ...); `networks` is importable
  only while saving."""
  sys.modules['networks'] = as_reference_module(model)
  try:
    with warnings.catch_warnings():  # legacy format looks for class sources
      warnings.filterwarnings('ignore', "Couldn't retrieve source code")
      torch.save({'epoch': 3, 'model': model}, path, **kwargs)
  finally:
    del sys.modules['networks']


def as_reference_module(model):
  """Re-labels the model's classes as the reference's own (`networks.py`)."""
  networks = types.ModuleType('networks')
  names = {tr.IntroVAE: 'IntroVAE', tr.Encoder: 'Encoder',
           tr.Decoder: 'Decoder', tr.ResidualBlock: '_Residual_Block'}
  for ours, name in names.items():
    setattr(networks, name, type(name, (ours,), {'__module__': 'networks'}))
  for module in model.modules():
    if type(module) in names:
      module.__class__ = getattr(networks, names[type(module)])
  return networks


@pytest.mark.parametrize('name', list(CONFIGS))
def test_torch_to_jax_to_torch_is_exact(name):
  model = random_reference_model(small_config(**CONFIGS[name]))
  sd = numpy_state_dict(model)
  back = convert.variables_to_torch_arrays(**convert.torch_to_variables(sd))
  assert list(back) == list(sd)   # same keys, in the reference's order
  for k, v in sd.items():
    if 'num_batches_tracked' not in k:   # not kept (unused with momentum 0.1)
      assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_jax_to_torch_to_jax_is_exact():
  state = jax_state(small_config())
  sd = convert.export_state_dict(state)
  variables = convert.torch_to_variables({k: v.numpy() for k, v in sd.items()})
  for name, tree in variables.items():
    want = jax.tree_util.tree_map(np.asarray, getattr(state, name))
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(want)):
      assert a.shape == b.shape and np.array_equal(a, b), name
  # The export loads into the reference model with strict key checking.
  tr.build_model(small_config()).load_state_dict(sd, strict=True)


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_whole_pickled_module_loads_without_the_reference_source(tmp_path,
                                                                 zip_format):
  """The reference saves {'epoch', 'model': <IntroVAE module>}; its classes
  live in `networks`, which is not importable here."""
  config = small_config(**CONFIGS['quirk_512_16px'])
  model = random_reference_model(config)
  path = str(tmp_path / 'model_epoch_3_iter_0.pth')
  save_as_the_reference_does(model, path,
                             _use_new_zipfile_serialization=zip_format)
  with pytest.raises(ModuleNotFoundError, match='networks'):
    torch.load(path, weights_only=False)

  loaded = convert.load_reference_checkpoint(path)
  sd = numpy_state_dict(model)
  assert list(loaded) == list(sd)
  for k, v in sd.items():
    assert np.array_equal(loaded[k], v), k
  assert convert.infer_model_fields(loaded) == dict(
      arch='conv', image_size=16, channels=(512, 512), hdim=4,
      image_channels=3, reference_layout=True)


def test_plain_state_dicts_load(tmp_path):
  model = random_reference_model(small_config())
  sd = model.state_dict()
  wrapped = {'module.' + k: v for k, v in sd.items()}   # DataParallel names
  for i, obj in enumerate([sd, {'model': sd}, wrapped]):
    path = str(tmp_path / f'{i}.pth')
    torch.save(obj, path)
    loaded = convert.load_reference_checkpoint(path)
    assert list(loaded) == list(sd)
    assert all(np.array_equal(loaded[k], v.numpy()) for k, v in sd.items())


def test_loading_runs_no_code_from_the_pickle(tmp_path):
  marker = tmp_path / 'ran'

  class Payload:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  model = random_reference_model(small_config())
  path = str(tmp_path / 'payload.pth')
  torch.save({'epoch': 1, 'model': model.state_dict(), 'extra': Payload()}, path)
  convert.load_reference_checkpoint(path)
  assert not marker.exists()


def test_reference_layout_is_read_off_the_checkpoint():
  wide = dict(image_size=16, channels=(512, 512), hdim=4)
  for layout in (True, False):
    sd = numpy_state_dict(random_reference_model(
        small_config(reference_layout=layout, **wide)))
    assert convert.infer_model_fields(sd)['reference_layout'] is layout
  # Below 257 channels the two layouts coincide: nothing to read.
  sd = numpy_state_dict(random_reference_model(small_config()))
  assert convert.infer_model_fields(sd) == dict(
      arch='conv', image_size=32, channels=(4, 8, 8), hdim=6, image_channels=3,
      reference_layout=None)


def test_config_that_does_not_fit_the_checkpoint_is_refused():
  sd = numpy_state_dict(random_reference_model(small_config(
      image_size=16, channels=(512, 512), hdim=4)))
  with pytest.raises(ValueError, match=r'hdim=6 \(checkpoint: 4\)'):
    convert.train_state_from_reference(
        sd, small_config(image_size=16, channels=(512, 512)))
  with pytest.raises(ValueError, match=r'reference_layout=False \(checkpoint: True\)'):
    convert.config_for_checkpoint(sd, small_config(
        image_size=16, channels=(512, 512), hdim=4, reference_layout=False))
  del sd['encoder.main.res_in_8.conv_expand.weight']
  with pytest.raises(ValueError, match='Inconsistent skip convolutions'):
    convert.infer_model_fields(sd)


def test_converted_model_computes_what_the_reference_computes():
  """Eval mode (running statistics), so the converted BN statistics count."""
  config = small_config()
  model = random_reference_model(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.mul_(0.3)
  state = convert.train_state_from_reference(numpy_state_dict(model), config)
  encoder, decoder = models.build_models(config)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
  z = rng.standard_normal((2, config.hdim)).astype(np.float32)

  @jax.jit
  def forward(state, x, z):
    variables = lambda p, s: {'params': p, 'batch_stats': s}
    mu, logvar = encoder.apply(variables(state.params_e, state.batch_stats_e),
                               x, train=False)
    out = decoder.apply(variables(state.params_g, state.batch_stats_g), z,
                        train=False)
    return mu, logvar, out

  mu, logvar, out = forward(state, x, z)
  with torch.no_grad():
    t_mu, t_logvar = model.encoder(torch.from_numpy(x).permute(0, 3, 1, 2))
    t_out = model.decoder(torch.from_numpy(z)).permute(0, 2, 3, 1)
  for a, b in ((mu, t_mu), (logvar, t_logvar), (out, t_out)):
    b = b.numpy()
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


def test_command_line_import_then_export(tmp_path):
  """.pth -> `--out` workdir (restored as the training loop restores) -> .pth."""
  config = small_config(**CONFIGS['quirk_512_16px'])
  model = random_reference_model(config)
  save_as_the_reference_does(model, str(tmp_path / 'ref.pth'))
  workdir = str(tmp_path / 'workdir')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  proc = subprocess.run(
      [sys.executable, '-m', 'introvae_jax.convert',
       f'--torch_checkpoint={tmp_path / "ref.pth"}', f'--out={workdir}'],
      env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'reference_layout=True' in proc.stdout
  assert os.path.exists(os.path.join(workdir, 'config.json'))

  # Restored through the training loop's own path.
  state = checkpointing.latest_state(workdir, config)
  assert int(state.step) == 0
  assert all(not np.any(np.asarray(m)) for m in jax.tree_util.tree_leaves(
      (state.opt_state_e[0].mu, state.opt_state_g[0].nu)))
  sd = numpy_state_dict(model)
  mine = convert.variables_to_torch_arrays(
      state.params_e, state.batch_stats_e, state.params_g, state.batch_stats_g)
  assert all(np.array_equal(mine[k], v) for k, v in sd.items()
             if 'num_batches' not in k)

  convert.export_reference(workdir, str(tmp_path / 'back.pth'))
  back = torch.load(str(tmp_path / 'back.pth'), weights_only=True)
  fresh = tr.build_model(config)
  fresh.load_state_dict(back, strict=True)
  for k, v in model.state_dict().items():
    if 'num_batches' not in k:
      assert torch.equal(back[k], v), k


def _png_folder(path, count=2, size=8):
  from PIL import Image
  os.makedirs(path)
  for i in range(count):
    Image.fromarray(np.full((size, size, 3), 60 * i, np.uint8)).save(
        os.path.join(path, f'{i}.png'))
  return str(path)


def test_converted_workdir_opens_like_a_trained_one(tmp_path):
  """convert wrote no config.json, so `sample --workdir=<out>` failed."""
  from introvae_jax import configuration
  from introvae_jax import sample as sample_cli
  config = small_config(image_size=8, channels=(4,), hdim=4)
  pth = str(tmp_path / 'ref.pth')
  save_as_the_reference_does(random_reference_model(config), pth)
  workdir = str(tmp_path / 'converted')
  convert.convert_reference(pth, workdir)  # model fields off the file
  saved = configuration.load_json(os.path.join(workdir, 'config.json'))
  assert (saved.image_size, saved.channels, saved.hdim, saved.image_channels,
          saved.m_plus) == (8, (4,), 4, 3, 120.0)
  out = str(tmp_path / 'samples')
  written = sample_cli.generate(workdir, out, num=2, interpolation_steps=2,
                                images=_png_folder(tmp_path / 'images'))
  assert {'samples.png', 'reconstructions.png', 'interpolation_slerp.png'} <= {
      os.path.basename(p) for p in written}
  # With --config, its recipe fields are what config.json keeps.
  convert.convert_reference(pth, str(tmp_path / 'recipe'), config)
  saved = configuration.load_json(str(tmp_path / 'recipe' / 'config.json'))
  assert (saved.m_plus, saved.weight_rec, saved.lr_g) == (1000.0, 0.3, 3e-4)


def test_bad_reference_files_are_named_before_anything_is_written(tmp_path):
  from introvae_jax import errors
  out = str(tmp_path / 'out')
  with pytest.raises(errors.UserError, match=(
      f'No file at --torch_checkpoint={tmp_path}/none.pth')):
    convert.convert_reference(str(tmp_path / 'none.pth'), out)
  garbage = tmp_path / 'cut.pth'
  garbage.write_bytes(b'PK\x03\x04 truncated')
  with pytest.raises(errors.UserError,
                     match=f'{garbage} is not a readable PyTorch checkpoint'):
    convert.convert_reference(str(garbage), out)
  torch.save({'weights': torch.zeros(2)}, str(tmp_path / 'other.pth'))
  with pytest.raises(errors.UserError, match='other.pth: No encoder.main.res_in_'):
    convert.convert_reference(str(tmp_path / 'other.pth'), out)
  assert not os.path.exists(out)
  os.makedirs(os.path.join(out, 'checkpoints', '0'))
  with pytest.raises(errors.WorkdirError, match='already holds checkpoints'):
    convert.convert_reference(str(tmp_path / 'none.pth'), out)
