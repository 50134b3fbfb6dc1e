"""Parity with the authors' PyTorch IntroVAE (`introvae_jax.torch_reference`).

Same weights, images and random draws on both sides:
- forward: encoder (mu, logvar) and decoder output, float32, 1e-5 relative;
- one reference iteration: every loss term and both networks' gradients,
  float32, 1e-5 relative;
- three full iterations: every parameter, Adam moment and BatchNorm statistic,
  float64 on both sides, 1e-7 relative (docs/introvae.md 3b: in float32, Adam's
  first steps turn rounding differences into +-lr differences).
"Relative" is per tensor: max |jax - torch| <= rtol * max |torch|.

The float64 runs happen in a subprocess (this file run as a script), so
`jax_enable_x64` never reaches other test modules.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='parity tests need torch: '
                            'pip install -r requirements-dev.txt')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from introvae_jax import base_config, convert, models  # pylint: disable=g-import-not-at-top
from introvae_jax import step as step_lib  # pylint: disable=g-import-not-at-top
from introvae_jax import torch_reference as tr  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_TERMS = ('loss_rec', 'kl_real', 'kl_rec', 'kl_fake', 'kl_rec_g',
              'kl_fake_g', 'loss_e', 'loss_g')


# ----------------------------------------------------------------------------
# Harness (also used by the float64 subprocess).


def small_config(**overrides):
  """32 px, narrow; weights all different so a swapped term shows."""
  c = base_config()
  with c.unlocked():
    c.image_size, c.channels, c.hdim, c.batch_size = 32, (4, 8, 8), 6, 4
    c.m_plus, c.weight_rec, c.weight_kl, c.weight_neg = 1000.0, 0.3, 0.7, 0.6
    c.lr_e, c.lr_g = 2e-4, 3e-4
    for k, v in overrides.items():
      c[k] = v
  return c


def jax_state(config, seed=0, dtype=np.float32):
  """A fresh TrainState with BatchNorm scales, all biases and BN statistics
  perturbed away from their 1/0 initial values (so a mix-up shows)."""
  state = step_lib.create_train_state(config, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)

  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    a = np.asarray(a, np.float64)
    if "'scale'" in name:
      a = a + 0.2 * rng.standard_normal(a.shape)
    elif "'bias'" in name:
      a = a + 0.1 * rng.standard_normal(a.shape)
    elif "'var'" in name:
      a = rng.uniform(0.5, 1.5, a.shape)
    elif "'mean'" in name:
      a = 0.1 * rng.standard_normal(a.shape)
    return a

  replace = {}
  for field in ('params_e', 'params_g', 'batch_stats_e', 'batch_stats_g'):
    replace[field] = jax.tree_util.tree_map_with_path(
        perturb, getattr(state, field))
  state = state.replace(**replace)
  cast = lambda a: (jnp.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                    else a)
  return jax.tree_util.tree_map(cast, state)


def torch_twin(state, config, dtype=torch.float32):
  """The reference model and optimisers holding `state`'s weights."""
  model = tr.build_model(config, dtype)
  model.load_state_dict(convert.export_state_dict(state))
  return model, tr.make_optimizers(model, config)


def draws(config, steps, seed=1, dtype=np.float32):
  """Images [B, H, W, C] in [0, 1], eps and z_p [B, hdim], per step."""
  rng = np.random.default_rng(seed)
  b, s, h = config.batch_size, config.image_size, config.hdim
  return [(rng.uniform(size=(b, s, s, config.image_channels)).astype(dtype),
           rng.standard_normal((b, h)).astype(dtype),
           rng.standard_normal((b, h)).astype(dtype)) for _ in range(steps)]


def to_torch(a, dtype):
  return torch.from_numpy(np.array(a)).to(dtype)


def reference_names(tree_e, tree_g, stats_e, stats_g):
  """A params-shaped pair of trees (weights, gradients, moments) -> reference keys."""
  return convert.variables_to_torch_arrays(tree_e, stats_e, tree_g, stats_g)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def worst(pairs):
  """(max relative error, name) over {name: (jax, torch)}."""
  errs = {k: rel_err(a, b) for k, (a, b) in pairs.items()}
  name = max(errs, key=errs.get)
  return errs[name], name


