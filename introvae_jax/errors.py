"""The one exception type for mistakes a user can fix.

Library code raises a `UserError` (or a subclass that is also the builtin
type callers catch, e.g. `ConfigError(UserError, ValueError)`) when the
config, a flag, a file or the workdir is wrong. Its message names the
field, flag or path and says what to do. The command-line tools
(`introvae_jax.cli.run`) print it as one line on stderr and exit with 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake in the user's config, flags, files or workdir."""


class ConfigError(UserError, ValueError):
  """An invalid or inconsistent config field."""


class WorkdirError(UserError, OSError):
  """The workdir is missing, unwritable, locked or holds an incompatible run."""


class MissingFileError(UserError, FileNotFoundError):
  """A weights or statistics file the user named (or must create) is absent."""


class BadFileError(UserError, ValueError):
  """A weights or statistics file cannot be read or holds something else."""


class MissingDependencyError(UserError, ImportError):
  """An optional dependency is not installed; the message names the extra
  (`introvae_jax.extras`) that brings it."""
