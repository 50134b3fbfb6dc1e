"""The 2-D toy suite of Soft-IntroVAE, for any objective (`config.objective`).

Data sets, schedule and metrics follow Soft-IntroVAE (Daniel & Tamar, CVPR
2021, taldatech/soft-intro-vae-pytorch `soft_intro_vae_2d`); docs/introvae.md,
section 6. The model is the project's MLP encoder/decoder (`arch='mlp'`) and
the step is `step.train_step`, unchanged; each data set carries IntroVAE's
tuned weights (`HPARAMS`) and Soft-IntroVAE's recommended betas
(`SOFT_HPARAMS`)::

    python -m introvae_jax.toy2d --dataset=8gaussians --workdir=/tmp/toy
    python -m introvae_jax.toy2d --config=configs/toy2d.py:rings \\
        --config.m_plus=5

Metrics (`evaluate`):

- `kl`: the reference's "KL", PyTorch `kl_div(log(q + 1e-14), p,
  'batchmean')` between 100x100-bin *density* histograms (np.histogram2d,
  density=True) of 5,000 real (p) and 5,000 generated (q) points over
  [-2s, 2s]^2; 'batchmean' divides by the 100 histogram rows.
- `jsd_reference`: the reference's "JSD", 0.5 * (kl_div(log p, m) +
  kl_div(log q, m)) with m = (p + q) / 2, i.e. 0.5 * (KL(m||p) + KL(m||q)) on
  densities (not the Jensen-Shannon divergence).
- `jsd`: the textbook Jensen-Shannon divergence (nats, <= ln 2) between the
  two histograms as probability masses.
- `modes_covered` (8 Gaussians): modes holding >= 1% of the generated points
  within 3 sigma of their centre.
- `gnelbo`: grid-normalised negative ELBO, per-point (KL + squared error)
  with z = mu, divided by its sum over a 1024x1024 grid on [-2s, 2s]^2 plus
  the real points, averaged over 12,800 real points (lower is better).

s is 1 for 8 Gaussians and 2 for the others, as in the reference.
"""

import contextlib
import functools
import io
import json
import os
import sys
import time
from typing import Callable, Dict, Optional, Tuple

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from introvae_jax import checkpointing
from introvae_jax import configuration
from introvae_jax import errors
from introvae_jax import losses
from introvae_jax import models
from introvae_jax import step as step_lib
from introvae_jax import stopping
from introvae_jax import workdir as workdir_lib
from introvae_jax.configuration import base_config

DATASETS = ('8gaussians', '2spirals', 'checkerboard', 'rings')

# Objective weights per data set, in IntroVAE's own parametrisation: w_kl 1,
# w_neg 1 (alpha = 0.5 on both hinge and generator terms), w_rec = beta 4, and
# m_plus ~3x the real points' KL at the end of the 2,000-iteration warm-up
# (0.83, 1.57, 2.27, 1.44 nats). Search and numbers: docs/tuning.md.
HPARAMS = {
    '8gaussians': dict(weight_rec=4.0, weight_kl=1.0, weight_neg=1.0,
                       m_plus=3.0),
    '2spirals': dict(weight_rec=4.0, weight_kl=1.0, weight_neg=1.0, m_plus=4.7),
    'checkerboard': dict(weight_rec=4.0, weight_kl=1.0, weight_neg=1.0,
                         m_plus=6.8),
    'rings': dict(weight_rec=4.0, weight_kl=1.0, weight_neg=1.0, m_plus=4.3),
}


# Soft-IntroVAE's recommended betas per data set (beta_kl, beta_rec,
# beta_neg; taldatech/soft-intro-vae-pytorch `soft_intro_vae_2d/README.md`,
# "Recommended hyperparameters", and `main.py` l. 13-16), gamma_r 1e-8.
SOFT_HPARAMS = {
    '8gaussians': dict(beta_kl=0.3, beta_rec=0.2, beta_neg=0.9),
    '2spirals': dict(beta_kl=0.5, beta_rec=0.2, beta_neg=1.0),
    'checkerboard': dict(beta_kl=0.1, beta_rec=0.2, beta_neg=0.2),
    'rings': dict(beta_kl=0.2, beta_rec=0.2, beta_neg=1.0),
}


