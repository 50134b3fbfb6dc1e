"""The comparison command: cells through the training program, tables from the
per-cell files, skipping what exists, refusing another recipe's results."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from introvae_jax import compare
from introvae_jax import errors
from introvae_jax import toy2d
from train_utils import REPO, env, scalars, tiny_config


def test_summaries_and_contrasts_by_hand():
  s = compare.summarize([3.0, 5.0, 10.0])
  assert s['n'] == 3 and s['mean'] == pytest.approx(6.0)
  # Sample std: sqrt(((3-6)^2 + (5-6)^2 + (10-6)^2) / 2) = sqrt(13).
  assert s['std'] == pytest.approx(np.sqrt(13.0))
  # Quartiles between order statistics: rank (n - 1) * q of 3, 5, 10.
  assert (s['median'], s['q1'], s['q3']) == (5.0, 4.0, 7.5)
  assert compare.summarize([4.0]) == dict(mean=4.0, std=0.0, median=4.0,
                                          q1=4.0, q3=4.0, n=1)
  assert compare.summarize([float('nan'), 2.0])['n'] == 1
  base, other = (dict(mean=200.0, std=5.0, n=3),
                 dict(mean=150.0, std=10.0, n=3))
  fd = compare.contrast(base, other, 'fd_digit')      # lower is better
  assert (fd['gain'] == pytest.approx(0.25)
          and fd['gap_in_std'] == pytest.approx(5.0))
  psnr = compare.contrast(base, other, 'rec_psnr')    # higher is better
  assert psnr['gain'] == pytest.approx(-0.25)
  assert compare.contrast(base, other, 'swd_32')['gain'] == pytest.approx(0.25)
  assert compare.contrast(base, other, 'kl_real') is None  # no direction
  # A base mean of 0 (the VAE's 0 modes) has no relative gain; no spread on
  # either side has no gap in stds. Both are None in JSON, 'n/a' in markdown.
  zero, eight = dict(mean=0.0, std=0.0, n=1), dict(mean=8.0, std=0.0, n=3)
  modes = compare.contrast(zero, eight, 'modes_covered')
  assert modes == dict(gain=None, gap_in_std=None)
  summary = dict(metrics={'modes_covered': dict(vae=zero, introvae=eight)},
                 contrasts=dict(introvae={'modes_covered': modes}),
                 seeds=dict(vae=[0], introvae=[0, 1, 2]), per_seed={})
  row = compare.markdown(summary, ['vae', 'introvae'], 't').splitlines()[-1]
  assert row == '| modes_covered | 0 +- 0 | 8 +- 0 | n/a, n/a |'


def test_from_five_seeds_a_side_the_table_gives_quartiles_and_modes_by_seed():
  kls = [1.5, 1.4, 55.6, 2.0, 30.0]
  cells = [dict(objective='soft_introvae', seed=s,
                metrics=dict(kl=kl, modes_covered=6 if kl > 10 else 8))
           for s, kl in zip((4, 0, 2, 3, 1), kls)]
  cells += [dict(objective='introvae', seed=s,
                 metrics=dict(kl=3.0 + s, modes_covered=8)) for s in (0, 1)]
  summary = compare.table(cells, ['introvae', 'soft_introvae'])
  assert summary['seeds']['soft_introvae'] == [0, 1, 2, 3, 4]
  # Sorted KLs 1.4 1.5 2.0 30.0 55.6: median 2.0, quartiles at ranks 1, 3.
  kl = summary['metrics']['kl']['soft_introvae']
  assert (kl['median'], kl['q1'], kl['q3']) == (2.0, 1.5, 30.0)
  text = compare.markdown(summary, ['introvae', 'soft_introvae'], 't')
  # Mean 90.5 / 5; sample std sqrt(2361.52 / 4) = 24.3.
  assert '| 18.1 +- 24; 2 [1.5, 30] |' in text
  assert '- soft_introvae (seeds [0, 1, 2, 3, 4]): 8 6 6 8 8' in text
  assert '- introvae (seeds [0, 1]): 8 8' in text
  # Below five seeds a side: mean +- std only, as before.
  few = compare.table(cells[:3], ['soft_introvae'])
  assert '; ' not in compare.markdown(few, ['soft_introvae'], 't').split(
      '| kl |')[1].splitlines()[0]


def test_vae_cell_is_the_vae_objective():
  config = tiny_config(num_train_steps=7, num_vae_steps=2, m_plus=9.0)
  vae = compare.cell_config(config, 'vae', 3)
  intro = compare.cell_config(config, 'introvae', 3)
  soft = compare.cell_config(config, 'soft_introvae', 3)
  assert (vae.objective, vae.seed) == ('vae', 3)
  assert ((intro.objective, intro.num_vae_steps, intro.seed)
          == ('introvae', 2, 3))
  assert soft.objective == 'soft_introvae'
  assert {k for k in config if vae[k] != intro[k]} == {'objective'}
  with pytest.raises(errors.UserError, match='covers all num_train_steps'):
    compare.cell_config(tiny_config(num_train_steps=2, num_vae_steps=2),
                        'introvae', 0)
  with pytest.raises(errors.UserError, match="Unknown objective 'gan'"):
    compare.cell_config(config, 'gan', 0)
  # A fused recipe: the objectives without a fused form run in reference mode.
  fused = tiny_config(num_train_steps=7, mode='fused')
  assert compare.cell_config(fused, 'introvae', 0).mode == 'fused'
  assert compare.cell_config(fused, 'soft_introvae', 0).mode == 'reference'


def test_betavae_cell_is_the_vae_with_the_recipes_weights():
  config = tiny_config(num_train_steps=7, num_vae_steps=2, weight_rec=4.0,
                       weight_kl=0.5)
  beta = compare.cell_config(config, 'betavae', 1)
  vae = compare.cell_config(config, 'vae', 1)
  assert (beta.objective, beta.vae_weight_rec, beta.vae_weight_kl) == (
      'vae', 4.0, 0.5)
  assert (vae.vae_weight_rec, vae.vae_weight_kl) == (1.0, 1.0)
  assert {k for k in config if beta[k] != vae[k]} == {'vae_weight_rec',
                                                      'vae_weight_kl'}


def test_cells_stored_before_the_objective_field_are_still_valid(tmp_path):
  """The committed results: a `vae` cell then ran IntroVAE's warm-up over
  every step (num_vae_steps = num_train_steps) and stored no `objective`."""
  config = tiny_config(num_train_steps=7, num_vae_steps=2)
  for name in ('vae', 'betavae', 'introvae'):
    stored = compare.as_json(compare.cell_config(config, name, 0))
    del stored['objective'], stored['soft_introvae']
    if name != 'introvae':
      stored['num_vae_steps'] = 7
    compare._check_stored(tmp_path / 'c.json', dict(config=stored),
                          compare.cell_config(config, name, 0), name)


@pytest.mark.parametrize('objective,field,value,refused', [
    ('vae', 'm_plus', 6.0, False), ('vae', 'weight_rec', 2.0, False),
    ('vae', 'lr_e', 1e-3, True),
    ('betavae', 'm_plus', 6.0, False), ('betavae', 'weight_neg', 0.1, False),
    ('betavae', 'weight_rec', 2.0, True),
    ('introvae', 'm_plus', 6.0, True),
    ('introvae', 'vae_weight_rec', 2.0, True),
    ('soft_introvae', 'm_plus', 6.0, False),
    ('soft_introvae', 'num_vae_steps', 3, True),
    ('vae', 'num_vae_steps', 3, False),
])
def test_stored_cell_is_refused_only_for_fields_its_objective_reads(
    tmp_path, objective, field, value, refused):
  config = tiny_config(num_train_steps=7, num_vae_steps=2, weight_rec=4.0)
  stored = dict(config=compare.as_json(compare.cell_config(config, objective,
                                                            0)))
  changed = config.copy_and_resolve_references()
  with changed.unlocked():
    changed[field] = value
  cell = compare.cell_config(changed, objective, 0)
  path = tmp_path / 'cell.json'
  if refused:
    with pytest.raises(errors.UserError,
                       match=rf'another recipe \((.*; )?{field}: '):
      compare._check_stored(path, stored, cell, objective)
  else:
    compare._check_stored(path, stored, cell, objective)


def _cell_files(results):
  return sorted(f for f in os.listdir(results) if f.endswith('_seed0.json')
                or f.endswith('_seed1.json'))


@pytest.mark.slow
def test_grid_tables_figure_skip_and_refusal(tmp_path, cache_dir):
  """Two objectives x two seeds on the tiny model: each cell is a training
  run whose TensorBoard log shows its objective, the table is the per-cell
  files' mean and sample std, a rerun trains nothing, another recipe's
  results are refused."""
  del cache_dir
  config = tiny_config(num_train_steps=4, num_vae_steps=2,
                       eval_split_fraction=0.2, checkpoint_every_steps=2)
  workdir, results = str(tmp_path / 'runs'), str(tmp_path / 'results')
  summary = compare.compare(config, ['vae', 'introvae'], [0, 1], workdir,
                            results, num_images=16)
  assert _cell_files(results) == ['introvae_seed0.json', 'introvae_seed1.json',
                                  'vae_seed0.json', 'vae_seed1.json']
  cells = {f[:-5]: json.load(open(os.path.join(results, f)))
           for f in _cell_files(results)}
  for name, cell in cells.items():
    phase = scalars(cell['workdir'])['vae_phase']
    if name.startswith('vae'):
      assert set(phase.values()) == {1.0}
    else:
      assert phase[4] == 0.0
    assert cell['kl_history']['step'][-1] == 4
    assert os.path.exists(os.path.join(results, f'{name}_samples.png'))
  # Same seed, same warm-up: the two objectives agree until the warm-up ends.
  assert (scalars(cells['vae_seed0']['workdir'])['loss_rec'][2] ==
          scalars(cells['introvae_seed0']['workdir'])['loss_rec'][2])
  for metric in ('fd_digit', 'swd_16', 'rec_psnr', 'kl_fake'):
    for objective in ('vae', 'introvae'):
      values = [cells[f'{objective}_seed{s}']['metrics'][metric]
                for s in (0, 1)]
      row = summary['metrics'][metric][objective]
      assert row['mean'] == pytest.approx(np.mean(values))
      assert row['std'] == pytest.approx(np.std(values, ddof=1))
  stored = json.load(open(os.path.join(results, 'table.json')))
  assert stored['metrics']['fd_digit'] == summary['metrics']['fd_digit']
  table_md = open(os.path.join(results, 'table.md')).read()
  assert '| fd_digit |' in table_md and 'introvae vs vae' in table_md
  assert os.path.getsize(os.path.join(results, 'figure.png')) > 10_000

  # A rerun trains nothing: every cell's workdir is untouched.
  mtimes = {n: os.path.getmtime(c['workdir']) for n, c in cells.items()}
  events = {n: sorted(os.listdir(c['workdir'])) for n, c in cells.items()}
  again = compare.compare(config, ['vae', 'introvae'], [0, 1], workdir,
                          results, num_images=16)
  assert again['metrics'] == summary['metrics']
  for n, c in cells.items():
    assert sorted(os.listdir(c['workdir'])) == events[n]
    assert os.path.getmtime(c['workdir']) == mtimes[n]
  # Logging fields may change; the recipe may not.
  compare.compare(tiny_config(num_train_steps=4, num_vae_steps=2,
                              eval_split_fraction=0.2, checkpoint_every_steps=2,
                              log_every_steps=1), ['vae'], [0], workdir,
                  results, num_images=16)
  # A VAE cell never reads the hinge's fields: its results serve m_plus 6 too
  # (nothing trains); an IntroVAE cell's do not.
  other = tiny_config(num_train_steps=4, num_vae_steps=2, m_plus=6.0,
                      weight_neg=0.25, eval_split_fraction=0.2,
                      checkpoint_every_steps=2)
  compare.compare(other, ['vae'], [0], workdir, results, num_images=16)
  assert os.path.getmtime(cells['vae_seed0']['workdir']) == mtimes['vae_seed0']
  with pytest.raises(errors.UserError,
                     match=r'introvae_seed0.json holds the results of another '
                     r'recipe \(m_plus: 5.0 -> 6.0; weight_neg: .* -> 0.25\)'):
    compare.compare(other, ['introvae'], [0], workdir, results, num_images=16)
  with pytest.raises(errors.UserError,
                     match=r'vae_seed0.json holds the results of another '
                     r'recipe \(lr_e: '):
    compare.compare(tiny_config(num_train_steps=4, num_vae_steps=2, lr_e=1e-3,
                                eval_split_fraction=0.2,
                                checkpoint_every_steps=2), ['vae'], [0],
                    workdir, results, num_images=16)


def test_command_line_reports_bad_seeds_in_one_line(tmp_path, cache_dir):
  cmd = [sys.executable, '-m', 'introvae_jax.compare',
         '--config=' + os.path.join(REPO, 'configs', 'default.py'),
         f'--workdir={tmp_path}', '--seeds=0,one']
  proc = subprocess.run(cmd, cwd=REPO, env=env(cache_dir), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "compare.py: error: --seeds='0,one': use integers separated by commas, "
      'e.g. --seeds=0,1,2.')


def test_toy_cells_go_through_the_toy_protocol(tmp_path):
  config = toy2d.toy_config('8gaussians')
  config.mlp_hidden, config.batch_size = (16, 16, 16), 64
  config.num_train_steps, config.num_vae_steps, config.log_every_steps = (
      40, 20, 20)
  config.lr_boundaries = (30,)
  config.toy.num_eval_points, config.toy.grid_points = 500, 32
  config.toy.num_elbo_points, config.toy.num_plot_points = 200, 64
  results = tmp_path / 'results'
  summary = compare.compare(config, ['vae', 'introvae', 'soft_introvae'], [0],
                            str(tmp_path / 'runs'), str(results))
  vae = json.load(open(results / 'vae_seed0.json'))
  assert vae['config']['objective'] == 'vae'
  assert vae['kl_history']['step'] == [20, 40]  # every log_every_steps
  soft = json.load(open(results / 'soft_introvae_seed0.json'))
  assert soft['config']['soft_introvae']['beta_neg'] == 0.9  # 8 Gaussians
  assert summary['metrics']['jsd']['soft_introvae']['n'] == 1
  # Soft-IntroVAE's own training scalars reach its history and the table.
  assert {'kl_gap', 'expelbo_rec', 'expelbo_fake'} <= set(soft['kl_history'])
  assert 'kl_gap' not in vae['kl_history']
  gap = summary['metrics']['train_kl_gap']
  assert gap['soft_introvae']['n'] == 1 and gap['introvae']['n'] == 0
  assert '| train_kl_gap | n/a | n/a |' in (results / 'table.md').read_text()
  assert 0 <= vae['metrics']['modes_covered'] <= 8
  assert summary['metrics']['jsd']['introvae']['n'] == 1
  assert (results / 'introvae_seed0_samples.png').exists()
  assert (results / 'figure.png').exists()
  assert (results / 'table.md').read_text().startswith(
      '# vae vs introvae vs soft_introvae, 8gaussians, 40 steps\n')
  # --notrain: the tables from the stored cells alone; seed 1 is not run.
  os.remove(results / 'table.json')
  partial = compare.compare(config, ['vae', 'introvae'], [0, 1],
                            str(tmp_path / 'runs'), str(results), train=False)
  assert not (tmp_path / 'runs' / 'vae_seed1').exists()
  assert partial['seeds'] == {'vae': [0], 'introvae': [0]}
  assert partial['metrics']['kl'] == {
      o: summary['metrics']['kl'][o] for o in ('vae', 'introvae')}
  assert json.load(open(results / 'table.json'))['seeds'] == partial['seeds']
  with pytest.raises(errors.UserError, match='No stored results .* for '
                     r'objective\(s\) vae; run them without --notrain'):
    compare.compare(config, ['vae'], [1], str(tmp_path / 'runs'),
                    str(results), train=False)
