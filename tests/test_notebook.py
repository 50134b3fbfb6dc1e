"""The Colab notebook, executed top to bottom on the CPU with a few steps.

Mimics papermill: the cell tagged `parameters` is followed by an injected
cell that overrides it (no install, 20 steps, eval off, a temporary workdir).
A last cell added here reports what the test checks. The kernel is this
interpreter (a kernelspec written for the test), so it sees the same venv,
where the package is installed (editable, from this checkout); it starts in
a temporary folder, so the notebook uses the installed form (the recipes
from the package, no clone on the path), as on Colab after its pip install
from the git URL. tests/test_wheel.py installs the wheel itself.
"""

import json
import math
import os
import sys

import pytest

nbformat = pytest.importorskip(
    'nbformat', reason='the notebook test needs requirements-dev.txt')
nbclient = pytest.importorskip(
    'nbclient', reason='the notebook test needs requirements-dev.txt')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'introvae_tpu_colab.ipynb')
STEPS = 20

REPORT = '''
import json, sys
print('REPORT ' + json.dumps({'python': sys.executable, 'metrics': metrics,
                              'curves': sorted(curves),
                              'step': int(state1.step),
                              'trained_step': int(state.step)}))
'''


def _parameters_index(nb):
  tagged = [i for i, cell in enumerate(nb.cells)
            if 'parameters' in cell.metadata.get('tags', [])]
  assert len(tagged) == 1, f'want one cell tagged parameters, got {tagged}'
  return tagged[0]


def _kernel_dir(tmp_path):
  """A jupyter path whose `python3` kernel is this interpreter (it wins over
  any user-level kernelspec of the same name)."""
  spec = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'Python 3 (test)', 'language': 'python'}))
  return str(tmp_path / 'jupyter')


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  _parameters_index(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


def test_notebook_installs_the_package_not_a_clone():
  """The install cell pip-installs the package from its git URL with the
  runtime's extras; nothing clones the repository or imports `configs`."""
  code = '\n'.join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
                   if c.cell_type == 'code')
  assert '!pip install -q "introvae-jax[{extras}] @ {package_url}"' in code
  assert "package_url = 'git+https://" in code
  for extra in ("'train'", "'tpu'", "'cuda12'", "'tf-cpu'"):
    assert extra in code, extra
  for clone in ('git clone', 'from configs', 'sys.path', 'requirements'):
    assert clone not in code, clone
  assert "introvae_jax.load_recipe('default')" in code


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  copy_to = tmp_path / 'copy'
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = dict(install=False, workdir=str(workdir), copy_to=str(copy_to),
                num_train_steps=STEPS,
                config_overrides={'eval_every_steps': 0, 'log_every_steps': 5})
  injected = nbformat.v4.new_code_cell(
      '\n'.join(f'{k} = {v!r}' for k, v in params.items()),
      metadata={'tags': ['injected-parameters']})
  nb.cells.insert(_parameters_index(nb) + 1, injected)
  nb.cells.append(nbformat.v4.new_code_cell(REPORT))

  monkeypatch.setenv('JUPYTER_PATH', _kernel_dir(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  # The train_step cell compiles the training loop's step again: a cache hit.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'xla_cache'))
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  monkeypatch.setenv('INTROVAE_CACHE', str(tmp_path / 'introvae_cache'))
  client = nbclient.NotebookClient(
      nb, kernel_name='python3', timeout=600,
      resources={'metadata': {'path': str(tmp_path)}})  # not the checkout
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'notebook cell failed:\n{str(e)[-4000:]}', pytrace=False)

  out = ''.join(o.get('text', '') for o in nb.cells[-1].outputs)
  report = json.loads(out.split('REPORT ', 1)[1])
  assert os.path.realpath(report['python']) == os.path.realpath(sys.executable)

  # The training run: a complete checkpoint of the last step, image grids,
  # curves.
  assert report['trained_step'] == STEPS
  assert (workdir / 'checkpoints' / str(STEPS) / 'commit_success.txt').exists()
  for kind in ('real', 'reconstruction', 'samples'):
    assert (workdir / 'images' / f'{kind}_{STEPS:08d}.png').exists(), kind
  assert ({'loss_e', 'loss_g', 'kl_real', 'kl_rec', 'kl_fake'}
          <= set(report['curves']))
  assert (copy_to / 'checkpoints' / str(STEPS) / 'commit_success.txt').exists()
  # The grids and the loss curves were drawn inline.
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) == 2, len(images)

  # The train_step cell: one step from a fresh state, finite metrics.
  assert report['step'] == 1
  assert report['metrics']['finite'] == 1.0
  assert all(math.isfinite(v) for v in report['metrics'].values()), (
      report['metrics'])
