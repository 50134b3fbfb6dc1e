"""Sampling tools: grids, interpolation, BatchNorm modes, the CLI on a
workdir, requests of many chunks, float64 runs."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import REPO_ROOT, in_subprocess
from introvae_jax import base_config, checkpointing, create_train_state, errors
from introvae_jax import evaluation, input_pipeline, sampling
from introvae_jax import generate as generate_cli


def _config(**kw):
  c = base_config()
  c.dataset, c.image_size, c.image_channels = 'mnist_offline', 8, 1
  c.channels, c.hdim, c.batch_size, c.num_image_samples = (4,), 4, 4, 4
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _make_workdir(path, config, seed=0):
  """A workdir as the training loop leaves it (config.json, a checkpoint of
  the initial state), without the cost of training; returns the state."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  state = create_train_state(config, jax.random.PRNGKey(seed))
  manager = checkpointing.make_manager(path)
  checkpointing.save(manager, state, force=True, config=config)
  manager.wait_until_finished()
  return state


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, config, state) of a tiny 8 px digits model."""
  workdir = str(tmp_path_factory.mktemp('sampling') / 'run')
  config = _config()
  return workdir, config, _make_workdir(workdir, config)


def _png(path):
  image = np.asarray(Image.open(path))
  return image if image.ndim == 3 else image[..., None]


def test_image_grid_layout():
  imgs = np.zeros((5, 2, 3, 1), np.float32)
  for i in range(5):
    imgs[i] = i / 4
  grid = sampling.image_grid(imgs, ncol=2)
  assert grid.shape == (6, 6, 1) and grid.dtype == np.uint8
  assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == round(0.25 * 255)
  # 5th image, then padding
  assert grid[4, 0, 0] == 255 and grid[4, 3, 0] == 255


def test_slerp_endpoints_and_constant_norm():
  rs = np.random.RandomState(0)
  z0, z1 = rs.randn(16), rs.randn(16)
  z1 *= np.linalg.norm(z0) / np.linalg.norm(z1)
  np.testing.assert_allclose(sampling.slerp(z0, z1, 0.0), z0, atol=1e-12)
  np.testing.assert_allclose(sampling.slerp(z0, z1, 1.0), z1, atol=1e-12)
  for t in (0.25, 0.5, 0.75):  # on the great circle: the norm is kept
    np.testing.assert_allclose(np.linalg.norm(sampling.slerp(z0, z1, t)),
                               np.linalg.norm(z0), rtol=1e-12)
  np.testing.assert_allclose(sampling.slerp(z0, 2 * z0, 0.5), 1.5 * z0)


def test_running_average_mode_is_per_example_and_batch_mode_is_not():
  config = _config()
  state = create_train_state(config, jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1))
  alone = sampling.encode(state, x[:1], config, use_running_average=True)[0]
  in_batch = sampling.encode(state, x, config, use_running_average=True)[0]
  np.testing.assert_allclose(alone[0], in_batch[0], rtol=1e-5, atol=1e-6)
  batch_a = sampling.encode(state, x[:3], config)[0]
  batch_b = sampling.encode(state, x, config)[0]
  assert np.abs(batch_a[0] - batch_b[0]).max() > 1e-3


def test_sample_cli_writes_grids_from_a_workdir(run, tmp_path):
  workdir = run[0]
  out = str(tmp_path / 'out')
  written = generate_cli.generate(workdir, out, num=6, interpolation_steps=5)
  names = {os.path.relpath(p, out) for p in written}
  assert {'samples.png', 'reconstructions.png', 'interpolation_linear.png',
          'interpolation_slerp.png',
          os.path.join('samples', '0005.png')} <= names
  grid = np.asarray(Image.open(os.path.join(out, 'interpolation_slerp.png')))
  assert grid.shape == (3 * 8, 5 * 8)  # 3 pairs of the 6 images, 5 steps each
  recs = np.asarray(Image.open(os.path.join(out, 'reconstructions.png')))
  assert recs.shape == (8, 12 * 8)     # 6 (real, reconstruction) pairs in a row


def test_one_chunk_of_samples_is_one_call_as_before(run, tmp_path):
  """A request of one chunk (250) gives the images of the one-call code it
  replaced: every PNG equals decode() of the whole noise at once. A guard of
  unchanged outputs: it passes before and after chunking."""
  workdir, config, state = run
  num, seed, temperature = sampling.CHUNK_SIZE, 3, 0.7
  out = str(tmp_path / 'out')
  generate_cli.generate(workdir, out, num=num, seed=seed,
                      temperature=temperature, interpolation_steps=2)
  z = temperature * jax.random.normal(jax.random.PRNGKey(seed),
                                      (num, config.hdim))
  fakes = np.asarray(sampling.decode(state, z, config))
  for i in (0, 137, num - 1):
    np.testing.assert_array_equal(
        _png(os.path.join(out, 'samples', f'{i:04d}.png')),
        sampling.image_grid(fakes[i:i + 1]))
  assert len(os.listdir(os.path.join(out, 'samples'))) == num
  np.testing.assert_array_equal(_png(os.path.join(out, 'samples.png')),
                                sampling.image_grid(fakes))
  reals = input_pipeline.eval_images(config, num)
  recs = np.asarray(sampling.reconstruct(state, reals, config))
  pairs = np.stack([reals, recs], 1).reshape((-1,) + reals.shape[1:])
  np.testing.assert_array_equal(_png(os.path.join(out, 'reconstructions.png')),
                                sampling.image_grid(pairs, ncol=16))


def test_many_chunks_are_decoded_one_chunk_per_call(run, tmp_path,
                                                    monkeypatch):
  """num = 2.5 chunks: each chunk's images are decode() of that chunk's noise
  alone (key fold_in(seed, c), chunk 0 the seed's own), no call decodes more
  than a chunk, and the grids show the first chunk. Before chunking the one
  call decoded all 10 (and a billion ran out of memory)."""
  workdir, config, state = run
  chunk, num, seed = 4, 10, 5
  monkeypatch.setattr(sampling, 'CHUNK_SIZE', chunk)
  sizes, decode = [], sampling.decode

  def counting_decode(state, z, *args, **kwargs):
    sizes.append(len(z))
    return decode(state, z, *args, **kwargs)

  monkeypatch.setattr(sampling, 'decode', counting_decode)
  out = str(tmp_path / 'out')
  generate_cli.generate(workdir, out, num=num, seed=seed, interpolation_steps=3)
  assert max(sizes) <= chunk and sizes[:3] == [4, 4, 2]
  monkeypatch.undo()
  key = jax.random.PRNGKey(seed)
  by_hand = np.concatenate([np.asarray(sampling.decode(
      state, jax.random.normal(jax.random.fold_in(key, c) if c else key,
                               (size, config.hdim)), config))
                            for c, size in enumerate((4, 4, 2))])
  for i in range(num):
    np.testing.assert_array_equal(
        _png(os.path.join(out, 'samples', f'{i:04d}.png')),
        sampling.image_grid(by_hand[i:i + 1]))
  np.testing.assert_array_equal(_png(os.path.join(out, 'samples.png')),
                                sampling.image_grid(by_hand[:chunk]))
  assert _png(os.path.join(out, 'reconstructions.png')).shape == (8, 8 * 8, 1)


def test_a_billion_samples_are_refused_at_once_with_the_estimate(run, tmp_path,
                                                                  monkeypatch):
  """--num=1000000000 used to log an out-of-memory (3.7 TiB) and spin: now it
  is refused before the model loads, naming the disk and time it would take;
  so is a request whose PNGs exceed the free space of --out."""
  workdir = run[0]
  out = str(tmp_path / 'out')
  loads = []
  monkeypatch.setattr(checkpointing, 'load_run',
                      lambda *a, **k: loads.append(1))
  start = time.time()
  with pytest.raises(sampling.RequestTooLargeError, match=(
      r'--num=1000000000: up to \S+ GiB of PNGs \((\d+) B each\) in .*out, '
      # The time is this machine's measured PNG rate: its unit varies.
      r'~\S+ (?:days|h|min) of PNG encoding alone; one run writes at most '
      r'1,000,000 ')
  ) as refused:
    generate_cli.generate(workdir, out, num=10**9)
  assert time.time() - start < 10
  # An 8 px gray PNG: its 64 pixels, a filter byte per row, ~70 B of headers.
  per_png = int(refused.value.args[0].split('(')[1].split(' B')[0])
  assert 64 + 8 < per_png < 64 + 8 + 100
  total = sampling.format_bytes(10**9 * per_png)
  assert f'up to {total} ' in str(refused.value)
  monkeypatch.setattr(generate_cli, '_free_bytes', lambda _: 10_000)
  with pytest.raises(sampling.RequestTooLargeError,
                     match=r'--num=1000: .* but 9.8 KiB is free there; lower '
                     r'--num to \d+ or less'):
    generate_cli.generate(workdir, out, num=1000)
  assert not loads and not os.path.exists(out)


def test_sample_cli_refuses_a_billion_in_seconds(run, tmp_path):
  """The command line: exit 2 and one line with the estimate, within
  seconds (it used to run out of memory and hang)."""
  start = time.time()
  proc = subprocess.run(
      [sys.executable, '-m', 'introvae_jax.generate', f'--workdir={run[0]}',
       '--num=1000000000', f'--out={tmp_path}/out'], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'error: --num=1000000000: up to' in lines[0]
  assert 'GiB of PNGs' in lines[0] and 'PNG encoding alone' in lines[0]
  assert len(lines[0].replace(str(tmp_path), '')) < 240
  assert time.time() - start < 60


def test_generate_checks_arguments_and_files_before_loading(tmp_path):
  """num=0 used to fail in image_grid (ZeroDivisionError), num=-1 in XLA."""
  missing, out = str(tmp_path / 'no_run'), str(tmp_path / 'out')
  with pytest.raises(errors.UserError, match=r'num=0: .*\(--num>=1\)'):
    generate_cli.generate(missing, out, num=0)
  with pytest.raises(errors.UserError, match='interpolation_steps=1: '):
    generate_cli.generate(missing, out, interpolation_steps=1)
  with pytest.raises(errors.UserError, match='interpolation_steps=251: .* at '
                     'most 250'):  # one decode call per row
    generate_cli.generate(missing, out, interpolation_steps=251)
  empty = tmp_path / 'empty'
  empty.mkdir()
  # The --images folder is checked before the (here missing) run loads.
  with pytest.raises(input_pipeline.DataError,
                     match=f"data_dir='{empty}' holds no image files"):
    generate_cli.generate(missing, out, images=str(empty))
  with pytest.raises(errors.WorkdirError, match='does not exist'):
    generate_cli.generate(missing, out)
  assert not os.path.exists(out)


# --------------------------------------------------------------------------
# A float64 run, in a process without 64-bit JAX (the tools turn it on).

X64_OFF = in_subprocess('x64_off', {'JAX_ENABLE_X64': '0'})


@pytest.mark.slow  # two command lines and a child pytest: about a minute
@X64_OFF
def test_tools_compute_a_float64_run_in_float64(tmp_path):
  """The sample and evaluation CLIs on a float64 run, started without
  JAX_ENABLE_X64, used to stop ("dtype='float64' needs 64-bit JAX"). Now they
  turn it on: the evaluation's reconstruction error equals an in-process
  float64 evaluation to 1e-12 (float32 differs at ~1e-7), and the samples
  are the float64 decoder's."""
  assert not jax.config.jax_enable_x64
  config = _config(dtype='float64')
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  assert sampling.enable_x64_for_run(workdir) and jax.config.jax_enable_x64
  state = _make_workdir(workdir, config)
  assert state.params_g['fc']['kernel'].dtype == np.float64
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('JAX_ENABLE_X64')

  def cli(module, *flags):
    proc = subprocess.run([sys.executable, '-m', module,
                           f'--workdir={workdir}', *flags], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

  cli('introvae_jax.evaluation', '--num_images=8')
  with open(os.path.join(workdir, 'eval_00000000_batch.json')) as f:
    metrics = json.load(f)
  expected = evaluation.evaluate_model(
      state, config, input_pipeline.eval_images(config, 8),
      jax.random.PRNGKey(0))
  for name in ('rec_mse', 'kl_real', 'kl_fake'):
    np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-12)
  cli('introvae_jax.generate', '--num=4', f'--out={tmp_path}/out')
  fakes = np.asarray(sampling.sample(state, jax.random.PRNGKey(0), 4, config))
  assert fakes.dtype == np.float64
  np.testing.assert_array_equal(
      _png(os.path.join(tmp_path, 'out', 'samples.png')),
      sampling.image_grid(fakes))
  # With config.json lost, the config recorded with the checkpoint serves,
  # for the precision too.
  os.remove(os.path.join(workdir, 'config.json'))
  cli('introvae_jax.generate', '--num=4', f'--out={tmp_path}/again')
  np.testing.assert_array_equal(
      _png(os.path.join(tmp_path, 'again', 'samples.png')),
      sampling.image_grid(fakes))
