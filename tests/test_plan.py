"""introvae_jax.plan: chip peaks, memory-line arithmetic, analytic FLOPs, and
(slow, with libtpu) the real step compiled for a TPU topology on this host."""

import importlib.util
import re
import time

import pytest

from conftest import tiny_config
from introvae_jax import hardware
from introvae_jax import plan
from introvae_jax.errors import UserError

GIB = 1024 ** 3


def test_chip_table_has_the_published_peaks():
  # cloud.google.com/tpu/docs: v4, v5e, v5p, v6e system architecture tables.
  expected = {'v4': (32, 1228, 275), 'v5e': (16, 819, 197),
              'v5p': (95, 2765, 459), 'v6e': (32, 1640, 918)}
  got = {k: (c.hbm_gib, c.hbm_gbps, c.bf16_tflops)
         for k, c in hardware.CHIPS.items() if k in hardware.TPUS}
  assert got == expected
  # NVIDIA datasheets, dense: (bf16, tf32, fp32) TFLOP/s.
  gpus = {k: (c.bf16_tflops, c.tf32_tflops, c.fp32_tflops)
          for k, c in hardware.CHIPS.items() if k not in hardware.TPUS}
  assert gpus == {'h100': (989.5, 494.5, 67), 'h200': (989.5, 494.5, 67),
                  'a100': (312, 156, 19.5), 'l4': (121, 60, 30.3)}
  assert hardware.chip_named('v5e:2x2') is hardware.CHIPS['v5e']
  assert hardware.chip_named('v4:2x2x1') is hardware.CHIPS['v4']
  with pytest.raises(UserError, match='unknown chip'):
    hardware.chip_named('v9x:2x2')


@pytest.mark.parametrize('kind, key', [
    ('TPU v4', 'v4'), ('TPU v5 lite', 'v5e'), ('TPU v5e', 'v5e'),
    ('TPU v5', 'v5p'), ('TPU v5p', 'v5p'), ('TPU v6 lite', 'v6e'),
    ('NVIDIA H100 80GB HBM3', 'h100'), ('NVIDIA H200', 'h200'),
    ('NVIDIA A100-SXM4-80GB', 'a100'), ('NVIDIA L4', 'l4'),
    ('NVIDIA L40S', None), ('cpu', None), ('TPU v3', None)])
def test_device_kinds_name_their_chip(kind, key):
  assert hardware.chip_key(kind) == key


def test_peak_follows_the_runs_arithmetic_and_mfu_is_its_share():
  c = tiny_config()
  # TPU: float32 products are 6 / 3 / 1 bfloat16 passes.
  assert hardware.peak_flops('v5e', 'float32', 'highest') == 197e12 / 6
  assert hardware.peak_flops('v5e', 'float32', 'high') == 197e12 / 3
  assert hardware.peak_flops('v5e', 'bfloat16', 'highest') == 197e12
  # GPU: plain float32 cores at 'highest', TF32 otherwise.
  assert hardware.peak_flops('a100', 'float32', 'highest') == 19.5e12
  assert hardware.peak_flops('a100', 'float32', 'default') == 156e12
  c.precision = 'default'
  flops = hardware.analytic_flops(c, 4)
  assert hardware.mfu(c, 4, 2e-6, 'a100') == pytest.approx(
      flops / (2e-6 * 156e12))


def test_analytic_flops_of_the_mlp_by_hand():
  c = tiny_config()
  c.arch, c.data_dim, c.hdim, c.mlp_hidden = 'mlp', 2, 2, (8, 4)
  # Encoder 2->8->4->4 (mu, logvar); decoder 2->4->8->2.
  enc = 2 * (2 * 8 + 8 * 4 + 4 * 4)
  dec = 2 * (2 * 4 + 4 * 8 + 8 * 2)
  assert hardware.mlp_forward_flops(c) == (enc, dec)
  assert hardware.analytic_flops(c, 3) == 3 * (13 * enc + 7 * dec)