def compare_states(state, model, opt_e, opt_g):
  """Worst relative errors of params, BN statistics and Adam states."""
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  mine = convert.variables_to_torch_arrays(
      state.params_e, state.batch_stats_e, state.params_g, state.batch_stats_g)
  if set(mine) != set(sd):
    raise AssertionError(f'key sets differ: {set(mine) ^ set(sd)}')
  is_stat = lambda k: 'running_' in k
  out = {
      'params': worst({k: (mine[k], sd[k]) for k in sd
                       if not is_stat(k) and 'num_batches' not in k}),
      'batch_stats': worst({k: (mine[k], sd[k]) for k in sd if is_stat(k)}),
  }
  adam_e, adam_g = state.opt_state_e[0], state.opt_state_g[0]
  torch_states = {}
  for prefix, net, opt in (('encoder.', model.encoder, opt_e),
                           ('decoder.', model.decoder, opt_g)):
    for name, st in tr.adam_states(opt, net).items():
      torch_states[prefix + name] = st
  for moment, torch_key in (('mu', 'exp_avg'), ('nu', 'exp_avg_sq')):
    names = reference_names(getattr(adam_e, moment), getattr(adam_g, moment),
                            state.batch_stats_e, state.batch_stats_g)
    out[f'adam_{moment}'] = worst({
        k: (names[k], torch_states[k][torch_key].numpy()) for k in torch_states})
  counts = {int(adam_e.count), int(adam_g.count)} | {
      int(st['step']) for st in torch_states.values()}
  if len(counts) != 1:
    raise AssertionError(f'Adam step counts differ: {counts}')
  return out


def run_both(config, steps, np_dtype, torch_dtype, seed=0):
  """`steps` iterations on both sides; per step, worst errors and losses."""
  state = jax_state(config, seed, np_dtype)
  model, (opt_e, opt_g) = torch_twin(state, config, torch_dtype)
  train_step = jax.jit(lambda s, x, e, z: step_lib.train_step(
      s, x, config, noise=(e, z)))
  report = []
  for i, (x, eps, z_p) in enumerate(draws(config, steps, seed + 1, np_dtype)):
    state, metrics = train_step(state, x, eps, z_p)
    out = tr.iteration(model, opt_e, opt_g,
                       to_torch(x.transpose(0, 3, 1, 2), torch_dtype),
                       to_torch(eps, torch_dtype), to_torch(z_p, torch_dtype),
                       config, i, keep_grads=False)
    errs = compare_states(state, model, opt_e, opt_g)
    errs['losses'] = worst({k: (metrics[k], out[k]) for k in out})
    report.append(errs)
  return report


# ----------------------------------------------------------------------------
# float32: outputs, losses and gradients.


def _forward_both(config, batch=3):
  state = jax_state(config)
  model, _ = torch_twin(state, config)
  encoder, decoder = models.build_models(config)
  x, eps, _ = draws(config, 1)[0]
  x, eps = x[:batch], eps[:batch]
  (mu, logvar), stats_e = step_lib._apply(  # pylint: disable=protected-access
      encoder, state.params_e, state.batch_stats_e, x)
  x_out, stats_g = step_lib._apply(  # pylint: disable=protected-access
      decoder, state.params_g, state.batch_stats_g, eps)
  t_mu, t_logvar = model.encoder(to_torch(x.transpose(0, 3, 1, 2),
                                          torch.float32))
  t_out = model.decoder(to_torch(eps, torch.float32))
  stats = convert.variables_to_torch_arrays(state.params_e, stats_e,
                                            state.params_g, stats_g)
  sd = model.state_dict()
  return {
      'mu': (mu, t_mu.detach().numpy()),
      'logvar': (logvar, t_logvar.detach().numpy()),
      'decoder_output': (x_out,
                         t_out.detach().numpy().transpose(0, 2, 3, 1)),
      'running_stats': worst({k: (v, sd[k].numpy()) for k, v in stats.items()
                              if 'running' in k}),
  }


def test_forward_outputs_match():
  got = _forward_both(small_config())
  stats_err, stats_name = got.pop('running_stats')
  for name, (a, b) in got.items():
    assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))
  # One train-mode call updates running stats (unbiased variance) the same way.
  assert stats_err < 1e-5, (stats_name, stats_err)


def test_forward_matches_with_512_wide_skip_convolutions():
  """The reference's `is not` quirk: 512 -> 512 blocks from two entries carry
  a 1x1 conv; both sides hold the same parameters and compute the same."""
  config = small_config(image_size=16, channels=(512, 512), hdim=4)
  ref_keys = set(tr.build_model(config).state_dict())
  expand = sorted(k for k in ref_keys if 'conv_expand' in k)
  assert expand == ['decoder.main.res_in_8.conv_expand.weight',
                    'encoder.main.res_in_8.conv_expand.weight']
  got = _forward_both(config, batch=2)
  got.pop('running_stats')
  for name, (a, b) in got.items():
    assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


