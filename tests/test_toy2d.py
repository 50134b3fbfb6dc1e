"""The 2-D toy suite: data generators, metrics, schedule and a short run."""

import functools
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import spatial
from scipy import stats

from introvae_jax import checkpointing
from introvae_jax import step as step_lib
from introvae_jax import stopping
from introvae_jax import toy2d
from conftest import REPO_ROOT

# --------------------------------------------------------------------------
# Data.


def _sample(name, n=20_000, seed=0):
  return np.asarray(toy2d.sample_data(name, jax.random.PRNGKey(seed), n))


@pytest.mark.parametrize('name', toy2d.DATASETS)
def test_generators_shape_dtype_and_range(name):
  x = _sample(name, 1001)
  assert x.shape == (1001, 2) and x.dtype == np.float32
  lim = 2 * toy2d.grid_scale(name)
  assert np.mean(np.all(np.abs(x) < lim, axis=1)) > 0.99


def test_eight_gaussians_statistics():
  x = _sample('8gaussians')
  radius = np.linalg.norm(x, axis=1)
  np.testing.assert_allclose(radius.mean(), 2 / 1.414, rtol=1e-3)
  assert radius.std() == pytest.approx(0.02 / 1.414, rel=0.05)
  mode = np.round(np.arctan2(x[:, 1], x[:, 0]) / (np.pi / 4)).astype(int) % 8
  np.testing.assert_allclose(np.bincount(mode, minlength=8) / len(x), 1 / 8,
                             atol=0.01)


def test_checkerboard_statistics():
  x = _sample('checkerboard')
  assert np.all(np.abs(x) <= 4)
  # Occupied squares of side 2 alternate: floor(x/2) + floor(y/2) is even.
  assert np.all((np.floor(x[:, 0] / 2) + np.floor(x[:, 1] / 2)) % 2 == 0)
  np.testing.assert_allclose(x.mean(axis=0), 0, atol=0.05)


def test_rings_statistics():
  x = _sample('rings')
  radius = np.linalg.norm(x, axis=1)
  ring = np.argmin(np.abs(radius[:, None] - np.array([3, 2.25, 1.5, 0.75])), 1)
  np.testing.assert_allclose(np.bincount(ring) / len(x), 0.25, atol=0.015)
  for k, r in enumerate((3, 2.25, 1.5, 0.75)):
    assert abs(radius[ring == k].mean() - r) < 0.01


def test_two_spirals_statistics():
  x = _sample('2spirals')
  np.testing.assert_allclose(x.mean(axis=0), 0, atol=0.03)  # point symmetric
  assert np.linalg.norm(x, axis=1).max() < 3 * np.pi / 3 + 0.8
  assert _sample('2spirals', 7).shape == (7, 2)  # odd sizes work


def test_dataset_names():
  assert toy2d.canonical_name('8Gaussians') == '8gaussians'
  with pytest.raises(ValueError, match='use one of'):
    toy2d.canonical_name('moons')


# --------------------------------------------------------------------------
# Metrics.


def test_torch_kl_div_semantics():
  rs = np.random.RandomState(0)
  target = rs.rand(4, 5)
  target[0, :2] = 0.0   # zero targets contribute nothing
  log_input = np.log(rs.rand(4, 5))
  pos = target > 0
  expected = np.sum(target[pos] * (np.log(target[pos]) - log_input[pos])) / 4
  np.testing.assert_allclose(toy2d.torch_kl_div(log_input, target), expected)
  torch = pytest.importorskip('torch')
  got_torch = torch.nn.functional.kl_div(
      torch.tensor(log_input), torch.tensor(target), reduction='batchmean')
  np.testing.assert_allclose(toy2d.torch_kl_div(log_input, target),
                             float(got_torch), rtol=1e-12)


def _bins_area(scale, bins):
  return (4 * scale / bins) ** 2


