"""Plans a TPU run on any host: compiles the real train step for a topology.

  python -m introvae_jax.plan --config=configs/default.py --topology=v5e:2x2 \
      [--config.batch_size=12 ...]

libtpu compiles for a named TPU topology on a CPU-only host (compile-only
devices), so the mesh step the training program runs (`make_train_step`,
donation included) is compiled here and XLA's memory and cost analyses are
read back, per device:

* memory: state, argument, temporary and peak bytes against the chip's HBM;
* FLOPs per step from XLA (with remat's recomputation) and the analytic
  model FLOPs of the IntroVAE reference iteration (`analytic_flops`);
* the roofline step time max(FLOPs / peak, bytes / bandwidth) and images/s
  at the chip's peak: a lower bound, not a measured time;
* the largest batch per device that fits, from a memory line through two
  compiles (`memory_line`), checked by one more compile.

Under pure data parallelism the per-device program depends only on the
per-device batch, not on the slice size, so one compile per chip generation
serves every slice of it (v5e:2x2 stands for v5e:16x16 too).

Not covered: the image-grid and in-training evaluation programs, which are
compiled separately and are resident only while they run; precision is
XLA's TPU default (float32 matmuls and convolutions as bfloat16 passes): the
project sets none outside the Inception network.
"""

import dataclasses
import os
import re
import time
from typing import Dict, Optional, Tuple

# Before JAX loads: compile on the CPU host, and keep an installed libtpu
# from probing cloud metadata for a TPU this host does not have.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from introvae_jax import configuration  # noqa: E402
from introvae_jax import models  # noqa: E402
from introvae_jax import parallel  # noqa: E402
from introvae_jax import step  # noqa: E402
from introvae_jax.errors import UserError  # noqa: E402

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float          # HBM per chip
  hbm_gbps: float         # HBM bandwidth per chip, GB/s (1e9 bytes/s)
  bf16_tflops: float      # dense bfloat16 peak per chip, TFLOP/s (1e12)


# Per-chip peaks, from the Cloud TPU documentation pages "TPU v4", "TPU v5e",
# "TPU v5p" and "TPU v6e (Trillium)" (cloud.google.com/tpu/docs/<version>),
# system architecture tables. v5p's 95 GiB and v6e's 1640 GB/s are the
# figures least often quoted and were not rechecked against the pages here.
CHIPS: Dict[str, Chip] = {
    'v4': Chip(hbm_gib=32, hbm_gbps=1228, bf16_tflops=275),
    'v5e': Chip(hbm_gib=16, hbm_gbps=819, bf16_tflops=197),
    'v5p': Chip(hbm_gib=95, hbm_gbps=2765, bf16_tflops=459),
    'v6e': Chip(hbm_gib=32, hbm_gbps=1640, bf16_tflops=918),
}

# What the reference iteration (step.py, mode='reference') runs per example,
# in forward-pass equivalents (a backward is one forward for the input
# gradient plus one for the weight gradient):
#   encoder: E(x) fwd + both grads (3); E-step on the two fakes, fwd + both
#     grads each (6); G-step with the updated E on the two fakes, fwd + input
#     grad each (4): 13.
#   decoder: G(z_p), G(z) fwd (2); the VJP for the encoder's g_z, input grads
#     of both calls (2); the G-step VJP, both grads of both calls (4): 8.
ENCODER_PASSES = 13
DECODER_PASSES = 8


def chip_for(topology_name: str) -> Chip:
  """The peak figures of the chip a topology name ('v5e:2x2') is made of."""
  generation = topology_name.split(':')[0].split('-')[0].lower()
  if generation not in CHIPS:
    raise UserError(f'--topology={topology_name}: unknown chip '
                    f'{generation!r}; use one of {sorted(CHIPS)} with a '
                    'shape, e.g. v5e:2x2, v4:2x2x1.')
  return CHIPS[generation]


