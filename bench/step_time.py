"""Times the compiled train step on synthetic data, and the input pipeline.

Prints, per engine (the mesh step, jit + shard_map, and the pmapped step,
side by side in one run), compile time, median step time and images/s; the
input pipeline's own rate (batches/s of `create_input_iter` alone, for the
config's data set) beside the step rate, so one sees which one limits; and
peak RSS, e.g.

  python bench/step_time.py --config=configs/default.py --devices=4
  python bench/step_time.py --image_size=32 --batch_size=4 --num_steps=5
  python bench/step_time.py --config=configs/celebahq256.py --batch_size=8 \
      --mode=fused --config.conv_impl=im2col
  python bench/step_time.py --image_size=1024 --batch_size=1 --num_steps=0 \
      --config.remat=True      # compile only: XLA's planned memory

It also prints XLA's cost analysis (FLOPs per step, achieved FLOP/s), the
model's FLOPs (`hardware.analytic_flops`, the reference iteration's count
from the layer shapes) and XLA's planned buffer memory; on a GPU or TPU in
`hardware.CHIPS` it prints the MFU: model FLOPs per second over the chip's
peak for the run's arithmetic (bfloat16, or float32 at `config.precision`).

Without --config the schema defaults (`introvae_jax.base_config()`) are used;
--image_size also sets the reference channel widths for that size.
"""

import os
import resource
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

# Runs from a checkout too (`python bench/step_time.py`), not only installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import introvae_jax  # pylint: disable=g-import-not-at-top
from introvae_jax import hardware  # pylint: disable=g-import-not-at-top
from introvae_jax import models  # pylint: disable=g-import-not-at-top
from introvae_jax import objectives  # pylint: disable=g-import-not-at-top
import xla_cost  # pylint: disable=g-import-not-at-top  (bench/, beside this file)