def canonical_name(dataset: str) -> str:
  """'8Gaussians' (the reference's spelling) -> '8gaussians', checked."""
  name = dataset.lower()
  if name not in DATASETS:
    raise errors.ConfigError(f'dataset={dataset!r}; use one of {DATASETS}.')
  return name


def toy_config(dataset: str = '8gaussians') -> ml_collections.ConfigDict:
  """The Soft-IntroVAE 2-D recipe for one data set (configs/toy2d.py)."""
  name = canonical_name(dataset)
  c = base_config()
  c.arch, c.hdim, c.data_dim, c.mlp_hidden = 'mlp', 2, 2, (256, 256, 256)
  c.batch_size = 512
  c.lr_e = c.lr_g = 2e-4
  c.lr_boundaries, c.lr_decay = (10_000, 15_000), 0.1  # x0.1 at each
  c.num_train_steps = 30_000
  c.num_vae_steps = 2_000
  c.log_every_steps = 1_000
  for field, value in HPARAMS[name].items():
    setattr(c, field, value)
  c.soft_introvae.update(SOFT_HPARAMS[name], gamma_r=1e-8)
  with c.unlocked():
    c.toy = ml_collections.ConfigDict(dict(
        dataset=name,
        num_eval_points=5_000,          # per histogram (real and generated)
        hist_bins=100,
        grid_points=1_024,              # gnELBO grid per axis
        num_elbo_points=12_800,         # real points for gnELBO (100 x 128)
        num_plot_points=1_024,
    ))
  return c


# --------------------------------------------------------------------------
# Data (reference: `ToyDataset.next_batch` for 8 Gaussians, `sample_2d_data`
# for the others).

def grid_scale(dataset: str) -> float:
  """s of the evaluation square [-2s, 2s]^2 (reference `main.py`)."""
  return 1.0 if canonical_name(dataset) == '8gaussians' else 2.0


# 8 Gaussians: modes on a circle of radius 2, std 0.02, all divided by 1.414.
EIGHT_GAUSSIANS_STD = 0.02 / 1.414


def eight_gaussians_centers() -> np.ndarray:
  """The 8 mode centres [8, 2] of the 8 Gaussians data set."""
  angle = np.arange(8) * (np.pi / 4)
  return 2.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1) / 1.414


def modes_covered(points, centers, std: float, *, num_std: float = 3.0,
                  min_fraction: float = 0.01) -> int:
  """How many modes hold at least `min_fraction` of `points` within
  `num_std` * `std` (Euclidean) of their centre."""
  points = np.asarray(points, np.float64)
  dist = np.linalg.norm(points[:, None, :] - np.asarray(centers)[None], axis=-1)
  share = np.mean(dist <= num_std * std, axis=0)
  return int(np.sum(share >= min_fraction))


def _eight_gaussians(key, n):
  k_mode, k_noise = jax.random.split(key)
  angle = jax.random.randint(k_mode, (n,), 0, 8) * (jnp.pi / 4)
  centers = 2.0 * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
  return (centers + 0.02 * jax.random.normal(k_noise, (n, 2))) / 1.414


def _two_spirals(key, n):
  k_r, k_x, k_y, k_noise = jax.random.split(key, 4)
  half = (n + 1) // 2
  t = jnp.sqrt(jax.random.uniform(k_r, (half,))) * 540 * (2 * jnp.pi) / 360
  x = -jnp.cos(t) * t + 0.5 * jax.random.uniform(k_x, (half,))
  y = jnp.sin(t) * t + 0.5 * jax.random.uniform(k_y, (half,))
  arm = jnp.stack([x, y], axis=1)
  points = jnp.concatenate([arm, -arm], axis=0)[:n] / 3
  return points + 0.1 * jax.random.normal(k_noise, (n, 2))