def test_histogram_kl_against_scipy_entropy():
  # Density histograms are masses / bin area; with every real bin also
  # occupied by fakes the reference's value is KL(P||Q) / (area * bins).
  rs = np.random.RandomState(1)
  real = rs.randn(5000, 2) * 0.4
  fake = np.concatenate([rs.randn(2000, 2) * 0.5, rs.rand(3000, 2) * 4 - 2])
  bins, scale = 20, 1.0
  p = toy2d.density_histogram(real, scale, bins)
  q = toy2d.density_histogram(fake, scale, bins)
  np.testing.assert_allclose(p.sum() * _bins_area(scale, bins), 1.0)
  assert np.all(q[p > 0] > 0)
  out = toy2d.histogram_divergences(real, fake, scale, bins)
  expected = (stats.entropy(p.ravel(), q.ravel())
              / (_bins_area(scale, bins) * bins))
  np.testing.assert_allclose(out['kl'], expected, rtol=1e-9)
  # Textbook JSD (nats) = scipy's Jensen-Shannon *distance* squared.
  np.testing.assert_allclose(
      out['jsd'], spatial.distance.jensenshannon(p.ravel(), q.ravel()) ** 2,
      rtol=1e-9)
  # The reference's "JSD": 0.5 (KL(M||P) + KL(M||Q)) on densities.
  m = 0.5 * (p + q)
  area = _bins_area(scale, bins)
  kl_m = lambda a: np.sum(
      m[m > 0] * np.log(m[m > 0] / (a[m > 0] + 1e-14))) / bins
  np.testing.assert_allclose(out['jsd_reference'], 0.5 * (kl_m(p) + kl_m(q)),
                             rtol=1e-9)
  assert 0 < out['jsd'] < np.log(2)
  assert area > 0


def test_histogram_divergences_identical_and_disjoint():
  rs = np.random.RandomState(2)
  pts = rs.rand(3000, 2) - 0.5
  same = toy2d.histogram_divergences(pts, pts, 1.0)
  for value in same.values():  # log(p + 1e-14) vs log(p): round-off only
    assert value == pytest.approx(0.0, abs=1e-12)
  far = toy2d.histogram_divergences(pts, pts + 1.2, 1.0)
  np.testing.assert_allclose(far['jsd'], np.log(2), rtol=1e-12)
  # Where fakes never land the reference's log(q + 1e-14) makes KL large.
  assert far['kl'] > 20 * np.log(10) / 100


def test_points_outside_the_square_are_dropped():
  inside = np.array([[0.1, 0.1], [0.5, -0.5]])
  outside = np.array([[5.0, 5.0]])
  np.testing.assert_allclose(
      toy2d.density_histogram(np.concatenate([inside, outside]), 1.0, 10),
      toy2d.density_histogram(inside, 1.0, 10))


def test_grid_normalized_elbo_by_hand():
  real = np.array([1.0, 2.0, 3.0])
  grid = np.array([4.0, 5.0, 6.0, 7.0])
  expected = np.mean(real / (real.sum() + grid.sum()))
  assert toy2d.grid_normalized_elbo(real, grid) == pytest.approx(expected)
  g = toy2d.grid_points(1.0, 5)
  assert g.shape == (25, 2) and g.min() == -2 and g.max() == 2


# --------------------------------------------------------------------------
# Schedule.


def test_learning_rate_factor_is_multisteplr_per_iteration():
  """Iteration i uses decay ** #{boundaries <= i}, as torch's MultiStepLR
  stepped after each iteration (Soft-IntroVAE's 2-D loop) gives it."""
  config = toy2d.toy_config('rings')
  assert config.lr_boundaries == (10_000, 15_000)
  for i in (0, 9_999, 10_000, 14_999, 15_000, 29_999):
    want = 0.1 ** sum(b <= i for b in config.lr_boundaries)
    np.testing.assert_allclose(
        float(step_lib.learning_rate_factor(config, i)), want, rtol=1e-6)
  torch = pytest.importorskip('torch')
  opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=(3, 5),
                                               gamma=0.5)
  config.lr_boundaries, config.lr_decay = (3, 5), 0.5
  for i in range(8):
    np.testing.assert_allclose(
        float(step_lib.learning_rate_factor(config, i)),
        opt.param_groups[0]['lr'], rtol=1e-6)
    opt.step()
    sched.step()


