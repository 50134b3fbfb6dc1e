"""Trains IntroVAE: `python main.py --config=configs/default.py --workdir=/tmp/run`.

Any config field can be overridden, e.g. `--config.batch_size=32`.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from introvae_jax import checkpointing
from introvae_jax import train

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'logs and images; an existing run resumes.')
config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpointing.quiet_orbax_logs()
  train.train_and_evaluate(FLAGS.config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