def _taps(size: int, k: int, exact: bool) -> int:
  """Kernel taps over a size x size output: k*k per pixel, or (`exact`) only
  those landing inside the image ('SAME' padding's zeros skipped)."""
  if not exact:
    return size * size * k * k
  p = k // 2
  line = sum(min(i + p, size - 1) - max(i - p, 0) + 1 for i in range(size))
  return line * line


def forward_flops(config, exact_taps: bool = False) -> Tuple[int, int]:
  """(encoder, decoder) forward FLOPs per example, from the layer shapes:
  2*H*W*Cin*Cout*k*k per convolution, 2*in*out per dense layer; the
  elementwise work (BatchNorm, activations, pooling, losses, Adam) is not
  counted. `exact_taps` leaves out the taps on 'SAME' padding, as XLA's
  count does (a third of a 3x3 window at 4x4; little at 64 px and up)."""
  _conv = lambda h, w, c_in, c_out, k: 2 * _taps(h, k, exact_taps) * c_in * c_out
  chans = tuple(config.channels)
  size = models.image_size_for(chans)
  img, hdim = config.image_channels, config.hdim
  skip = lambda a, b, two: models._has_skip_conv(  # pylint: disable=protected-access
      a, b, two, config.reference_layout)

  def block(s, c_in, c_out, has_skip):
    f = _conv(s, s, c_in, c_out, 3) + _conv(s, s, c_out, c_out, 3)
    return f + (_conv(s, s, c_in, c_out, 1) if has_skip else 0)

  enc = _conv(size, size, img, chans[0], 5)
  s = size // 2
  for i in range(1, len(chans)):
    enc += block(s, chans[i - 1], chans[i], skip(chans[i - 1], chans[i], True))
    s //= 2
  enc += block(s, chans[-1], chans[-1], False)
  enc += 2 * s * s * chans[-1] * 2 * hdim

  dec = 2 * hdim * chans[-1] * 16
  s, prev = 4, len(chans) - 1
  for i in reversed(range(len(chans))):
    dec += block(s, chans[prev], chans[i], skip(chans[prev], chans[i], prev != i))
    s, prev = 2 * s, i
  dec += block(s, chans[0], chans[0], False)
  dec += _conv(s, s, chans[0], img, 5)
  return enc, dec


def analytic_flops(config, batch: int, exact_taps: bool = False) -> int:
  """Model FLOPs of one reference iteration on `batch` examples (the MFU
  numerator: remat's recomputation is not model work)."""
  enc, dec = forward_flops(config, exact_taps)
  return batch * (ENCODER_PASSES * enc + DECODER_PASSES * dec)


def _config_for(config, per_device_batch, n_devices):
  config = config.copy_and_resolve_references()
  if per_device_batch is not None:
    config.batch_size = per_device_batch * n_devices
  return config