def test_memory_line_through_two_points():
  a, b = plan.fit_line([(1, 3 * GIB), (3, 7 * GIB)])
  assert (a, b) == (1 * GIB, 2 * GIB)
  assert plan.largest_batch(a, b, 16 * GIB) == 7      # 1 + 2*7 = 15 <= 16
  assert plan.largest_batch(a, b, 15 * GIB) == 7      # exactly full fits
  assert plan.largest_batch(a, b, 0.5 * GIB) == 0
  with pytest.raises(ValueError):
    plan.fit_line([(2, 1.0), (2, 2.0)])


def test_analytic_flops_of_a_one_level_model_by_hand():
  c = tiny_config()              # 8 px, channels (4,), hdim 4, RGB
  # Encoder: conv_in 5x5 3->4 at 8x8; block 4->4 (two 3x3) at 4x4; fc 64->8.
  enc = 2 * 64 * 3 * 4 * 25 + 2 * (2 * 16 * 4 * 4 * 9) + 2 * 64 * 8
  # Decoder: fc 4->64; blocks 4->4 at 4x4 and 8x8; conv_out 5x5 4->3 at 8x8.
  dec = (2 * 4 * 64 + 2 * (2 * 16 * 4 * 4 * 9) + 2 * (2 * 64 * 4 * 4 * 9)
         + 2 * 64 * 4 * 3 * 25)
  assert (enc, dec) == (48640, 84992)
  assert hardware.forward_flops(c) == (enc, dec)
  # 13 encoder and 7 decoder forward-equivalents per example (IntroVAE),
  # 13 and 17 (Soft-IntroVAE), 5 and 4 (VAE); objectives/*.py PASSES.
  assert hardware.analytic_flops(c, 4) == 4 * (13 * enc + 7 * dec)
  for name, (p_e, p_g) in (('soft_introvae', (13, 17)), ('vae', (5, 4))):
    c.objective = name
    assert hardware.analytic_flops(c, 4) == 4 * (p_e * enc + p_g * dec)
  # Without the taps on 'SAME' padding: per axis, a 5-tap kernel over 8
  # pixels lands 3+4+5*4+4+3 = 34 times inside; a 3-tap one over 4 pixels
  # 2+3+3+2 = 10, over 8 pixels 2+3*6+2 = 22.
  enc_x = 2 * 34**2 * 3 * 4 + 2 * (2 * 10**2 * 4 * 4) + 2 * 64 * 8
  dec_x = (2 * 4 * 64 + 2 * (2 * 10**2 * 4 * 4) + 2 * (2 * 22**2 * 4 * 4)
           + 2 * 34**2 * 4 * 3)
  assert hardware.forward_flops(c, exact_taps=True) == (enc_x, dec_x)


def test_mxu_flops_pad_widths_to_the_tile_by_hand():
  """What the MXU multiplies: widths rounded up to its 128 tile, and with
  space_to_depth the packed map's positions, taps and widths."""
  c = tiny_config()              # 8 px, channels (4,), hdim 4, RGB
  t = 128 * 128
  # conv_in 5x5 at 8x8; block_1's two 3x3 at 4x4; fc 64 -> 8 as before.
  enc = 2 * 64 * 25 * t + 2 * (2 * 16 * 9 * t) + 2 * 64 * 8
  assert hardware.forward_flops(c, mxu_tile=128)[0] == enc
  # Block 2 at 8 px: 4x4 positions, the 5x5 window within one block of each
  # side (3x3 taps), 4*3 = 12 and 4*4 = 16 lanes, each padded to 128; the
  # 4 px block is plain (block 1).
  c.space_to_depth = 2
  packed = 2 * 16 * 9 * t + 2 * (2 * 16 * 9 * t) + 2 * 64 * 8
  assert hardware.forward_flops(c, mxu_tile=128)[0] == packed
  assert hardware.forward_flops(c) == hardware.forward_flops(
      tiny_config())  # the model's own FLOPs do not depend on the layout


