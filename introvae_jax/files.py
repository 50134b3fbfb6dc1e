"""Whole-file writes and checked reads of .npz archives, local or gs://.

Weights files (InceptionV3), feature caches and FID statistics go through
these: a write never leaves a half file, and a read names the file, what it
should hold and what to do, instead of numpy's messages.
"""

import io
import os
from typing import Dict

from etils import epath
import numpy as np

from introvae_jax.errors import BadFileError, MissingFileError


def write_npz(path: str, **arrays) -> str:
  """np.savez to a local or gs:// path (".npz" appended as np.savez does),
  written whole then renamed, so an interrupted write leaves no half file."""
  path = str(path)
  if not path.endswith('.npz'):
    path += '.npz'
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  partial = target.parent / f'.{target.name}.{os.getpid()}.partial'
  partial.write_bytes(buffer.getvalue())
  partial.replace(target)
  return path


def read_npz(path: str, what: str, fix: str) -> Dict[str, np.ndarray]:
  """All arrays of an .npz (local or gs://).

  Raises MissingFileError or BadFileError naming `path`, `what` it should
  hold and the `fix`, instead of numpy's messages (a file that is not a zip
  archive reads as "pickled data ... allow_pickle=False").
  """
  path = epath.Path(path)
  if not path.exists():
    raise MissingFileError(f'No {what} at {path}; {fix}')
  data = path.read_bytes()
  if not data.startswith(b'PK'):
    raise BadFileError(f'{path} is not an .npz archive, so not a {what}; {fix}')
  try:
    with np.load(io.BytesIO(data)) as f:
      return {name: f[name] for name in f.files}
  except Exception as e:  # pylint: disable=broad-except
    # A damaged zip surfaces as BadZipFile, EOFError, OSError or ValueError.
    raise BadFileError(f'{path} is a damaged .npz ({type(e).__name__}: {e}), '
                       f'not a readable {what}; {fix}') from e