def topology(topology_name: str):
  """The compile-only devices of a named TPU topology (needs libtpu)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(platform='tpu',
                                        topology_name=topology_name)
  except Exception as e:  # pylint: disable=broad-except
    # A bad name and a missing libtpu both land here; the text says which.
    text = ' '.join(str(e).split())[:200]
    raise UserError(f'--topology={topology_name}: cannot make the TPU '
                    f'topology ({text}); it needs libtpu (pip install '
                    "'libtpu==0.0.42.*') and a name such as v5e:2x2.") from e


def compile_step(config, topology_name: str, per_device_batch=None):
  """The mesh train step compiled for `topology_name` (state donated).

  With `per_device_batch`, the global batch is that times the topology's
  chip count; else `config.batch_size`. An HBM out-of-memory is raised as one
  `UserError` line with XLA's numbers and the fix.
  """
  devices = topology(topology_name).devices
  config = _config_for(config, per_device_batch, len(devices))
  configuration.check_batch_divides(config.batch_size, len(devices))
  mesh = parallel.make_mesh(devices=devices)
  state = step.abstract_train_state(config, mesh=mesh)
  batch = jax.ShapeDtypeStruct(
      (config.batch_size,) + models.input_shape(config), jnp.float32,
      sharding=parallel.batch_sharded(parallel.explicit_mesh(mesh)))
  try:
    return step.make_train_step(config, mesh=mesh).lower(state, batch).compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if 'RESOURCE_EXHAUSTED' not in text and 'out of memory' not in text.lower():
      raise
    raise UserError(oom_line(text, topology_name,
                             config.batch_size // len(devices))) from e


def oom_line(text: str, topology_name: str, per_device: int) -> str:
  """XLA's compile-time HBM out-of-memory as one line with the fix."""
  used = re.search(r'Used\s+([\d.]+\s*[KMGT]?i?B?)\s+of\s+([\d.]+\s*[KMGT]?i?B?)'
                   r'\s+hbm', text)
  numbers = (f'needs {used.group(1)} of {used.group(2)} HBM' if used
             else 'does not fit in HBM')
  return (f'the train step for {topology_name} at {per_device} images per '
          f'device {numbers}; set --config.remat=True, a smaller '
          '--config.batch_size, or --config.dtype=bfloat16.')


def state_bytes(config) -> int:
  """Bytes of the TrainState (params, Adam moments, BatchNorm statistics),
  unpadded."""
  return sum(a.size * a.dtype.itemsize
             for a in jax.tree_util.tree_leaves(step.abstract_train_state(config)))


def peak_bytes(compiled) -> int:
  """Per-device peak: arguments + temporaries + outputs not aliased to a
  donated argument."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes
          + m.output_size_in_bytes - m.alias_size_in_bytes)


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def xla_bytes(compiled) -> float:
  """HBM bytes XLA's cost model says one step reads and writes."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('bytes accessed', 0.0))


def fit_line(points) -> Tuple[float, float]:
  """(a, b) of peak = a + b * batch through two (batch, bytes) points."""
  (b1, y1), (b2, y2) = points
  if b1 == b2:
    raise ValueError('The memory line needs two different batch sizes.')
  slope = (y2 - y1) / (b2 - b1)
  return y1 - slope * b1, slope


