"""The on-disk cache: weights trained here, statistics, compiled programs.

`$INTROVAE_CACHE` or `~/.cache/introvae_jax` holds the digit classifier, the
FID statistics of real images, converted InceptionV3 weights, and (for the
command-line programs) JAX's persistent compilation cache, so that a rerun
or a resume does not compile the step again.
"""

import os

import jax

CACHE_ENV = 'INTROVAE_CACHE'
# JAX's own variable; when it is set, JAX uses it and so do we.
JAX_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'


def cache_dir() -> str:
  """$INTROVAE_CACHE or ~/.cache/introvae_jax."""
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser('~'), '.cache', 'introvae_jax')


def enable_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache in <cache>/jax, unless the
  user chose a folder (JAX_COMPILATION_CACHE_DIR or jax.config); returns the
  folder in use. Programs compiled in under a second are not stored."""
  chosen = jax.config.jax_compilation_cache_dir or os.environ.get(JAX_CACHE_ENV)
  if chosen:
    return chosen
  path = os.path.join(cache_dir(), 'jax')
  jax.config.update('jax_compilation_cache_dir', path)
  return path
