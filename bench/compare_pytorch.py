"""This project's reference-mode step vs the authors' PyTorch iteration, on CPU.

Same machine, architecture (the reference widths, `channels_for`), batch and
thread count on both sides; each side runs in its own child process (pinned
to the same `--threads` CPUs), so compile times and peak RSS are separate.

  python bench/compare_pytorch.py                      # 64, 128 and 256 px
  python bench/compare_pytorch.py --sizes=64 --steps=3

Per size it prints, for each side: compile time (JAX: lowering + XLA
compilation of the jitted `train_step`; PyTorch runs eagerly and has none),
the first iteration, the median seconds per iteration over `--steps` timed
iterations after one warm-up, images/s, and the process's peak RSS; then the
JAX/PyTorch ratios. Batches: 64 px x 16, 128 px x 8, 256 px x 4 (override with
`--batch`). Synthetic images and fresh random draws each iteration; no input
pipeline is timed.

The PyTorch side is `introvae_jax.torch_reference.introspective_iteration`:
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


def _time_iterations(run_one, steps):
  t0 = time.perf_counter()
  run_one()
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run_one()
    times.append(time.perf_counter() - t0)
  return first, times


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

  first, times = _time_iterations(run_one, args.steps)
  return dict(compile_s=compile_s, first_s=first, times=times,
              backend=jax.default_backend(), version=jax.__version__)


def worker_torch(args):
  import torch  # pylint: disable=g-import-not-at-top
  from introvae_jax import torch_reference as tr  # pylint: disable=g-import-not-at-top

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

  first, times = _time_iterations(run_one, args.steps)
  return dict(compile_s=None, first_s=first, times=times,
              threads=torch.get_num_threads(), version=torch.__version__)


def run_worker(args):
  cpus = sorted(os.sched_getaffinity(0))[:args.threads]
  os.sched_setaffinity(0, cpus)
  result = (worker_jax if args.worker == 'jax' else worker_torch)(args)
  result.update(cpus=cpus, peak_rss_mib=_peak_rss_mib())
  print('RESULT ' + json.dumps(result))


def _spawn(side, size, batch, args):
  env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
             MKL_NUM_THREADS=str(args.threads), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(
                 [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={side}',
         f'--size={size}', f'--batch={batch}', f'--steps={args.steps}',
         f'--threads={args.threads}', f'--conv_impl={args.conv_impl}']
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{side} worker failed ({size}px):\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


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
    load_jax = os.getloadavg()[0]
    jax_r = _spawn('jax', size, batch, args)
    load_torch = os.getloadavg()[0]
    torch_r = _spawn('torch', size, batch, args)
    print(f'\n{size}px, batch {batch} (jax {jax_r["version"]}, '
          f'torch {torch_r["version"]}, {torch_r["threads"]} torch threads; '
          f'1-min load average before each side: {load_jax:.2f}, '
          f'{load_torch:.2f})')
    print(f"  {'side':<8} {'compile s':>10} {'first it s':>10} {'median s/it':>11} "
          f"{'img/s':>8} {'peak MiB':>10}")
    line, t_jax = _row('jax', jax_r, batch)
    print(line)
    line, t_torch = _row('pytorch', torch_r, batch)
    print(line)
    print(f'  ratio jax/pytorch: time per iteration {t_jax / t_torch:.2f}x, '
          f'peak RSS {jax_r["peak_rss_mib"] / torch_r["peak_rss_mib"]:.2f}x '
          f'(jax per-iteration times {[round(t, 2) for t in jax_r["times"]]}, '
          f'pytorch {[round(t, 2) for t in torch_r["times"]]})', flush=True)


if __name__ == '__main__':
  main()
