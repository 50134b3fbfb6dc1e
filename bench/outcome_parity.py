"""Outcome parity: the authors' own training loops beside this project's, on
the same batches, budget, network and evaluation, over seeds.

  python bench/outcome_parity.py --intro_vae=~/src/IntroVAE \\
      --soft_intro_vae=~/src/soft-intro-vae-pytorch \\
      --authors_python=~/venvs/torch/bin/python --seeds=0,1,2
  python bench/outcome_parity.py --table        # the table from stored cells

The authors' code is read at run time from checkouts of their public
repositories that you point to (hhb072/IntroVAE, taldatech/
soft-intro-vae-pytorch); nothing of theirs is in this project. Their loop
runs in a child process (`bench/authors_loop.py`, which lists the shims it
needs on a CPU) under `--authors_python`, an interpreter with torch and
torchvision; this project's run is an ordinary `compare` cell.

The recipe is the offline default's (`configs/default.py`: digits at 32 px,
widths 16/32/64, hdim 32, batch 64, 2,000 steps with 500 VAE warm-up steps)
with PyTorch's initialisation (`init='pytorch'`) and, for Soft-IntroVAE, its
residual block and its MNIST betas (1, 1, 256). Per (objective, seed), both
sides see the batches of this project's input pipeline for that seed, in the
same order: the authors' loop reads them from a file written from
`input_pipeline.create_input_iter`. The authors' trained model is imported
with `convert` and both are scored by `evaluation.evaluate_workdir` (1,000
held-out digits, the same sampling seed).

A cell's results go to `<results>/<side>/<objective>_seed<k>.json` (side:
`authors` or `project`); a cell whose file exists is not run again, so the
grid fills in across sessions. Then `<results>/table.md` and `table.json`:
per objective and metric, each side's mean and std over seeds and Welch's
two-sample t-test. Cells take about an hour of one core each; run one
process per core (`--objectives=`, `--seeds=`, `--sides=` split the grid).
"""

import json
import math
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ('authors', 'project')
OBJECTIVES = ('introvae', 'soft_introvae')
# What the table shows, in this order (compare.LOWER_IS_BETTER says which way).
EVAL_IMAGES = 1000  # held-out digits, as compare.run_cell scores
METRICS = ('fd_digit', 'kid_digit_mean', 'rec_psnr', 'swd_mean', 'kl_real',
           'kl_fake')

flags.DEFINE_string('intro_vae', '', 'A checkout of hhb072/IntroVAE.')
flags.DEFINE_string('soft_intro_vae', '',
                    'A checkout of taldatech/soft-intro-vae-pytorch.')
flags.DEFINE_string('authors_python', sys.executable,
                    'The interpreter for their code (torch and torchvision).')
flags.DEFINE_list('objectives', list(OBJECTIVES), 'Objectives to run.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to run.')
flags.DEFINE_list('sides', list(SIDES), 'Sides to run.')
flags.DEFINE_string('workdir', 'runs/outcome_parity', 'Where runs train.')
flags.DEFINE_string('results', 'docs/results/outcome_parity',
                    'Where cell results and the table go.')
flags.DEFINE_integer('threads', 1, 'CPU threads of the authors\' torch.')
flags.DEFINE_integer('steps', None, 'Override the budget (num_train_steps), '
                     'e.g. for a quick check into another --results.')
flags.DEFINE_integer('vae_steps', None, 'Override num_vae_steps.')
flags.DEFINE_bool('table', False, 'Only rewrite the table from stored cells.')
FLAGS = flags.FLAGS


def recipe(objective: str):
  """The shared recipe of one objective (see the module docstring)."""
  from introvae_jax import recipes  # pylint: disable=g-import-not-at-top
  config = recipes.load_recipe('default')
  with config.unlocked():
    config.init = 'pytorch'
    if objective == 'soft_introvae':
      config.residual_block = 'soft_introvae'
    if FLAGS.steps is not None:
      config.num_train_steps = FLAGS.steps
    if FLAGS.vae_steps is not None:
      config.num_vae_steps = FLAGS.vae_steps
  return config


def cpu_name() -> str:
  """The CPU's model name and whether it has AVX-512 (float32 trajectories
  differ between AVX2-only and AVX-512 CPUs)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  name = next((line.split(':', 1)[1].strip() for line in info.splitlines()
               if line.startswith('model name')), platform.machine())
  return f'{name} ({"AVX-512" if "avx512f" in info else "AVX2-only"})'


def steps_per_epoch(cell) -> int:
  """Their loops count warm-up and budget in epochs: the largest epoch that
  divides both."""
  return math.gcd(cell.num_vae_steps, cell.num_train_steps)


def write_batches(cell, path: str) -> None:
  """The project's training batches of `cell`, step 0 on, as one .npy."""
  from introvae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  batches = input_pipeline.create_input_iter(cell, num_local_devices=1)
  out = np.lib.format.open_memmap(
      path, mode='w+', dtype=np.float32,
      shape=(cell.num_train_steps, cell.batch_size, cell.image_size,
             cell.image_size, cell.image_channels))
  for i in range(cell.num_train_steps):
    out[i] = next(batches)['image']
  out.flush()
  del out


