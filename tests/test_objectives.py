"""The objectives behind the step shell (`introvae_jax.objectives`).

- the contract, for every registered objective: its noise, its metrics, a
  finite step from the tiny models, the config's choices;
- `vae` is IntroVAE's warm-up as a run of its own: the same new state and
  shared metrics as IntroVAE's warm-up step on the same draws;
- a diverging run names what to change for its objective.
Soft-IntroVAE against its authors' code: tests/test_parity_soft_introvae.py.
"""

import jax
import numpy as np
import pytest

import introvae_jax
from introvae_jax import configuration
from introvae_jax import objectives
from introvae_jax import step as step_lib
from introvae_jax.errors import ConfigError
from conftest import (assert_trees_close, initial_state,
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


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=() if n == 'introvae' else (pytest.mark.slow,))
    for n in sorted(objectives.REGISTRY)])  # one compile each: the rest slow
def test_model_flops_match_xlas_count_of_the_step(name):
  """Each objective's PASSES (forward-pass equivalents per example) times
  the layer-shape count of the networks (taps on 'SAME' padding left out,
  as XLA counts) is XLA's FLOP count of its compiled step, within the
  elementwise work it leaves out (measured at 32 px: 2.0%, 2.7%, 2.2% for
  introvae, soft_introvae, vae)."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from introvae_jax import hardware  # pylint: disable=g-import-not-at-top
  config = tiny_config(objective=name, image_size=16, channels=(8, 16),
                       hdim=8, batch_size=4)
  state = introvae_jax.abstract_train_state(config)
  x = jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32)
  compiled = jax.jit(functools.partial(step_lib.train_step, config=config)
                     ).lower(state, x).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)['flops']
  model = hardware.analytic_flops(config, 4, exact_taps=True)
  assert 1.0 <= xla / model <= 1.08, (xla, model, xla / model)