def test_scheduled_step_equals_constant_rate_phases():
  """The step schedule (one compiled step, the factor from state.step) ==
  Adam at a constant, scaled rate in each phase (its moments do not depend
  on the rate): the toy suite's former loop, an independent formulation."""
  config = toy2d.toy_config('rings')
  config.mlp_hidden, config.batch_size, config.num_vae_steps = (8, 8), 16, 2
  config.lr_boundaries, config.lr_decay, config.lr_e = (2, 4), 0.5, 1e-2
  state = phased = step_lib.create_train_state(config, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(step_lib.train_step, config=config))
  for i in range(6):
    x = toy2d.sample_data('rings', jax.random.PRNGKey(i), 16)
    state, _ = step(state, x)
    constant = config.copy_and_resolve_references()
    factor = 0.5 ** sum(b <= i for b in (2, 4))
    constant.lr_boundaries = ()
    constant.lr_e, constant.lr_g = config.lr_e * factor, config.lr_g * factor
    phased, _ = step_lib.train_step(phased, x, constant)
  for a, b in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(phased)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------------------
# Training.


def _tiny_config(dataset='rings', steps=300):
  c = toy2d.toy_config(dataset)
  c.mlp_hidden = (64, 64, 64)
  c.batch_size = 128
  c.num_train_steps = steps
  c.num_vae_steps = steps // 2
  c.log_every_steps = 100
  c.lr_boundaries = (steps - 100,)
  c.toy.num_eval_points = 2_000
  c.toy.hist_bins = 20  # 2,000 points: coarse bins keep sampling noise low
  c.toy.grid_points = 64
  c.toy.num_elbo_points = 1_000
  c.toy.num_plot_points = 256
  c.lr_e = c.lr_g = 1e-3
  return c


def test_short_training_reduces_jsd_and_writes_plots(tmp_path):
  config = _tiny_config()
  key = jax.random.PRNGKey(5)
  state0 = toy2d.step_lib.create_train_state(config, jax.random.PRNGKey(0))
  before, _ = toy2d.evaluate(state0, config, key)
  lines = []
  state, history = toy2d.train(config, log=lines.append)
  after, arrays = toy2d.evaluate(state, config, key)
  assert [s for s, _ in history] == [100, 200, 300]
  assert len(lines) == 3 and 'kl_fake' in lines[0]
  assert after['jsd'] < 0.7 * before['jsd']
  assert after['kl'] < before['kl']
  assert arrays['density'].shape == (64, 64)
  paths = toy2d.save_plots(arrays, 'rings', str(tmp_path))
  for path in paths.values():
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  table = toy2d.format_table([('rings', after)])
  assert table.count('\n') == 2 and 'gnELBO' in table


def _stop_at(step):
  """A `log` that sends this process SIGTERM when it sees `step`."""
  def log(line):
    if line.startswith(f'step {step:6d}'):
      os.kill(os.getpid(), signal.SIGTERM)
  return log


def test_a_stopped_and_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path):
  """SIGTERM at step 100 saves and returns; the rerun resumes there, and its
  state, history and metrics equal those of a run never stopped."""
  config = _tiny_config(steps=200)  # the resume is the warm-up's end
  config.checkpoint_every_steps = 100
  whole_state, whole_history = toy2d.train(config, log=None)

  signals = stopping.StopSignals()
  assert toy2d.run(config, str(tmp_path), log=_stop_at(100),
                   signals=signals) is None
  assert signals.stopped == signal.SIGTERM
  assert checkpointing.make_manager(str(tmp_path), read_only=True
                                    ).all_steps() == [100]
  assert not (tmp_path / 'rings_results.json').exists()
  lines = []
  state, history = toy2d.train(config, log=lines.append, workdir=str(tmp_path))
  assert lines[0].startswith('Resuming at step 100')
  assert history == whole_history
  for a, b in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(whole_state)):
    np.testing.assert_array_equal(a, b)

  # A finished run reruns without training: the last checkpoint holds it all.
  metrics = toy2d.run(config, str(tmp_path), log=None)
  expected, _ = toy2d.evaluate(whole_state, config, jax.random.PRNGKey(
      config.seed + 1))
  assert {k: metrics[k] for k in expected} == expected
  stored = json.loads((tmp_path / 'rings_results.json').read_text())
  assert stored['kl_history'] == toy2d.kl_history(whole_history)
  # The training time adds up over the two processes that trained it.
  first, total = (toy2d.train_seconds(str(tmp_path), s) for s in (100, 200))
  assert 0 < first < total == stored['train_seconds']