def largest_batch(a: float, b: float, hbm_bytes: float) -> int:
  """The largest per-device batch with a + b * batch <= hbm_bytes (0 if
  none)."""
  if b <= 0:
    raise ValueError(f'Memory does not grow with the batch (slope {b}).')
  return max(int((hbm_bytes - a) // b), 0)


def memory_line(config, topology_name: str, compiled=None, check=True):
  """Fits per-device peak = a + b * batch through the config's per-device
  batch p (`compiled`, if given, is its compile) and 2p, predicts the largest
  batch that fits the chip's HBM and (with `check`) compiles it once to
  confirm. Returns a dict; 'largest_batch' is None when the peak does not
  grow with the batch (tiny batches, where XLA's schedule dominates). Fit it
  near the batch you mean to run: from 2 and 4 images of the 32 px default
  on v5e it predicts 4632 per chip at 16 GiB, which compiles to 6.6 GiB."""
  hbm = chip_for(topology_name).hbm_gib * GIB
  per = configuration.check_batch_divides(
      config.batch_size, len(topology(topology_name).devices))
  if compiled is None:
    compiled = compile_step(config, topology_name)
  points = [(per, peak_bytes(compiled)),
            (2 * per, peak_bytes(compile_step(config, topology_name, 2 * per)))]
  a, b = fit_line(points)
  out = dict(points=points, a=a, b=b, largest_batch=None, checked=None)
  if b <= 0:
    return out
  out['largest_batch'] = best = largest_batch(a, b, hbm)
  if check and best > 0:
    try:
      out['checked'] = peak_bytes(compile_step(config, topology_name, best))
    except UserError as e:
      out['checked'] = str(e)
  return out


def report(config, topology_name: str, compiled=None) -> str:
  """The per-device plan of `config` on `topology_name`, as text."""
  chip = chip_for(topology_name)
  devices = topology(topology_name).devices
  n = len(devices)
  per = configuration.check_batch_divides(config.batch_size, n)
  if compiled is None:
    compiled = compile_step(config, topology_name)
  m = compiled.memory_analysis()
  hbm = chip.hbm_gib * GIB
  peak = peak_bytes(compiled)
  flops, traffic = xla_flops(compiled), xla_bytes(compiled)
  model = analytic_flops(config, per)
  t_flops = flops / (chip.bf16_tflops * 1e12)
  t_bytes = traffic / (chip.hbm_gbps * 1e9)
  t = max(t_flops, t_bytes)
  gib = lambda x: f'{x / GIB:.3f} GiB'
  lines = [
      f'{topology_name}: {n} chips, {per} images per chip (global batch '
      f'{config.batch_size}); one compile serves every {topology_name.split(":")[0]} '
      'slice under data parallelism.',
      f'chip: {chip.hbm_gib} GiB HBM, {chip.hbm_gbps} GB/s, '
      f'{chip.bf16_tflops} bf16 TFLOP/s (peaks, plan.CHIPS).',
      f'precision: params {config.dtype}; TPU default matmul/conv precision '
      '(bfloat16 passes for float32 inputs).',
      f'state (unpadded): {gib(state_bytes(config))}',
      f'arguments: {gib(m.argument_size_in_bytes)}  temporaries: '
      f'{gib(m.temp_size_in_bytes)}  outputs: {gib(m.output_size_in_bytes)} '
      f'(aliased {gib(m.alias_size_in_bytes)})',
      f'peak: {gib(peak)} of {chip.hbm_gib} GiB ({100 * peak / hbm:.1f}%, '
      f'{100 * (1 - peak / hbm):.1f}% free)',
      f'FLOPs per step per chip: XLA {flops:.4g}, model {model:.4g} '
      f'(ratio {flops / model if model else float("nan"):.3f})',
      f'roofline step time: {t * 1e3:.3f} ms (compute {t_flops * 1e3:.3f} ms, '
      f'HBM {t_bytes * 1e3:.3f} ms for XLA\'s {traffic / GIB:.3f} GiB '
      'accessed), '
      f'{per / t if t else float("inf"):.1f} images/s per chip',
      'MFU = model FLOPs per step / (step time * peak FLOP/s); the roofline '
      'is a bound, not a measured TPU time. Image-grid and evaluation '
      'programs are not included.',
  ]
  return '\n'.join(lines)


def main(argv):
  """CLI body: `cli.run(main)` with --config and --topology."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  # JAX's persistent cache cannot reload a TPU executable on a CPU host.
  jax.config.update('jax_enable_compilation_cache', False)
  config = flags_.config
  t0 = time.time()
  compiled = compile_step(config, flags_.topology)
  print(f'compiled in {time.time() - t0:.1f} s')
  print(report(config, flags_.topology, compiled))
  if flags_.fit:
    line = memory_line(config, flags_.topology, compiled)
    checked = line['checked']
    if isinstance(checked, (int, float)):
      checked = f'{checked / GIB:.3f} GiB'
    print(f"memory line: peak = {line['a'] / GIB:.3f} GiB + "
          f"{line['b'] / GIB:.4f} GiB * images per chip, through "
          f"{[(n, round(y / GIB, 3)) for n, y in line['points']]}; largest "
          f"batch per chip {line['largest_batch']} (compiled: {checked})")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                  lock_config=True)
  flags.DEFINE_string('topology', 'v5e:2x2', 'TPU topology, e.g. v5e:2x2, '
                      'v4:2x2x1, v5p:2x2x1, v6e:2x2.')
  flags.DEFINE_bool('fit', False, 'Also fit the memory line (two more '
                    'compiles and a check).')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  from introvae_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)
