"""No file the program reads can run code from it.

Checkpoints and weights come from file hosts. Each test builds the hostile
file itself, reads it with this project's loaders (which must run nothing
and, where they refuse it, say why in one line naming the file), then checks
that the payload is live: the generic reader it targets (pickle.loads,
torch.load, torch.jit.load, np.load(allow_pickle=True)) does run it.
JSON (`configuration.read_json`) needs no test: json.loads builds only
dicts, lists, strings and numbers.
"""

import builtins
import copyreg
import io
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from introvae_jax import errors
from introvae_jax import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line_naming(error: Exception, path) -> str:
  message = str(error)
  assert '\n' not in message and str(path) in message, message
  return message


# ----------------------------------------------------------------------------
# Pickle payloads (`__reduce__`), in each format a .pth can take.


class _Reduce:
  """Pickles as `func(*args)`: what a hostile file asks the unpickler to do."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _payloads(marker):
  """name -> pickle bytes that create `marker` when a plain unpickler loads
  them."""
  touch = f'touch {marker}'
  cmd = touch.encode()
  return {
      'os.system': pickle.dumps(_Reduce(os.system, touch), protocol=2),
      'builtins.exec': pickle.dumps(_Reduce(
          builtins.exec, f'open({str(marker)!r}, "w").close()'), protocol=2),
      # getattr(__import__('os'), 'system')('touch ...'), protocol 0.
      'getattr_import': (b'cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\n'
                         b'tRVsystem\ntR(V' + cmd + b'\ntR.'),
      # copyreg._reconstructor(Popen, Popen, args) calls Popen.__init__.
      'copyreg._reconstructor': pickle.dumps(_Reduce(
          copyreg._reconstructor, subprocess.Popen, subprocess.Popen,  # pylint: disable=protected-access
          ['touch', str(marker)]), protocol=2),
      # Protocol 4 resolves dotted names by getattr: posixpath.os.system.
      'dotted_name': (b'\x80\x04\x8c\x09posixpath\x8c\x09os.system\x93\x8c' +
                      bytes([len(cmd)]) + cmd + b'\x85R.'),
  }


def _as_zip(object_pickle: bytes, template: bytes = b'') -> bytes:
  """torch.save's zip format (`template`, default an empty dict's) with
  `object_pickle` as its data.pkl."""
  if not template:
    torch = pytest.importorskip('torch')
    buffer = io.BytesIO()
    torch.save({}, buffer)
    template = buffer.getvalue()
  out = io.BytesIO()
  with zipfile.ZipFile(io.BytesIO(template)) as src, \
      zipfile.ZipFile(out, 'w') as dst:
    for info in src.infolist():
      data = src.read(info)
      dst.writestr(info, object_pickle if info.filename.endswith('/data.pkl')
                   else data)
  return out.getvalue()


def _as_legacy(object_pickle: bytes) -> bytes:
  """torch's legacy format (torch/serialization.py `_legacy_save`) around
  `object_pickle`: magic number, protocol, sys info, it, no storages."""
  header = [0x1950a86a20f9469cfc6c, 1001,
            dict(protocol_version=1001, little_endian=True,
                 type_sizes=dict(short=2, int=4, long=8))]
  return (b''.join(pickle.dumps(h, protocol=2) for h in header) +
          object_pickle + pickle.dumps([], protocol=2))


_FORMATS = {'zip': _as_zip, 'legacy': _as_legacy, 'plain_pickle': lambda p: p}


def _live(path, fmt):
  """Loads `path` as an ordinary reader would (the payload runs)."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    if fmt == 'plain_pickle':
      result = pickle.loads(data)
    else:
      import torch  # pylint: disable=g-import-not-at-top
      result = torch.load(io.BytesIO(data), weights_only=False)
  except Exception:  # pylint: disable=broad-except
    return  # some payloads return something torch then chokes on
  if isinstance(result, subprocess.Popen):
    result.wait()


@pytest.mark.parametrize('fmt', list(_FORMATS))
@pytest.mark.parametrize('payload', list(_payloads('m')))
def test_reduce_payloads_never_run(payload, fmt, tmp_path):
  """A `__reduce__` payload in a zip, legacy or plain-pickle .pth runs
  nothing in `convert` or `inception.convert`; each refuses the file in one
  line. These payloads were stand-ins before the fix too (the allow-list
  guard); the TorchScript test below is the one the old code failed."""
  from introvae_jax import convert, inception  # pylint: disable=g-import-not-at-top
  marker = tmp_path / 'ran'
  path = tmp_path / f'{payload}.pth'
  path.write_bytes(_FORMATS[fmt](_payloads(marker)[payload]))
  with pytest.raises(errors.BadFileError) as e:
    convert.load_reference_checkpoint(str(path))
  _one_line_naming(e.value, path)
  with pytest.raises(errors.BadFileError) as e:
    inception.convert(str(path), str(tmp_path / 'w.npz'))
  _one_line_naming(e.value, path)
  assert not marker.exists()
  _live(path, fmt)
  assert marker.exists(), 'the payload is not live: the test shows nothing'