def _checkerboard(key, n):
  k1, k2, k3 = jax.random.split(key, 3)
  x1 = jax.random.uniform(k1, (n,)) * 4 - 2
  x2 = (jax.random.uniform(k2, (n,))
        - 2.0 * jax.random.randint(k3, (n,), 0, 2) + jnp.floor(x1) % 2)
  return 2 * jnp.stack([x1, x2], axis=1)


def _rings(key, n):
  # Four circles (radii 3, 2.25, 1.5, 0.75) of n//4 evenly spaced points each
  # (the smallest takes the remainder), resampled with replacement, noise 0.08.
  k_idx, k_noise = jax.random.split(key)
  quarter = n // 4
  counts = (quarter, quarter, quarter, n - 3 * quarter)
  rings = []
  for radius, count in zip((1.0, 0.75, 0.5, 0.25), counts):
    angle = jnp.arange(count) * (2 * jnp.pi / count)
    rings.append(radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1))
  points = 3.0 * jnp.concatenate(rings, axis=0)
  points = points[jax.random.randint(k_idx, (n,), 0, n)]
  return points + 0.08 * jax.random.normal(k_noise, (n, 2))


_GENERATORS = {'8gaussians': _eight_gaussians, '2spirals': _two_spirals,
               'checkerboard': _checkerboard, 'rings': _rings}


def sample_data(dataset: str, key, num: int) -> jax.Array:
  """`num` float32 points [num, 2] of a toy data set (jit-able, num static)."""
  return _GENERATORS[canonical_name(dataset)](key, num).astype(jnp.float32)


# --------------------------------------------------------------------------
# Metrics.

def torch_kl_div(log_input, target) -> float:
  """PyTorch `F.kl_div(log_input, target, reduction='batchmean')` in NumPy.

  sum(xlogy(target, target) - target * log_input) / log_input.shape[0]:
  terms with target == 0 contribute 0.
  """
  log_input = np.asarray(log_input, np.float64)
  target = np.asarray(target, np.float64)
  safe = np.where(target > 0, target, 1.0)
  pointwise = (np.where(target > 0, target * np.log(safe), 0.0)
               - target * log_input)
  return float(pointwise.sum() / log_input.shape[0])


def density_histogram(points, scale: float, bins: int = 100) -> np.ndarray:
  """np.histogram2d(density=True) over [-2s, 2s]^2 (points outside dropped)."""
  points = np.asarray(points, np.float64)
  lim = [-2.0 * scale, 2.0 * scale]
  hist, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=bins,
                              range=[lim, lim], density=True)
  return hist


def histogram_divergences(real, fake, scale: float,
                          bins: int = 100) -> Dict[str, float]:
  """The reference's `kl` and `jsd_reference` plus the textbook `jsd`."""
  p = density_histogram(real, scale, bins)
  q = density_histogram(fake, scale, bins)
  tiny = 1e-14  # the reference's offset inside the log
  m = 0.5 * (p + q)
  kl = torch_kl_div(np.log(q + tiny), p)
  jsd_reference = 0.5 * (torch_kl_div(np.log(p + tiny), m) +
                         torch_kl_div(np.log(q + tiny), m))
  return {'kl': kl, 'jsd_reference': jsd_reference,
          'jsd': jensen_shannon(p, q)}


def jensen_shannon(p, q) -> float:
  """Textbook JSD in nats of two histograms (normalised to masses here)."""
  p = np.asarray(p, np.float64).ravel()
  q = np.asarray(q, np.float64).ravel()
  p, q = p / p.sum(), q / q.sum()
  m = 0.5 * (p + q)

  def kl(a):
    pos = a > 0
    return float(np.sum(a[pos] * np.log(a[pos] / m[pos])))

  return 0.5 * (kl(p) + kl(q))


def grid_points(scale: float, num: int) -> np.ndarray:
  """A num x num grid over [-2s, 2s]^2 as [num*num, 2], row-major in (x, y)."""
  axis = np.linspace(-2.0 * scale, 2.0 * scale, num, dtype=np.float32)
  xx, yy = np.meshgrid(axis, axis, indexing='ij')
  return np.stack([xx.ravel(), yy.ravel()], axis=1)


