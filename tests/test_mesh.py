"""The mesh engine (jit + shard_map over 4 host CPU devices) against the
single-device step, the pmapped step and hand computations.

The tests run in child processes started with
XLA_FLAGS=--xla_force_host_platform_device_count=4: one with jax_enable_x64
(the step's numerics, 3 steps in float64) and one in float32 (the training
program, sampling and evaluation on the mesh, the input prefetch).

The same global batches of 8 go through `make_train_step(config, mesh=mesh)`
as a global array sharded 2 per device, through the jitted single-device step
whole and through `make_train_step(config, pmap=True)` as 4 shards; the
margin splits the devices' shards (test_pmap), so a hinge decided per device
would fail.
"""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import introvae_jax
from conftest import (assert_trees_close, in_subprocess, initial_state,
                      jitted_step, tiny_batch, tiny_config, to_numpy)
from introvae_jax import checkpointing, objectives, parallel
from test_pmap import DEVICES, FOUR_DEVICES, config_for
import train_utils

MESH = in_subprocess('mesh', FOUR_DEVICES)
MESH_X64 = in_subprocess('mesh_x64', dict(FOUR_DEVICES, JAX_ENABLE_X64='1'))
STEPS = 3


def float64_setup(model, **overrides):
  """test_pmap's models, and 'conv': BatchNorm per device (not synced)."""
  assert jax.config.jax_enable_x64 and jax.device_count() == DEVICES
  if model == 'conv':
    model, overrides = 'conv_sync_bn', dict(overrides, sync_batch_stats=False)
  config, state = config_for(model, dtype='float64', **overrides)
  state = jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating)
      else a, state)
  return config, state


def batches(config, num=STEPS):
  return [tiny_batch(config, seed=10 + t, dtype=np.float64) for t in range(num)]


def run_mesh(config, state, xs):
  mesh = parallel.make_mesh()
  step = introvae_jax.make_train_step(config, mesh=mesh)
  state = parallel.put_replicated(state, mesh)
  for x in xs:
    state, metrics = step(state, parallel.global_batch(x, mesh))
  for leaf in jax.tree_util.tree_leaves(state):
    assert leaf.sharding == parallel.replicated(mesh), leaf.sharding
  return state, metrics


def _fast_for(model, objective):
  """The MLP under IntroVAE in the fast suite (the conv model's statistics
  over devices are checked below); the rest (a minute or two of compiles
  each on 2 cores) in the slow set."""
  marks = () if (model, objective) == ('mlp', 'introvae') else (
      pytest.mark.slow,)
  return pytest.param(model, objective, marks=marks)


@MESH_X64
@pytest.mark.parametrize('model, objective', [
    _fast_for(model, objective) for model in ('mlp', 'conv_sync_bn')
    for objective in sorted(objectives.REGISTRY)])
def test_mesh_step_equals_single_device_step_float64(model, objective):
  """Every objective: the shell draws its noise for the global batch, so 4
  devices give the single device's numbers."""
  config, state = float64_setup(model, objective=objective)
  xs = batches(config)
  mesh_state, mesh_metrics = run_mesh(config, state, xs)
  single = state
  for x in xs:
    single, single_metrics = jitted_step(config)(single, x)
  for name, value in single_metrics.items():
    np.testing.assert_allclose(np.asarray(mesh_metrics[name]), value,
                               rtol=1e-8, atol=1e-12, err_msg=name)
  assert_trees_close(to_numpy(mesh_state), to_numpy(single), rtol=1e-8,
                     atol_scale=1e-10, what=f'state after {STEPS} steps')


@MESH_X64
@pytest.mark.parametrize('model', [
    # mlp and conv_sync_bn: both engines equal the single device (above and
    # test_pmap), so these are in the slow set; per-device statistics
    # (conv) have no single-device twin.
    pytest.param('mlp', marks=pytest.mark.slow),
    pytest.param('conv_sync_bn', marks=pytest.mark.slow), 'conv'])
def test_mesh_step_equals_pmapped_step_float64(model):
  config, state = float64_setup(model)
  xs = batches(config)
  mesh_state, mesh_metrics = run_mesh(config, state, xs)
  p_step = introvae_jax.make_train_step(config, pmap=True)
  p_state = introvae_jax.replicate(state)
  for x in xs:
    p_state, p_metrics = p_step(p_state, introvae_jax.shard_batch(x))
  for name, value in p_metrics.items():
    np.testing.assert_allclose(np.asarray(mesh_metrics[name]),
                               np.asarray(value)[0], rtol=1e-12, atol=1e-14,
                               err_msg=name)
  assert_trees_close(to_numpy(mesh_state),
                     to_numpy(introvae_jax.unreplicate(p_state)), rtol=1e-12,
                     atol_scale=1e-14, what=f'state after {STEPS} steps')


