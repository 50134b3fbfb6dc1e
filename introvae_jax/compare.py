"""Objectives side by side at equal budget, over seeds: does IntroVAE beat a
VAE?

    python -m introvae_jax.compare --config=configs/default.py \\
        --objectives=vae,introvae --seeds=0,1,2 --workdir=runs/compare

Each (objective, seed) cell is an ordinary training run
(`train.train_and_evaluate`; `toy2d.run` for the 2-D toys) in
`<workdir>/<objective>_seed<k>`, so it resumes and shows progress, then
evaluated (`evaluation.evaluate_workdir`, `toy2d.evaluate`). A cell
is the config with `objective` set: `vae`, `introvae`, `soft_introvae` (the
registry, `introvae_jax.objectives`), or `betavae`, the `vae` objective with
the recipe's `weight_rec`/`weight_kl` (the ablation that separates the
reconstruction weight from the introspective terms).

Each cell's results go to `<results>/<objective>_seed<k>.json` (metrics, the
KL statistics over training, its config) with its sample and reconstruction
grids; a cell whose results file exists is not run again, so a grid fills in
across sessions and anyone can rebuild the tables from the committed files.
Then `<results>/table.md` and `table.json` (mean and std over seeds of every
metric, and each objective against the first) and `figure.png`.
"""

import json
import math
from typing import Dict, List, Optional, Sequence

from absl import logging
from etils import epath
import numpy as np

from introvae_jax import configuration
from introvae_jax import errors
from introvae_jax import objectives as objectives_lib
from introvae_jax import sampling
from introvae_jax import workdir as workdir_lib

# Cells: every registered objective, and `betavae`: the `vae` objective
# weighted like the IntroVAE recipe (vae_weight_rec/kl = weight_rec/kl, a
# beta-VAE with beta = weight_kl / weight_rec; the ablation that separates
# the reconstruction weight from the introspective terms).
OBJECTIVES = tuple(objectives_lib.REGISTRY) + ('betavae',)
_OBJECTIVE_FIELDS = frozenset().union(
    *(o.READS for o in objectives_lib.REGISTRY.values()))
# Fields a cell never reads, by cell: changing them keeps the cell's results
# valid, so one baseline serves every recipe of a search.
UNREAD = {
    **{name: _OBJECTIVE_FIELDS - o.READS
       for name, o in objectives_lib.REGISTRY.items()},
    'betavae': _OBJECTIVE_FIELDS - {'weight_rec', 'weight_kl'},
}
# Metrics where lower is better; rec_psnr is higher-is-better; KLs have no
# direction (they are the introspective signal, not a quality).
LOWER_IS_BETTER = ('fd_digit', 'kid_digit_mean', 'fid', 'kid_mean', 'rec_mse',
                   'kl', 'jsd', 'jsd_reference', 'gnelbo')  # (2-D toys: kl..)
HIGHER_IS_BETTER = ('rec_psnr', 'modes_covered')
# From this many seeds a side the table also gives the median and quartiles
# (a distribution, not only a mean: one seed that drops modes moves a mean
# of KLs by tens); these metrics are also listed seed by seed.
QUARTILES_FROM = 5
PER_SEED = ('modes_covered',)
NUM_GRID_IMAGES = 32


def cell_name(objective: str, seed: int) -> str:
  """A cell's name: its run folder and results file, `<objective>_seed<k>`."""
  return f'{objective}_seed{seed}'


def cell_config(config, objective: str, seed: int):
  """The training config of one cell: `config` with `seed` and the cell's
  objective (`betavae`: `vae` with vae_weight_rec/kl = weight_rec/kl); an
  objective without a fused form runs in reference mode."""
  if objective not in OBJECTIVES:
    raise errors.UserError(f'Unknown objective {objective!r}; use one of '
                           f'{", ".join(OBJECTIVES)}.')
  cell = config.copy_and_resolve_references()
  with cell.unlocked():
    cell.seed = seed
    cell.objective = 'vae' if objective == 'betavae' else objective
    if objective == 'betavae':
      cell.vae_weight_rec, cell.vae_weight_kl = cell.weight_rec, cell.weight_kl
    if not objectives_lib.get(cell.objective).FUSED:
      cell.mode = 'reference'
    if cell.objective != 'vae' and cell.num_vae_steps >= cell.num_train_steps:
      raise errors.UserError(
          f'objective {objective}: num_vae_steps={cell.num_vae_steps} covers '
          f'all num_train_steps={cell.num_train_steps}, so it is a VAE; lower '
          '--config.num_vae_steps.')
  return cell.lock()