@functools.partial(jax.jit, static_argnames=('config',))
def _negative_elbo(params_e, params_g, x, config):
  encoder, decoder = models.build_models(config)
  mu, logvar = encoder.apply({'params': params_e}, x, train=False)
  x_rec = decoder.apply({'params': params_g}, mu, train=False)
  return (losses.kl_divergence(mu, logvar)
          + losses.reconstruction_loss(x, x_rec))


def negative_elbo(state, x, config, chunk: int = 16_384) -> np.ndarray:
  """Per-point KL + squared error with z = mu (reference beta_kl =
  beta_rec = 1)."""
  frozen = ml_collections.FrozenConfigDict(config)
  x = np.asarray(x, np.float32)
  out = [np.asarray(_negative_elbo(state.params_e, state.params_g,
                                   x[i:i + chunk], frozen))
         for i in range(0, len(x), chunk)]
  return np.concatenate(out).astype(np.float64)


def grid_normalized_elbo(elbo_real, elbo_grid) -> float:
  """gnELBO: mean of elbo_real / (sum(elbo_grid) + sum(elbo_real))."""
  elbo_real = np.asarray(elbo_real, np.float64)
  total = np.sum(elbo_grid, dtype=np.float64) + elbo_real.sum()
  return float(np.mean(elbo_real / total))


@functools.partial(jax.jit, static_argnames=('config', 'num'))
def _generate(params_g, key, config, num):
  _, decoder = models.build_models(config)
  z = jax.random.normal(key, (num, config.hdim), jnp.float32)
  return decoder.apply({'params': params_g}, z, train=False)


def generate(state, key, num: int, config) -> np.ndarray:
  """Decoded prior samples G(z), z ~ N(0, I), unclipped 2-D points."""
  frozen = ml_collections.FrozenConfigDict(config)
  return np.asarray(_generate(state.params_g, key, frozen, num))


def evaluate(state, config,
             key) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
  """(metrics, arrays for plots): kl, jsd_reference, jsd, gnelbo, and for
  8 Gaussians modes_covered (of 8, by the 5,000 generated points)."""
  toy = config.toy
  scale = grid_scale(toy.dataset)
  k_real, k_fake, k_elbo, k_plot_r, k_plot_f = jax.random.split(key, 5)
  real = np.asarray(sample_data(toy.dataset, k_real, toy.num_eval_points))
  fake = generate(state, k_fake, toy.num_eval_points, config)
  metrics = histogram_divergences(real, fake, scale, toy.hist_bins)
  grid = grid_points(scale, toy.grid_points)
  elbo_grid = negative_elbo(state, grid, config)
  elbo_real = negative_elbo(
      state, sample_data(toy.dataset, k_elbo, toy.num_elbo_points), config)
  metrics['gnelbo'] = grid_normalized_elbo(elbo_real, elbo_grid)
  if toy.dataset == '8gaussians':
    metrics['modes_covered'] = modes_covered(fake, eight_gaussians_centers(),
                                             EIGHT_GAUSSIANS_STD)
  arrays = {
      'real': np.asarray(sample_data(toy.dataset, k_plot_r,
                                     toy.num_plot_points)),
      'fake': generate(state, k_plot_f, toy.num_plot_points, config),
      # The reference's density plot: exp(-(KL + squared error)) on the grid.
      'density': np.exp(-elbo_grid).reshape(toy.grid_points, toy.grid_points),
  }
  return metrics, arrays


# --------------------------------------------------------------------------
# Training.

@functools.lru_cache(maxsize=None)
def _chunk_fn(config: ml_collections.FrozenConfigDict, num_steps: int):
  """Jitted: `num_steps` train steps under lax.scan, data drawn inside."""
  dataset, batch = config.toy.dataset, config.batch_size

  def run(state, data_key):
    def body(state, _):
      key = jax.random.fold_in(data_key, state.step)
      return step_lib.train_step(state, sample_data(dataset, key, batch),
                                 config)

    state, metrics = jax.lax.scan(body, state, None, length=num_steps)
    return state, jax.tree_util.tree_map(jnp.mean, metrics)

  return jax.jit(run, donate_argnums=(0,))


