"""The pmapped step on 4 host devices equals the single-device step.

These tests run in child processes started with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (this pytest process has
already initialised JAX with one CPU device): one child in float32 (metrics,
gradients and running statistics to 1e-5) and one with jax_enable_x64
(parameters and optimiser states after two steps to 1e-8).

The same 8 examples go through `make_train_step(config, pmap=True)` as 4
shards of 2 and through the jitted single-device step as one batch. Both draw
their own noise from the state (drawn for the global batch and sliced per
device, so the draws are the same). The conv model syncs BatchNorm statistics
across devices (`sync_batch_stats=True`); without that, each device
normalises its own shard, as in the reference's multi-GPU runs, and the two
runs differ by design.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import introvae_jax
from conftest import (adam_moments, assert_trees_close, in_subprocess,
                      initial_state, jitted_step, tiny_batch, tiny_config,
                      to_numpy)

DEVICES = 4
FOUR_DEVICES = {
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={DEVICES}'}
PMAP = in_subprocess('pmap', FOUR_DEVICES)
PMAP_X64 = in_subprocess('pmap_x64', dict(FOUR_DEVICES, JAX_ENABLE_X64='1'))

MODELS = {
    'mlp': dict(arch='mlp'),
    'conv_sync_bn': dict(arch='conv', sync_batch_stats=True),
}


def margin_between_shards(config, state):
  """An m_plus that the fakes' global mean KL and one shard's mean KL fall on
  either side of, at the first step: a device deciding the hinge on its own
  shard would then differ from the single-device step."""
  encoder, decoder = introvae_jax.build_models(config)
  def call(module, params, stats, inputs):
    return module.apply({'params': params, 'batch_stats': stats}, inputs,
                        mutable=['batch_stats'])[0]
  _, z_p = introvae_jax.draw_noise(state.rng, state.step, 8, config.hdim)
  x_fake = call(decoder, state.params_g, state.batch_stats_g, z_p)
  mu, logvar = call(encoder, state.params_e, state.batch_stats_e, x_fake)
  kl = np.asarray(-0.5 * jnp.sum(1 + logvar - mu ** 2 - jnp.exp(logvar), -1))
  shard_means = kl.reshape(DEVICES, -1).mean(axis=1)
  far = shard_means[np.argmax(np.abs(shard_means - kl.mean()))]
  assert abs(far - kl.mean()) > 1e-3 * abs(kl.mean()), shard_means
  return float(0.5 * (far + kl.mean()))


def config_for(model, **overrides):
  """8 examples, 2 per device, and a margin that splits the shards."""
  fields = dict(MODELS[model], batch_size=8, **overrides)
  arch = fields.pop('arch')
  state = initial_state(arch)
  margin = margin_between_shards(tiny_config(arch, **fields), state)
  return tiny_config(arch, m_plus=margin, **fields), state


def check_devices():
  assert jax.local_device_count() == DEVICES, (
      f'needs {DEVICES} host devices, got {jax.local_device_count()}')


def run_both(config, state, num_steps):
  """(single-device (state, metrics), pmapped (state, metrics)) per step."""
  single_step = jitted_step(config)
  pmapped_step = introvae_jax.make_train_step(config, pmap=True)
  single, sharded = state, introvae_jax.replicate(state)
  out = []
  for t in range(num_steps):
    x = tiny_batch(config, seed=10 + t, dtype=np.asarray(
        jax.tree_util.tree_leaves(state.params_e)[0]).dtype)
    single, single_metrics = single_step(single, x)
    sharded, sharded_metrics = pmapped_step(sharded,
                                            introvae_jax.shard_batch(x))
    out.append(((single, single_metrics), (sharded, sharded_metrics)))
  return out


def assert_replicas_identical(sharded_state):
  for leaf in jax.tree_util.tree_leaves(sharded_state):
    leaf = np.asarray(leaf)
    assert leaf.shape[0] == DEVICES
    for d in range(1, DEVICES):
      np.testing.assert_array_equal(leaf[d], leaf[0])


@PMAP
@pytest.mark.parametrize('model', [  # the mesh is the engine; pmap's mlp slow
    pytest.param('mlp', marks=pytest.mark.slow), 'conv_sync_bn'])
def test_pmap_matches_single_device_float32(model):
  check_devices()
  config, state = config_for(model, adam_b1=0.0)   # Adam's mu = the gradient
  [((single, single_metrics), (sharded, sharded_metrics))] = run_both(
      config, state, num_steps=1)
  assert_replicas_identical(sharded)
  sharded = introvae_jax.unreplicate(sharded)
  for name, value in single_metrics.items():
    np.testing.assert_allclose(np.asarray(sharded_metrics[name])[0], value,
                               rtol=1e-5, atol=1e-7, err_msg=name)
  for net in ('e', 'g'):
    got = adam_moments(getattr(sharded, f'opt_state_{net}'))[1]
    expected = adam_moments(getattr(single, f'opt_state_{net}'))[1]
    assert_trees_close(got, expected, rtol=1e-5, atol_scale=1e-5,
                       what=f'grad {net}')
    assert_trees_close(getattr(sharded, f'batch_stats_{net}'),
                       getattr(single, f'batch_stats_{net}'), rtol=1e-5,
                       atol_scale=1e-5, what=f'stats {net}')


@PMAP
def test_indivisible_global_batch_is_a_clear_error():
  check_devices()
  config = tiny_config('mlp', batch_size=6)
  with pytest.raises(ValueError,
                     match='batch_size=6 does not divide over 4 devices'):
    introvae_jax.make_train_step(config, pmap=True)
  with pytest.raises(ValueError,
                     match='batch_size=6 does not divide over 4 devices'):
    introvae_jax.shard_batch(tiny_batch(config))


@pytest.mark.slow  # the mesh engine's float64 twin is in the fast suite
@PMAP_X64
@pytest.mark.parametrize('model', list(MODELS))
def test_pmap_matches_single_device_float64(model):
  check_devices()
  assert jax.config.jax_enable_x64
  config, state = config_for(model, dtype='float64')
  state = jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating)
      else a, state)
  runs = run_both(config, state, num_steps=2)
  (single, single_metrics), (sharded, sharded_metrics) = runs[-1]
  assert single_metrics['loss_e'].dtype == jnp.float64
  for name, value in single_metrics.items():
    np.testing.assert_allclose(np.asarray(sharded_metrics[name])[0], value,
                               rtol=1e-8, atol=1e-12, err_msg=name)
  assert_replicas_identical(sharded)
  assert_trees_close(to_numpy(introvae_jax.unreplicate(sharded)),
                     to_numpy(single), rtol=1e-8, atol_scale=1e-10,
                     what='state after 2 steps')
