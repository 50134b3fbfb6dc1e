"""Time from `python main.py ...` to the first training step, cold and warm.

Runs the training program `--runs` times on a fresh workdir each time, all
sharing one new JAX compilation cache (so the first run compiles and the
others read the cache, as a rerun or a resume does), and prints per run the
seconds until step 1's metrics are logged, the total wall time and the CPU
time of the process:

  python bench/startup.py                                # configs/default.py
  python bench/startup.py --runs=3 -- --config.num_train_steps=2
  python bench/startup.py --no_cache                     # the cache turned off

Arguments after `--` go to main.py (default: 1 step, evaluation off, so the
numbers are start-up only). The digit classifier and data caches are the
user's ($INTROVAE_CACHE); only the compilation cache is fresh. Numbers depend
on the machine and on its load: compare runs made in the same invocation.
"""

import os
import re
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = flags.DEFINE_string('config', 'configs/default.py', 'Recipe file.')
_RUNS = flags.DEFINE_integer('runs', 2, 'Runs sharing one compilation cache.',
                             lower_bound=1)
_NO_CACHE = flags.DEFINE_bool('no_cache', False, 'Turn the persistent '
                              'compilation cache off (every run compiles).')
FIRST_STEP = re.compile(r'\] \[1\] ')


def time_run(workdir, cache, extra):
  """(seconds to step 1's log line, wall seconds, CPU seconds)."""
  cmd = [sys.executable, os.path.join(REPO, 'main.py'),
         f'--config={os.path.join(REPO, _CONFIG.value)}',
         f'--workdir={workdir}', *extra]
  env = dict(os.environ)
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = cache
  else:
    env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.monotonic()
  first = None
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  for line in proc.stderr:
    if first is None and FIRST_STEP.search(line):
      first = time.monotonic() - start
  if proc.wait():
    raise SystemExit(f'main.py failed with status {proc.returncode}')
  wall = time.monotonic() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return first, wall, cpu


def main(argv):
  extra = argv[1:] or ['--config.num_train_steps=1',
                       '--config.eval_every_steps=0']
  with tempfile.TemporaryDirectory() as tmp:
    cache = None if _NO_CACHE.value else os.path.join(tmp, 'jax_cache')
    print(f'{_CONFIG.value} {" ".join(extra)}; compilation cache: '
          f'{"off" if cache is None else "fresh, shared by the runs"}')
    print(f'{"run":>4} {"to step 1 (s)":>14} {"wall (s)":>9} {"CPU (s)":>8}')
    for i in range(_RUNS.value):
      first, wall, cpu = time_run(os.path.join(tmp, f'run{i}'), cache, extra)
      print(f'{i:>4} {first if first is not None else float("nan"):>14.1f} '
            f'{wall:>9.1f} {cpu:>8.1f}')


if __name__ == '__main__':
  app.run(main)
