"""The objectives behind the step shell (`introvae_jax.objectives`).

- the contract, for every registered objective: its noise, its metrics, a
  finite step from the tiny models, the config's choices;
- `vae` is IntroVAE's warm-up as a run of its own: the same new state and
  shared metrics as IntroVAE's warm-up step on the same draws;
- Soft-IntroVAE against a PyTorch restatement of the authors' iteration
  (`torch_reference.soft_introvae_iteration`, taldatech/soft-intro-vae-
  pytorch b6dbf16): loss terms in float32 (1e-5 relative to the float64
  reference); parameters, Adam moments (after the first step, the
  gradients) and BatchNorm statistics after 3 iterations, warm-up included,
  in float64 at 1e-7 relative, the tolerances of the IntroVAE parity tests.
"""

import jax
import numpy as np
import pytest

from introvae_jax import configuration
from introvae_jax import objectives
from introvae_jax import step as step_lib
from introvae_jax.errors import ConfigError
from conftest import (assert_trees_close, in_subprocess, initial_state,
                      jitted_step, tiny_batch, tiny_config)


@pytest.mark.parametrize('name', sorted(objectives.REGISTRY))
def test_every_objective_keeps_the_contract(name):
  objective = objectives.get(name)
  assert set(objective.NOISE) >= {'eps', 'z_p'}
  assert len(set(objective.NOISE)) == len(objective.NOISE)
  assert len(objective.PASSES) == 2 and min(objective.PASSES) > 0
  fields = configuration.flat_fields(configuration.base_config())
  assert objective.READS <= set(fields), objective.READS - set(fields)
  config = tiny_config('mlp', objective=name)
  state, metrics = jitted_step(config)(initial_state('mlp'), tiny_batch(config))
  assert set(metrics) >= set(objectives.METRICS)
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert int(state.step) == 1


def test_registry_and_config_choices_agree():
  assert tuple(objectives.REGISTRY) == configuration.OBJECTIVES


def test_the_shell_draws_each_declared_noise_for_the_global_batch():
  """Soft-IntroVAE's six draws are distinct, and the first two are the ones
  IntroVAE draws (the same keys)."""
  rng, step = jax.random.PRNGKey(3), 7
  six = step_lib.draw_noise(rng, step, 4, 5, num=6)
  two = step_lib.draw_noise(rng, step, 4, 5)
  assert len(six) == 6 and all(a.shape == (4, 5) for a in six)
  assert len({float(a[0, 0]) for a in six}) == 6
  assert len(two) == 2


def test_fused_mode_without_a_fused_form_is_refused():
  for name in ('vae', 'soft_introvae'):
    with pytest.raises(ConfigError, match='has no fused form'):
      configuration.validate(tiny_config(objective=name, mode='fused'))
  configuration.validate(tiny_config(objective='introvae', mode='fused'))


def test_wrong_number_of_injected_draws_is_refused():
  config = tiny_config('mlp', objective='soft_introvae')
  x = tiny_batch(config)
  eps = np.zeros((config.batch_size, config.hdim), np.float32)
  with pytest.raises(ValueError, match="takes noise \\('eps', 'z_p'"):
    step_lib.train_step(initial_state('mlp'), x, config, noise=(eps, eps))


def test_objective_is_part_of_the_run_identity():
  stored = configuration.base_config().to_dict()
  changes = configuration.identity_changes(
      stored, tiny_config(objective='soft_introvae'))
  assert ('objective', 'introvae', 'soft_introvae') in changes
  config = configuration.base_config()
  config.soft_introvae.beta_neg = 3.0
  assert ('soft_introvae.beta_neg', 256.0, 3.0) in (
      configuration.identity_changes(stored, config))