def better(metric: str) -> int:
  """+1 if higher is better, -1 if lower is better, 0 if neither."""
  if metric in HIGHER_IS_BETTER:
    return 1
  if metric in LOWER_IS_BETTER or metric.startswith('swd'):
    return -1
  return 0


def summarize(values: Sequence[float]) -> Dict[str, float]:
  """mean, std (sample std, ddof=1; 0 for one value), median, quartiles q1
  and q3 (linear interpolation between order statistics, numpy's default)
  and n of the finite values."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)],
                 np.float64)
  if not len(v):
    nan = float('nan')
    return dict(mean=nan, std=nan, median=nan, q1=nan, q3=nan, n=0)
  q1, median, q3 = (float(q) for q in np.percentile(v, (25, 50, 75)))
  return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1
              else 0.0, median=median, q1=q1, q3=q3, n=int(len(v)))


def contrast(base: Dict[str, float], other: Dict[str, float], metric: str):
  """How much `other` improves on `base`: {'gain': relative improvement of
  the mean (0.2 = 20% better), 'gap_in_std': improvement of the mean over the
  larger of the two stds}, positive when `other` is better; either is None
  where it is undefined (a base mean of 0, no spread on either side)."""
  sign = better(metric)
  if not sign or not base['n'] or not other['n']:
    return None
  diff = sign * (other['mean'] - base['mean'])
  spread = max(base['std'], other['std'])
  return dict(gain=diff / abs(base['mean']) if base['mean'] else None,
              gap_in_std=diff / spread if spread else None)


def table(cells: List[dict], objectives: Sequence[str]) -> dict:
  """{'metrics': {metric: {objective: summary}}, 'contrasts': {objective:
  {metric: contrast against objectives[0]}}, 'seeds': {objective: [..]},
  'per_seed': {metric in PER_SEED: {objective: [value by seed]}}}."""
  names = sorted({m for c in cells for m in c['metrics']})
  by_obj = {o: sorted((c for c in cells if c['objective'] == o),
                      key=lambda c: c['seed']) for o in objectives}
  metrics = {m: {o: summarize([c['metrics'].get(m) for c in by_obj[o]])
                 for o in objectives} for m in names}
  contrasts = {o: {m: contrast(metrics[m][objectives[0]], metrics[m][o], m)
                   for m in names} for o in objectives[1:]}
  return dict(metrics=metrics, contrasts=contrasts,
              seeds={o: [c['seed'] for c in by_obj[o]] for o in objectives},
              per_seed={m: {o: [c['metrics'].get(m) for c in by_obj[o]]
                            for o in objectives}
                        for m in PER_SEED if m in names})


def _cell(s: Dict[str, float], quartiles: bool) -> str:
  if not s['n']:
    return 'n/a'
  text = f'{s["mean"]:.4g} +- {s["std"]:.2g}'
  if quartiles:
    text += f'; {s["median"]:.4g} [{s["q1"]:.4g}, {s["q3"]:.4g}]'
  return text


def markdown(summary: dict, objectives: Sequence[str], title: str) -> str:
  """The table as markdown: one row per metric, mean +- std per objective
  (and median [q1, q3] from QUARTILES_FROM seeds a side); then the PER_SEED
  metrics seed by seed."""
  base = objectives[0]
  seeds = summary['seeds']
  quartiles = max(len(seeds[o]) for o in objectives) >= QUARTILES_FROM
  head = ['metric'] + [f'{o} (n={len(seeds[o])})' for o in objectives]
  head += [f'{o} vs {base}: gain, gap/std' for o in objectives[1:]]
  lines = [f'# {title}', '',
           'Mean +- sample std (ddof=1) over seeds '
           + ', '.join(f'{o}: {seeds[o]}' for o in objectives)
           + ('; median [first quartile, third quartile]' if quartiles
              else '')
           + '. gain: relative improvement of the mean over '
           f'`{base}` (positive = better); gap/std: the improvement over the '
           'larger std of the two.', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for metric, row in summary['metrics'].items():
    cols = [metric] + [_cell(row[o], quartiles) for o in objectives]
    for o in objectives[1:]:
      c = summary['contrasts'][o][metric]
      if c is None:
        cols.append('')
        continue
      gain = 'n/a' if c['gain'] is None else f'{100 * c["gain"]:+.1f}%'
      gap = 'n/a' if c['gap_in_std'] is None else f'{c["gap_in_std"]:+.1f}'
      cols.append(f'{gain}, {gap}')
    lines.append('| ' + ' | '.join(cols) + ' |')
  for metric, by_objective in summary['per_seed'].items():
    lines += ['', f'{metric}, seed by seed:', '']
    lines += [f'- {o} (seeds {seeds[o]}): '
              + ' '.join('n/a' if v is None else f'{v:.4g}'
                         for v in by_objective[o]) for o in objectives]
  return '\n'.join(lines) + '\n'


def kl_history(workdir: str) -> Dict[str, List[float]]:
  """{'step': [...], 'kl_real': [...], 'kl_rec': [...], 'kl_fake': [...], and
  the other `toy2d.HISTORY_TAGS` the objective logs}: the training scalars of
  a run's TensorBoard event files (later files win)."""
  import tensorflow as tf
  from introvae_jax import toy2d
  values: Dict[str, Dict[int, float]] = {t: {} for t in toy2d.HISTORY_TAGS}
  for path in sorted(tf.io.gfile.glob(
      str(workdir_lib.path(workdir, 'events.out.tfevents.*')))):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for v in event.summary.value:
        if v.tag in values:
          values[v.tag][int(event.step)] = float(tf.make_ndarray(v.tensor))
  values = {t: v for t, v in values.items() if v}
  steps = sorted(set.intersection(*(set(v) for v in values.values())))
  return dict(step=steps, **{t: [values[t][s] for s in steps] for t in values})


