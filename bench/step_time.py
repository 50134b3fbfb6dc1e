"""Times the compiled train step on synthetic data.

Prints compile time, median step time, images/s and peak RSS, e.g.

  python bench/step_time.py --image_size=32 --batch_size=4 --num_steps=5
  python bench/step_time.py --config=configs/celebahq256.py --batch_size=8 \
      --mode=fused --config.conv_impl=im2col
  python bench/step_time.py --image_size=1024 --batch_size=1 --num_steps=0 \
      --config.remat=True      # compile only: XLA's planned memory

It also prints XLA's cost analysis (FLOPs per step, achieved FLOP/s), an
analytic model-FLOPs estimate, and XLA's planned buffer memory, so efficiency
against the hardware's peak can be read off.

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
from introvae_jax import models  # pylint: disable=g-import-not-at-top
import xla_cost  # pylint: disable=g-import-not-at-top  (bench/, beside this file)

config_flags.DEFINE_config_file(
    'config', None, 'Python file with get_config() (default: base_config()); '
    'fields can be overridden with --config.<field>=<value>.')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, 'Image size; also sets channels to channels_for(size).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Global batch size.')
_MODE = flags.DEFINE_enum('mode', None, ['reference', 'fused'], 'Step mode.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', 10, 'Timed steps (after compile).')
_PMAP = flags.DEFINE_bool('pmap', False, 'pmap over all local devices '
                          '(default: the jitted single-device step).')

FLAGS = flags.FLAGS


def build_config():
  config = FLAGS.config if FLAGS.config is not None else introvae_jax.base_config()
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
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = build_config()
  state = introvae_jax.create_train_state(config, jax.random.PRNGKey(config.seed))
  rs = np.random.RandomState(0)
  images = rs.rand(config.batch_size, *models.input_shape(config)).astype(np.float32)
  step = introvae_jax.make_train_step(config, pmap=_PMAP.value)
  if _PMAP.value:
    state = introvae_jax.replicate(state)
    images = introvae_jax.shard_batch(images)

  t0 = time.perf_counter()
  compiled = step.lower(state, images).compile()
  compile_s = time.perf_counter() - t0

  times = []
  for _ in range(_NUM_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = compiled(state, images)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)

  print(f'device        {jax.devices()[0].device_kind} x{jax.local_device_count()}'
        f' ({"pmap" if _PMAP.value else "jit"})')
  print(f'config        arch={config.arch} image_size={config.image_size} '
        f'channels={tuple(config.channels)} hdim={config.hdim} '
        f'batch_size={config.batch_size} mode={config.mode} '
        f'dtype={config.dtype} conv_impl={config.conv_impl} remat={config.remat}')
  print(f'parameters    encoder {count_params(state.params_e):,}  '
        f'decoder {count_params(state.params_g):,}'
        f'{"  (per replica x devices)" if _PMAP.value else ""}')
  print(f'compile       {compile_s:.2f} s')
  mem = xla_cost.memory_mib(compiled)
  print(f'XLA memory    temporaries {mem["temporaries"]:.0f} MiB, arguments '
        f'{mem["arguments"]:.0f} MiB, outputs {mem["outputs"]:.0f} MiB '
        '(planned, per device)')
  flop = xla_cost.flops(compiled)
  print(f'FLOPs/step    {flop / 1e9:.1f} GFLOP (XLA cost analysis, per device)')
  est = None
  if config.arch == 'conv' and not _PMAP.value:
    est = xla_cost.model_flops(config, config.batch_size)
    print(f'model FLOPs   {est["step"] / 1e9:.1f} GFLOP/step (7 decoder + 13 '
          f'encoder forwards of {est["decoder_forward"] / 1e9:.2f} / '
          f'{est["encoder_forward"] / 1e9:.2f} GFLOP)')
  if times:
    median = statistics.median(times)
    print(f'step median   {median * 1e3:.1f} ms over {len(times)} steps '
          f'(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})')
    print(f'throughput    {config.batch_size / median:.1f} images/s; '
          f'{flop / median / 1e9:.1f} GFLOP/s (XLA count)'
          + (f', {est["step"] / median / 1e9:.1f} GFLOP/s (model)' if est else ''))
    print(f'last loss_e   {float(np.mean(metrics["loss_e"])):.4f}  '
          f'loss_g {float(np.mean(metrics["loss_g"])):.4f}')
  print(f'peak RSS      {peak_rss_mib():.0f} MiB')


if __name__ == '__main__':
  app.run(main)