def authors_command(cell, objective: str, checkout: str, batches: str,
                    out: str) -> list:
  """The child command that runs their loop for `cell`."""
  args = [FLAGS.authors_python, os.path.join(REPO, 'bench', 'authors_loop.py'),
          f'--objective={objective}', f'--checkout={checkout}',
          f'--batches={batches}', f'--out={out}', f'--seed={cell.seed}',
          f'--num_vae_steps={cell.num_vae_steps}',
          f'--steps_per_epoch={steps_per_epoch(cell)}',
          f'--channels={",".join(map(str, cell.channels))}',
          f'--hdim={cell.hdim}', f'--lr={cell.lr_e}',
          f'--threads={FLAGS.threads}']
  if objective == 'introvae':
    args += [f'--m_plus={cell.m_plus}', f'--weight_neg={cell.weight_neg}',
             f'--weight_rec={cell.weight_rec}',
             f'--weight_kl={cell.weight_kl}']
  else:
    s = cell.soft_introvae
    args += [f'--beta_kl={s.beta_kl}', f'--beta_rec={s.beta_rec}',
             f'--beta_neg={s.beta_neg}', f'--gamma_r={s.gamma_r}']
  return args


def check_recipe(cell) -> None:
  """What their loops cannot express is refused, not silently changed."""
  from introvae_jax import errors  # pylint: disable=g-import-not-at-top
  fixed = dict(lr_g=cell.lr_e, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
               lr_boundaries=())
  for field, want in fixed.items():
    if tuple(np.ravel(cell[field])) != tuple(np.ravel(want)):
      raise errors.ConfigError(
          f'{field}={cell[field]}: the authors\' loops run with {want}.')


def run_authors_cell(config, objective: str, seed: int, workdir: str,
                     results: str, checkout: str):
  """Their loop on the project's batches, imported and scored."""
  from introvae_jax import compare  # pylint: disable=g-import-not-at-top
  from introvae_jax import convert  # pylint: disable=g-import-not-at-top
  from introvae_jax import evaluation  # pylint: disable=g-import-not-at-top

  name = compare.cell_name(objective, seed)
  path = os.path.join(results, 'authors', f'{name}.json')
  if os.path.exists(path):
    logging.info('authors %s: results exist (%s), skipped.', name, path)
    return
  if not checkout:
    flag = 'intro_vae' if objective == 'introvae' else 'soft_intro_vae'
    raise app.UsageError(f'--{flag}: pass a checkout of the authors\' '
                         'repository.')
  cell = compare.cell_config(config, objective, seed)
  check_recipe(cell)
  run_dir = os.path.abspath(os.path.join(workdir, 'authors', name))
  train_dir = os.path.join(run_dir, 'torch')
  os.makedirs(train_dir, exist_ok=True)
  batches = os.path.join(run_dir, 'batches.npy')
  logging.info('authors %s: writing the batches to %s', name, batches)
  write_batches(cell, batches)
  command = authors_command(cell, objective, os.path.abspath(
      os.path.expanduser(checkout)), batches, train_dir)
  logging.info('authors %s: %s', name, ' '.join(command))
  start = time.time()
  with open(os.path.join(run_dir, 'torch.log'), 'w', encoding='utf-8') as log:
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
  os.remove(batches)
  with open(os.path.join(train_dir, 'trained.json'), encoding='utf-8') as f:
    trained = json.load(f)
  model_dir = os.path.join(run_dir, 'model')
  convert.convert_reference(os.path.join(train_dir, 'trained.pth'), model_dir,
                            config=cell)
  metrics, _ = evaluation.evaluate_workdir(
      model_dir, num_images=EVAL_IMAGES,
      classifier_path=cell.digit_classifier or None, log=logging.info)
  out = dict(side='authors', objective=objective, seed=seed,
             step=cell.num_train_steps, metrics=metrics,
             seconds=round(time.time() - start, 1), cpu=cpu_name(),
             train=trained, checkout=_revision(checkout),
             command=' '.join(command[1:]),
             config=compare.as_json(cell))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=1)


