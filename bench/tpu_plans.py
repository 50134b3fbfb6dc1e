"""Plans the image recipes for TPU topologies and keeps each plan as JSON.

  python bench/tpu_plans.py                    # every row not yet stored
  python bench/tpu_plans.py --rows=ffhq1024@v5e:2x2 --force
  python bench/tpu_plans.py --table            # docs/tpu.md from the JSON

Each row (recipe, topology, config overrides) is compiled by
`introvae_jax.plan` for the topology on this CPU host (libtpu) and its
figures and report are written to docs/results/plans/<row>.json, keyed by
what decides the program: the resolved config, the topology, the JAX and
libtpu versions and the source of the modules that build the step. A row
whose key is unchanged is not compiled again, so a change to one recipe
recompiles its rows only (a change to the model recompiles all). A 1024 px
step takes 15-77 min and up to 16 GB of host memory on 2 cores: rows run one
at a time. `--table` rewrites the table between the markers in docs/tpu.md
from the stored rows, compiling nothing.
"""

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, 'docs', 'results', 'plans')
DOC = os.path.join(REPO, 'docs', 'tpu.md')
BEGIN, END = '<!-- plans:begin -->', '<!-- plans:end -->'
# The config fields a row records as compiled (a recipe may change later).
SHOWN = ('precision', 'dtype', 'remat', 'space_to_depth')
# The modules whose source decides the compiled step.
SOURCES = ('models.py', 'layout.py', 'step.py', 'losses.py', 'parallel.py',
           'objectives/base.py', 'objectives/introvae.py',
           'objectives/soft_introvae.py', 'objectives/vae.py')

# (recipe, topology, overrides): the image recipes as they ship, and the
# layouts, remat and dtypes measured beside them (docs/tpu.md, "Where the
# bytes go"; the 0.3.0 recipes were space_to_depth=1, and remat=True at
# 1024 px).
# FFHQ and CelebA-HQ recipes of one size compile to one program.
ROWS = (
    [(r, t, {}) for r in ('ffhq1024', 'celebahq256')
     for t in ('v5e:2x2', 'v5p:2x2x1', 'v4:2x2x1')]
    + [(r, 'v5e:2x2', {}) for r in ('default', 'faces', 'cifar10')]
    + [('ffhq1024', 'v5e:2x2', {'space_to_depth': 1, 'remat': True}),
       ('ffhq1024', 'v5e:2x2', {'remat': True}),
       ('ffhq1024', 'v5e:2x2', {'dtype': 'bfloat16'}),
       ('celebahq256', 'v5e:2x2', {'space_to_depth': 1})])

flags.DEFINE_list('rows', [], 'Rows to plan, as recipe@topology[+field=value'
                  '...]; default: every row of ROWS.')
flags.DEFINE_bool('force', False, 'Compile even where a stored plan matches.')
flags.DEFINE_bool('table', False, 'Only rewrite the docs table.')
FLAGS = flags.FLAGS


def row_name(recipe, topology, overrides):
  extra = ''.join(f'+{k}={v}' for k, v in sorted(overrides.items()))
  return f'{recipe}@{topology}{extra}'


def parse_row(text):
  recipe, rest = text.split('@', 1)
  topology, *fields = rest.split('+')
  return recipe, topology, dict(f.split('=', 1) for f in fields)


def config_for(recipe, overrides):
  from introvae_jax import plan, recipes  # pylint: disable=g-import-not-at-top
  return plan.with_changes(recipes.load_recipe(recipe),
                           [f'{k}={v}' for k, v in overrides.items()])


def key_for(config, topology):
  digest = hashlib.sha256()
  digest.update(config.to_json(sort_keys=True).encode())
  digest.update(topology.encode())
  for package in ('jax', 'jaxlib', 'libtpu', 'flax'):
    digest.update(importlib.metadata.version(package).encode())
  for name in SOURCES:
    with open(os.path.join(REPO, 'introvae_jax', name), 'rb') as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]


