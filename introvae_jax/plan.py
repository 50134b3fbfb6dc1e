"""Plans a TPU run on any host: compiles the real train step for a topology.

  python -m introvae_jax.plan --config=configs/ffhq1024.py --topology=v5e:2x2 \
      [--fit] [--config.remat=True ...] [--against=space_to_depth=1,...]

libtpu compiles for a named TPU topology on a CPU-only host (compile-only
devices), so the mesh step the training program runs (`make_train_step`,
donation included) is compiled here and XLA's memory and cost analyses are
read back, per device:

* memory: state, argument, temporary and peak bytes against the chip's HBM;
* precision: float32 products at `config.precision` take 6 ('highest'), 3
  ('high') or 1 ('default') bfloat16 MXU passes (`hardware.TPU_PASSES`);
* FLOPs per step from XLA (with remat's recomputation) and the analytic
  model FLOPs of the objective's iteration (`hardware`);
* the roofline step time max(FLOPs x passes / bf16 peak, bytes / bandwidth)
  and images/s: a lower bound from the chip's peaks, not a measured time.
  FLOPs are what the MXU multiplies (widths padded to its tiles); bytes are
  XLA's 'bytes accessed' (every memory space: the conservative bound) and,
  beside it, the traffic of the arrays XLA placed in HBM;
* where the bytes go: traffic per image, by layer, and the largest arrays
  with their logical and tiled sizes;
* with --fit, the largest batch per device that fits, from a memory line
  through two compiles (`memory_line`), checked by one more compile;
* with --against, the config with those changes planned too, and the two
  side by side (`side_by_side`).

Under pure data parallelism the per-device program depends only on the
per-device batch, not on the slice size, so one compile per chip generation
serves every slice of it (v5e:2x2 stands for v5e:16x16 too).

Not covered: the image-grid and in-training evaluation programs. They are
compiled separately and run between steps, when the step's temporaries are
freed; their memory on top of the state is not planned here.
"""

import ast
import collections
import os
import re
import time
from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from introvae_jax import configuration
from introvae_jax import hardware
from introvae_jax import models
from introvae_jax import parallel
from introvae_jax import step
from introvae_jax.errors import UserError

GIB = 1024 ** 3


def _config_for(config, per_device_batch, n_devices):
  config = config.copy_and_resolve_references()
  if per_device_batch is not None:
    config.batch_size = per_device_batch * n_devices
  return config


def topology(topology_name: str):
  """The compile-only devices of a named TPU topology (needs libtpu)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  hardware.chip_named(topology_name)  # an unknown chip: say so first
  # A v4 chip's two TensorCores run as one device (megacore), as JAX uses
  # them on a v4 VM; the compile-only default would make each core a device.
  extra = ({'chip_config_name': 'megacore'}
           if topology_name.lower().startswith('v4') else {})
  try:
    return topologies.get_topology_desc(platform='tpu',
                                        topology_name=topology_name, **extra)
  except Exception as e:  # pylint: disable=broad-except
    # A bad name and a missing libtpu both land here; the text says which.
    text = ' '.join(str(e).split())[:200]
    raise UserError(f'--topology={topology_name}: cannot make the TPU '
                    f'topology ({text}); it needs libtpu (pip install '
                    "'libtpu==0.0.42.*') and a name such as v5e:2x2.") from e


def abstract_batch(config, mesh) -> jax.ShapeDtypeStruct:
  """The global image batch the mesh step takes, as a shape on `mesh`."""
  return jax.ShapeDtypeStruct(
      (config.batch_size,) + models.input_shape(config), jnp.float32,
      sharding=parallel.batch_sharded(parallel.explicit_mesh(mesh)))


def compile_checked(lowered, where: str, per_device: int):
  """`lowered.compile()`, with an HBM out-of-memory raised as one
  `UserError` line (`oom_line`)."""
  try:
    return lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if 'RESOURCE_EXHAUSTED' not in text and 'out of memory' not in text.lower():
      raise
    raise UserError(oom_line(text, where, per_device)) from e


def compile_step(config, topology_name: str, per_device_batch=None):
  """The mesh train step compiled for `topology_name` (state donated).

  With `per_device_batch`, the global batch is that times the topology's
  chip count; else `config.batch_size`. An HBM out-of-memory is raised as one
  `UserError` line with XLA's numbers and the fix.
  """
  devices = topology(topology_name).devices
  config = _config_for(config, per_device_batch, len(devices))
  per = configuration.check_batch_divides(config.batch_size, len(devices))
  mesh = parallel.make_mesh(devices=devices)
  state = step.abstract_train_state(config, mesh=mesh)
  lowered = step.make_train_step(config, mesh=mesh).lower(
      state, abstract_batch(config, mesh))
  return compile_checked(lowered, topology_name, per)


def oom_line(text: str, where: str, per_device: int) -> str:
  """XLA's compile-time HBM out-of-memory as one line with the fix."""
  size = r'([\d.]+\s*[KMGT]?i?B?)'
  used = (re.search(rf'Used\s+{size}\s+of\s+{size}\s+hbm', text) or
          re.search(rf'HLO temporaries \({size}\) exceeds available HBM '
                    rf'\({size}\)', text))
  numbers = (f'needs {used.group(1)} of {used.group(2)} HBM' if used
             else 'does not fit in HBM')
  return (f'the train step for {where} at {per_device} images per '
          f'device {numbers}; set --config.remat=True, a smaller '
          '--config.batch_size, or --config.dtype=bfloat16 '
          '(python -m introvae_jax.plan --fit finds the largest batch).')