def check_config(config) -> None:
  """Raises ConfigError unless `config` is a valid 2-D toy config."""
  configuration.validate(config)
  if config.arch != 'mlp' or config.data_dim != 2:
    raise errors.ConfigError(
        f"The toy suite needs arch='mlp' and data_dim=2, got "
        f'arch={config.arch!r}, data_dim={config.data_dim}.')


# Saved in each checkpoint's metadata: the chunk means so far, and the
# training's wall seconds over every process that trained the run.
HISTORY_KEY = 'toy2d_history'
SECONDS_KEY = 'toy2d_train_seconds'


def train(config, log: Optional[Callable[[str], None]] = print, *,
          workdir: Optional[str] = None,
          signals: Optional[stopping.StopSignals] = None):
  """Trains; returns (state, [(step, chunk-mean metrics)]).

  With `workdir`: an Orbax checkpoint (the state, and the history in its
  metadata) at the first log boundary at or after each multiple of
  `checkpoint_every_steps` and at the end; a rerun resumes from the newest
  one that restores and ends at the numbers of an uninterrupted run. Another
  run identity or model is refused before anything is written, and one
  process trains a workdir at a time. SIGTERM or SIGINT ends the run, saved,
  at the end of the current log chunk; `signals` (a fresh
  `stopping.StopSignals`) then says which (`signals.stopped`).
  """
  check_config(config)
  if workdir is None:
    return _train(config, log, None, None, None)
  workdir_lib.prepare(workdir)
  with workdir_lib.RunLock(workdir):
    manager = checkpointing.make_manager(workdir,
                                         max_to_keep=config.max_to_keep)
    with checkpointing.disk_full_is_a_user_error(manager):
      return _train(config, log, manager, signals or stopping.StopSignals(),
                    workdir)


def _resume(manager, config):
  """(state, history, seconds) of the newest checkpoint that restores, or
  (None, [], 0)."""
  state = checkpointing.restore(manager, config, move_damaged=True)
  if state is None:
    return None, [], 0.0
  step = int(state.step)
  history = checkpointing.stored_extra(manager, step, HISTORY_KEY)
  if history is None:
    raise errors.WorkdirError(
        f'The checkpoint of step {step} in {manager.directory} holds no toy2d '
        'history (another program wrote it); pass another --workdir.')
  seconds = checkpointing.stored_extra(manager, step, SECONDS_KEY) or 0.0
  return state, [(s, m) for s, m in history], seconds


def train_seconds(workdir: str, step: int) -> Optional[float]:
  """The wall seconds that training a workdir's run to `step` took, over
  every resume (None for a step without a checkpoint)."""
  manager = checkpointing.make_manager(workdir, read_only=True)
  if step not in manager.all_steps():
    return None
  return checkpointing.stored_extra(manager, step, SECONDS_KEY)


def _train(config, log, manager, signals, workdir):
  rng = jax.random.PRNGKey(config.seed)
  state, history, spent, changes = None, [], 0.0, []
  if manager is not None:
    checkpointing.check_model(manager, config)  # another model: say so first
    stored, changes = checkpointing.resume_identity(config, workdir, manager)
    state, history, spent = _resume(manager, config)
    start = 0 if state is None else int(state.step)
    if not changes:  # a change is recorded once a checkpoint holds it
      checkpointing.write_config(config, workdir, start, stored, changes)
  if state is None:
    state = step_lib.create_train_state(config, rng)
  elif log is not None:
    log(f'Resuming at step {int(state.step)} from {manager.directory}.')
  data_key = jax.random.fold_in(rng, 1)
  every = max(1, config.log_every_steps)
  save_every = max(1, config.checkpoint_every_steps)
  start_time = time.time()
  frozen = ml_collections.FrozenConfigDict(config)
  step = saved = int(state.step)
  with signals or contextlib.nullcontext():
    while step < config.num_train_steps and not (signals and signals.requested):
      n = min(every - step % every, config.num_train_steps - step)
      state, metrics = _chunk_fn(frozen, n)(state, data_key)
      step += n
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics['loss_e'] + metrics['loss_g']):
        raise FloatingPointError(f'Non-finite loss by step {step}: {metrics}')
      history.append((step, metrics))
      if log is not None:
        factor = float(step_lib.learning_rate_factor(config, step - 1))
        log(f'step {step:6d}  lr x{factor:g}  rec {metrics["loss_rec"]:.4f}  '
            f'kl_real {metrics["kl_real"]:.3f}  '
            f'kl_rec {metrics["kl_rec"]:.3f}  '
            f'kl_fake {metrics["kl_fake"]:.3f}'
            f'  ({time.time() - start_time:.0f} s)')
      if manager is not None and (step // save_every > saved // save_every
                                  or step == config.num_train_steps
                                  or signals.requested):
        checkpointing.save(manager, state, config=config, extra={
            HISTORY_KEY: history,
            SECONDS_KEY: spent + time.time() - start_time})
        saved = step
        if changes:
          manager.wait_until_finished()  # the new identity is on disk
          checkpointing.write_config(config, workdir, start, stored, changes)
          changes = []
    if signals is not None and step < config.num_train_steps:
      signals.stopped = signals.received
    if manager is not None:
      manager.wait_until_finished()
  return state, history


