"""A run's workdir: a local folder or a `gs://` bucket path, one writer at a
time.

Every path of a run goes through `etils.epath`, so the same code writes to a
local disk or to Cloud Storage (TPU pods share nothing else). A local workdir
is guarded by an OS-level lock (`<workdir>/.lock`, `fcntl.flock`): a second
training process is refused at once, naming the holder, and the kernel drops
the lock when its holder dies, so a crash never leaves it stuck. Cloud
Storage has no such lock; there the scheduler must not start two jobs on one
workdir.
"""

import datetime
import errno
import fcntl
import os
import socket
import sys

from etils import epath

from introvae_jax.errors import WorkdirError

LOCK_NAME = '.lock'


def is_remote(path) -> bool:
  """True for URLs such as gs://bucket/run (anything with a scheme)."""
  return '://' in str(path)


def path(workdir, *parts) -> epath.Path:
  """`workdir/parts...` as an epath; local paths made absolute (Orbax needs
  it)."""
  root = str(workdir)
  if not is_remote(root):
    root = os.path.abspath(root)
  return epath.Path(root).joinpath(*parts)


def _refuse_link(found: str) -> None:
  raise WorkdirError(
      f'{found} is a symbolic link; the program never writes through a link '
      'planted where it writes. Remove the link (the workdir itself may be '
      'one), or use another --workdir or --out.')


def check_no_links(workdir) -> None:
  """Refuses a local workdir that holds a symbolic link where the program
  writes: its own entries and those of its folders (images/, checkpoints/,
  ...), where a planted link would send a write, a rename or a removal to a
  file outside the workdir. Deeper levels are written only into folders the
  program has just made itself. A no-op for gs:// workdirs."""
  if is_remote(workdir):
    return
  root = str(path(workdir))
  if not os.path.isdir(root):
    return
  for entry in os.scandir(root):
    if entry.is_symlink():
      _refuse_link(entry.path)
    if entry.is_dir(follow_symlinks=False):
      for inner in os.scandir(entry.path):
        if inner.is_symlink():
          _refuse_link(inner.path)


def open_no_follow(file_path: str, flags: int) -> int:
  """os.open that refuses (WorkdirError) a symbolic link or a folder at
  `file_path` instead of writing through it."""
  try:
    return os.open(file_path, flags | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      _refuse_link(file_path)
    if e.errno == errno.EISDIR:
      raise WorkdirError(
          f'{file_path} is a folder where the program keeps a file; move it '
          'away, or use another --workdir.') from None
    raise


def write_bytes(file_path, data: bytes) -> None:
  """Writes a whole file, local or gs://; a link or a folder planted at a
  local `file_path` is refused (WorkdirError), never written through."""
  if is_remote(file_path):
    epath.Path(file_path).write_bytes(data)
    return
  fd = open_no_follow(str(file_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  with os.fdopen(fd, 'wb') as f:
    f.write(data)


def write_text(file_path, text: str) -> None:
  """`write_bytes` of `text`, UTF-8."""
  write_bytes(file_path, text.encode())


def prepare(workdir, process_index: int = 0) -> None:
  """Creates the workdir, checks that this process can write to it and that
  no link planted in it would take a write outside (`check_no_links`)."""
  try:
    root = path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    check_no_links(workdir)
    probe = root / f'.write_test_{process_index}'  # hosts may share it
    write_bytes(probe, b'ok')
    probe.unlink()
  except OSError as e:
    if isinstance(e, WorkdirError):
      raise
    raise WorkdirError(
        f'Cannot write to --workdir={workdir} ({e.strerror or e}); pass a '
        'directory you can write to.') from e


class RunLock:
  """Holds `<workdir>/.lock` for the life of a training process (local only).

  The file records who holds it (pid, host, start time, command) so that a
  refused second process can name the running one.
  """

  def __init__(self, workdir):
    self.workdir = str(workdir)
    self._fd = None

  def __enter__(self):
    if is_remote(self.workdir):
      return self
    lock_path = str(path(self.workdir, LOCK_NAME))
    fd = open_no_follow(lock_path, os.O_RDWR | os.O_CREAT)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip()
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirError(
          f'--workdir={self.workdir} is in use by another training process '
          f'({holder or "unknown holder"}). Wait for it to finish or stop it, '
          'or pass another --workdir.') from None
    now = datetime.datetime.now().isoformat(timespec='seconds')
    info = (f'pid {os.getpid()} on {socket.gethostname()}, started {now}: '
            f'{" ".join(sys.argv)}')
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # closing drops the flock
      self._fd = None