def state_bytes(config) -> int:
  """Bytes of the TrainState (params, Adam moments, BatchNorm statistics),
  unpadded."""
  return sum(a.size * a.dtype.itemsize
             for a in jax.tree_util.tree_leaves(
                 step.abstract_train_state(config)))


def peak_bytes(compiled) -> int:
  """Per-device peak: arguments + temporaries + outputs not aliased to a
  donated argument."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes
          + m.output_size_in_bytes - m.alias_size_in_bytes)


def _cost(compiled, key: str) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get(key, 0.0))


def xla_flops(compiled) -> float:
  """FLOPs XLA counts for one step (remat's recomputation included; the
  same at every precision: passes are not counted)."""
  return _cost(compiled, 'flops')


def xla_bytes(compiled) -> float:
  """HBM bytes XLA's cost model says one step reads and writes."""
  return _cost(compiled, 'bytes accessed')


# HLO text: element sizes, one array type with its layout, one instruction.
_ITEM_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4,
                   u32=4, f32=4, s64=8, u64=8, f64=8, c64=8)
_ARRAY = re.compile(r'\b(' + '|'.join(_ITEM_BYTES) +
                    r')\[([\d,]*)\](?:\{([^}]*)\})?')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$')
# Instructions that move no bytes of their own (an async copy or slice is
# counted at its start: it reads the source and writes the destination).
_NO_TRAFFIC = frozenset({'parameter', 'constant', 'get-tuple-element',
                         'tuple', 'bitcast', 'copy-done', 'slice-done',
                         'after-all',
                         'partition-id', 'replica-id'})