def test_a_workdir_of_another_run_is_refused_untouched(tmp_path):
  from introvae_jax import errors
  config = _tiny_config(steps=200)
  config.num_train_steps = 100
  toy2d.train(config, log=None, workdir=str(tmp_path))
  assert json.loads((tmp_path / 'config.json').read_text())['seed'] == 0
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  config.seed = 1
  with pytest.raises(errors.ConfigError,
                     match=r'Refusing to resume .* \(seed: 0 -> 1\)'):
    toy2d.train(config, log=None, workdir=str(tmp_path))
  config.seed, config.mlp_hidden = 0, (32, 32, 32)
  with pytest.raises(errors.UserError, match='different model'):
    toy2d.train(config, log=None, workdir=str(tmp_path))
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before


def test_train_rejects_image_configs():
  config = toy2d.toy_config()
  config.arch = 'conv'
  with pytest.raises(ValueError, match="arch='mlp'"):
    toy2d.train(config)


@pytest.mark.slow
def test_command_line(tmp_path):
  cmd = [sys.executable, '-m', 'introvae_jax.toy2d',
         '--config=configs/toy2d.py:checkerboard', '--num_steps=20',
         '--config.mlp_hidden=(16,16,16)', '--config.num_vae_steps=10',
         '--config.toy.grid_points=32', '--config.toy.num_eval_points=500',
         '--config.toy.num_elbo_points=500', f'--workdir={tmp_path}']
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| checkerboard |' in proc.stdout
  with open(os.path.join(tmp_path, 'checkerboard_results.json')) as f:
    results = json.load(f)
  assert results['steps'] == 20 and np.isfinite(results['gnelbo'])
  assert os.path.exists(os.path.join(tmp_path, 'checkerboard_density.png'))


def test_unwritable_workdir_is_refused_before_training(tmp_path, monkeypatch):
  """It used to fail after the whole training, when the plots were saved."""
  from introvae_jax import errors
  (tmp_path / 'a_file').write_text('not a folder')
  monkeypatch.setattr(toy2d, 'train',
                      lambda *args, **kwargs: pytest.fail('trained first'))
  with pytest.raises(errors.WorkdirError,
                     match=f'Cannot write to --workdir={tmp_path}/a_file'):
    toy2d.run(_tiny_config(), str(tmp_path / 'a_file'))


def test_modes_covered_counts_a_hand_made_sample_set():
  centers = toy2d.eight_gaussians_centers()
  std = toy2d.EIGHT_GAUSSIANS_STD
  assert np.allclose(np.linalg.norm(centers, axis=1), 2.0 / 1.414)
  rs = np.random.RandomState(0)
  # 1,000 points: 500 on mode 0, 300 on mode 3, 10 (exactly 1%) within
  # 2.9 sigma of mode 5, 9 (0.9%) on mode 6, the rest far from every mode.
  def near(i, n, radius):
    angle = rs.uniform(0, 2 * np.pi, n)
    return centers[i] + radius * std * np.stack(
        [np.cos(angle), np.sin(angle)], 1)
  points = np.concatenate([near(0, 500, 0.5), near(3, 300, 2.0),
                           near(5, 10, 2.9), near(6, 9, 0.1),
                           near(1, 181, 3.5)])  # 3.5 sigma: not covered
  assert len(points) == 1000
  assert toy2d.modes_covered(points, centers, std) == 3
  assert toy2d.modes_covered(points, centers, std, num_std=4.0) == 4
  assert toy2d.modes_covered(points, centers, std, min_fraction=0.009) == 4
  real = np.asarray(
      toy2d.sample_data('8gaussians', jax.random.PRNGKey(0), 5000))
  assert toy2d.modes_covered(real, centers, std) == 8
