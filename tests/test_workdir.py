"""Tests for introvae_jax.workdir: nothing outside the workdir is written
through a link planted in it."""

import os

import pytest

from introvae_jax import workdir as workdir_lib
from introvae_jax.errors import WorkdirError

from train_utils import tiny_config

# Where the program writes inside a workdir, as (link path, what it links to).
PLANTED = [
    ('.lock', 'file'),
    ('.write_test_0', 'file'),
    ('config.json', 'file'),
    ('config.2.json', 'file'),
    ('events.out.tfevents.1.host', 'file'),
    ('.events-rewrite-0.tmp', 'file'),
    ('eval_results.json', 'file'),
    ('images', 'folder'),
    ('images/samples_00000002.png', 'file'),
    ('checkpoints', 'folder'),
    ('checkpoints/2', 'folder'),
    ('checkpoints_damaged', 'folder'),
    ('samples', 'folder'),
]


@pytest.mark.parametrize('name, kind', PLANTED, ids=[p for p, _ in PLANTED])
def test_planted_links_are_refused_and_their_targets_untouched(tmp_path, name,
                                                               kind):
  """A link planted at any path the program writes (a file or a folder,
  possibly dangling) is refused with one line before anything is written,
  by the training program and by every tool that writes into a workdir;
  the link's target keeps its bytes. Before the fix a `.lock` link
  truncated its target and a `.write_test_*` link was written through."""
  from introvae_jax import train  # pylint: disable=g-import-not-at-top
  outside = tmp_path / 'outside'
  outside.mkdir()
  target = outside / 'target'
  if kind == 'file':
    target.write_bytes(b'precious bytes')
  else:
    target.mkdir()
    (target / 'keep.txt').write_bytes(b'precious bytes')
  workdir = tmp_path / 'run'
  link = workdir / name
  link.parent.mkdir(parents=True, exist_ok=True)
  os.symlink(target, link)
  for prepare in (lambda: train.train_and_evaluate(tiny_config(), str(workdir)),
                  lambda: workdir_lib.prepare(str(workdir))):
    with pytest.raises(WorkdirError, match='is a symbolic link') as error:
      prepare()
    assert str(link) in str(error.value) and '\n' not in str(error.value)
  if kind == 'file':
    assert target.read_bytes() == b'precious bytes'
  else:
    assert os.listdir(target) == ['keep.txt']
    assert (target / 'keep.txt').read_bytes() == b'precious bytes'
  assert sorted(os.listdir(outside)) == ['target']


def test_dangling_link_is_refused_too(tmp_path):
  """A link to a file that does not exist yet would be created outside."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.symlink(tmp_path / 'would_be_created', workdir / '.lock')
  with pytest.raises(WorkdirError, match='is a symbolic link'):
    workdir_lib.prepare(str(workdir))
  assert not (tmp_path / 'would_be_created').exists()


def test_lock_that_is_a_folder_is_one_clear_error(tmp_path):
  """Before the fix: an IsADirectoryError traceback."""
  workdir = tmp_path / 'run'
  (workdir / '.lock').mkdir(parents=True)
  with pytest.raises(WorkdirError, match='is a folder where the program keeps '
                     'a file'):
    with workdir_lib.RunLock(str(workdir)):
      pass


def test_lock_opening_does_not_follow_a_link_planted_after_the_check(tmp_path):
  """O_NOFOLLOW: even a link planted between the check and the open is not
  written through."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  target = tmp_path / 'target'
  target.write_bytes(b'precious bytes')
  os.symlink(target, workdir / '.lock')
  with pytest.raises(WorkdirError, match='is a symbolic link'):
    with workdir_lib.RunLock(str(workdir)):
      pass
  assert target.read_bytes() == b'precious bytes'


def test_workdir_itself_may_be_a_link(tmp_path):
  real = tmp_path / 'real'
  real.mkdir()
  os.symlink(real, tmp_path / 'alias')
  workdir_lib.prepare(str(tmp_path / 'alias'))
  with workdir_lib.RunLock(str(tmp_path / 'alias')):
    assert (real / '.lock').exists()
