"""SIGTERM to saved checkpoint, under load, and the loop's speed: worst cases.

For each `--max_steps_in_flight` value (default 2, the loop's default, and
1000: the loop before the bound, whose host ran up to `log_every_steps` steps
ahead of the computation), in one invocation:

1. Speed, on the machine as it is: `--speed_steps` steps of the recipe,
   twice per value, interleaved (A B A B); steps/s from completed steps (the
   wall time of the metrics written at steps `log_every_steps` and the last,
   each written after its step has finished).
2. Preemption, with one busy process per core beside the run
   (`--load_per_core`): the run is started, and SIGTERM is sent `--delays`
   seconds after its first metrics line (the host's backlog, if any, is
   largest just after a flush). Per trial: the step the run stopped at,
   signal -> checkpoint saved (the "Stopped" line) and signal -> exit, the
   exit status, and whether the saved checkpoint restores and is finite.
   The worst signal -> exit is set against max(10 s, 3 steps' time), a step's
   time measured from completed steps in that trial. Then Ctrl-C (SIGINT,
   exit 130) and a second SIGTERM (which aborts at once, status -15).

  python bench/preemption.py                  # configs/default.py
  python bench/preemption.py --delays=1 --more= --max_steps_in_flight=2 \
      --speed_steps=0

Evaluation is off (`eval_every_steps=0`; a stop during an evaluation abandons
it, tests/test_train.py). Runs share the user's compilation cache, so only
the first run compiles. Numbers depend on the machine and its load: compare
the values of one invocation.
"""

import glob
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runs from a checkout too
from introvae_jax import checkpointing  # pylint: disable=g-import-not-at-top

_CONFIG = flags.DEFINE_string('config', 'configs/default.py', 'Recipe file.')
_IN_FLIGHT = flags.DEFINE_list('max_steps_in_flight', ['2', '1000'],
                               'Values of config.max_steps_in_flight to run.')
_DELAYS = flags.DEFINE_list('delays', ['0', '1', '4', '15'],
                            'Seconds after the first metrics line to send '
                            'SIGTERM, one trial each.')
_MORE = flags.DEFINE_list('more', ['INT', 'TERM+TERM'], 'Further trials, 1 s '
                          'after the first metrics line: INT (Ctrl-C, exit '
                          '130), TERM+TERM (a second SIGTERM 0.5 s after the '
                          'first: aborts at once).')
_LOAD = flags.DEFINE_integer('load_per_core', 1, 'Busy processes per core '
                             'beside each preemption trial.')
_SPEED_STEPS = flags.DEFINE_integer('speed_steps', 300, 'Steps per speed run '
                                    '(0: skip the speed comparison).')

METRICS = re.compile(r'\] \[(\d+)\] corrupt_images_skipped=')
STOPPED = re.compile(r'Stopped at step (\d+)')


def _command(workdir, in_flight, steps, extra=()):
  return [sys.executable, os.path.join(REPO, 'main.py'),
          f'--config={os.path.join(REPO, _CONFIG.value)}',
          f'--workdir={workdir}', '--config.eval_every_steps=0',
          f'--config.max_steps_in_flight={in_flight}',
          f'--config.num_train_steps={steps}', *extra]


class _Run:
  """main.py in the background, its stderr lines timestamped as they come."""

  def __init__(self, command):
    self.lines = []  # (time, line)
    self.proc = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, text=True,
                                 bufsize=1)

  def wait_for(self, pattern):
    """(time, match) of the first stderr line matching `pattern`."""
    for t, line in self.lines:
      if pattern.search(line):
        return t, pattern.search(line)
    for line in self.proc.stderr:
      self.lines.append((time.time(), line))
      if pattern.search(line):
        return self.lines[-1][0], pattern.search(line)
    raise RuntimeError('main.py ended before a line matched '
                       f'{pattern.pattern!r}:\n' +
                       ''.join(l for _, l in self.lines[-20:]))

  def finish(self):
    for line in self.proc.stderr:
      self.lines.append((time.time(), line))
    return self.proc.wait(), time.time()


def _seconds_per_step(run):
  """From consecutive metrics lines: (t2 - t1) / (s2 - s1), the last pair."""
  points = [(int(m.group(1)), t) for t, l in run.lines
            if (m := METRICS.search(l))]
  if len(points) < 2:
    return None
  (s1, t1), (s2, t2) = points[-2:]
  return (t2 - t1) / (s2 - s1)


def _finite_checkpoint(workdir):
  """(step, every array finite) of the newest checkpoint."""
  _, state = checkpointing.load_run(workdir)
  leaves = jax.tree_util.tree_leaves(state)
  return int(state.step), all(np.isfinite(np.asarray(a)).all() for a in leaves)