def _revision(checkout: str) -> str:
  try:
    return subprocess.run(
        ['git', '-C', os.path.expanduser(checkout), 'rev-parse', 'HEAD'],
        capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def run_project_cell(config, objective: str, seed: int, workdir: str,
                     results: str):
  """A `compare` cell, with the CPU and the seconds it took added."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from introvae_jax import compare  # pylint: disable=g-import-not-at-top
  folder = epath.Path(results) / 'project'
  path = folder / f'{compare.cell_name(objective, seed)}.json'
  if path.exists():
    logging.info('project %s: results exist (%s), skipped.', path.stem, path)
    return
  check_recipe(compare.cell_config(config, objective, seed))
  start = time.time()
  out = compare.run_cell(config, objective, seed,
                         os.path.join(workdir, 'project'), folder,
                         num_images=EVAL_IMAGES)
  if out is not None:  # None: a stop signal interrupted it
    out.update(side='project', cpu=cpu_name(),
               seconds=round(time.time() - start, 1))
    path.write_text(json.dumps(out, indent=1))


def welch(a, b):
  """Welch's two-sample t-test: (t, p), None with fewer than 2 a side or no
  spread."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a, float), np.asarray(b, float)
  if min(len(a), len(b)) < 2 or not (a.std() or b.std()):
    return None
  result = stats.ttest_ind(a, b, equal_var=False)
  return float(result.statistic), float(result.pvalue)


def load_cells(results: str) -> list:
  cells = []
  for side in SIDES:
    folder = os.path.join(results, side)
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      if name.endswith('.json'):
        with open(os.path.join(folder, name), encoding='utf-8') as f:
          cell = json.load(f)
        cell['side'] = side
        cells.append(cell)
  return cells


def summary(cells: list) -> dict:
  """{objective: {metric: {side: summary, 'welch': (t, p)}}}."""
  from introvae_jax import compare  # pylint: disable=g-import-not-at-top
  out = {}
  for objective in OBJECTIVES:
    rows = {}
    for metric in METRICS:
      values = {side: [c['metrics'].get(metric) for c in cells
                       if c['side'] == side and c['objective'] == objective]
                for side in SIDES}
      if not any(values.values()):
        continue
      row = {side: compare.summarize(v) for side, v in values.items()}
      row['seeds'] = {side: sorted(c['seed'] for c in cells
                                   if c['side'] == side
                                   and c['objective'] == objective)
                      for side in SIDES}
      row['welch'] = welch(*(values[s] for s in SIDES))
      rows[metric] = row
    if rows:
      out[objective] = rows
  return out


def markdown(table: dict, cells: list) -> str:
  cpus = sorted({c.get('cpu', '?') for c in cells})
  steps = sorted({c['step'] for c in cells})
  lines = ['# The authors\' training loops and this project\'s, digits, '
           f'{"/".join(map(str, steps))} steps', '',
           'Mean +- sample std over the seeds in brackets; Welch\'s two-sample '
           't-test of the two sides (t, p); `python bench/outcome_parity.py`.',
           '', '| objective | metric | authors\' loop (seeds) | this project '
           '(seeds) | Welch t, p |', '|---|---|---|---|---|']
  for objective, rows in table.items():
    for metric, row in rows.items():
      cols = []
      for side in SIDES:
        s = row[side]
        seeds = ','.join(map(str, row['seeds'][side]))
        spread = f' +- {s["std"]:.2g}' if s['n'] > 1 else ''
        cols.append(f'{s["mean"]:.4g}{spread} ({seeds})' if s['n'] else '-')
      w = row['welch']
      test = '-' if w is None else f'{w[0]:+.2f}, {w[1]:.2g}'
      lines.append(f'| {objective} | {metric} | {cols[0]} | {cols[1]} | '
                   f'{test} |')
  return ('\n'.join(lines) + '\n\nCPUs: ' + '; '.join(cpus) + '\n')


def write_table(results: str) -> str:
  cells = load_cells(results)
  table = summary(cells)
  text = markdown(table, cells)
  with open(os.path.join(results, 'table.json'), 'w', encoding='utf-8') as f:
    json.dump(table, f, indent=1)
  with open(os.path.join(results, 'table.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  return text


def main(argv):
  del argv
  results = os.path.join(REPO, FLAGS.results) if not os.path.isabs(
      FLAGS.results) else FLAGS.results
  if not FLAGS.table:
    unknown = (set(FLAGS.objectives) - set(OBJECTIVES)
               or set(FLAGS.sides) - set(SIDES))
    if unknown:
      raise app.UsageError(f'unknown {sorted(unknown)}; objectives: '
                           f'{OBJECTIVES}, sides: {SIDES}.')
    checkouts = dict(introvae=FLAGS.intro_vae,
                     soft_introvae=FLAGS.soft_intro_vae)
    for objective in FLAGS.objectives:
      config = recipe(objective)
      for seed in map(int, FLAGS.seeds):
        if 'authors' in FLAGS.sides:
          run_authors_cell(config, objective, seed, FLAGS.workdir, results,
                           checkouts[objective])
        if 'project' in FLAGS.sides:
          run_project_cell(config, objective, seed, FLAGS.workdir, results)
  print(write_table(results))


if __name__ == '__main__':
  app.run(main)