def stored(name):
  path = os.path.join(OUT, name + '.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def plan_row(recipe, topology, overrides):
  """Compiles one row and stores its plan; returns the stored dict."""
  from introvae_jax import plan  # pylint: disable=g-import-not-at-top
  config = config_for(recipe, overrides)
  name = row_name(recipe, topology, overrides)
  t0 = time.time()
  compiled = plan.compile_step(config, topology)
  seconds = time.time() - t0
  figures, rows, report = plan.analyse(config, topology, compiled)
  record = dict(
      row=name, recipe=recipe, topology=topology, overrides=overrides,
      key=key_for(config, topology), figures=figures,
      config={k: config[k] for k in SHOWN},
      by_layer=plan.traffic_by_layer(rows)[:12], report=report,
      compile_seconds=round(seconds), host=platform.processor() or
      platform.machine(), date=time.strftime('%Y-%m-%d'),
      versions={p: importlib.metadata.version(p)
                for p in ('jax', 'libtpu', 'flax')})
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, name + '.json'), 'w') as f:
    json.dump(record, f, indent=1)
  return record


def current_figures(record):
  """A stored plan's figures with the roofline recomputed by today's
  `plan.roofline` from its stored counts (the bound's rule may change
  without a compile)."""
  from introvae_jax import hardware, plan  # pylint: disable=g-import-not-at-top
  f = dict(record['figures'])
  if 'laid_out_flops' not in f:  # stored before the count existed
    f['laid_out_flops'] = hardware.analytic_flops(
        config_for(record['recipe'], record['overrides']), f['per_device'],
        mxu_tile=1)
  shown = record['config']
  f.update(plan.roofline(f, hardware.topology_key(record['topology']),
                         shown['dtype'], shown['precision']))
  return f


def table() -> str:
  """The docs table from every stored plan, one row each."""
  gib = 1024 ** 3
  lines = ['| row (recipe@topology+changes) | images per chip | precision, '
           'dtype, remat, layout | peak HBM (free) | bytes per step: XLA (HBM '
           'arrays) | MXU FLOPs (x model) | roofline ms: compute; XLA bytes '
           '(HBM arrays) | images/s per chip: XLA bytes (HBM arrays) |',
           '|---|---|---|---|---|---|---|---|']
  for name in sorted(n[:-5] for n in os.listdir(OUT) if n.endswith('.json')):
    r = stored(name)
    f, c = current_figures(r), r['config']
    lines.append(
        f"| `{name}` | {f['per_device']} | {c['precision']}, "
        f"{c['dtype']}, remat {c['remat']}, space_to_depth "
        f"{c['space_to_depth']} | "
        f"{f['peak'] / gib:.2f} of {f['hbm'] / gib:.0f} GiB "
        f"({100 * (1 - f['peak'] / f['hbm']):.0f}%) | "
        f"{f['bytes'] / gib:.1f} ({f['hbm_arrays'] / gib:.1f}) GiB | "
        f"{f['mxu_flops'] / 1e12:.2f} T "
        f"({f['mxu_flops'] / f['model_flops']:.1f}x) | "
        f"{1e3 * f['t_compute']:.0f}; {1e3 * f['t_hbm']:.0f} "
        f"({1e3 * f['hbm_arrays'] / (f['bytes'] / f['t_hbm']):.0f}) | "
        f"{f['images_per_s']:.1f} ({f['images_per_s_arrays']:.1f}) |")
  return '\n'.join(lines)


def write_table():
  with open(DOC) as f:
    text = f.read()
  start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
  with open(DOC, 'w') as f:
    f.write(text[:start] + '\n' + table() + '\n' + text[end:])


def main(argv):
  del argv
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_enable_compilation_cache', False)
  if not FLAGS.table:
    rows = [parse_row(r) for r in FLAGS.rows] or ROWS
    for recipe, topology, overrides in rows:
      name = row_name(recipe, topology, overrides)
      old = stored(name)
      key = key_for(config_for(recipe, overrides), topology)
      if old and old['key'] == key and not FLAGS.force:
        print(f'{name}: stored, unchanged')
        continue
      record = plan_row(recipe, topology, overrides)
      print(f"{name}: compiled in {record['compile_seconds']} s, "
            f"{record['figures']['images_per_s']:.1f} images/s per chip",
            flush=True)
  write_table()
  print(table())


if __name__ == '__main__':
  app.run(main)