config_flags.DEFINE_config_file(
    'config', None, 'Python file with get_config() (default: base_config()); '
    'fields can be overridden with --config.<field>=<value>.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, 'Image size; also sets channels to channels_for(size).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Global batch size.')
_MODE = flags.DEFINE_enum('mode', None, ['reference', 'fused'], 'Step mode.')
_NUM_STEPS = flags.DEFINE_integer(
    'num_steps', 10, 'Timed steps (after compile).')
_ENGINES = flags.DEFINE_list(
    'engines', ['mesh', 'pmap'], 'Steps to time: mesh (jit + shard_map over '
    'all devices, the training program\'s), pmap (make_train_step(pmap=True)).')
_DEVICES = flags.DEFINE_integer(
    'devices', None, 'Host CPU devices to run on (jax_num_cpu_devices); '
    'default: the platform\'s devices.')
_PIPELINE_BATCHES = flags.DEFINE_integer(
    'pipeline_batches', 50, 'Batches to time the input pipeline on (0: skip).')

FLAGS = flags.FLAGS


def build_config():
  config = (FLAGS.config if FLAGS.config is not None
            else introvae_jax.base_config())
  if _IMAGE_SIZE.value is not None:
    config.image_size = _IMAGE_SIZE.value
    config.channels = introvae_jax.channels_for(_IMAGE_SIZE.value)
  if _BATCH_SIZE.value is not None:
    config.batch_size = _BATCH_SIZE.value
  if _MODE.value is not None:
    config.mode = _MODE.value
  introvae_jax.validate(config)
  return config


def peak_rss_mib() -> float:
  # KiB on Linux
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def time_engine(engine, config, state, images):
  """(compiled, compile seconds, step times, last metrics) of one engine."""
  if engine == 'mesh':
    mesh = introvae_jax.make_mesh()
    step = introvae_jax.make_train_step(config, mesh=mesh)
    state = introvae_jax.put_replicated(state, mesh)
    images = introvae_jax.global_batch(images, mesh)
  elif engine == 'pmap':
    step = introvae_jax.make_train_step(config, pmap=True)
    state = introvae_jax.replicate(state)
    images = introvae_jax.shard_batch(images)
  else:
    raise app.UsageError(
        f'--engines: unknown engine {engine!r}; use mesh, pmap.')
  t0 = time.perf_counter()
  compiled = step.lower(state, images).compile()
  compile_s = time.perf_counter() - t0
  times, metrics = [], None
  for _ in range(_NUM_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = compiled(state, images)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return compiled, compile_s, times, metrics


def pipeline_rate(config):
  """Batches/s of this host's input pipeline alone (after a first batch), or
  the reason it cannot run here."""
  from introvae_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    batches = input_pipeline.create_input_iter(config)
    next(batches)
    t0 = time.perf_counter()
    for _ in range(_PIPELINE_BATCHES.value):
      next(batches)
    return _PIPELINE_BATCHES.value / (time.perf_counter() - t0)
  except Exception as e:  # pylint: disable=broad-except
    return f'not timed ({type(e).__name__}: {str(e).splitlines()[0][:120]})'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _DEVICES.value)
    jax.config.update('jax_platforms', 'cpu')
  config = build_config()
  state = introvae_jax.create_train_state(config,
                                          jax.random.PRNGKey(config.seed))
  rs = np.random.RandomState(0)
  images = rs.rand(config.batch_size,
                   *models.input_shape(config)).astype(np.float32)

  print(f'device        {jax.devices()[0].device_kind} x{jax.device_count()}')
  print(f'config        arch={config.arch} image_size={config.image_size} '
        f'channels={tuple(config.channels)} hdim={config.hdim} '
        f'batch_size={config.batch_size} mode={config.mode} '
        f'dtype={config.dtype} precision={config.precision} '
        f'conv_impl={config.conv_impl} remat={config.remat}')
  print(f'parameters    encoder {count_params(state.params_e):,}  '
        f'decoder {count_params(state.params_g):,}')
  n_dev = jax.device_count()
  model = hardware.analytic_flops(config, config.batch_size)
  chip = hardware.chip_key(jax.devices()[0].device_kind)
  if model:
    enc, dec = hardware.forward_flops(config)
    passes_e, passes_g = objectives.get(config.objective).PASSES
    print(f'model FLOPs   {model / 1e9:.1f} GFLOP/step ({passes_e} encoder + '
          f'{passes_g} decoder forwards of {enc / 1e9:.3f} / '
          f'{dec / 1e9:.3f} GFLOP per image)')
  rates = {}
  for engine in _ENGINES.value:
    compiled, compile_s, times, metrics = time_engine(engine, config, state,
                                                      images)
    mem = xla_cost.memory_mib(compiled)
    flop = xla_cost.flops(compiled)
    print(f'[{engine}] compile {compile_s:.2f} s; XLA memory per device: '
          f'temporaries {mem["temporaries"]:.0f} MiB, arguments '
          f'{mem["arguments"]:.0f} MiB, outputs {mem["outputs"]:.0f} MiB; '
          f'{flop / 1e9:.1f} GFLOP/step per device (XLA count)')
    if times:
      median = statistics.median(times)
      rates[engine] = 1 / median
      print(f'[{engine}] step median {median * 1e3:.1f} ms over {len(times)} '
            f'steps (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}): '
            f'{1 / median:.2f} steps/s, {config.batch_size / median:.1f} '
            f'images/s' + (f', {model / median / 1e9:.1f} GFLOP/s (model)'
                           if model else ''))
      if model and chip:
        mfu = 100 * hardware.mfu(config, config.batch_size // n_dev, median,
                                 chip)
        peak = hardware.peak_flops(chip, config.dtype, config.precision) / 1e12
        print(f'[{engine}] MFU {mfu:.1f}% of {peak:.1f} TFLOP/s per {chip} '
              f'({config.dtype}, precision {config.precision})')
      print(f'[{engine}] last loss_e {float(np.mean(metrics["loss_e"])):.4f}  '
            f'loss_g {float(np.mean(metrics["loss_g"])):.4f}')
  if 'mesh' in rates and 'pmap' in rates:
    print(f'mesh / pmap   {rates["mesh"] / rates["pmap"]:.3f} (step rate '
          'ratio; > 1: the mesh step is faster)')
  if _PIPELINE_BATCHES.value:
    rate = pipeline_rate(config)
    if isinstance(rate, float):
      limit = (' (limits the step)' if rates and rate < max(rates.values())
               else '')
      print(f'input         {rate:.1f} batches/s of {config.batch_size} '
            f'({config.dataset}, this host alone){limit}')
    else:
      print(f'input         {rate}')
  print(f'peak RSS      {peak_rss_mib():.0f} MiB')


if __name__ == '__main__':
  app.run(main)
