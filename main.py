"""Trains IntroVAE:
`python main.py --config=configs/default.py --workdir=/tmp/run`.

The program is the package's (`introvae_jax/__main__.py`; installed,
`python -m introvae_jax`). Any config field can be overridden, e.g.
`--config.batch_size=32`. A user error (a bad field, an incompatible workdir,
missing data) is one line on stderr and exit status 2. SIGTERM or Ctrl-C saves
the current step and exits (status 0 after SIGTERM, 130 after Ctrl-C);
rerunning the command resumes.
"""

from introvae_jax import cli
from introvae_jax.__main__ import main

if __name__ == '__main__':
  cli.run(main)