@pytest.mark.parametrize('m_plus', [1000.0, 0.0], ids=['hinges_on', 'hinges_off'])
def test_one_iteration_losses_and_gradients_match(m_plus):
  config = small_config(m_plus=m_plus)
  state = jax_state(config)
  model, (opt_e, opt_g) = torch_twin(state, config)
  x, eps, z_p = draws(config, 1)[0]
  new, metrics = jax.jit(lambda s, x, e, z: step_lib.train_step(
      s, x, config, noise=(e, z)))(state, x, eps, z_p)
  out = tr.introspective_iteration(
      model, opt_e, opt_g, to_torch(x.transpose(0, 3, 1, 2), torch.float32),
      to_torch(eps, torch.float32), to_torch(z_p, torch.float32), config)

  for k in LOSS_TERMS:
    assert rel_err(metrics[k], out[k]) < 1e-5, (k, float(metrics[k]), float(out[k]))
  if m_plus:  # both hinges active: the E-step KLs of the fakes have weight
    assert float(out['kl_rec']) < m_plus and float(out['kl_fake']) < m_plus

  # After one Adam step from zero moments, mu = (1 - b1) * gradient.
  b1 = config.adam_b1
  grads = reference_names(
      jax.tree_util.tree_map(lambda m: m / (1 - b1), new.opt_state_e[0].mu),
      jax.tree_util.tree_map(lambda m: m / (1 - b1), new.opt_state_g[0].mu),
      new.batch_stats_e, new.batch_stats_g)
  torch_grads = {**{'encoder.' + k: v for k, v in out['grads_e'].items()},
                 **{'decoder.' + k: v for k, v in out['grads_g'].items()}}
  assert set(torch_grads) <= set(grads)
  for k, g in torch_grads.items():
    assert rel_err(grads[k], g.numpy()) < 1e-5, (k, rel_err(grads[k], g.numpy()))
  for name in ('grad_norm_e', 'grad_norm_g'):
    tree = out['grads_e'] if name.endswith('e') else out['grads_g']
    norm = np.sqrt(sum(float((g.double() ** 2).sum()) for g in tree.values()))
    assert rel_err(metrics[name], norm) < 1e-5, name

  # The decoder's gradient keeps the w_rec * L_AE part from L_E's backward
  # pass (the reference never zeroes it): a large share of the total here.
  kept = out['grads_g_from_loss_e']['main.predict.bias'].numpy()
  total = out['grads_g']['main.predict.bias'].numpy()
  assert rel_err(kept, 0 * kept) > 0 and rel_err(total - kept, total) > 0.05


def test_full_backward_variant_gives_same_decoder_gradient():
  """torch_reference's in-place workaround: restricting the G-step backward to
  the decoder == the reference's full backward with saved tensors cloned."""
  config = small_config(image_size=16, channels=(4, 8))
  state = jax_state(config)
  x, eps, z_p = [to_torch(a, torch.float32) for a in draws(config, 1)[0]]
  x = x.permute(0, 3, 1, 2)
  runs = []
  for full in (False, True):
    model, (opt_e, opt_g) = torch_twin(state, config)
    runs.append(tr.introspective_iteration(model, opt_e, opt_g, x, eps, z_p,
                                           config, full_backward=full))
  for k, g in runs[0]['grads_g'].items():
    assert torch.equal(g, runs[1]['grads_g'][k]), k


# ----------------------------------------------------------------------------
# float64: three full iterations, in a subprocess.


def _float64_report(phase):
  config = small_config(dtype='float64',
                        num_vae_steps=3 if phase == 'warmup' else 0)
  steps = 4 if phase == 'warmup' else 3
  return run_both(config, steps, np.float64, torch.float64)


@pytest.mark.parametrize('phase', ['adversarial', 'warmup'])
def test_three_iterations_match_in_float64(phase):
  """adversarial: 3 reference iterations; warmup: num_vae_steps=3, so three
  warm-up iterations and then the switch to the adversarial one."""
  env = dict(os.environ, JAX_ENABLE_X64='1',
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), phase],
                        env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  failures = [(i, what, err, name) for i, errs in enumerate(report)
              for what, (err, name) in errs.items() if err > 1e-7]
  assert not failures, failures


if __name__ == '__main__':
  jax.config.update('jax_enable_x64', True)
  print(json.dumps(_float64_report(sys.argv[1])))