def test_array_bytes_round_the_minor_dimensions_up_to_the_tile():
  mib = 2 ** 20
  # A 16-channel map with channels minor: 8x its size in 128-lane tiles.
  assert plan.array_bytes('f32', '1,1024,1024,16', '3,2,1,0:T(8,128)') == (
      64 * mib, 512 * mib, 0)
  # Width minor, channels second: 16 rows fill two 8-row tiles exactly.
  assert plan.array_bytes('f32', '1,1024,1024,16', '2,3,1,0:T(8,128)') == (
      64 * mib, 64 * mib, 0)
  assert plan.array_bytes('bf16', '3,5', '1,0:T(8,128)(2,1)S(1)') == (
      30, 8 * 128 * 2, 1)
  assert plan.array_bytes('f32', '', '') == (4, 4, 0)


T = '{1,0:T(8,128)}'
HLO = '\n'.join([
    'HloModule m',
    'ENTRY %main (p: f32[8,16]) -> f32[8,16] {',
    f'  %p = f32[8,16]{T} parameter(0), metadata={{op_name="x"}}',
    f'  %fusion.1 = f32[8,16]{T} fusion(%p), kind=kLoop, metadata={{op_name='
    '"jit(s)/jvp(Decoder)/block_8/conv1/conv_general_dilated"}',
    '  %copy-start = (f32[8,16]{1,0:T(8,128)S(1)}, f32[8,16]{1,0:T(8,128)}, '
    'u32[]{:S(2)}) copy-start(%fusion.1)',
    '  %copy-done = f32[8,16]{1,0:T(8,128)S(1)} copy-done(%copy-start)',
    f'  %fusion.2 = f32[8,16]{T} fusion(%copy-done, %p), kind=kLoop, '
    'metadata={op_name="jit(s)/transpose(jvp(Encoder))/bn_in/add"}',
    '  %copy.1 = f32[8,16]{0,1:T(8,128)} copy(%p)',
    f'  %copy.2 = f32[8,16]{T} copy(%copy.1)',
    f'  ROOT %copy.3 = f32[8,16]{T} copy(%unknown)',
    '}'])


def test_hbm_traffic_reads_and_writes_each_tiled_hbm_array_once():
  tile = 8 * 128 * 4          # f32[8,16] in one (8, 128) tile
  rows = plan.hbm_traffic(HLO)
  f32_16x8 = 16 * 128 * 4    # its transpose, in two tiles
  assert [(r['opcode'], r['read'], r['write'], r['layer']) for r in rows] == [
      ('fusion', tile, tile, 'Decoder/block_8/conv1'),
      # Moves XLA adds count for the layer whose array they move.
      ('copy-start', tile, 0, 'Decoder/block_8/conv1 (copied)'),  # to VMEM
      ('fusion', tile, tile, 'Encoder/bn_in'),   # reads VMEM and p
      ('copy', tile, f32_16x8, '(step arguments: state and batch) (copied)'),
      ('copy', f32_16x8, tile, '(step arguments: state and batch) (copied)'),
      ('copy', 0, tile, '(copies without a source op)')]
  assert rows[0]['logical'] == 8 * 16 * 4 and rows[0]['tiled'] == tile
  assert plan.traffic_by_layer(rows)[:2] == [
      ('(step arguments: state and batch) (copied)', 2 * (tile + f32_16x8)),
      ('Decoder/block_8/conv1', 2 * tile)]


def test_oom_is_one_line_with_the_numbers_and_the_fix():
  text = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of '
          'memory in memory space hbm. Used 15.91G of 15.75G hbm. Exceeded '
          'hbm capacity by 164.5M.\n\nTotal hbm usage >= 16.16G: ...')
  line = plan.oom_line(text, 'v5e:2x2', 3)
  assert '\n' not in line
  other = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
           'required for HLO temporaries (50.12G) exceeds available HBM '
           '(15.75G).')
  assert 'needs 50.12G of 15.75G HBM' in plan.oom_line(other, 'v5e:2x2', 9)
  assert '15.91G of 15.75G HBM' in line and '3 images per device' in line
  assert 'remat' in line and 'batch_size' in line and 'bfloat16' in line