@MESH_X64
def test_mesh_step_takes_injected_noise_and_host_arrays():
  """`noise=(eps, z_p)` as `train_step` takes it (global [B, hdim], sliced per
  device like the drawn noise), with NumPy inputs placed by the step."""
  config, state = float64_setup('conv_sync_bn')
  x = batches(config, 1)[0]
  rs = np.random.RandomState(3)
  noise = tuple(rs.randn(config.batch_size, config.hdim) for _ in range(2))
  step = introvae_jax.make_train_step(config, mesh=parallel.make_mesh(),
                                      donate=False)
  got, got_metrics = step(to_numpy(state), x, noise=noise)
  want, want_metrics = jitted_step(config)(state, x, noise=noise)
  for name, value in want_metrics.items():
    np.testing.assert_allclose(np.asarray(got_metrics[name]), value,
                               rtol=1e-8, atol=1e-12, err_msg=name)
  assert_trees_close(to_numpy(got), to_numpy(want), rtol=1e-8,
                     atol_scale=1e-10,
                     what='state after an injected-noise step')


@MESH_X64
def test_running_statistics_are_the_mean_over_devices():
  """Without synced BatchNorm each device normalises its own 2 rows and
  updates its own running statistics; the replicated state keeps their mean.
  By hand: the unmapped step on each shard alone, with that shard's noise,
  then the mean. (In the warm-up step every running-statistics update
  depends only on the old state and the device's rows.)"""
  config, state = float64_setup('conv', num_vae_steps=5)
  x = batches(config, 1)[0]
  mesh_state, _ = run_mesh(config, state, [x])
  eps, z_p = introvae_jax.draw_noise(state.rng, state.step, config.batch_size,
                                     config.hdim)
  rows = config.batch_size // DEVICES
  per_device = []
  for d in range(DEVICES):
    part = slice(d * rows, (d + 1) * rows)
    new, _ = introvae_jax.train_step(state, x[part], config,
                                     noise=(eps[part], z_p[part]))
    per_device.append(to_numpy((new.batch_stats_e, new.batch_stats_g)))
  mean = jax.tree_util.tree_map(lambda *a: np.mean(a, axis=0), *per_device)
  assert_trees_close(to_numpy((mesh_state.batch_stats_e,
                               mesh_state.batch_stats_g)), mean, rtol=1e-12,
                     atol_scale=1e-14, what='running statistics')
  # The choice matters: device 0's own statistics are not the mean.
  first = jax.tree_util.tree_leaves(per_device[0])
  assert max(np.max(np.abs(a - b)) for a, b in
             zip(first, jax.tree_util.tree_leaves(mean))) > 1e-3


@MESH
def test_global_batch_rows_and_prefetch_order():
  mesh = parallel.make_mesh()
  local = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  batch = parallel.global_batch(local, mesh)
  assert batch.sharding == parallel.batch_sharded(mesh)
  for shard in batch.addressable_shards:       # device d holds rows 2d, 2d+1
    d = mesh.devices.tolist().index(shard.device)
    np.testing.assert_array_equal(shard.data, local[2 * d:2 * d + 2])
  with pytest.raises(ValueError, match='does not divide over 4 devices'):
    parallel.global_batch(local[:6], mesh)

  pulled = []
  def source():
    for i in range(5):
      pulled.append(i)
      yield np.full((4, 2), i, np.float32)
  out = parallel.prefetch_to_mesh(source(), mesh, size=2)
  first = next(out)
  assert pulled == [0, 1, 2]       # the current batch and two ahead
  rest = list(out)
  assert [int(np.asarray(b)[0, 0]) for b in [first] + rest] == [0, 1, 2, 3, 4]


@MESH
def test_mesh_of_some_devices():
  mesh = parallel.make_mesh(2)
  assert (mesh.axis_names == ('batch',)
          and mesh.devices.tolist() == jax.devices()[:2])
  assert parallel.make_mesh().devices.size == DEVICES
  with pytest.raises(ValueError,
                     match='num_devices=5: this process has 4 devices'):
    parallel.make_mesh(5)