@pytest.mark.parametrize('arch', ['mlp', 'conv'])
def test_vae_objective_is_the_warmup_step(arch):
  """objective='vae' gives IntroVAE's warm-up step: the same new state
  (parameters, Adam moments, running statistics) and shared metrics."""
  vae = tiny_config(arch, objective='vae', vae_weight_rec=0.7,
                    vae_weight_kl=1.3)
  warm = tiny_config(arch, objective='introvae', vae_weight_rec=0.7,
                     vae_weight_kl=1.3, num_vae_steps=5)
  state, x = initial_state(arch), tiny_batch(vae, seed=4)
  got, m_vae = jitted_step(vae)(state, x)
  want, m_warm = jitted_step(warm)(state, x)
  assert_trees_close(jax.device_get(got), jax.device_get(want), rtol=1e-5,
                     atol_scale=1e-6, what='state')
  for k in objectives.METRICS:
    np.testing.assert_allclose(m_vae[k], m_warm[k], rtol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------
# Soft-IntroVAE against the authors' iteration.

torch = pytest.importorskip('torch', reason='parity tests need torch: '
                            'pip install -r requirements-dev.txt')
import test_parity_torch as parity  # pylint: disable=g-import-not-at-top
from introvae_jax import torch_reference as tr  # pylint: disable=g-import-not-at-top

NOISE = objectives.soft_introvae.NOISE
LOSS_TERMS = ('loss_rec', 'kl_real', 'kl_rec', 'kl_fake', 'kl_rec_g',
              'kl_fake_g', 'expelbo_rec', 'expelbo_fake', 'loss_rec_rec',
              'loss_fake_rec', 'loss_e', 'loss_g')


def soft_config(**overrides):
  """The parity model (32 px, widths 4, 8, 8) with betas all different and
  gamma_r large enough that the fakes' reconstruction term shows; beta_neg
  puts the expELBO terms near exp(-1), where their gradients are large."""
  config = parity.small_config(objective='soft_introvae', **overrides)
  hp = config.soft_introvae
  hp.beta_rec, hp.beta_kl, hp.beta_neg, hp.gamma_r = 0.8, 0.6, 64.0, 0.5
  return config


def soft_draws(config, steps, seed, dtype):
  """Images (8-bit levels) and the six draws per iteration."""
  rng = np.random.default_rng(seed)
  b, s, h = config.batch_size, config.image_size, config.hdim
  return [((rng.integers(0, 256, (b, s, s, 3)) / 256).astype(dtype),
           [rng.standard_normal((b, h)).astype(dtype) for _ in NOISE])
          for _ in range(steps)]


def run_torch(model, opts, x, noise, config, step, dtype):
  return tr.soft_introvae_step(
      model, *opts, parity.to_torch(x.transpose(0, 3, 1, 2), dtype),
      {k: parity.to_torch(a, dtype) for k, a in zip(NOISE, noise)}, config,
      step, keep_grads=False)


def test_soft_introvae_loss_terms_match_in_float32():
  config = soft_config()
  state = parity.jax_state(config)
  (x, noise), = soft_draws(config, 1, seed=5, dtype=np.float32)
  _, metrics = step_lib.make_train_step(config, pmap=False, donate=False)(
      state, x, noise=tuple(noise))
  model, opts = parity.torch_twin(state, config, torch.float64)
  ref = run_torch(model, opts, x, noise, config, 0, torch.float64)
  for k in LOSS_TERMS:
    err = parity.rel_err(metrics[k], ref[k].numpy())
    assert err < 1e-5, (k, err, float(metrics[k]), float(ref[k]))
  # Every term of both losses is a sizeable share (else a dropped one hides).
  s = 1 / (3 * 32 * 32)
  hp = config.soft_introvae
  real = s * (hp.beta_rec * float(ref['loss_rec']) + hp.beta_kl
              * float(ref['kl_real']))
  fake = 0.25 * float(ref['expelbo_rec'] + ref['expelbo_fake'])
  assert 0.05 < fake / real < 20, (fake, real)


X64 = in_subprocess('x64', {'JAX_ENABLE_X64': '1'})


@X64
def test_soft_introvae_three_iterations_match_in_float64():
  """Warm-up (step 0), then two Soft-IntroVAE iterations: every parameter,
  Adam moment and BatchNorm statistic, and the loss terms, after each."""
  assert jax.config.jax_enable_x64, 'needs JAX_ENABLE_X64=1'
  config = soft_config(dtype='float64', num_vae_steps=1)
  state = parity.jax_state(config, 0, np.float64)
  model, opts = parity.torch_twin(state, config, torch.float64)
  step = step_lib.make_train_step(config, pmap=False, donate=False)
  failures = []
  for i, (x, noise) in enumerate(soft_draws(config, 3, 6, np.float64)):
    state, metrics = step(state, x, noise=tuple(noise))
    out = run_torch(model, opts, x, noise, config, i, torch.float64)
    errs = parity.compare_states(state, model, *opts)
    errs['losses'] = parity.worst({k: (metrics[k], out[k]) for k in out})
    assert float(metrics['vae_phase']) == (i == 0)
    failures += [(i, what, err, name) for what, (err, name) in errs.items()
                 if err > 1e-7]
  assert not failures, failures


def test_a_diverging_soft_introvae_run_gives_its_own_advice(tmp_path):
  """The loop's one-line message names what to change for the objective:
  for Soft-IntroVAE, beta_neg (its authors' advice for NaN), not IntroVAE's
  weight_rec."""
  from introvae_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(objective='soft_introvae', num_train_steps=2,
                       log_every_steps=1, image_every_steps=100)
  config.soft_introvae.beta_kl = 1e38   # the real KL term overflows float32
  with pytest.raises(train.NonFiniteLossError,
                     match=r"step 1: .*Raise soft_introvae.beta_neg"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def _their_mlp(in_dim, out_dim, n_layers=3, width=256):
  """Soft-IntroVAE's `EncoderSimple`/`DecoderSimple` main stack
  (`soft_intro_vae_2d/train_soft_intro_vae_2d.py` l. 402-444): Linear(in,
  256), ReLU, n_layers x (Linear(256, 256), ReLU), Linear(256, out)."""
  layers = [torch.nn.Linear(in_dim, width), torch.nn.ReLU()]
  for _ in range(n_layers):
    layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
  return torch.nn.Sequential(*layers, torch.nn.Linear(width, out_dim))


def test_their_2d_networks_are_mlp_hidden_of_four_256_layers():
  """`mlp_hidden=(256,) * 4` is their 2-D encoder and decoder (n_layers=3,
  num_hidden=256): the same parameter count (their decoder's extra scalar
  `loggamma` is never used in training) and the same outputs with the same
  weights. configs/toy2d.py keeps three layers (the committed IntroVAE
  grid) and says so."""
  import flax  # pylint: disable=g-import-not-at-top
  from introvae_jax import models  # pylint: disable=g-import-not-at-top
  config = tiny_config('mlp', mlp_hidden=(256,) * 4, hdim=2)
  encoder, decoder = models.build_models(config)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 2)).astype(np.float32)
  for module, inputs, out_dim in ((encoder, x, 4), (decoder, x, 2)):
    params = module.init(jax.random.PRNGKey(1), inputs)['params']
    theirs = _their_mlp(2, out_dim)
    n_ours = sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert n_ours == sum(p.numel() for p in theirs.parameters()) == (
        2 * 256 + 256 + 3 * (256 * 256 + 256) + 256 * out_dim + out_dim)
    dense = [m for m in theirs if isinstance(m, torch.nn.Linear)]
    flat = flax.traverse_util.flatten_dict(params)
    names = [f'fc_{i}' for i in range(4)] + ['fc_out']
    with torch.no_grad():
      for name, layer in zip(names, dense):
        layer.weight.copy_(torch.from_numpy(
            np.asarray(flat[(name, 'kernel')]).T.copy()))
        layer.bias.copy_(torch.from_numpy(np.asarray(flat[(name, 'bias')])))
      want = theirs(torch.from_numpy(inputs)).numpy()
    got = module.apply({'params': params}, inputs)
    got = np.concatenate(got, -1) if isinstance(got, tuple) else got
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