def test_unknown_chip_is_refused_before_libtpu_is_needed():
  with pytest.raises(UserError, match="unknown chip 'v9x'"):
    plan.topology('v9x:2x2')


def _has_libtpu():
  return importlib.util.find_spec('libtpu') is not None


@pytest.mark.skipif(not _has_libtpu(), reason='libtpu is not installed')
def test_topologies_have_one_device_per_chip_as_on_a_tpu_vm():
  # v4 and v5p chips have two TensorCores that JAX runs as one device
  # (megacore); v5e and v6e chips have one.
  for name, chips in [('v4:2x2x1', 4), ('v5p:2x2x1', 4), ('v5e:2x2', 4),
                      ('v6e:2x2', 4)]:
    devices = plan.topology(name).devices
    assert len(devices) == chips, name
    assert len({tuple(d.coords) for d in devices}) == chips, name


@pytest.mark.slow
@pytest.mark.skipif(not _has_libtpu(), reason='libtpu is not installed '
                    "(pip install 'libtpu==0.0.42.*') : it compiles for TPU "
                    'topologies on this CPU host')
def test_step_compiled_for_a_tpu_topology_matches_independent_counts():
  # 128 channels: TPU tiles are 128 lanes wide, so the state is not inflated
  # by lane padding (16 channels inflate it 7x); hdim 64 makes the encoder's
  # fc 2*hdim = 128 wide. BatchNorm, both networks and donation are in it.
  c = tiny_config(channels=(128,), hdim=64, batch_size=4)
  t0 = time.time()
  compiled = plan.compile_step(c, 'v5e:2x2')     # 1 image per chip
  seconds = time.time() - t0
  m = compiled.memory_analysis()
  # Independent count, by hand from the layer shapes (C = 128, hdim 64):
  C, conv3, bn = 128, 3 * 3 * 128 * 128, 2 * 128
  enc = (5 * 5 * 3 * C + bn                  # conv_in, bn_in
         + 2 * conv3 + 2 * bn                # block_1 at 4x4
         + 4 * 4 * C * 128 + 128)            # fc -> 2 * hdim
  dec = (64 * 16 * C + 16 * C                # fc
         + 2 * (2 * conv3 + 2 * bn)          # block_0, block_1
         + 5 * 5 * C * 3 + 3)                # conv_out
  stats = 7 * 2 * C                          # 7 BatchNorms' mean and var
  # State: params + Adam mu, nu + BN stats in float32; step, two counters,
  # the rng key (2 x uint32) and two Adam counts are scalars.
  expected = 4 * (3 * (enc + dec) + stats) + 4 * (1 + 1 + 2 + 2)
  # The donated state is aliased to the new state: its bytes on the chip,
  # tile padding included (tiny leaves take at least 512 bytes).
  ratio = m.alias_size_in_bytes / expected
  print(f'compile {seconds:.1f} s; state {m.alias_size_in_bytes} B vs '
        f'{expected} B by hand ({ratio:.4f}); peak '
        f'{plan.peak_bytes(compiled)} B')
  assert expected == plan.state_bytes(c)
  assert 1.0 <= ratio <= 1.02       # measured 1.005
  flops = plan.xla_flops(compiled)
  model = hardware.analytic_flops(c, 1)
  exact = hardware.analytic_flops(c, 1, exact_taps=True)
  print(f'XLA FLOPs {flops:.4g}; analytic {model:.4g} (ratio '
        f'{flops / model:.3f}), without padding taps {exact:.4g} (ratio '
        f'{flops / exact:.3f})')
  # XLA counts the taps inside the image only, the 13 + 7 passes of
  # hardware.py, and the elementwise work the analytic count leaves out
  # (BatchNorm, activations, Adam over 1.3 M parameters): at one 8 px image
  # per chip that is a tenth of the step (measured 1.088).
  assert 0.95 <= flops / exact <= 1.15
  # At 8 px, a third of the 3x3 taps at 4x4 fall on padding (measured 0.849).
  assert 0.75 <= flops / model <= 0.95