def test_meshes_made_by_hand_or_from_devices_give_the_same_step():
  """make_mesh(devices=...) (e.g. a TPU topology's compile-only devices) and
  a hand-made jax.sharding.Mesh, whose axes are Auto where the step's
  jax.reshard needs Explicit ones, give the same step as make_mesh();
  before, the Auto mesh failed inside jax.reshard. A mesh without the
  'batch' axis is refused naming it."""
  config = tiny_config('mlp')
  x = tiny_batch(config)
  results = []
  for mesh in (parallel.make_mesh(), parallel.make_mesh(devices=jax.devices()),
               jax.sharding.Mesh(np.array(jax.devices()), ('batch',))):
    state = parallel.put_replicated(initial_state('mlp'),
                                    parallel.explicit_mesh(mesh))
    results.append(to_numpy(introvae_jax.make_train_step(
        config, mesh=mesh, donate=False)(state, x)))
  for other in results[1:]:
    jax.tree_util.tree_map(np.testing.assert_array_equal, other, results[0])
  with pytest.raises(ValueError, match="an axis named 'batch'"):
    introvae_jax.make_train_step(
        config, mesh=jax.sharding.Mesh(np.array(jax.devices()), ('data',)))


def test_abstract_state_compiles_the_step_without_initialising():
  """abstract_train_state(config, mesh=...) has the real state's shapes,
  dtypes and the mesh's replicated sharding, built without running the
  initialisation; the step lowered and compiled from it ahead of time is the
  step the program runs (same numbers as the jitted mesh step)."""
  config = tiny_config('conv')
  mesh = parallel.make_mesh()
  abstract = introvae_jax.abstract_train_state(config, mesh=mesh)
  real = introvae_jax.create_train_state(config, jax.random.PRNGKey(0),
                                         mesh=mesh)
  for a, r in zip(jax.tree_util.tree_leaves(abstract),
                  jax.tree_util.tree_leaves(real)):
    assert (a.shape, a.dtype) == (r.shape, r.dtype)
    assert a.sharding == parallel.replicated(mesh) == r.sharding
  x = tiny_batch(config)
  batch = jax.ShapeDtypeStruct(x.shape, x.dtype,
                               sharding=parallel.batch_sharded(mesh))
  step = introvae_jax.make_train_step(config, mesh=mesh, donate=False)
  compiled = step.lower(abstract, batch).compile()
  assert compiled.memory_analysis() is not None
  got = compiled(real, parallel.global_batch(x, mesh))
  jax.tree_util.tree_map(np.testing.assert_array_equal, to_numpy(got),
                         to_numpy(step(real, x)))


@MESH
def test_indivisible_batch_is_a_clear_error_on_the_mesh():
  with pytest.raises(ValueError,
                     match='batch_size=6 does not divide over 4 devices'):
    introvae_jax.make_train_step(tiny_config('mlp', batch_size=6))


@pytest.mark.slow
@MESH
def test_program_runs_on_the_mesh_without_pmap(tmp_path, monkeypatch):
  """train_and_evaluate, its checkpoint, sample and evaluation on 4 devices,
  with jax.pmap (and the replicate helpers) made to fail if called."""
  def refuse(*args, **kwargs):
    raise AssertionError('the program called jax.pmap')
  monkeypatch.setattr(jax, 'pmap', refuse)
  from introvae_jax import evaluation, generate, step as step_lib, train
  monkeypatch.setattr(step_lib, 'replicate', refuse)
  monkeypatch.setattr(step_lib, 'unreplicate', refuse)
  workdir = str(tmp_path / 'run')
  config = train_utils.tiny_config(num_train_steps=4, checkpoint_every_steps=2,
                                   image_every_steps=4, log_every_steps=2)
  final = train.train_and_evaluate(config, workdir)
  mesh = parallel.make_mesh()
  for leaf in jax.tree_util.tree_leaves(final):
    assert leaf.sharding == parallel.replicated(mesh)
  manager = checkpointing.make_manager(workdir, read_only=True)
  restored = checkpointing.restore(manager, config, mesh=mesh)
  for a, b in zip(jax.tree_util.tree_leaves(restored),
                  jax.tree_util.tree_leaves(final)):
    assert a.sharding == parallel.replicated(mesh)   # restored in place
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Resuming from step 2 on the mesh gives the same step-4 state.
  again = str(tmp_path / 'again')
  train.train_and_evaluate(train_utils.tiny_config(
      num_train_steps=2, checkpoint_every_steps=2, image_every_steps=4,
      log_every_steps=2), again)
  resumed = train.train_and_evaluate(config, again)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      resumed, final)

  out = str(tmp_path / 'samples')
  generate.generate(workdir, out, num=4)
  assert glob.glob(os.path.join(out, '*.png'))
  metrics, _ = evaluation.evaluate_workdir(workdir, num_images=16, log=None)
  assert np.isfinite(metrics['swd_mean'])
