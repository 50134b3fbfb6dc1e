"""Command-line entry points: a user's mistake is one line on stderr, exit 2.

They also turn on JAX's persistent compilation cache (`cache`), so a rerun
or a resume does not compile again.

Every CLI of the package (and `main.py`) starts with `cli.run(main)` instead
of `absl.app.run(main)`. Flag-parsing errors and `errors.UserError` (raised
by library code with a message naming the flag or path and the fix) are
printed as `<program>: error: <message>` and exit with status 2, without a
traceback; `--verbosity=1` (`-v 1`) prints the traceback as well. Other
exceptions are bugs and keep their traceback. A config file that does not
load, or whose get_config() raises, is reported naming the file and line.
A config-file flag also takes a recipe's name (`--config=ffhq1024`,
`--config=toy2d:rings`: `recipes.recipe_path`), so an installed package
trains without a clone.
"""

import logging as std_logging
import os
import re
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging

from introvae_jax import cache
from introvae_jax import recipes
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


def _config_file_error(flag_values) -> None:
  """Exits naming a config-file flag whose file did not load (config_flags
  defers that error to the first use of the config)."""
  for name in list(flag_values):
    flag = flag_values[name]
    if type(flag.value).__name__ == '_ErrorConfig':
      cause = str(flag.value._error).strip().splitlines()[-1].strip()  # pylint: disable=protected-access
      exit_with_error(f'--{name}: cannot load the config file ({cause}); pass '
                      'a config file such as configs/default.py.')
    if (flag.present and flag.value is None and
        type(flag.parser).__name__ == 'ConfigFileFlagParser'):
      exit_with_error(f'{flag.serialize()}: its get_config() returned None; '
                      'it must return the config.')


def _short(text: str, limit: int = 120) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _chain(error: BaseException):
  """`error` and the exceptions it was raised from or while handling."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _config_file_failure(error: BaseException):
  """(flag name, config file, the original exception, its line in the file
  or None) when `error` came from loading a config file or running its
  get_config(), else None.

  config_flags raises these from `ConfigFileFlagParser.parse`, bare or
  wrapped (in a TypeError/ValueError holding a traceback, then in absl's
  IllegalFlagValueError), so the innermost exception that passed through
  that frame is the user's.
  """
  found = None
  for exc in _chain(error):
    for frame, _ in traceback.walk_tb(exc.__traceback__):
      parser = frame.f_locals.get('self')
      if (frame.f_code.co_name == 'parse' and
          type(parser).__name__ == 'ConfigFileFlagParser'):
        found = (parser.name, str(frame.f_locals.get('path', '')), exc)
        break
  if found is None or 'Failed loading config file' in str(found[2]):
    return None  # the file itself is missing: _config_file_error says so
  name, argument, exc = found
  path = argument.split(':', 1)[0]
  line = None
  if isinstance(exc, SyntaxError):  # in the file, or in a module it imports
    path, line = exc.filename or path, exc.lineno
  else:
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
      if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path):
        line = lineno  # the innermost line of the file: where it failed
  return name, path, exc, line


def _exit_if_config_file_failed(error: BaseException) -> None:
  """A config file that does not parse or whose get_config() raises: one line
  naming the file (and the line), never the --config overrides."""
  failure = _config_file_failure(error)
  if failure is None:
    return
  name, path, exc, line = failure
  where = f'--{name}: {path}' + (f' line {line}' if line else '')
  text = str(exc)
  if isinstance(exc, SyntaxError):
    exit_with_error(f'{where}: syntax error: {_short(exc.msg)}.')
  if isinstance(exc, AttributeError) and 'get_config' in text and not line:
    exit_with_error(f'--{name}: {path} has no get_config(); a config file '
                    'defines get_config() returning the config, as '
                    'configs/default.py does.')
  key = re.search(r'Key "([^"]+)" does not exist', text)
  if key:
    guess = re.search(r'Did you mean "([^"]+)"', text)
    hint = (f"did you mean '{guess.group(1)}'?" if guess else
            'the fields are in introvae_jax/configuration.py')
    exit_with_error(f"{where}: unknown config field '{key.group(1)}' ({hint})")
  typed = re.search(r"override field '([^']+)'.*of original type <class "
                    r"'(\w+)'> and cannot be casted to type <class '(\w+)'>",
                    text)
  if typed:
    field, given, wanted = typed.groups()
    exit_with_error(f'{where}: config field {field!r} needs type {wanted}, '
                    f'not {given}.')
  if isinstance(exc, UserError):
    exit_with_error(f'{where}: {_short(text, 160)}')
  exit_with_error(f'{where}: {type(exc).__name__}: {_short(text)}')


def _is_config_file_flag(flag_values, name: str) -> bool:
  return (name in flag_values and
          type(flag_values[name].parser).__name__ == 'ConfigFileFlagParser')


def _recipe_paths(argv: Sequence[str], flag_values) -> list[str]:
  """`argv` with a recipe's name given to a config-file flag
  (`--config=ffhq1024`, `--config toy2d:rings`) replaced by the recipe's
  path (`recipes.recipe_path`), so an installed package needs no clone."""
  out = list(argv)
  for i, arg in enumerate(out):
    if not arg.startswith('--') or i == 0:
      continue
    name, eq, value = arg[2:].partition('=')
    if not eq:  # `--config VALUE`
      if i + 1 == len(out) or not _is_config_file_flag(flag_values, name):
        continue
      i, value = i + 1, out[i + 1]
    elif not _is_config_file_flag(flag_values, name):
      continue
    if recipes.is_recipe_name(value):
      try:
        path = recipes.recipe_path(value)
      except UserError as e:
        exit_with_error(f'--{name}={value} is neither a file nor a recipe. {e}')
      out[i] = f'--{name}={path}' if eq else path
  return out


def _parse_flags(argv: Sequence[str], flag_values=None):
  """absl's parsing of `flag_values` (flags.FLAGS); any failure, config files
  and their overrides included, is a usage error naming the flag or file. A
  config file may be given as a recipe's name (`--config=default`)."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  argv = _recipe_paths(argv, flag_values)
  try:
    remaining = flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except
    _exit_if_config_file_failed(e)
    if isinstance(e, flags.Error):
      _config_file_error(flag_values)
      exit_with_error(f'{e} (run with --helpfull to list the flags).')
    text = _clean(e)
    if isinstance(e, (AttributeError, KeyError)):  # an unknown override field
      field = text.split("'")[1] if text.count("'") >= 2 else ''
      bad = [a.split('=')[0] for a in argv[1:] if field and a.startswith('--')
             and a.split('=')[0].endswith(field)]
      exit_with_error(f'{bad[0] if bad else "a --config override"}: unknown '
                      f'config field {text}')
    _config_file_error(flag_values)
    if 'Failed loading config file' in text:  # overrides of a missing file
      cause = text[text.find('[Errno'):] if '[Errno' in text else text
      exit_with_error(f'--config: cannot load the config file ({cause}); '
                      'pass a config file such as configs/default.py.')
    exit_with_error(f'{text} (check the flags).')
  _config_file_error(flag_values)
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