@pytest.mark.parametrize('fmt', list(_FORMATS))
def test_payload_beside_the_weights_is_ignored(fmt, tmp_path):
  """A payload stored beside a valid state_dict ({'model': sd, 'extra': p})
  stays an inert stand-in: the weights load, nothing runs. The zip and
  legacy cases passed before the fix too; a plain pickle was not read at
  all."""
  from introvae_jax import convert  # pylint: disable=g-import-not-at-top
  torch = pytest.importorskip('torch')
  marker = tmp_path / 'ran'
  sd = {'encoder.fc.weight': torch.arange(6.).reshape(2, 3)}
  whole = pickle.dumps({'model': sd, 'extra': _Reduce(
      os.system, f'touch {marker}')}, protocol=2)
  path = tmp_path / 'checkpoint.pth'
  if fmt == 'plain_pickle':
    path.write_bytes(whole)
  else:
    torch.save({'model': sd, 'extra': _Reduce(os.system, f'touch {marker}')},
               str(path), _use_new_zipfile_serialization=fmt == 'zip')
  loaded = convert.load_reference_checkpoint(str(path))
  assert not marker.exists()
  assert list(loaded) == ['encoder.fc.weight']
  np.testing.assert_array_equal(loaded['encoder.fc.weight'],
                                np.arange(6.).reshape(2, 3))
  _live(path, fmt)
  assert marker.exists()


def test_only_inert_names_resolve():
  """The allow-list resolves no callable that could reach code: every name
  a payload needs (os.system, builtins.eval/exec/getattr/__import__,
  subprocess.Popen, torch.load, torch.jit.load) is a stand-in class whose
  call does nothing; copyreg's constructors build only stand-ins."""
  unpickler = files._Unpickler(io.BytesIO(b''), files._no_storages)  # pylint: disable=protected-access
  for module, name in [('os', 'system'), ('posix', 'system'),
                       ('builtins', 'eval'), ('builtins', 'exec'),
                       ('builtins', 'getattr'), ('builtins', '__import__'),
                       ('subprocess', 'Popen'), ('torch', 'load'),
                       ('torch.jit', 'load'), ('torch.serialization', 'load'),
                       ('torch._C', 'import_ir_module'),
                       ('torch._utils', '_rebuild_qtensor'),
                       ('posixpath', 'os.system'), ('numpy', 'load')]:
    found = unpickler.find_class(module, name)
    assert files.is_stand_in(found), (module, name)
    assert files.is_stand_in(found('touch /tmp/x'))
  reconstruct = unpickler.find_class('copyreg', '_reconstructor')
  with pytest.raises(pickle.UnpicklingError):
    reconstruct(subprocess.Popen, subprocess.Popen, ['true'])
  newobj = unpickler.find_class('copyreg', '__newobj__')
  with pytest.raises(pickle.UnpicklingError):
    newobj(subprocess.Popen, ['true'])


def test_tensor_views_cannot_read_outside_their_storage(tmp_path):
  """A tensor whose size and stride reach past its storage (as_strided
  would read other memory) is refused, not read."""
  torch = pytest.importorskip('torch')
  path = tmp_path / 'strided.pth'
  torch.save({'w': torch.zeros(4)}, str(path))
  with zipfile.ZipFile(str(path)) as archive:
    name = [n for n in archive.namelist() if n.endswith('/data.pkl')][0]
    data = archive.read(name)
  # (4,) stride (1,) -> (4,) stride (100,): BININT1 100 in place of 1.
  old = b'K\x04\x85q\x08K\x01\x85'
  assert data.count(old) == 1, data
  path.write_bytes(_as_zip(data.replace(old, b'K\x04\x85q\x08Kd\x85'),
                           path.read_bytes()))
  with pytest.raises(errors.BadFileError, match='reads element 300') as e:
    files.read_pth(str(path), 'a checkpoint', 'pass another.')
  _one_line_naming(e.value, path)


def test_old_tar_format_is_refused_unread(tmp_path):
  """torch's pre-1.0 tar format (members storages, tensors, pickle) is
  refused in one line before any member is unpickled: its pickle would go
  through the same unpickler, but nothing supports the format any more."""
  import tarfile  # pylint: disable=g-import-not-at-top
  marker = tmp_path / 'ran'
  path = tmp_path / 'old.pth'
  with tarfile.open(str(path), 'w', format=tarfile.PAX_FORMAT) as tar:
    for name in ('storages', 'tensors', 'pickle'):
      data = pickle.dumps(_Reduce(os.system, f'touch {marker}'), protocol=2)
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  with pytest.raises(errors.BadFileError, match='tar format') as e:
    files.read_pth(str(path), 'a checkpoint', 'pass another.')
  _one_line_naming(e.value, path)
  assert not marker.exists()


