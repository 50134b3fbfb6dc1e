"""The training program: `python -m introvae_jax --config=FILE --workdir=DIR`.

`main.py` in a clone runs the same program. Any config field can be
overridden, e.g. `--config.batch_size=32`; `--config` takes a file or a
recipe's name (`--config=ffhq1024`: the recipes the package carries). A user
error (a bad field, an incompatible workdir, missing data or a missing
optional dependency) is one line on stderr and exit status 2. SIGTERM or
Ctrl-C saves the current step and exits (status 0 after SIGTERM, 130 after
Ctrl-C); rerunning the command resumes.
"""

import signal
import sys

from absl import flags
from ml_collections import config_flags

from introvae_jax import cli
from introvae_jax import configuration
from introvae_jax import extras
from introvae_jax.errors import MissingDependencyError

try:  # what the core dependencies lack: a message naming the extra
  from introvae_jax import checkpointing
  from introvae_jax import stopping
  from introvae_jax import train
except (ModuleNotFoundError, MissingDependencyError) as e:
  cli.exit_with_error(extras.missing(e, 'The training program'))

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'logs and images; an existing run resumes.')
config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  """Trains `--config` in `--workdir` (resuming it); exits 130 on Ctrl-C."""
  del argv  # cli.run refuses extra arguments.
  checkpointing.quiet_orbax_logs()
  # Before any array is made.
  configuration.enable_x64_for(FLAGS.config.dtype, "--config's dtype")
  signals = stopping.StopSignals(exit_when_saved=True)
  try:
    train.train_and_evaluate(FLAGS.config, _WORKDIR.value, signals=signals)
  except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save.
    print('Interrupted before training started; nothing was saved.',
          file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  if signals.stopped == signal.SIGINT:
    sys.exit(128 + signal.SIGINT)


if __name__ == '__main__':
  cli.run(main)
