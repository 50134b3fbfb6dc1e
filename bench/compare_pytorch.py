"""This project's reference-mode step vs the authors' PyTorch iteration, on CPU.

Same machine, architecture (the reference widths, `channels_for`), batch and
thread count on both sides; each side runs in its own child process (pinned
to the same `--threads` CPUs), so compile times and peak RSS are separate.
Both processes stay alive and take turns, one timed iteration each, so a
change in the machine's load hits both sides alike.

  python bench/compare_pytorch.py                      # 64, 128 and 256 px
  python bench/compare_pytorch.py --sizes=64 --steps=3

Per size it prints, for each side: compile time (JAX: lowering + XLA
compilation of the jitted `train_step`; PyTorch runs eagerly and has none),
the first iteration, the median seconds per iteration over `--steps` timed
iterations after one warm-up, images/s, and the process's peak RSS; then the
JAX/PyTorch ratios. For JAX also XLA's FLOP count per step and the FLOP/s
achieved (the PyTorch side runs the same model FLOPs plus a second decoder
backward). Batches: 64 px x 16, 128 px x 8, 256 px x 4 (override with
`--batch`). Synthetic images and fresh random draws each iteration; no input
pipeline is timed.

The PyTorch side is `tests/torch_reference.py`'s `introspective_iteration`:
the reference's calls and arithmetic, with the G-step backward limited to the
decoder (the authors' loop also back-propagates through the first encoder
call a second time, for encoder gradients it discards), so it is a slightly
leaner baseline than the authors' own loop.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BATCH = {32: 32, 64: 16, 128: 8, 256: 4, 512: 2, 1024: 1}


def _config(size, batch, conv_impl='xla'):
  from introvae_jax import base_config, channels_for  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.image_size, c.channels, c.hdim, c.batch_size = (
      size, channels_for(size), 512, batch)
  c.mode, c.num_vae_steps, c.conv_impl = 'reference', 0, conv_impl
  return c


def _peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serve(run_one, setup):
  """Worker loop: one warm-up iteration, then one timed iteration per 'go'
  line from the parent; prints RESULT lines the parent reads."""
  t0 = time.perf_counter()
  run_one()
  print('RESULT ' + json.dumps(dict(setup, first_s=time.perf_counter() - t0)),
        flush=True)
  for line in sys.stdin:
    if line.strip() != 'go':
      break
    t0 = time.perf_counter()
    run_one()
    print('RESULT ' + json.dumps(dict(time_s=time.perf_counter() - t0)),
          flush=True)
  print('RESULT ' + json.dumps(dict(peak_rss_mib=_peak_rss_mib())), flush=True)


def worker_jax(args):
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from introvae_jax import create_train_state, train_step  # pylint: disable=g-import-not-at-top

  config = _config(args.size, args.batch, args.conv_impl)
  state = create_train_state(config, jax.random.PRNGKey(0))
  x = np.random.default_rng(0).uniform(
      size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  step = jax.jit(functools.partial(
      train_step, config=ml_collections.FrozenConfigDict(config)),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, x).compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def run_one():
    holder[0], metrics = compiled(holder[0], x)
    jax.block_until_ready(metrics)

  import xla_cost  # pylint: disable=g-import-not-at-top  (bench/, beside this file)
  return run_one, dict(compile_s=compile_s, flops=xla_cost.flops(compiled),
                       backend=jax.default_backend(), version=jax.__version__)


def worker_torch(args):
  import torch  # pylint: disable=g-import-not-at-top
  # The restatement lives with the tests (it is not part of the package).
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'tests'))
  import torch_reference as tr  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  # XLA:CPU computes with denormals flushed to zero; the same here, so slow
  # denormal arithmetic does not tilt the comparison.
  torch.set_flush_denormal(True)
  torch.manual_seed(0)
  config = _config(args.size, args.batch)
  model = tr.build_model(config)
  opt_e, opt_g = tr.make_optimizers(model, config)
  x = torch.rand(args.batch, 3, args.size, args.size)

  def run_one():
    eps = torch.randn(args.batch, config.hdim)
    z_p = torch.randn(args.batch, config.hdim)
    tr.introspective_iteration(model, opt_e, opt_g, x, eps, z_p, config,
                               keep_grads=False)

  return run_one, dict(compile_s=None, threads=torch.get_num_threads(),
                       version=torch.__version__)


def run_worker(args):
  cpus = sorted(os.sched_getaffinity(0))[:args.threads]
  os.sched_setaffinity(0, cpus)
  run_one, setup = (worker_jax if args.worker == 'jax' else worker_torch)(args)
  _serve(run_one, dict(setup, cpus=cpus))


class _Worker:
  """A live worker process: set up and warmed up on start, then one timed
  iteration per `step()`."""

  def __init__(self, side, size, batch, args):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), JAX_PLATFORMS='cpu',
               PYTHONPATH=os.pathsep.join(
                   [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={side}',
           f'--size={size}', f'--batch={batch}', f'--threads={args.threads}',
           f'--conv_impl={args.conv_impl}']
    self.name = f'{side} ({size}px)'
    self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    self.result = self._read()
    self.result['times'] = []

  def _read(self):
    for line in self._proc.stdout:
      if line.startswith('RESULT '):
        return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'{self.name} worker failed:\n'
                       f'{self._proc.stderr.read()[-3000:]}')

  def step(self):
    self._proc.stdin.write('go\n')
    self._proc.stdin.flush()
    self.result['times'].append(self._read()['time_s'])

  def finish(self):
    self._proc.stdin.close()
    self.result.update(self._read())
    self._proc.wait()
    return self.result


def _row(name, r, batch):
  med = statistics.median(r['times'])
  compile_s = '-' if r['compile_s'] is None else f"{r['compile_s']:.1f}"
  return (f"  {name:<8} {compile_s:>10} {r['first_s']:>10.2f} {med:>11.3f} "
          f"{batch / med:>8.2f} {r['peak_rss_mib']:>10.0f}"), med


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--sizes', default='64,128,256',
                 help='comma-separated image sizes')
  p.add_argument('--batch', type=int, default=None,
                 help='batch for every size (default: 64->16, 128->8, 256->4)')
  p.add_argument('--steps', type=int, default=3,
                 help='timed iterations per side, after one warm-up')
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--conv_impl', default='xla', choices=('xla', 'im2col'),
                 help="this project's convolution (config.conv_impl)")
  p.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  p.add_argument('--size', type=int, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return run_worker(args)

  print(f'# {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs visible, {args.threads} used per side; '
        f'load average at start {os.getloadavg()[0]:.2f}')
  print(f'# reference-mode step, hdim 512, reference widths; JAX conv_impl='
        f'{args.conv_impl}; {args.steps} timed iterations after 1 warm-up')
  for size in (int(s) for s in args.sizes.split(',')):
    batch = args.batch or DEFAULT_BATCH[size]
    load = os.getloadavg()[0]
    jax_w = _Worker('jax', size, batch, args)
    torch_w = _Worker('torch', size, batch, args)
    for _ in range(args.steps):   # alternate: the same load for both sides
      jax_w.step()
      torch_w.step()
    jax_r, torch_r = jax_w.finish(), torch_w.finish()
    print(f'\n{size}px, batch {batch} (jax {jax_r["version"]}, '
          f'torch {torch_r["version"]}, {torch_r["threads"]} torch threads; '
          f'1-min load average at start {load:.2f}, at end '
          f'{os.getloadavg()[0]:.2f})')
    print(f"  {'side':<8} {'compile s':>10} {'first it s':>10} "
          f"{'median s/it':>11} {'img/s':>8} {'peak MiB':>10}")
    line, t_jax = _row('jax', jax_r, batch)
    print(line)
    line, t_torch = _row('pytorch', torch_r, batch)
    print(line)
    print(f'  ratio pytorch/jax time per iteration (= jax/pytorch images/s): '
          f'{t_torch / t_jax:.2f}x; peak RSS jax/pytorch '
          f'{jax_r["peak_rss_mib"] / torch_r["peak_rss_mib"]:.2f}x')
    print(f'  jax: XLA counts {jax_r["flops"] / 1e9:.0f} GFLOP/step, '
          f'{jax_r["flops"] / t_jax / 1e9:.1f} GFLOP/s achieved; per-iteration '
          f'times jax {[round(t, 2) for t in jax_r["times"]]}, pytorch '
          f'{[round(t, 2) for t in torch_r["times"]]}', flush=True)


if __name__ == '__main__':
  main()