def speed(root, in_flight, log_every):
  """Steps/s of one run, from the metrics written at `log_every` and last."""
  workdir = os.path.join(root, f'speed-{in_flight}-{time.time_ns()}')
  run = _Run(_command(workdir, in_flight, _SPEED_STEPS.value))
  first, _ = run.wait_for(METRICS)
  rc, _ = run.finish()
  last = [t for t, l in run.lines if METRICS.search(l)][-1]
  if rc:
    raise RuntimeError(''.join(l for _, l in run.lines[-20:]))
  return (_SPEED_STEPS.value - log_every) / (last - first)


def trial(root, in_flight, delay, signals):
  """`signals` ('TERM', 'INT' or 'TERM+TERM': a second SIGTERM 0.5 s after
  the first, which aborts) under load; a dict of what happened."""
  workdir = os.path.join(root, f'stop-{in_flight}-{delay}-{time.time_ns()}')
  busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass'])
          for _ in range(_LOAD.value * os.cpu_count())]
  try:
    run = _Run(_command(workdir, in_flight, 100_000))
    first, match = run.wait_for(METRICS)
    time.sleep(max(0.0, first + delay - time.time()))
    sent = time.time()
    for number, name in enumerate(signals.split('+')):
      time.sleep(0.5 * bool(number))
      run.proc.send_signal(getattr(signal, 'SIG' + name))
    saved = None
    if '+' not in signals:
      saved, _ = run.wait_for(STOPPED)
    rc, ended = run.finish()
  finally:
    for p in busy:
      p.kill()
  stopped = [int(m.group(1)) for _, l in run.lines if (m := STOPPED.search(l))]
  try:
    step, finite = _finite_checkpoint(workdir)
  except Exception:  # pylint: disable=broad-except  (aborted: none saved)
    step, finite = None, None
  return dict(at=int(match.group(1)), stopped=stopped[0] if stopped else None,
              step=step, finite=finite, rc=rc,
              saved=None if saved is None else saved - sent,
              exit=ended - sent, step_s=_seconds_per_step(run))


def _cell(value, width, form='d'):
  return f'{"-" if value is None else format(value, form):>{width}}'


def main(argv):
  del argv
  checkpointing.quiet_orbax_logs()
  root = tempfile.mkdtemp(prefix='preemption-')
  print(f'{os.cpu_count()} cores; {_CONFIG.value}; workdirs under {root}')
  spec = importlib.util.spec_from_file_location(
      'recipe', os.path.join(REPO, _CONFIG.value))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  log_every = recipe.get_config().log_every_steps
  values = [int(v) for v in _IN_FLIGHT.value]
  if _SPEED_STEPS.value:
    rates = {v: [] for v in values}
    for _ in range(2):
      for v in values:
        rates[v].append(speed(root, v, log_every))
    print(f'\nspeed, {_SPEED_STEPS.value} steps, steps/s from completed steps '
          '(A B A B):')
    for v in values:
      print(f'  max_steps_in_flight={v:<5d} ' +
            '  '.join(f'{r:.3f}' for r in rates[v]) +
            f'   mean {np.mean(rates[v]):.3f}')
  print(f'\nSIGTERM, {_LOAD.value} busy process(es) per core:')
  print('  in flight  signal     delay  first-line  stopped  ckpt  finite  '
        'rc  saved_s  exit_s  step_s  bound_s')
  cases = [('TERM', float(d)) for d in _DELAYS.value] + [
      (name, 1.0) for name in _MORE.value]
  for v in values:
    worst = 0.0
    for name, delay in cases:
      r = trial(root, v, delay, name)
      bound = max(10.0, 3 * (r['step_s'] or 0.0))
      worst = max(worst, r['exit'] / bound)
      print(f"  {v:9d}  {name:9s}  {delay:5.1f}  {r['at']:10d}  "
            f"{_cell(r['stopped'], 7)}  {_cell(r['step'], 4)}  "
            f"{_cell(r['finite'], 6, '')}  {r['rc']:2d}  "
            f"{_cell(r['saved'], 7, '.1f')}  {r['exit']:6.1f}  "
            f"{_cell(r['step_s'], 6, '.2f')}  {bound:7.1f}", flush=True)
    print(f'  max_steps_in_flight={v}: worst signal -> exit is '
          f'{worst:.2f}x max(10 s, 3 steps)')
  for path in glob.glob(os.path.join(root, '*')):
    subprocess.run(['rm', '-rf', path], check=False)


if __name__ == '__main__':
  app.run(main)