# Training scalars kept for compare's figures and tables: the KLs every
# objective logs, and the ones an objective adds (Soft-IntroVAE's).
HISTORY_TAGS = ('kl_real', 'kl_rec', 'kl_fake', 'kl_gap', 'expelbo_rec',
                'expelbo_fake')


def kl_history(history) -> Dict[str, list]:
  """`train`'s history as {'step': [...], 'kl_real': ..., 'kl_rec': ...,
  'kl_fake': ..., and the other `HISTORY_TAGS` the objective logs} (chunk
  means)."""
  tags = [t for t in HISTORY_TAGS if history and t in history[0][1]]
  return dict(step=[s for s, _ in history],
              **{t: [m[t] for _, m in history] for t in tags})


# --------------------------------------------------------------------------
# Plots and the command line.

def save_plots(arrays, dataset: str, workdir: str) -> Dict[str, str]:
  """samples.png (real | generated | density) and density.png; returns paths."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  lim = 2.0 * grid_scale(dataset)
  paths = {'samples': os.path.join(workdir, f'{dataset}_samples.png'),
           'density': os.path.join(workdir, f'{dataset}_density.png')}

  def density(ax):
    # Rows of the grid are x (indexing='ij'), so transpose for imshow.
    ax.imshow(arrays['density'].T, origin='lower',
              extent=(-lim, lim, -lim, lim), cmap='jet',
              interpolation='nearest')

  fig, axes = plt.subplots(1, 3, figsize=(15, 5))
  for ax, key, color, title in ((axes[0], 'real', 'tab:blue', 'Real data'),
                                (axes[1], 'fake', 'tab:green', 'Samples')):
    ax.scatter(arrays[key][:, 0], arrays[key][:, 1], s=4, c=color)
    ax.set_title(title)
  density(axes[2])
  axes[2].set_title('Density exp(-(KL + rec))')
  for ax in axes:
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect('equal')
    ax.set_axis_off()
  _save_figure(fig, paths['samples'], dpi=80)

  fig, ax = plt.subplots(figsize=(5, 5))
  density(ax)
  ax.set_axis_off()
  _save_figure(fig, paths['density'], dpi=100)
  return paths


def _save_figure(fig, path: str, dpi: int) -> None:
  """PNG to a local or gs:// path."""
  import matplotlib.pyplot as plt
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', bbox_inches='tight', dpi=dpi)
  plt.close(fig)
  workdir_lib.write_bytes(path, buffer.getvalue())


def format_table(rows) -> str:
  """rows: [(dataset, metrics)] -> a Markdown table (with the modes covered
  where measured)."""
  modes = any('modes_covered' in m for _, m in rows)
  head = '| data set | gnELBO | KL | JSD (reference) | JSD (textbook) |'
  lines = [head + (' modes covered |' if modes else ''),
           '|---|---|---|---|---|' + ('---|' if modes else '')]
  for name, m in rows:
    line = (f'| {name} | {m["gnelbo"]:.4e} | {m["kl"]:.4f} | '
            f'{m["jsd_reference"]:.4f} | {m["jsd"]:.4f} |')
    if modes:
      line += f' {m["modes_covered"]} of 8 |' if 'modes_covered' in m else ' |'
    lines.append(line)
  return '\n'.join(lines)


