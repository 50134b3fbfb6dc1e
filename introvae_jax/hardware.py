"""Accelerator peaks, the model's FLOPs and MFU.

One table of per-chip peaks (TPUs and GPUs), the analytic FLOPs of one
IntroVAE reference iteration from the layer shapes, and the model-FLOPs
utilisation of a measured step. `plan` reads them for compile-time plans,
`train` for the MFU it logs on an accelerator.
"""

import dataclasses
import re
from typing import Dict, Optional, Tuple

from introvae_jax import layout
from introvae_jax import models
from introvae_jax import objectives
from introvae_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float          # memory per chip (GiB; GPUs: the datasheet's GB)
  hbm_gbps: float         # memory bandwidth per chip, GB/s (1e9 bytes/s)
  bf16_tflops: float      # dense bfloat16 peak per chip, TFLOP/s (1e12)
  # Dense float32 peaks (GPUs): with TF32 tensor cores ('default' precision)
  # and without them ('highest'). TPUs have none: float32 products are
  # bfloat16 passes on the MXU (TPU_PASSES).
  tf32_tflops: Optional[float] = None
  fp32_tflops: Optional[float] = None


# TPUs, from the Cloud TPU documentation pages "TPU v4", "TPU v5e", "TPU v5p"
# and "TPU v6e (Trillium)" (cloud.google.com/tpu/docs/<version>), system
# architecture tables. v5p's 95 GiB and v6e's 1640 GB/s are the figures least
# often quoted and were not rechecked against the pages here.
# GPUs, dense (no sparsity), from NVIDIA's datasheets: "H100 Tensor Core GPU"
# (SXM column), "H200 Tensor Core GPU", "A100 Tensor Core GPU" (SXM 80GB),
# "L4 Tensor Core GPU"; the datasheets quote the tensor-core figures with 2:4
# sparsity, halved here.
CHIPS: Dict[str, Chip] = {
    'v4': Chip(hbm_gib=32, hbm_gbps=1228, bf16_tflops=275),
    'v5e': Chip(hbm_gib=16, hbm_gbps=819, bf16_tflops=197),
    'v5p': Chip(hbm_gib=95, hbm_gbps=2765, bf16_tflops=459),
    'v6e': Chip(hbm_gib=32, hbm_gbps=1640, bf16_tflops=918),
    'h100': Chip(hbm_gib=80, hbm_gbps=3350, bf16_tflops=989.5,
                 tf32_tflops=494.5, fp32_tflops=67),
    'h200': Chip(hbm_gib=141, hbm_gbps=4800, bf16_tflops=989.5,
                 tf32_tflops=494.5, fp32_tflops=67),
    'a100': Chip(hbm_gib=80, hbm_gbps=2039, bf16_tflops=312,
                 tf32_tflops=156, fp32_tflops=19.5),
    'l4': Chip(hbm_gib=24, hbm_gbps=300, bf16_tflops=121,
               tf32_tflops=60, fp32_tflops=30.3),
}
TPUS = ('v4', 'v5e', 'v5p', 'v6e')

# bfloat16 MXU passes per float32 product on a TPU, by `config.precision`
# (JAX documentation, "Matmul precision": HIGH is BF16_BF16_F32_X3, HIGHEST
# BF16_BF16_F32_X6 there). bfloat16 inputs take one pass at any precision.
TPU_PASSES = {'default': 1, 'high': 3, 'highest': 6}



def topology_key(name: str) -> str:
  """The CHIPS key of a TPU topology name ('v5e:2x2' -> 'v5e') or of a table
  key ('h100'); an unknown chip is a `UserError`."""
  generation = name.split(':')[0].split('-')[0].lower()
  if generation not in CHIPS:
    raise UserError(f'--topology={name}: unknown chip {generation!r}; use one '
                    f'of {list(TPUS)} with a shape, e.g. v5e:2x2, v4:2x2x1.')
  return generation


def chip_named(name: str) -> Chip:
  """The chip of a TPU topology name ('v5e:2x2') or a table key ('h100')."""
  return CHIPS[topology_key(name)]


def chip_key(device_kind: str) -> Optional[str]:
  """The CHIPS key of a JAX `device.device_kind` ('TPU v5 lite', 'NVIDIA
  H100 80GB HBM3'), or None for a CPU or a chip not in the table."""
  kind = device_kind.lower()
  if kind.startswith('tpu'):
    if 'v6' in kind:
      return 'v6e'
    if 'v5' in kind:
      return 'v5e' if ('lite' in kind or 'v5e' in kind) else 'v5p'
    return 'v4' if 'v4' in kind else None
  for key in ('h200', 'h100', 'a100', 'l4'):
    if re.search(rf'\b{key}\b', kind):
      return key
  return None


def peak_flops(key: str, dtype: str, precision: str) -> float:
  """FLOP/s one chip can reach for the run's arithmetic: bfloat16, or float32
  at `precision` (TPU: bfloat16 passes; GPU: TF32 or plain float32 cores)."""
  chip = CHIPS[key]
  if dtype == 'bfloat16':
    return chip.bf16_tflops * 1e12
  if key in TPUS:
    return chip.bf16_tflops * 1e12 / TPU_PASSES[precision]
  return (chip.fp32_tflops if precision == 'highest'
          else chip.tf32_tflops) * 1e12


