"""Reference checkpoints <-> this project's variables (`introvae_jax.convert`).

The authors' own files cannot be downloaded in CI: tests/fixtures holds tiny
ones pickled the same way (`make_reference_checkpoints.py`), in torch's zip
and legacy formats, with their state_dict as a plain .npz.
"""

import importlib.util
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
import torch_reference as tr  # pylint: disable=g-import-not-at-top  (tests/)
from test_parity_torch import jax_state, small_config  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')
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
    assert (jax.tree_util.tree_structure(tree)
            == jax.tree_util.tree_structure(want))
    for a, b in zip(jax.tree_util.tree_leaves(tree),
                    jax.tree_util.tree_leaves(want)):
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
      arch='conv', image_size=16, channels=(512, 512), base_size=4, hdim=4,
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
  torch.save({'epoch': 1, 'model': model.state_dict(), 'extra': Payload()},
             path)
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
      arch='conv', image_size=32, channels=(4, 8, 8), base_size=4, hdim=6,
      image_channels=3, reference_layout=None)


def test_config_that_does_not_fit_the_checkpoint_is_refused():
  sd = numpy_state_dict(random_reference_model(small_config(
      image_size=16, channels=(512, 512), hdim=4)))
  with pytest.raises(ValueError, match=r'hdim=6 \(checkpoint: 4\)'):
    convert.train_state_from_reference(
        sd, small_config(image_size=16, channels=(512, 512)))
  with pytest.raises(ValueError,
                     match=r'reference_layout=False \(checkpoint: True\)'):
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
  """.pth -> `--out` workdir (restored as the training loop restores) ->
  .pth."""
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
  from introvae_jax import generate as generate_cli
  config = small_config(image_size=8, channels=(4,), hdim=4)
  pth = str(tmp_path / 'ref.pth')
  save_as_the_reference_does(random_reference_model(config), pth)
  workdir = str(tmp_path / 'converted')
  convert.convert_reference(pth, workdir)  # model fields off the file
  saved = configuration.load_json(os.path.join(workdir, 'config.json'))
  assert (saved.image_size, saved.channels, saved.hdim, saved.image_channels,
          saved.m_plus) == (8, (4,), 4, 3, 120.0)
  out = str(tmp_path / 'samples')
  written = generate_cli.generate(workdir, out, num=2, interpolation_steps=2,
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
  with pytest.raises(errors.UserError,
                     match='other.pth: No encoder.main.res_in_'):
    convert.convert_reference(str(tmp_path / 'other.pth'), out)
  assert not os.path.exists(out)
  os.makedirs(os.path.join(out, 'checkpoints', '0'))
  with pytest.raises(errors.WorkdirError, match='already holds checkpoints'):
    convert.convert_reference(str(tmp_path / 'none.pth'), out)


# ----------------------------------------------------------------------------
# The committed reference-format fixtures, read without torch.


def _fixtures():
  """tests/fixtures/make_reference_checkpoints.py as a module."""
  spec = importlib.util.spec_from_file_location(
      'make_reference_checkpoints',
      os.path.join(FIXTURES, 'make_reference_checkpoints.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _expected_state_dict():
  with np.load(os.path.join(FIXTURES, _fixtures().EXPECTED_FILE)) as f:
    return {k: f[k] for k in f.files}


def _refuse_torch_reading(monkeypatch):
  """torch.load and torch.jit.load raise: convert must not call them."""
  def refuse(*args, **kwargs):
    raise AssertionError('convert called torch.load or torch.jit.load')
  monkeypatch.setattr(torch, 'load', refuse)
  monkeypatch.setattr(torch.serialization, 'load', refuse)
  monkeypatch.setattr(torch.jit, 'load', refuse)


def _fixture_path(name, tmp_path):
  """A fixture file; 'legacy_gpu' is the legacy one as a CUDA run saves it
  (`torch.cuda.FloatStorage`, location 'cuda:0'), as the authors' were."""
  fixtures = _fixtures()
  if name != 'legacy_gpu':
    return os.path.join(FIXTURES, {'zip': fixtures.ZIP_FILE,
                                   'legacy': fixtures.LEGACY_FILE}[name])
  with open(os.path.join(FIXTURES, fixtures.LEGACY_FILE), 'rb') as f:
    data = f.read()
  for old, new in ((b'ctorch\nFloatStorage\n', b'ctorch.cuda\nFloatStorage\n'),
                   (b'ctorch\nLongStorage\n', b'ctorch.cuda\nLongStorage\n'),
                   (b'X\x03\x00\x00\x00cpu', b'X\x06\x00\x00\x00cuda:0')):
    assert data.count(old) == 1  # each pickled once, then memoised
    data = data.replace(old, new)
  path = tmp_path / 'model_epoch_1_iter_0.pth'
  path.write_bytes(data)
  return str(path)


@pytest.mark.parametrize('name', ['zip', 'legacy', 'legacy_gpu'])
def test_reference_fixtures_read_bit_for_bit_without_torch(name, tmp_path,
                                                           monkeypatch):
  """The authors' file layout ({'epoch', 'model': networks.IntroVAE}) reads
  to the state_dict torch itself reads from it, bit for bit, with torch.load
  and torch.jit.load raising. Fails before the fix, which read every .pth
  with torch.load(weights_only=False)."""
  path = _fixture_path(name, tmp_path)
  expected = _expected_state_dict()
  # The independent reference: torch's own reading, the classes importable.
  sys.modules['networks'] = _fixtures().networks_module()
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', "Couldn't retrieve source code")
      by_torch = torch.load(path, map_location='cpu', weights_only=False)
  finally:
    del sys.modules['networks']
  assert by_torch['epoch'] == 1
  by_torch = {k: v.numpy() for k, v in by_torch['model'].state_dict().items()}
  assert list(by_torch) == list(expected)
  assert all(np.array_equal(by_torch[k], v) for k, v in expected.items())

  _refuse_torch_reading(monkeypatch)
  loaded = convert.load_reference_checkpoint(path)
  assert list(loaded) == list(expected)
  for k, v in expected.items():
    assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v), k


@pytest.mark.parametrize('name', ['zip', 'legacy'])
def test_reference_fixtures_convert_as_before(name, tmp_path, monkeypatch):
  """`convert_reference` of each fixture gives the variables the state_dict
  converts to (`torch_to_variables`, unchanged), bit for bit, and the model
  fields it was built with; torch.load and torch.jit.load raise. Fails
  before the fix (convert read the file with torch.load)."""
  _refuse_torch_reading(monkeypatch)
  state, config, _ = convert.convert_reference(
      _fixture_path(name, tmp_path), str(tmp_path / 'out'))
  model = _fixtures().MODEL
  assert (config.image_size, tuple(config.channels), config.hdim,
          config.image_channels) == (model['image_size'], model['channels'],
                                     model['hdim'], model['image_channels'])
  want = convert.torch_to_variables(_expected_state_dict())
  for tree_name, tree in want.items():
    got = jax.tree_util.tree_map(np.asarray, getattr(state, tree_name))
    assert (jax.tree_util.tree_structure(got) ==
            jax.tree_util.tree_structure(tree)), tree_name
    for a, b in zip(jax.tree_util.tree_leaves(got),
                    jax.tree_util.tree_leaves(tree)):
      assert a.dtype == b.dtype and np.array_equal(a, b), tree_name


# ----------------------------------------------------------------------------
# Files that are checkpoints in form but not in content: one line each.


@pytest.mark.parametrize('missing', ['encoder.main.0.weight',
                                     'encoder.main.res_in_8.conv1.weight',
                                     'encoder.fc.weight'])
def test_state_dict_with_some_encoder_entries_is_one_line(missing, tmp_path):
  """A state_dict holding some but not all of the encoder's entries is a
  BadFileError naming the file and the entry. Fails before the fix
  (`infer_model_fields` raised KeyError)."""
  from introvae_jax import errors
  sd = {k: torch.from_numpy(v) for k, v in _expected_state_dict().items()
        if k != missing}
  path = tmp_path / 'partial.pth'
  torch.save(sd, str(path))
  with pytest.raises(errors.BadFileError) as e:
    convert.convert_reference(str(path), str(tmp_path / 'out'))
  message = str(e.value)
  assert '\n' not in message and str(path) in message and missing in message
  assert not (tmp_path / 'out').exists()


def test_module_that_contains_itself_is_one_line(tmp_path):
  """A pickled module among whose submodules is itself has no state_dict: a
  BadFileError naming the file, not a RecursionError (before the fix)."""
  from introvae_jax import errors
  model = torch.nn.Sequential(torch.nn.Linear(2, 2))
  model._modules['loop'] = model  # pylint: disable=protected-access
  path = tmp_path / 'loop.pth'
  torch.save({'epoch': 1, 'model': model}, str(path))
  with pytest.raises(errors.BadFileError, match='contains itself') as e:
    convert.convert_reference(str(path), str(tmp_path / 'out'))
  assert '\n' not in str(e.value) and str(path) in str(e.value)


# ----------------------------------------------------------------------------
# float64 runs, as a user runs the tool (without JAX_ENABLE_X64).


def _float64_reference(tmp_path):
  """A float64 reference state_dict (values float32 cannot hold), saved."""
  config = small_config(image_size=16, channels=(2, 4), hdim=2,
                        dtype='float64')
  torch.manual_seed(1)
  model = tr.build_model(config, dtype=torch.float64)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_()
  path = str(tmp_path / 'ref64.pth')
  torch.save(model.state_dict(), path)
  return path, numpy_state_dict(model)


def _run_tool(args, x64=False):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  env.pop('JAX_ENABLE_X64', None)
  if x64:
    env['JAX_ENABLE_X64'] = '1'
  proc = subprocess.run([sys.executable] + args, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _assert_exported_exactly(pth, reference):
  back = torch.load(pth, weights_only=True)  # the test's own file
  for k, v in reference.items():
    if 'num_batches' not in k:
      got = back[k].numpy()
      assert got.dtype == np.float64 and np.array_equal(got, v), (k, got.dtype)


_FLOAT64_RUN = """
import sys
from introvae_jax import configuration, convert
c = configuration.base_config()
with c.unlocked():
  c.image_size, c.channels, c.hdim, c.dtype = 16, (2, 4), 2, 'float64'
convert.convert_reference(sys.argv[1], sys.argv[2], c)
"""


def test_float64_run_exports_float64(tmp_path):
  """`convert --jax_checkpoint` of a float64 run (written, as main.py does,
  with 64-bit JAX), run without JAX_ENABLE_X64, exports the run's float64
  values exactly. Fails before the fix (float32 tensors, ~1e-7 off)."""
  pth, reference = _float64_reference(tmp_path)
  run = str(tmp_path / 'run')
  _run_tool(['-c', _FLOAT64_RUN, pth, run], x64=True)
  out = str(tmp_path / 'back.pth')
  _run_tool(['-m', 'introvae_jax.convert', f'--jax_checkpoint={run}',
             f'--out={out}'])
  _assert_exported_exactly(out, reference)


def test_float64_config_imports_float64(tmp_path):
  """`convert --torch_checkpoint --config=<float64 config>` without
  JAX_ENABLE_X64 keeps the checkpoint's float64 values (read back by the
  export). Fails before the fix (the import stored float32)."""
  pth, reference = _float64_reference(tmp_path)
  config_file = tmp_path / 'float64.py'
  config_file.write_text(
      'from introvae_jax.configuration import base_config\n'
      'def get_config():\n'
      '  c = base_config()\n'
      "  c.image_size, c.channels, c.hdim, c.dtype = 16, (2, 4), 2, 'float64'\n"
      '  return c\n')
  run = str(tmp_path / 'run')
  _run_tool(['-m', 'introvae_jax.convert', f'--torch_checkpoint={pth}',
             f'--config={config_file}', f'--out={run}'])
  out = str(tmp_path / 'back.pth')
  _run_tool(['-m', 'introvae_jax.convert', f'--jax_checkpoint={run}',
             f'--out={out}'])
  _assert_exported_exactly(out, reference)


# ----------------------------------------------------------------------------
# Soft-IntroVAE's files: the same keys, another block, 28 px networks.

# Their MNIST layout (28 px, two widths, 7x7 decoder base), widths scaled down.
SOFT_28PX = dict(image_size=28, base_size=7, channels=(4, 8), image_channels=1,
                 residual_block='soft_introvae', reference_layout=False)


def test_their_28px_files_round_trip_exactly():
  model = random_reference_model(small_config(**SOFT_28PX))
  sd = numpy_state_dict(model)
  assert convert.infer_model_fields(sd) == dict(
      arch='conv', image_size=28, channels=(4, 8), base_size=7, hdim=6,
      image_channels=1, reference_layout=None)
  back = convert.variables_to_torch_arrays(**convert.torch_to_variables(sd))
  assert list(back) == list(sd)
  for k, v in sd.items():
    if 'num_batches_tracked' not in k:
      assert np.array_equal(back[k], v), k


def _trained(block: str, steps: int = 60):
  """(state_dict, config) of a 28 px model trained `steps` steps on real
  digits with its own objective: IntroVAE's block under IntroVAE,
  Soft-IntroVAE's under Soft-IntroVAE."""
  import introvae_jax  # pylint: disable=g-import-not-at-top
  from introvae_jax import offline_datasets  # pylint: disable=g-import-not-at-top
  config = small_config(**dict(SOFT_28PX, channels=(8, 16), hdim=8,
                               batch_size=32, residual_block=block,
                               objective=block, num_vae_steps=15, m_plus=4.0))
  state = introvae_jax.create_train_state(config, jax.random.PRNGKey(0))
  train_step = introvae_jax.make_train_step(config)
  digits = offline_datasets.mnist().astype(np.float32)
  rs = np.random.RandomState(0)
  for _ in range(steps):
    state, _ = train_step(state, digits[rs.randint(0, len(digits), 32)])
  return convert.variables_to_torch_arrays(
      state.params_e, state.batch_stats_e, state.params_g,
      state.batch_stats_g), config


@pytest.fixture(scope='module')
def trained_files():
  return {block: _trained(block) for block in ('introvae', 'soft_introvae')}


@pytest.mark.slow  # trained_files: two minutes of training on 2 cores
def test_import_refuses_a_file_of_the_other_block(trained_files):
  """Each paper's trained file imports under its own block; under the other
  it is refused, naming the block it fits. A fresh model (statistics never
  updated) tells nothing and imports under either."""
  for block, (sd, config) in trained_files.items():
    other = 'soft_introvae' if block == 'introvae' else 'introvae'
    misfit = convert.block_misfit(convert.torch_to_variables(sd), config)
    assert misfit[block] * convert._MISFIT_RATIO < misfit[other], misfit  # pylint: disable=protected-access
    state = convert.train_state_from_reference(sd, config)
    assert np.array_equal(state.params_g['fc']['kernel'],
                          convert.torch_to_variables(sd)['params_g']['fc'][
                              'kernel'])
    wrong = config.copy_and_resolve_references()
    wrong.residual_block = other
    with pytest.raises(convert.BadFileError,
                       match=f"fit the '{block}' residual block"):
      convert.train_state_from_reference(sd, wrong)
  _, config = trained_files['introvae']
  fresh = convert.variables_to_torch_arrays(
      **{k: getattr(jax_state(config), k) for k in (
          'params_e', 'batch_stats_e', 'params_g', 'batch_stats_g')})
  for block in ('introvae', 'soft_introvae'):
    wrong = config.copy_and_resolve_references()
    wrong.residual_block = block
    convert.train_state_from_reference(
        {k: v for k, v in fresh.items()}, wrong)


@pytest.mark.slow
def test_their_file_through_the_command_line(trained_files, tmp_path):
  """Their `save_checkpoint` format in, refused under the default block with
  one line that says what to pass, imported with it, and exported back as
  `{'epoch', 'model'}` that their `load_model` (`weights['model']`) loads."""
  sd, config = trained_files['soft_introvae']
  path = tmp_path / 'model_epoch_5_iter_60.pth'
  torch.save({'epoch': 5, 'model': {k: torch.from_numpy(np.array(v))
                                    for k, v in sd.items()}}, str(path))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'introvae_jax.convert', *args], env=env,
      cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
      check=False)
  proc = run(f'--torch_checkpoint={path}', f'--out={tmp_path / "a"}')
  assert proc.returncode != 0
  assert '--residual_block=soft_introvae' in proc.stderr
  assert not (tmp_path / 'a').exists()
  proc = run(f'--torch_checkpoint={path}', f'--out={tmp_path / "b"}',
             '--residual_block=soft_introvae')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'base_size=7' in proc.stdout
  assert 'residual_block=soft_introvae' in proc.stdout
  convert.export_reference(str(tmp_path / 'b'), str(tmp_path / 'back.pth'))
  back = torch.load(str(tmp_path / 'back.pth'), weights_only=True)
  assert set(back) == {'epoch', 'model'}
  theirs = tr.build_model(config)
  theirs.load_state_dict(back['model'], strict=True)
  for k, v in sd.items():
    if 'num_batches' not in k:
      assert np.array_equal(back['model'][k].numpy(), v), k