@pytest.mark.slow
@pytest.mark.skipif(not _has_libtpu(), reason='libtpu is not installed '
                    "(pip install 'libtpu==0.0.42.*') : it compiles for TPU "
                    'topologies on this CPU host')
def test_a_step_too_large_for_hbm_is_one_line_with_xlas_numbers():
  # A real failing compile, made cheap: the 2-D toy MLP at 2**20 points per
  # chip needs ~50 GiB of temporaries on a 16 GiB v5e (a few seconds).
  c = tiny_config('mlp', mlp_hidden=(1024, 1024, 1024))
  with pytest.raises(UserError) as e:
    plan.compile_step(c, 'v5e:2x2', per_device_batch=2 ** 20)
  message = str(e.value)
  print(message)
  assert '\n' not in message
  assert '1048576 images per device needs' in message, message
  used = re.search(r'needs ([\d.]+)G of ([\d.]+)G HBM', message)
  assert used and float(used.group(1)) > float(used.group(2)), message


def test_against_changes_a_copy_and_refuses_unknown_fields():
  c = tiny_config(image_size=16, channels=(4, 8))
  other = plan.with_changes(c, ['space_to_depth=2', 'precision=default'])
  assert (other.space_to_depth, other.precision) == (2, 'default')
  assert (c.space_to_depth, c.precision) == (1, 'highest')
  with pytest.raises(UserError, match='--against=space_to_dept=2'):
    plan.with_changes(c, ['space_to_dept=2'])
  with pytest.raises(ValueError, match='space_to_depth'):
    plan.with_changes(c, ['space_to_depth=3'])


def test_side_by_side_puts_each_plan_in_a_column():
  f = dict(peak=GIB, bytes=2 * GIB, hbm_arrays=GIB, mxu_flops=3e12,
           t_compute=0.01, t_hbm=0.02, images_per_s=50.0,
           images_per_s_arrays=100.0)
  text = plan.side_by_side({'a': f, 'b': dict(f, peak=2 * GIB)})
  lines = text.splitlines()
  assert lines[0] == '| | a | b |'
  assert '| peak HBM | 1.00 GiB | 2.00 GiB |' in lines
  assert '| images/s per chip (HBM arrays) | 100.0 | 100.0 |' in lines


def test_roofline_charges_the_padded_tiles_once():
  """Compute: the larger of XLA's FLOPs and the layers' count in their
  layout, times the lane padding's waste (mxu / laid_out), at the passes;
  HBM: XLA's bytes, and the HBM arrays' traffic for the tighter bound."""
  counts = dict(per_device=3, passes=1, model_flops=2e12, xla_flops=10e12,
                laid_out_flops=8e12, mxu_flops=12e12, bytes=819e9,
                hbm_arrays=409.5e9)
  r = plan.roofline(counts, 'v5e', 'float32', 'default')
  assert r['t_compute'] == pytest.approx(10e12 * 1.5 / 197e12)
  assert r['t_hbm'] == pytest.approx(1.0) and r['t'] == r['t_hbm']
  assert r['t_arrays'] == pytest.approx(0.5)
  assert r['images_per_s'] == pytest.approx(3.0)
  assert r['mfu_bound'] == pytest.approx(2e12 / 197e12)
  # At 6 passes the compute side grows sixfold and bounds the step.
  r = plan.roofline(dict(counts, passes=6, xla_flops=30e12), 'v5e',
                    'float32', 'highest')
  assert r['t'] == r['t_compute'] == pytest.approx(6 * 45e12 / 197e12)
