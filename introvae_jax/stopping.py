"""Stop signals as a flag: a training loop saves its step and returns."""

import os
import signal

from absl import logging
import jax


class _Interrupted(Exception):
  """A stop signal arrived during an interruptible stretch (evaluation)."""


class StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) become a flag the loop checks
  after each step, so it saves the current step and returns; a second
  signal aborts at once. Inside `call_interruptible` (an in-training
  evaluation, which can take longer than a preemption notice) the signal
  also abandons that work at once, so the save follows within seconds.

  Pass one to `train.train_and_evaluate` or `toy2d.train` to learn how the
  run ended: `stopped` is the signal that ended it early (SIGTERM for a
  multi-host preemption), or None when it reached `num_train_steps`."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None  # the first signal's number
    self.stopped = None   # set by the loop when it stops early
    self._previous = {}
    self._interruptible = False

  def call_interruptible(self, fn, *args):
    """fn(*args), or None when a stop signal arrives before or during it."""
    if self.requested:
      return None
    self._interruptible = True
    try:
      return fn(*args)
    except _Interrupted:
      return None
    finally:
      self._interruptible = False

  def __enter__(self):
    if jax.process_count() > 1:
      # All processes must stop at the same step: JAX's preemption service
      # catches SIGTERM there, and `manager.reached_preemption` agrees a step.
      return self
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: no handler can be installed.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received is not None:
      logging.warning('%s received again: aborting without saving.', name)
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    logging.warning('%s received: saving a checkpoint at the current step and '
                    'exiting (send it again to abort at once).', name)
    self.received = signum
    if self._interruptible:
      self._interruptible = False
      raise _Interrupted()

  @property
  def requested(self) -> bool:
    return self.received is not None

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