def run(config, workdir: str, log=print,
        signals: Optional[stopping.StopSignals] = None
        ) -> Optional[Dict[str, float]]:
  """Trains (resuming from the workdir's checkpoints), evaluates, writes
  plots and <dataset>_results.json (metrics, the training KLs, config);
  returns the metrics, or None when a stop signal ended the training (saved;
  `signals.stopped` says which)."""
  check_config(config)  # before anything is written
  workdir_lib.prepare(workdir)  # before training, not after it
  signals = signals or stopping.StopSignals()
  start = time.time()
  state, history = train(config, log=log, workdir=workdir, signals=signals)
  if signals.stopped is not None:
    if log is not None:
      log(f'Stopped at step {int(state.step)}, saved; rerun the same command '
          'to resume.')
    return None
  # Over every resume; this process's part where the checkpoint has none.
  train_s = (train_seconds(workdir, int(state.step))
             or time.time() - start)
  eval_start = time.time()
  metrics, arrays = evaluate(state, config, jax.random.PRNGKey(config.seed + 1))
  metrics['train_seconds'] = train_s
  metrics['eval_seconds'] = time.time() - eval_start
  paths = save_plots(arrays, config.toy.dataset, workdir)
  results = dict(metrics, steps=config.num_train_steps,
                 kl_history=kl_history(history),
                 config=json.loads(config.to_json_best_effort()))
  workdir_lib.write_text(
      epath.Path(workdir, f'{config.toy.dataset}_results.json'),
      json.dumps(results, indent=2))
  if log is not None:
    log(format_table([(config.toy.dataset, metrics)]))
    log(f'train {train_s:.0f} s, eval {metrics["eval_seconds"]:.0f} s; '
        f'plots: {paths["samples"]}, {paths["density"]}')
  return metrics


def main(argv):
  """`python -m introvae_jax.toy2d`: trains a 2-D toy recipe (resuming its
  workdir) and writes its metrics and plot."""
  from absl import flags
  del argv
  checkpointing.quiet_orbax_logs()
  f = flags.FLAGS
  if f.config is not None:
    config = f.config
    if 'toy' not in config:
      raise errors.ConfigError('--config is not a toy2d config (it has no '
                             'toy fields); use configs/toy2d.py:<dataset>.')
    if f['dataset'].present and canonical_name(f.dataset) != config.toy.dataset:
      raise errors.UserError(f'--dataset={f.dataset} disagrees with the config '
                             f'({config.toy.dataset}); pass one of them.')
  else:
    config = toy_config(f.dataset)
  if f.num_steps is not None:
    config.num_train_steps = f.num_steps
  if f.seed is not None:
    config.seed = f.seed
  workdir = f.workdir or os.path.join('toy2d_runs', config.toy.dataset)
  signals = stopping.StopSignals()
  if run(config, workdir, signals=signals) is None:
    sys.exit(128 + signals.stopped)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string('dataset', '8gaussians', f'One of {DATASETS}.')
  flags.register_validator(
      'dataset', lambda name: name.lower() in DATASETS,
      f'--dataset must be one of {", ".join(DATASETS)}')
  flags.DEFINE_integer('num_steps', None, 'Iterations (default: the config, '
                       '30,000).', lower_bound=1)
  flags.DEFINE_integer('seed', None, 'Random seed (default: the config).')
  flags.DEFINE_string('workdir', None, 'Folder for checkpoints, plots and '
                      'results.json (default: toy2d_runs/<dataset>); an '
                      'existing run resumes.')
  config_flags.DEFINE_config_file('config', None, 'Optional config file, e.g. '
                                  'configs/toy2d.py:rings.', lock_config=True)


if __name__ == '__main__':
  from introvae_jax import cli
  _define_flags()
  cli.run(main)