# Training scalars an objective adds, reported in the tables at their last
# logged value (`train_<tag>`; Soft-IntroVAE's kl_gap is its authors'
# diff_kl: KL of prior samples minus KL of real images).
TRAIN_SCALARS = ('kl_gap', 'expelbo_rec', 'expelbo_fake')


def _with_training_scalars(metrics: dict, history: dict) -> dict:
  return dict(metrics, **{f'train_{t}': history[t][-1] for t in TRAIN_SCALARS
                          if history.get(t)})


def _grids(workdir: str, results: epath.Path, name: str, num_images: int):
  """Writes <name>_samples.png (fixed prior noise, the same for every cell)
  and <name>_reconstructions.png (the first held-out images over their
  reconstructions)."""
  import jax
  from introvae_jax import checkpointing
  from introvae_jax import input_pipeline
  from introvae_jax import parallel

  config, state = checkpointing.load_run(workdir, mesh=parallel.make_mesh())
  z = jax.random.normal(jax.random.PRNGKey(0), (num_images, config.hdim))
  sampling.save_png(str(results / f'{name}_samples.png'), sampling.image_grid(
      sampling.decode(state, z, config)))
  real = input_pipeline.eval_images(config, num_images // 2)
  rec = np.asarray(sampling.reconstruct(state, real, config))
  pairs = np.concatenate([real[:8], rec[:8], real[8:16], rec[8:16]])
  sampling.save_png(str(results / f'{name}_reconstructions.png'),
                    sampling.image_grid(pairs))


def is_toy(config) -> bool:
  """Whether `config` is a 2-D toy recipe (configs/toy2d.py), run by toy2d."""
  return 'toy' in config


def _run_toy(config, run_dir: str, results: epath.Path, name: str, signals):
  """One 2-D toy cell through `toy2d.run` (resuming from its checkpoints);
  (metrics, KL history), or None when a stop signal ended it."""
  from introvae_jax import toy2d
  metrics = toy2d.run(config, run_dir, log=logging.info, signals=signals)
  if metrics is None:
    return None
  dataset = config.toy.dataset
  stored = json.loads((epath.Path(run_dir) / f'{dataset}_results.json'
                       ).read_text())
  (results / f'{name}_samples.png').write_bytes(
      (epath.Path(run_dir) / f'{dataset}_samples.png').read_bytes())
  return metrics, stored['kl_history']


def as_json(config) -> dict:
  """A config as the JSON a cell's results file stores."""
  return json.loads(json.dumps(config.to_dict(), default=list))


def _check_stored(path: epath.Path, stored: dict, config,
                  objective: str) -> None:
  """UserError unless the results file was made with `config`'s identity
  fields (those a resume may not change and the objective reads)."""
  changes = [c for c in configuration.identity_changes(stored['config'],
                                                       as_json(config))
             if c[0] not in UNREAD[objective]]
  if changes:
    listed = '; '.join(f'{n}: {a!r} -> {b!r}' for n, a, b in changes)
    raise errors.UserError(
        f'{path} holds the results of another recipe ({listed}); delete it to '
        'run the cell again, or pass another --results folder.')


def run_cell(config, objective: str, seed: int, workdir: str,
             results: epath.Path, *, num_images: int = 1000) -> Optional[dict]:
  """Trains and evaluates one cell unless its results file exists; returns
  its results, or None when a stop signal interrupted the training. Image
  recipes go through the training program, 2-D toy recipes (configs/toy2d.py)
  through `toy2d.run`."""
  from introvae_jax import evaluation
  from introvae_jax import stopping
  from introvae_jax import train

  name = cell_name(objective, seed)
  cell = cell_config(config, objective, seed)
  path = results / f'{name}.json'
  if path.exists():
    stored = json.loads(path.read_text())
    _check_stored(path, stored, cell, objective)
    logging.info('%s: results exist (%s), skipped.', name, path)
    return stored
  run_dir = str(workdir_lib.path(workdir, name))
  logging.info('%s: training in %s', name, run_dir)
  signals = stopping.StopSignals()
  if is_toy(cell):
    done = _run_toy(cell, run_dir, results, name, signals)
    if done is None:
      return None
    metrics, history = done
  else:
    train.train_and_evaluate(cell, run_dir, signals=signals)
    if signals.stopped is not None:
      return None
    metrics, _ = evaluation.evaluate_workdir(
        run_dir, num_images=num_images, classifier_path=cell.digit_classifier
        or None, inception_path=cell.fid_weights or None, log=logging.info)
    _grids(run_dir, results, name, NUM_GRID_IMAGES)
    history = kl_history(run_dir)
  out = dict(objective=objective, seed=seed, step=cell.num_train_steps,
             workdir=run_dir,
             metrics=_with_training_scalars(metrics, history),
             kl_history=history,
             config=as_json(cell))
  path.write_text(json.dumps(out, indent=1))
  return out


def figure(cells: List[dict], objectives: Sequence[str], results: epath.Path,
           m_plus: float) -> str:
  """figure.png: per objective, its first seed's samples (same prior noise)
  and reconstructions (same held-out images), and the KL of real /
  reconstructed / sampled images over training (mean over seeds), with
  IntroVAE's margin m_plus in its own panel."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from PIL import Image

  firsts = {o: sorted((c for c in cells if c['objective'] == o),
                      key=lambda c: c['seed']) for o in objectives}
  images = {}  # (kind, objective) -> array; toys have samples only
  for objective, mine in firsts.items():
    name = cell_name(objective, mine[0]['seed'])
    for kind in ('samples', 'reconstructions'):
      if (results / f'{name}_{kind}.png').exists():
        with (results / f'{name}_{kind}.png').open('rb') as f:
          images[kind, objective] = np.asarray(Image.open(f))
  kinds = [k for k in ('samples', 'reconstructions')
           if any((k, o) in images for o in objectives)]
  width = 5.0  # inches per objective
  heights = [width * max(a.shape[0] / a.shape[1] for (k, _), a in
                         images.items() if k == kind) + 0.4 for kind in kinds]
  fig, axes = plt.subplots(
      len(kinds) + 1, len(objectives), squeeze=False,
      figsize=(width * len(objectives), sum(heights) + 4),
      gridspec_kw=dict(height_ratios=heights + [4]))
  for col, objective in enumerate(objectives):
    mine = firsts[objective]
    for row, kind in enumerate(kinds):
      ax = axes[row][col]
      ax.axis('off')
      if (kind, objective) in images:
        ax.imshow(images[kind, objective], cmap='gray')
        ax.set_title(f'{objective}: {kind} (seed {mine[0]["seed"]})')
    ax = axes[len(kinds)][col]
    steps = mine[0]['kl_history']['step']
    for tag, color in (('kl_real', 'C0'), ('kl_rec', 'C1'), ('kl_fake', 'C3')):
      runs = [c['kl_history'][tag] for c in mine
              if c['kl_history']['step'] == steps]
      ax.plot(steps, np.mean(runs, axis=0), color=color, label=tag)
    if objective == 'introvae':
      ax.axhline(m_plus, color='k', ls='--', lw=1, label='m_plus')
    warm = mine[0]['config']['num_vae_steps']
    if warm < mine[0]['step']:
      ax.axvline(warm, color='gray', ls=':', lw=1, label='end of warm-up')
    ax.set_xlabel('step')
    seeds = f'mean of {len(mine)} seeds' if len(mine) > 1 else 'one seed'
    ax.set_title(f'{objective}: training KL ({seeds})')
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = results / 'figure.png'
  with path.open('wb') as f:
    fig.savefig(f, dpi=80, format='png')
  plt.close(fig)
  return str(path)


def compare(config, objectives: Sequence[str], seeds: Sequence[int],
            workdir: str, results: Optional[str] = None, *,
            num_images: int = 1000, title: str = '',
            train: bool = True) -> Optional[dict]:
  """Runs (or reuses) every cell, then writes table.md, table.json and
  figure.png into `results` (default <workdir>/results); returns the table,
  or None when a stop signal interrupted a cell (rerun to resume). With
  `train=False` the tables come from the stored cells alone (a grid still
  filling in); cells without a results file are left out and logged."""
  configuration.validate(config)
  for o in objectives:
    cell_config(config, o, 0)  # every objective is valid before any training
  results = epath.Path(results or workdir_lib.path(workdir, 'results'))
  results.mkdir(parents=True, exist_ok=True)
  cells, missing = [], []
  for seed in seeds:
    for objective in objectives:
      name = cell_name(objective, seed)
      if not train and not (results / f'{name}.json').exists():
        missing.append(name)
        continue
      cell = run_cell(config, objective, seed, workdir, results,
                      num_images=num_images)
      if cell is None:
        logging.warning('Stopped; rerun the same command to continue.')
        return None
      cells.append(cell)
  if missing:
    logging.warning('Not run yet, left out of the tables: %s.',
                    ', '.join(missing))
  empty = [o for o in objectives if not any(c['objective'] == o for c in cells)]
  if empty:
    raise errors.UserError(f'No stored results in {results} for objective(s) '
                           f'{", ".join(empty)}; run them without --notrain.')
  summary = table(cells, objectives)
  summary['config'] = as_json(config)
  (results / 'table.json').write_text(json.dumps(summary, indent=1))
  (results / 'table.md').write_text(markdown(
      summary, objectives, title or f'{" vs ".join(objectives)}, '
      f'{config.toy.dataset if is_toy(config) else config.dataset}, '
      f'{config.num_train_steps} steps'))
  figure(cells, objectives, results, config.m_plus)
  logging.info('Tables and figure in %s', results)
  return summary


def main(argv):
  """`python -m introvae_jax.compare`: trains the missing cells, writes the
  tables and the figure."""
  del argv
  from absl import flags
  from introvae_jax import checkpointing
  checkpointing.quiet_orbax_logs()
  f = flags.FLAGS
  objectives = [o.strip() for o in f.objectives.split(',') if o.strip()]
  try:
    seeds = [int(s) for s in f.seeds.split(',') if s.strip()]
  except ValueError as e:
    raise errors.UserError(f'--seeds={f.seeds!r}: use integers separated by '
                           'commas, e.g. --seeds=0,1,2.') from e
  if not objectives or not seeds:
    raise errors.UserError('--objectives and --seeds need at least one entry.')
  summary = compare(f.config, objectives, seeds, f.workdir, f.results,
                    num_images=f.num_images, train=f.train)
  if summary is None:
    raise SystemExit(130)
  print(markdown(summary, objectives, 'Comparison'))


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  from introvae_jax import cli
  config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. '
                                  'configs/default.py.', lock_config=True)
  flags.DEFINE_string('objectives', 'vae,introvae', 'Comma-separated; the '
                      'first is the baseline.')
  flags.DEFINE_string('seeds', '0,1,2', 'Comma-separated seeds.')
  flags.DEFINE_string('workdir', None, 'Folder of the training runs.',
                      required=True)
  flags.DEFINE_string('results', None, 'Folder of the per-cell results, '
                      'tables and figure (default: <workdir>/results).')
  flags.DEFINE_integer('num_images', 1000, 'Evaluation images (held-out '
                       'where the recipe holds images out).', lower_bound=2)
  flags.DEFINE_bool('train', True, 'Run the missing cells; --notrain builds '
                    'the tables and figure from the stored results only.')
  flags.mark_flag_as_required('config')
  cli.run(main)
