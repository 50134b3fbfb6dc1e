"""Mixed precision (dtype='bfloat16') and rematerialisation (remat=True).

bfloat16 computes convolutions, dense layers and activations in bfloat16
(forward and backward), while parameters, optimiser state, BatchNorm
statistics and every loss stay in float32. Its stated tolerance against the
float32 step, over 3 steps of a small model (16 px, widths (8, 16)):
- first-step gradients: relative L2 error <= 15% per network (measured: 12%
  encoder, 7.5% decoder; bfloat16 keeps 8 bits of mantissa);
- losses and KLs: within 3% relative at every step;
- parameters: within Adam's per-step movement, |delta| <= 3 steps * 2 * lr
  (an elementwise sign flip of a tiny gradient moves a weight by 2 lr; see
  docs/introvae.md, section 3b), and on average far below it.
remat recomputes block activations in the backward pass: the same function,
so the same numbers.

`precision` is the arithmetic of float32 products on TPUs and GPUs (CPUs
compute float32 exactly at any setting): every convolution and dense layer of
the step carries it into the compiled program.
"""

import re

import jax
import numpy as np
import pytest

import introvae_jax
from introvae_jax import checkpointing
from conftest import assert_trees_close, step_gradients, tiny_batch, tiny_config

STEPS = 3


def _config(**overrides):
  return tiny_config('conv', image_size=16, channels=(8, 16), hdim=8,
                     batch_size=8, adam_b1=0.0, m_plus=4.0, **overrides)


def _run(config, steps=STEPS):
  """States and metrics of `steps` jitted steps from the same initial state."""
  state = introvae_jax.create_train_state(config, jax.random.PRNGKey(0))
  step = jax.jit(lambda s, x: introvae_jax.train_step(s, x, config))
  states, metrics = [], []
  for i in range(steps):
    state, m = step(state, tiny_batch(config, seed=i))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return states, metrics


@pytest.fixture(scope='module')
def float32_run():
  return _run(_config())


@pytest.fixture(scope='module')
def bfloat16_run():
  return _run(_config(dtype='bfloat16'))


def _flat(tree):
  return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def test_bfloat16_really_computes_in_bfloat16():
  config = _config(dtype='bfloat16')
  state = introvae_jax.create_train_state(config, jax.random.PRNGKey(0))
  hlo = jax.jit(lambda s, x: introvae_jax.train_step(s, x, config)).lower(
      state, tiny_batch(config)).as_text()
  convs = [line for line in hlo.splitlines() if 'stablehlo.convolution' in line]
  assert convs, 'no convolution in the step'
  # Forward and backward convolutions alike: none silently in float32.
  float32_convs = [line for line in convs if 'f32' in line.split(':')[-1]]
  assert not float32_convs, float32_convs[0]


def test_bfloat16_keeps_parameters_optimiser_state_and_losses_in_float32(
    bfloat16_run):
  states, metrics = bfloat16_run
  for path, leaf in jax.tree_util.tree_flatten_with_path(states[-1])[0]:
    if np.issubdtype(leaf.dtype, np.floating):
      assert leaf.dtype == np.float32, jax.tree_util.keystr(path)
  for name, value in metrics[-1].items():
    assert value.dtype == np.float32, name


def test_bfloat16_gradients_within_15_percent_of_float32(float32_run,
                                                         bfloat16_run):
  for net, g32, g16 in zip('EG', step_gradients(float32_run[0][0]),
                           step_gradients(bfloat16_run[0][0])):
    a, b = _flat(g32), _flat(g16)
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert rel <= 0.15, f'{net}: relative L2 gradient error {rel:.3g}'


def test_bfloat16_losses_within_3_percent_of_float32(float32_run, bfloat16_run):
  for step, (m32, m16) in enumerate(zip(float32_run[1], bfloat16_run[1])):
    for name in ('loss_rec', 'kl_real', 'kl_rec', 'kl_fake', 'kl_rec_g',
                 'kl_fake_g', 'loss_e', 'loss_g'):
      np.testing.assert_allclose(m16[name], m32[name], rtol=0.03,
                                 err_msg=f'{name} at step {step + 1}')


def test_bfloat16_parameters_within_adams_movement_of_float32(
    float32_run, bfloat16_run):
  config = _config()
  bound = STEPS * 2 * max(config.lr_e, config.lr_g)
  p32, p16 = float32_run[0][-1], bfloat16_run[0][-1]
  for name in ('params_e', 'params_g'):
    diff = np.abs(_flat(getattr(p16, name)) - _flat(getattr(p32, name)))
    assert diff.max() <= bound * 1.01, f'{name}: max |delta| {diff.max():.3g}'
    assert diff.mean() <= bound / 4, f'{name}: mean |delta| {diff.mean():.3g}'


def test_remat_gives_the_same_step():
  plain, remat = _run(_config(), steps=1), _run(_config(remat=True), steps=1)
  assert_trees_close(step_gradients(remat[0][0]), step_gradients(plain[0][0]),
                     rtol=1e-5, atol_scale=1e-6, what='gradients')
  assert_trees_close(remat[0][0].batch_stats_e, plain[0][0].batch_stats_e,
                     rtol=1e-5, atol_scale=1e-6, what='stats E')
  for name, value in plain[1][0].items():
    np.testing.assert_allclose(remat[1][0][name], value, rtol=1e-5,
                               err_msg=name)


def test_remat_keeps_the_parameter_layout():
  shapes = lambda c: jax.tree_util.tree_map(
      lambda a: a.shape, checkpointing.abstract_state(c))
  assert shapes(_config(remat=True)) == shapes(_config())


def test_remat_marks_the_blocks_for_recomputation():
  """remat=True puts each residual block behind jax.checkpoint (optimisation
  barriers in the lowered step); XLA on GPU/TPU then recomputes instead of
  storing the block's activations."""
  def barriers(config):
    state = checkpointing.abstract_state(config)
    return jax.jit(lambda s, x: introvae_jax.train_step(s, x, config)).lower(
        state, tiny_batch(config)).as_text().count('optimization_barrier')
  assert barriers(_config()) == 0
  assert barriers(_config(remat=True)) > 0


@pytest.mark.parametrize('arch, precision', [
    ('conv', 'highest'), ('conv', 'default'), ('mlp', 'high')])
def test_every_product_of_the_step_carries_the_configured_precision(
    arch, precision):
  c = tiny_config(arch, precision=precision)
  state = introvae_jax.create_train_state(c, jax.random.PRNGKey(0))
  step = jax.jit(lambda s, x: introvae_jax.train_step(s, x, c))
  text = step.lower(state, tiny_batch(c)).as_text()
  ops = re.findall(r'stablehlo\.(?:convolution|dot_general)[^\n]*', text)
  assert len(ops) >= (60 if arch == 'conv' else 20)
  # Both operands' precision, as '#stablehlo<precision X>' (convolutions) or
  # 'precision = [X, X]' (dots).
  named = [set(re.findall(r'\b(DEFAULT|HIGHEST|HIGH)\b', op)) for op in ops]
  assert all(n == {precision.upper()} for n in named), named