def array_bytes(dtype: str, dims: str, layout_text: str):
  """(logical bytes, bytes in the layout's tiles, memory space) of one HLO
  array type such as f32[3,1024,1024,16]{3,2,1,0:T(8,128)}: the first tile
  rounds up the most-minor dimensions (a 16-channel map in (8, 128) tiles
  takes 8x its size); memory space 0 is HBM (S(1) is a TPU core's VMEM)."""
  shape = [int(d) for d in dims.split(',') if d]
  logical = _ITEM_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
  space = re.search(r'S\((\d+)\)', layout_text or '')
  tile = re.search(r'T\(([\d,]+)\)', layout_text or '')
  if not (tile and shape):
    return logical, logical, int(space.group(1)) if space else 0
  order = [int(i) for i in layout_text.split(':')[0].split(',') if i]
  minor_first = [shape[i] for i in order]
  for j, t in enumerate(reversed([int(v) for v in tile.group(1).split(',')])):
    if j < len(minor_first):
      minor_first[j] = -(-minor_first[j] // t) * t
  tiled = _ITEM_BYTES[dtype] * int(np.prod(minor_first, dtype=np.int64))
  return logical, tiled, int(space.group(1)) if space else 0


def _entry_lines(hlo_text: str) -> List[str]:
  lines, inside = [], False
  for line in hlo_text.splitlines():
    if line.startswith('ENTRY'):
      inside = True
    elif inside and line.startswith('}'):
      break
    elif inside:
      lines.append(line)
  return lines


# Layers of the instructions no model op names (`hbm_traffic`).
NO_SOURCE = '(copies without a source op)'
ARGUMENTS = '(step arguments: state and batch)'
COPIED = ' (copied)'


def layer_of(op_name: str) -> str:
  """The model layer an HLO op came from, from its op_name (Flax names its
  modules' scopes): 'Decoder/block_8/conv1', or the last part otherwise."""
  parts = [p for p in op_name.split('/') if p]
  for i, p in enumerate(parts):
    module = re.sub(r'^.*\((Encoder|Decoder)\)+$', r'\1', p)
    if module in ('Encoder', 'Decoder'):
      rest = [q for q in parts[i + 1:] if re.match(
          r'^(block_\d+|conv_(in|out|expand)|conv\d|bn_in|bn\d|fc)$', q)]
      return '/'.join([module] + rest[:2])
  return parts[-1] if parts else NO_SOURCE


def hbm_traffic(hlo_text: str) -> List[Dict]:
  """Per instruction of the compiled program's entry computation: the HBM
  bytes it reads and writes in the arrays' tiled layouts, its largest
  output (logical and tiled bytes) and its layer. A model of traffic (each
  HBM operand read once, each output written once), to set beside XLA's
  'bytes accessed'. An instruction XLA added (a copy, an async move to or
  from VMEM, a relayout: no op_name) counts as '<layer of its source>
  (copied)', the step's arguments (parameters, optimiser state, the batch)
  being ARGUMENTS."""
  arrays, layers, rows = {}, {}, []
  for line in _entry_lines(hlo_text):
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, types, opcode, operands, rest = m.groups()
    outs = [array_bytes(*t) for t in _ARRAY.findall(types)]
    arrays[name] = outs
    sources = re.findall(r'%([\w.\-]+)', operands)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    if opcode == 'parameter':
      layers[name] = ARGUMENTS
    elif op_name:
      layers[name] = layer_of(op_name.group(1))
    else:  # added by XLA: the layer of the array it passes on or moves
      source = next((layers[s] for s in sources if s in layers), NO_SOURCE)
      moved = opcode not in _NO_TRAFFIC and source != NO_SOURCE
      layers[name] = (source + COPIED if moved and not source.endswith(COPIED)
                      else source)
    if opcode in _NO_TRAFFIC:
      continue
    reads = []
    for operand in sources:
      reads += arrays.get(operand, [])
    if opcode == 'copy-start':  # (destination, source, context)
      outs = outs[:1]
    elif opcode == 'slice-start':  # ((source), destination, context)
      reads, outs = [outs[1][:2] + (outs[0][2],)], outs[1:2]
    in_hbm = lambda bufs: sum(tiled for _, tiled, space in bufs if space == 0)
    largest = max(outs, key=lambda b: b[1], default=(0, 0, 0))
    rows.append(dict(
        opcode=opcode, read=in_hbm(reads), write=in_hbm(outs),
        logical=largest[0], tiled=largest[1], layer=layers[name]))
  return rows


def traffic_by_layer(rows) -> List[Tuple[str, int]]:
  """(layer, HBM bytes read and written) from `hbm_traffic`, largest
  first."""
  total = collections.Counter()
  for r in rows:
    total[r['layer']] += r['read'] + r['write']
  return total.most_common()


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
  hbm = hardware.chip_named(topology_name).hbm_gib * GIB
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


def figures(config, key: str, per_device: int, compiled, rows) -> dict:
  """The plan's numbers for one chip of kind `key` (hardware.CHIPS) running
  `compiled` on `per_device` images: bytes, FLOPs, seconds (`rows`: the
  program's `hbm_traffic`)."""
  m = compiled.memory_analysis()
  counts = dict(
      per_device=per_device, hbm=hardware.CHIPS[key].hbm_gib * GIB,
      state=state_bytes(config), arguments=m.argument_size_in_bytes,
      temporaries=m.temp_size_in_bytes, outputs=m.output_size_in_bytes,
      aliased=m.alias_size_in_bytes, peak=peak_bytes(compiled),
      passes=(1 if config.dtype == 'bfloat16'
              else hardware.TPU_PASSES[config.precision]),
      xla_flops=xla_flops(compiled),
      model_flops=hardware.analytic_flops(config, per_device),
      # What the MXU multiplies: the layers' widths padded to its tiles, in
      # the config's layout (hardware.forward_flops), and what XLA counts of
      # the same layers (the packed layout's zero taps, no lane padding).
      mxu_flops=hardware.analytic_flops(config, per_device,
                                        mxu_tile=hardware.MXU_TILE.get(key)),
      laid_out_flops=hardware.analytic_flops(config, per_device, mxu_tile=1),
      bytes=xla_bytes(compiled),
      # XLA's 'bytes accessed' sums every op's operands and outputs in every
      # memory space (docs/tpu.md, "Where the bytes go"); the arrays XLA
      # placed in HBM are what HBM bandwidth bounds: a second, tighter bound.
      hbm_arrays=sum(r['read'] + r['write'] for r in rows))
  return dict(counts, **roofline(counts, key, config.dtype, config.precision))


def roofline(counts: dict, key: str, dtype: str, precision: str) -> dict:
  """Step-time bounds on chip `key` from a plan's counts (`figures`; also
  what bench/tpu_plans.py stores): seconds, images/s and the MFU bound."""
  chip = hardware.CHIPS[key]
  flops, laid_out = counts['xla_flops'], counts['laid_out_flops']
  # XLA's count leaves out the taps on 'SAME' padding that the MXU still
  # multiplies, and the layer count leaves out remat: the chip does at least
  # the larger (so the MFU bound stays <= 100%), times the lane padding.
  t_compute = (max(flops, laid_out) * counts['mxu_flops'] / laid_out
               * counts['passes'] / (chip.bf16_tflops * 1e12))
  t_hbm = counts['bytes'] / (chip.hbm_gbps * 1e9)
  t = max(t_compute, t_hbm)
  t_arrays = max(t_compute, counts['hbm_arrays'] / (chip.hbm_gbps * 1e9))
  per = counts['per_device']
  return dict(
      t_compute=t_compute, t_hbm=t_hbm, t=t, t_arrays=t_arrays,
      images_per_s=per / t if t else float('inf'),
      images_per_s_arrays=per / t_arrays if t_arrays else float('inf'),
      mfu_bound=(counts['model_flops'] / (
          t * hardware.peak_flops(key, dtype, precision))
                 if t else float('nan')))


def precision_text(config) -> str:
  """Which arithmetic the step's products run at on a TPU."""
  if config.dtype == 'bfloat16':
    return ('bfloat16 compute (float32 parameters, optimiser state and '
            'statistics): one MXU pass per product')
  passes = hardware.TPU_PASSES[config.precision]
  exact = (' (the reference-exact path)' if config.precision == 'highest'
           else ' (not reference-exact)')
  return (f"{config.dtype} at precision '{config.precision}'{exact}: "
          f'{passes} bfloat16 MXU pass{"es" if passes > 1 else ""} per product')


def report(config, topology_name: str, compiled=None) -> str:
  """The per-device plan of `config` on `topology_name`, as text."""
  return analyse(config, topology_name, compiled)[2]


def analyse(config, topology_name: str, compiled=None):
  """(figures, hbm_traffic rows, report text) of `config` on
  `topology_name`, the compiled program read once."""
  key = hardware.topology_key(topology_name)
  chip = hardware.CHIPS[key]
  n = len(topology(topology_name).devices)
  per = configuration.check_batch_divides(config.batch_size, n)
  if compiled is None:
    compiled = compile_step(config, topology_name)
  rows = hbm_traffic(compiled.as_text())
  f = figures(config, key, per, compiled, rows)
  gib = lambda x: f'{x / GIB:.3f} GiB'
  ms = lambda x: f'{x * 1e3:.2f} ms'
  peak, hbm = f['peak'], f['hbm']
  lines = [
      f'{topology_name}: {n} chips, {per} images per chip (global batch '
      f'{config.batch_size}); one compile serves every '
      f'{key} slice under data parallelism.',
      f'chip: {chip.hbm_gib} GiB HBM, {chip.hbm_gbps} GB/s, '
      f'{chip.bf16_tflops} bf16 TFLOP/s (peaks, hardware.CHIPS).',
      f'precision: {precision_text(config)}; remat {config.remat}.',
      f"state (unpadded): {gib(f['state'])}",
      f"arguments: {gib(f['arguments'])}  temporaries: "
      f"{gib(f['temporaries'])}  outputs: {gib(f['outputs'])} "
      f"(aliased {gib(f['aliased'])})",
      f'peak: {gib(peak)} of {chip.hbm_gib} GiB ({100 * peak / hbm:.1f}%, '
      f'{100 * (1 - peak / hbm):.1f}% free)',
      f"FLOPs per step per chip: XLA {f['xla_flops']:.4g}, model "
      f"{f['model_flops']:.4g} (ratio {f['xla_flops'] / f['model_flops']:.3f}"
      f"), on the MXU's padded tiles {f['mxu_flops']:.4g} "
      f"({f['mxu_flops'] / f['model_flops']:.2f}x the model's)",
      f"roofline step time: {ms(f['t'])} (compute {ms(f['t_compute'])} at "
      f"{f['passes']} pass{'es' if f['passes'] > 1 else ''}, HBM "
      f"{ms(f['t_hbm'])} for XLA's {f['bytes'] / GIB:.3f} GiB accessed), "
      f"{f['images_per_s']:.1f} images/s per chip, MFU at most "
      f"{100 * f['mfu_bound']:.1f}%",
      f"with the HBM arrays' traffic ({f['hbm_arrays'] / GIB:.3f} GiB; "
      "XLA's count also holds the arrays it keeps in VMEM): "
      f"{ms(f['t_arrays'])}, {f['images_per_s_arrays']:.1f} images/s per "
      'chip',
      'The roofline is a bound from the peaks, not a measured TPU time; MFU '
      "counts the model's FLOPs against the peak of the run's arithmetic. "
      'Image-grid and evaluation programs are not included.',
  ] + where_bytes_go(rows, f)
  return f, rows, '\n'.join(lines)


def where_bytes_go(rows, f, top: int = 6) -> List[str]:
  """Report lines from a program's `hbm_traffic` rows and `figures`: HBM
  traffic per image, the layers that move the most and the largest arrays
  in HBM with their logical and tiled sizes."""
  per_device = f['per_device']
  gib = lambda x: f'{x / GIB:.2f} GiB'
  lines = [
      f"bytes per image: {gib(f['bytes'] / per_device)} "
      "(XLA's count); HBM traffic per image: "
      f"{gib(f['hbm_arrays'] / per_device)} (the HBM arrays, tiled, each "
      'read and written once per op).',
      'HBM traffic by layer, per image: ' + '; '.join(
          f'{layer} {gib(b / per_device)}'
          for layer, b in traffic_by_layer(rows)[:top]) + '.',
      'largest arrays written to HBM (logical -> tiled): ' + '; '.join(
          f"{r['layer']} {gib(r['logical'])} -> {gib(r['tiled'])}"
          for r in sorted(rows, key=lambda r: -r['write'])[:top]) + '.']
  return lines


def with_changes(config, changes):
  """A copy of `config` with 'field=value' changes (Python literals, or
  strings), validated; a wrong field or value is one `UserError`."""
  config = config.copy_and_resolve_references()
  for change in changes:
    name, _, text = change.partition('=')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      setattr(config, name, value)
    except (AttributeError, KeyError, TypeError) as e:
      raise UserError(f'--against={change}: {e}') from e
  configuration.validate(config)
  return config


def side_by_side(reports) -> str:
  """The main figures of several plans (name -> `figures` dict) as a
  table, one column each."""
  gib = lambda x: f'{x / GIB:.2f} GiB'
  ms = lambda x: f'{x * 1e3:.1f} ms'
  rows = [('peak HBM', 'peak', gib), ("bytes (XLA's count)", 'bytes', gib),
          ('HBM arrays traffic', 'hbm_arrays', gib),
          ('MXU FLOPs', 'mxu_flops', lambda x: f'{x / 1e12:.2f} T'),
          ('compute bound', 't_compute', ms), ('HBM bound (XLA)', 't_hbm', ms),
          ('images/s per chip (XLA bytes)', 'images_per_s',
           lambda x: f'{x:.1f}'),
          ('images/s per chip (HBM arrays)', 'images_per_s_arrays',
           lambda x: f'{x:.1f}')]
  names = list(reports)
  lines = ['| | ' + ' | '.join(names) + ' |',
           '|---' * (len(names) + 1) + '|']
  for label, key, fmt in rows:
    lines.append(f'| {label} | ' + ' | '.join(
        fmt(reports[n][key]) for n in names) + ' |')
  return '\n'.join(lines)


def main(argv):
  """CLI body: `cli.run(main)` with --config and --topology."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags_ = flags.FLAGS
  # Compile on the CPU host (an installed libtpu would look for a TPU); keep
  # libtpu from probing cloud metadata and from locking out other processes
  # (a plan only compiles). JAX's persistent cache cannot reload a TPU
  # executable on a CPU host.
  if 'JAX_PLATFORMS' not in os.environ:
    jax.config.update('jax_platforms', 'cpu')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  jax.config.update('jax_enable_compilation_cache', False)
  config = flags_.config
  t0 = time.time()
  compiled = compile_step(config, flags_.topology)
  print(f'compiled in {time.time() - t0:.1f} s')
  f, _, text = analyse(config, flags_.topology, compiled)
  print(text)
  if flags_.against:
    other, _, text = analyse(with_changes(config, flags_.against),
                             flags_.topology)
    print(text)
    print(side_by_side({'config': f, ','.join(flags_.against): other}))
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
  flags.DEFINE_list('against', [], 'Also plan the config with these changes '
                    '(field=value,...) and print the two side by side, e.g. '
                    '--against=space_to_depth=1.')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  from introvae_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main)