def _taps(size: int, k: int, exact: bool) -> int:
  """Kernel taps over a size x size output: k*k per pixel, or (`exact`) only
  those landing inside the image ('SAME' padding's zeros skipped)."""
  if not exact:
    return size * size * k * k
  p = k // 2
  line = sum(min(i + p, size - 1) - max(i - p, 0) + 1 for i in range(size))
  return line * line


# The MXU's side on a TPU: a product's contraction and output widths are
# multiplied in tiles of this many (128 x 128 arrays; v6e's are 256 x 256).
MXU_TILE = {'v4': 128, 'v5e': 128, 'v5p': 128, 'v6e': 256}


def _mxu_conv(size: int, c_in: int, c_out: int, k: int, block: int,
              tile: int) -> int:
  """FLOPs an MXU performs for a k x k convolution over a size x size map
  held with `block` (`layout`): the packed map's positions, the packed
  kernel's taps (its zero taps are multiplied too) and its channel widths
  rounded up to the MXU tile."""
  up = lambda n: -(-n // tile) * tile
  taps = layout.packed_kernel_size(k, block)
  bb = block * block
  return (2 * (size // block) ** 2 * taps * taps * up(bb * c_in)
          * up(bb * c_out))


def forward_flops(config, exact_taps: bool = False,
                  mxu_tile: Optional[int] = None) -> Tuple[int, int]:
  """(encoder, decoder) forward FLOPs per example, from the layer shapes:
  2*H*W*Cin*Cout*k*k per convolution, 2*in*out per dense layer; the
  elementwise work (BatchNorm, activations, pooling, losses, Adam) is not
  counted. `exact_taps` leaves out the taps on 'SAME' padding, as XLA's
  count does (a third of a 3x3 window at 4x4; little at 64 px and up).
  With `mxu_tile`, the convolutions count what a TPU's MXU multiplies
  (`_mxu_conv`: widths padded to the tile, in `config.space_to_depth`'s
  layout), the work a narrow layer wastes and a packed one adds."""
  chans = tuple(config.channels)
  base = config.base_size
  size = models.image_size_for(chans, base)
  if mxu_tile:
    _conv = lambda s, c_in, c_out, k: _mxu_conv(
        s, c_in, c_out, k, layout.block_at(config.space_to_depth, size, s),
        mxu_tile)
  else:
    _conv = lambda s, c_in, c_out, k: (2 * _taps(s, k, exact_taps) * c_in
                                       * c_out)
  img, hdim = config.image_channels, config.hdim
  skip = lambda a, b, two: models._has_skip_conv(  # pylint: disable=protected-access
      a, b, two, config.reference_layout)

  def block(s, c_in, c_out, has_skip):
    f = _conv(s, c_in, c_out, 3) + _conv(s, c_out, c_out, 3)
    return f + (_conv(s, c_in, c_out, 1) if has_skip else 0)

  enc = _conv(size, img, chans[0], 5)
  s = size // 2
  for i in range(1, len(chans)):
    enc += block(s, chans[i - 1], chans[i], skip(chans[i - 1], chans[i], True))
    s //= 2
  enc += block(s, chans[-1], chans[-1], False)
  enc += 2 * s * s * chans[-1] * 2 * hdim

  dec = 2 * hdim * chans[-1] * base * base
  s, prev = base, len(chans) - 1
  for i in reversed(range(len(chans))):
    dec += block(s, chans[prev], chans[i],
                 skip(chans[prev], chans[i], prev != i))
    s, prev = 2 * s, i
  dec += block(s, chans[0], chans[0], False)
  dec += _conv(s, chans[0], img, 5)
  return enc, dec


def mlp_forward_flops(config) -> Tuple[int, int]:
  """(encoder, decoder) forward FLOPs per point of the 2-D MLPs: 2*in*out
  per dense layer."""
  widths = (config.data_dim,) + tuple(config.mlp_hidden) + (2 * config.hdim,)
  enc = sum(2 * a * b for a, b in zip(widths, widths[1:]))
  widths = ((config.hdim,) + tuple(reversed(tuple(config.mlp_hidden)))
            + (config.data_dim,))
  return enc, sum(2 * a * b for a, b in zip(widths, widths[1:]))


def analytic_flops(config, batch: int, exact_taps: bool = False,
                   mxu_tile: Optional[int] = None) -> int:
  """Model FLOPs of one iteration of `config.objective` on `batch` examples
  (the MFU numerator: remat's recomputation is not model work): forward
  FLOPs times the objective's passes (`PASSES`, in forward-pass
  equivalents). `mxu_tile`: what a TPU multiplies (`forward_flops`)."""
  enc, dec = (forward_flops(config, exact_taps, mxu_tile)
              if config.arch == 'conv' else mlp_forward_flops(config))
  passes_e, passes_g = objectives.get(config.objective).PASSES
  return batch * (passes_e * enc + passes_g * dec)


def mfu(config, per_device_batch: int, step_seconds: float,
        key: str) -> float:
  """Model FLOPs utilisation of one chip: the model's FLOPs per step over
  what the chip's peak for the run's arithmetic (`peak_flops`) would do in
  the measured step time."""
  peak = peak_flops(key, config.dtype, config.precision)
  return analytic_flops(config, per_device_batch) / (step_seconds * peak)
