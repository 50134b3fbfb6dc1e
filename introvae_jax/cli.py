"""Command-line entry points: a user's mistake is one line on stderr, exit 2.

They also turn on JAX's persistent compilation cache (`cache`), so a rerun
or a resume does not compile again.

Every CLI of the package (and `main.py`) starts with `cli.run(main)` instead
of `absl.app.run(main)`. Flag-parsing errors and `errors.UserError` (raised
by library code with a message naming the flag or path and the fix) are
printed as `<program>: error: <message>` and exit with status 2, without a
traceback; `--verbosity=1` (`-v 1`) prints the traceback as well. Other
exceptions are bugs and keep their traceback.
"""

import logging as std_logging
import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging

from introvae_jax import cache
from introvae_jax.errors import UserError

USAGE_EXIT_CODE = 2


def exit_with_error(message: str) -> NoReturn:
  """Prints `<program>: error: <message>` as one line on stderr; exits 2."""
  program = os.path.basename(sys.argv[0]) if sys.argv else 'introvae_jax'
  if program in ('__main__.py', '-m', '-c', ''):
    program = 'introvae_jax'
  one_line = ' '.join(str(message).split())
  print(f'{program}: error: {one_line}', file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT_CODE)


def _clean(error: BaseException) -> str:
  """One readable line of an exception raised while parsing flags."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  if 'Traceback (most recent call last)' in text:  # a config file raised
    head = text.split('Traceback')[0].strip()
    text = f'{head} {text.strip().splitlines()[-1]}'
  return ' '.join(text.split())


def _config_file_error() -> None:
  """Exits naming a config-file flag whose file did not load (config_flags
  defers that error to the first use of the config)."""
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    if type(value).__name__ == '_ErrorConfig':
      cause = str(value._error).strip().splitlines()[-1].strip()  # pylint: disable=protected-access
      exit_with_error(f'--{name}: cannot load the config file ({cause}); pass '
                      'a config file such as configs/default.py.')


def _parse_flags(argv: Sequence[str]):
  """absl's parsing; any failure, config-file overrides included, is a usage
  error naming the flag."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    _config_file_error()
    exit_with_error(f'{e} (run with --helpfull to list the flags).')
  except (AttributeError, KeyError) as e:  # config_flags: an unknown field
    text = _clean(e)
    field = text.split("'")[1] if text.count("'") >= 2 else ''
    bad = [a.split('=')[0] for a in argv[1:]
           if field and a.startswith('--') and a.split('=')[0].endswith(field)]
    exit_with_error(f'{bad[0] if bad else "a --config override"}: unknown '
                    f'config field {text}')
  except Exception as e:  # pylint: disable=broad-except
    _config_file_error()
    text = _clean(e)
    if 'Failed loading config file' in text:  # overrides of a missing file
      cause = text[text.find('[Errno'):] if '[Errno' in text else text
      exit_with_error(f'--config: cannot load the config file ({cause}); '
                      'pass a config file such as configs/default.py.')
    exit_with_error(f'{text} (check the flags).')
  _config_file_error()
  return remaining


def _drop_backend_probe_lines(record) -> bool:
  """JAX logs, at INFO, each platform it probes and does not find ("Unable
  to initialize backend 'tpu'") on every CPU or GPU start: noise to a user."""
  return 'Unable to initialize backend' not in record.getMessage()


def run(main: Callable[[Sequence[str]], object]) -> None:
  """`absl.app.run(main)` with user errors reported as one line, exit 2."""

  def guarded(argv):
    std_logging.getLogger('jax._src.xla_bridge').addFilter(
        _drop_backend_probe_lines)
    if len(argv) > 1:
      exit_with_error(f'unexpected arguments {argv[1:]}; every option is a '
                      '--flag=value.')
    cache.enable_compilation_cache()
    try:
      return main(argv)
    except (UserError, app.UsageError) as e:
      if logging.get_verbosity() >= 1:
        traceback.print_exc()
      exit_with_error(str(e))

  app.run(guarded, flags_parser=_parse_flags)