# ----------------------------------------------------------------------------
# TorchScript: the archive's code runs when torch loads it.


def _scripted_archive(path):
  """torch.jit.save of a scripted module whose exported __setstate__ prints
  a marker: torch.jit.load (and torch.load, which dispatches to it) runs it."""
  torch = pytest.importorskip('torch')
  from typing import Tuple  # pylint: disable=g-import-not-at-top

  class Payload(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.register_buffer('w', torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
      return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
      print('TORCHSCRIPT PAYLOAD RAN')
      self.w = state[0]
      self.training = state[1]

    def forward(self, x):
      return x * self.w

  torch.jit.save(torch.jit.script(Payload()), str(path))
  return torch


def test_torchscript_archive_is_refused_unread(tmp_path, monkeypatch, capfd):
  """A TorchScript .pth is refused by `convert` and `inception.convert` in
  one line naming it, before anything in it is unpickled: torch.load and
  torch.jit.load are never called (both raise here) and its __setstate__
  does not run. Fails before the fix (torch.load dispatched to
  torch.jit.load, which ran the archive's code)."""
  from introvae_jax import convert, inception  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'model_epoch_1_iter_0.pth'
  torch = _scripted_archive(path)
  capfd.readouterr()
  calls = []

  def refuse(*args, **kwargs):
    calls.append(args)
    raise AssertionError('torch.load or torch.jit.load was called')

  with monkeypatch.context() as patch:
    for owner in (torch, torch.serialization, torch.jit):
      patch.setattr(owner, 'load', refuse)
    with pytest.raises(errors.BadFileError, match='TorchScript') as e:
      convert.load_reference_checkpoint(str(path))
    _one_line_naming(e.value, path)
    with pytest.raises(errors.BadFileError, match='TorchScript') as e:
      inception.convert(str(path), str(tmp_path / 'w.npz'))
    _one_line_naming(e.value, path)
  assert not calls
  assert 'PAYLOAD' not in ''.join(capfd.readouterr())
  torch.jit.load(str(path))  # the payload is live
  assert 'TORCHSCRIPT PAYLOAD RAN' in capfd.readouterr().out


def test_convert_command_refuses_torchscript_in_one_line(tmp_path):
  """`python -m introvae_jax.convert --torch_checkpoint=<TorchScript>`, as a
  user runs it: exit status 2, one line on stderr, the archive's code never
  runs. Fails before the fix (the payload printed, then 'No encoder')."""
  path = tmp_path / 'model_epoch_1_iter_0.pth'
  _scripted_archive(path)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  proc = subprocess.run(
      [sys.executable, '-m', 'introvae_jax.convert',
       f'--torch_checkpoint={path}', f'--out={tmp_path / "out"}'],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert 'PAYLOAD' not in proc.stdout + proc.stderr
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'TorchScript' in lines[0] and str(path) in lines[0]
  assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------
# .npz, msgpack.


def test_npz_object_array_is_refused_unread(tmp_path):
  """An .npz holding an object array (a pickle) with a __reduce__ payload is
  refused in one line that says so, without unpickling it. Before the fix it
  was called 'a damaged .npz'."""
  marker = tmp_path / 'ran'
  path = tmp_path / 'stats.npz'
  payload = np.empty(1, object)
  payload[0] = _Reduce(os.system, f'touch {marker}')
  np.savez(str(path), mu=np.zeros(2), sigma=payload)
  with pytest.raises(errors.BadFileError, match='object array') as e:
    files.read_npz(str(path), 'statistics file', 'compute it again.')
  _one_line_naming(e.value, path)
  assert not marker.exists()
  with np.load(str(path), allow_pickle=True) as f:
    f['sigma']  # pylint: disable=pointless-statement
  assert marker.exists()


def test_msgpack_weights_cannot_hold_code(tmp_path):
  """Flax msgpack holds only data: msgpack builds numbers, strings, lists and
  maps, and flax's only hooks build numeric arrays (np.frombuffer, which
  refuses object dtypes) and complex numbers. A file claiming an object
  array is refused in one line. No fix was needed: this passed before."""
  import msgpack  # pylint: disable=g-import-not-at-top
  from introvae_jax import digit_classifier  # pylint: disable=g-import-not-at-top
  array = msgpack.ExtType(1, msgpack.packb([[2], b'O', b'\0' * 16]))
  path = tmp_path / 'digit_classifier.msgpack'
  path.write_bytes(msgpack.packb({'Conv_0': {'kernel': array}}))
  with pytest.raises(errors.BadFileError) as e:
    digit_classifier.load(str(path))
  _one_line_naming(e.value, path)
