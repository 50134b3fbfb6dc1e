"""Whole-file writes, and reads that never run anything from the file.

Weights files (the reference's checkpoints, InceptionV3), feature caches and
FID statistics go through these: a write never leaves a half file, and a read
names the file, what it should hold and what to do, instead of numpy's,
pickle's or torch's messages.

Files come from file hosts, so reading one must not execute any of it:

* `.npz` (`read_npz`): numpy with allow_pickle=False; an object array (which
  only pickle can hold) is refused.
* `.pth` (`read_pth`): PyTorch's formats are parsed here, without torch (so
  neither `torch.load` nor `torch.jit.load` ever sees the file): the zip
  format (torch >= 1.6), the legacy stream (`_use_new_zipfile_serialization=
  False`, and every file of torch < 1.6) and a plain pickle of tensors. The
  pickles go through `_Unpickler`, whose `find_class` resolves only an
  allow-list of inert callables (this module's own tensor and storage
  builders, a few containers); every other name becomes a `PickledObject`
  stand-in that only keeps the attributes pickled into it, so a `__reduce__`
  naming `os.system` or `builtins.exec` calls a stand-in's no-op constructor.
  TorchScript archives (`torch.jit.save`: they carry code that runs on load)
  and torch's pre-1.0 tar format are refused before anything is unpickled.
* Flax msgpack (`digit_classifier.load`) and JSON (`configuration.read_json`)
  hold only data: their parsers build numbers, strings, lists, dicts and
  (msgpack) numeric arrays, and call nothing named in the file.
"""

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, Callable, Dict

from etils import epath
import ml_dtypes
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
  """All arrays of an .npz (local or gs://), none of them unpickled.

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
    # allow_pickle=False: an object array is a pickle, which can run code.
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      arrays = {}
      for name in f.files:
        try:
          arrays[name] = f[name]
        except ValueError as e:
          if 'allow_pickle' not in str(e):
            raise
          raise BadFileError(
              f'{path} holds an object array ({name!r}: pickled Python '
              'objects, which could run code), which is not read, so it is '
              f'not a {what}; {fix}') from None
      return arrays
  except BadFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A damaged zip surfaces as BadZipFile, EOFError, OSError or ValueError.
    raise BadFileError(f'{path} is a damaged .npz ({type(e).__name__}: {e}), '
                       f'not a readable {what}; {fix}') from e


# ----------------------------------------------------------------------------
# PyTorch .pth files, read without torch.


class PickledObject:
  """Stand-in for a class a pickle names that is not on the allow-list.

  Has no behaviour: calling the class or unpickling an instance only keeps
  the pickled attribute state; for a pickled `nn.Module` that includes
  `_parameters`, `_buffers` and `_modules`.
  """
  pickled_class = '?'

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
      state = {**(state[0] or {}), **(state[1] or {})}
    if isinstance(state, dict):
      self.__dict__.update(state)

  def __repr__(self):
    return f'<pickled {self.pickled_class}>'


def _stand_in(module: str, name: str) -> type:
  return type(name, (PickledObject,), {'pickled_class': f'{module}.{name}'})


def is_stand_in(obj) -> bool:
  """Whether `obj` is a `PickledObject` stand-in class or instance."""
  cls = obj if isinstance(obj, type) else type(obj)
  return issubclass(cls, PickledObject)


# torch's storage classes (torch.FloatStorage, torch.cuda.FloatStorage, ...).
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexDoubleStorage': np.complex128, 'ComplexFloatStorage': np.complex64,
    'UntypedStorage': np.uint8,
}
# torch.float32 and the like (_rebuild_tensor_v3 names the dtype).
_TORCH_DTYPES = {
    'float64': np.float64, 'double': np.float64, 'float32': np.float32,
    'float': np.float32, 'float16': np.float16, 'half': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'int64': np.int64, 'long': np.int64,
    'int32': np.int32, 'int': np.int32, 'int16': np.int16, 'short': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
    'complex128': np.complex128, 'cdouble': np.complex128,
    'complex64': np.complex64, 'cfloat': np.complex64,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


class _TypeTag:
  """What a storage class or torch dtype global resolves to: only a dtype.

  A fresh object per lookup with no behaviour, so a pickle that calls it or
  sets its attributes changes nothing shared.
  """

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise pickle.UnpicklingError(message)


def _index(value, what: str) -> int:
  _check(isinstance(value, int) and value >= 0,
         f'{what} is {value!r}, not an index')
  return int(value)


def _storage(raw: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
  """Raw storage bytes -> a read-only 1-D array in this machine's byte order."""
  _check(len(raw) % dtype.itemsize == 0,
         f'a storage of {len(raw)} bytes does not hold whole {dtype} elements')
  if little_endian == (sys.byteorder == 'little') or dtype.itemsize == 1:
    return np.frombuffer(raw, dtype)
  unit = dtype.itemsize // (2 if dtype.kind == 'c' else 1)
  swapped = np.frombuffer(raw, np.uint8).reshape(-1, unit)[:, ::-1]
  return np.ascontiguousarray(swapped).reshape(-1).view(dtype)


class _Unpickler(pickle.Unpickler):
  """Unpickles torch's object graphs with tensors as numpy arrays.

  `find_class` resolves only the names in `_allowed` (bound methods of this
  unpickler, so a pickle cannot reach or alter anything shared), the torch
  storage/dtype names (to `_TypeTag`s) and a few builtin containers; any
  other name is a fresh `PickledObject` stand-in. `load_storage(pid)` gives
  the storage a persistent id names. With `dry`, storages are empty and
  tensors None (the legacy format's first pass, which only learns the
  storages' dtypes).
  """

  def __init__(self, file, load_storage: Callable[[tuple], Any],
               dry: bool = False, depth: int = 0):
    super().__init__(file, encoding='utf-8')
    self._load_storage = load_storage
    self._dry = dry
    self._depth = depth
    self._allowed = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
        ('builtins', 'slice'): slice, ('builtins', 'complex'): complex,
        ('builtins', 'object'): object,
        ('copyreg', '_reconstructor'): self._reconstructor,
        ('copyreg', '__newobj__'): self._newobj,
        ('_codecs', 'encode'): self._encode,
        ('torch._utils', '_rebuild_tensor'): self._rebuild_tensor,
        ('torch._utils', '_rebuild_tensor_v2'): self._rebuild_tensor_v2,
        ('torch._utils', '_rebuild_tensor_v3'): self._rebuild_tensor_v3,
        ('torch._utils', '_rebuild_parameter'): self._parameter,
        ('torch._utils', '_rebuild_parameter_with_state'): self._parameter,
        ('torch.nn.parameter', 'Parameter'): self._parameter,
        ('torch._tensor', '_rebuild_from_type_v2'): self._from_type_v2,
        ('torch', 'Size'): self._size,
        ('torch', 'device'): self._device,
        ('torch.storage', '_load_from_bytes'): self._load_from_bytes,
    }
    self._tensor_builders = (self._rebuild_tensor, self._rebuild_tensor_v2,
                             self._rebuild_tensor_v3, self._parameter)

  def find_class(self, module, name):
    # Protocol-2 pickles name Python 2 modules (torch.save's default protocol).
    module = {'__builtin__': 'builtins',
              'copy_reg': 'copyreg'}.get(module, module)
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    if module.split('.')[0] == 'torch' and name.endswith('Storage'):
      _check(name in _STORAGE_DTYPES, f'unknown storage type {module}.{name}')
      return _TypeTag(_STORAGE_DTYPES[name])
    if module == 'torch' and name in _TORCH_DTYPES:
      return _TypeTag(_TORCH_DTYPES[name])
    return _stand_in(module, name)

  def persistent_load(self, pid):
    _check(isinstance(pid, tuple) and pid, f'unknown persistent id {pid!r}')
    kind = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
    if kind == 'module' and len(pid) == 4:  # legacy: a module's class
      return pid[1]
    _check(kind == 'storage' and len(pid) in (5, 6) and
           isinstance(pid[1], _TypeTag), f'unknown persistent id {pid!r}')
    return self._load_storage(pid)

  # The allow-listed callables. Each checks its arguments: they come from
  # the file.

  def _reconstructor(self, cls, base, state):
    """copyreg._reconstructor: only a stand-in (or an OrderedDict) is made."""
    if is_stand_in(cls) and isinstance(cls, type) and base is object:
      return cls()
    _check(cls is collections.OrderedDict and base is dict and state is None,
           f'copyreg._reconstructor of {cls!r} on {base!r} is not allowed')
    return cls()

  def _newobj(self, cls, *args):
    """copyreg.__newobj__: only stand-ins and the allowed containers."""
    del args
    _check(isinstance(cls, type) and (is_stand_in(cls) or cls in (
        collections.OrderedDict, set, frozenset)),
           f'copyreg.__newobj__ of {cls!r} is not allowed')
    return cls()

  def _encode(self, text, encoding='utf-8'):
    """_codecs.encode, as protocol-2 pickles store bytes: str -> latin-1."""
    _check(isinstance(text, str) and encoding in ('latin1', 'latin-1'),
           '_codecs.encode is allowed for latin-1 text only')
    return text.encode('latin-1')

  def _size(self, sizes=()):
    return tuple(_index(s, 'a size') for s in sizes)

  def _device(self, *args):
    return ':'.join(str(a) for a in args)

  def _parameter(self, data=None, *args):
    """A Parameter (any torch version's pickle of one) is its data."""
    del args
    _check(data is None or isinstance(data, np.ndarray),
           f'a parameter holds a {type(data).__name__}, not a tensor')
    return data

  def _from_type_v2(self, func, new_type, args, state):
    """A tensor subclass or a tensor with attributes: only its data is kept."""
    del new_type, state
    _check(func in self._tensor_builders and isinstance(args, tuple),
           f'_rebuild_from_type_v2 of {func!r} is not allowed')
    return func(*args)

  def _rebuild_tensor(self, storage, offset, size, stride):
    return self._rebuild_tensor_v2(storage, offset, size, stride, False, None)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad,
                         hooks, dtype, metadata=None):
    _check(isinstance(dtype, _TypeTag), f'unknown tensor dtype {dtype!r}')
    if not self._dry:
      _check(isinstance(storage, np.ndarray) and storage.dtype == np.uint8,
             'an untyped storage is not bytes')
      _check(storage.size % dtype.dtype.itemsize == 0,
             f'a storage of {storage.size} bytes does not hold whole '
             f'{dtype.dtype} elements')
      storage = storage.view(dtype.dtype)
    return self._rebuild_tensor_v2(storage, offset, size, stride,
                                   requires_grad, hooks, metadata)

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad,
                         hooks, metadata=None):
    """A copy of the strided view torch would make of `storage`."""
    del requires_grad, hooks
    _check(isinstance(storage, np.ndarray) and storage.ndim == 1,
           f'a tensor is built on a {type(storage).__name__}, not a storage')
    offset = _index(offset, 'a storage offset')
    _check(isinstance(size, tuple) and isinstance(stride, tuple) and
           len(size) == len(stride), f'tensor size {size!r}, stride {stride!r}')
    size = tuple(_index(s, 'a size') for s in size)
    stride = tuple(_index(s, 'a stride') for s in stride)
    if self._dry:
      return None
    if 0 in size:
      return np.zeros(size, storage.dtype)
    # Every element a view reads must lie in the storage: as_strided does not
    # check, and would read other memory.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    _check(last < storage.size, f'a tensor reads element {last} of a storage '
           f'of {storage.size}')
    tensor = np.lib.stride_tricks.as_strided(
        storage[offset:], size, [s * storage.itemsize for s in stride],
        writeable=False).copy()
    metadata = metadata or {}
    _check(isinstance(metadata, dict), f'tensor metadata {metadata!r}')
    if metadata.get('neg'):
      tensor = -tensor
    if metadata.get('conj'):
      tensor = np.conj(tensor)
    return tensor

  def _load_from_bytes(self, data):
    """A storage pickled alone (plain pickles of tensors): a .pth in bytes."""
    _check(isinstance(data, bytes), 'a pickled storage is not bytes')
    _check(self._depth < 2, 'storages nested in storages')
    storage = _read_torch_bytes(data, self._depth + 1)
    _check(isinstance(storage, np.ndarray) and storage.ndim == 1,
           f'a pickled storage holds a {type(storage).__name__}')
    return storage


def _read_zip(data: bytes, depth: int):
  """torch.save's zip format: <prefix>/data.pkl, storage <key> in
  <prefix>/data/<key>."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    names = archive.namelist()
    # TorchScript (torch.jit.save) keeps code in code/ and constants.pkl:
    # loading one runs that code, so it is refused before any unpickling.
    for name in names:
      parts = name.split('/')
      if ((len(parts) > 2 and parts[1] == 'code') or
          parts[-1] in ('constants.pkl', 'bytecode.pkl')):
        raise _Refused('it is a TorchScript archive (torch.jit.save), whose '
                       'code would run when loaded, so it is not read')
    pickles = [n for n in names
               if n.count('/') == 1 and n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise _Refused('a zip archive, but not one torch.save wrote: no '
                     '<name>/data.pkl')
    prefix = pickles[0][:-len('data.pkl')]
    little = True
    if prefix + 'byteorder' in names:
      order = archive.read(prefix + 'byteorder')
      _check(order in (b'little', b'big'), f'byteorder {order!r}')
      little = order == b'little'
    storages = {}

    def load_storage(pid):
      _check(len(pid) == 5, f'unknown persistent id {pid!r}')
      _, tag, key, _, numel = pid
      _check(isinstance(key, str), f'storage key {key!r}')
      if key not in storages:
        record = f'{prefix}data/{key}'
        _check(record in names, f'no storage record {record}')
        raw = archive.read(record)
        nbytes = _index(numel, 'a storage size') * tag.dtype.itemsize
        _check(len(raw) >= nbytes, f'storage {record} is truncated')
        storages[key] = _storage(raw[:nbytes], tag.dtype, little)
      _check(storages[key].dtype == tag.dtype,
             f'storage {key} is read as two dtypes')
      return storages[key]

    return _Unpickler(io.BytesIO(archive.read(pickles[0])), load_storage,
                      depth=depth).load()


def _read_stream(data: bytes, depth: int):
  """torch's legacy stream, or a plain pickle.

  Legacy (torch.load's `_legacy_load`): pickles of the magic number, the
  protocol version and sys info, then the object pickle, then the list of
  storage keys; then per storage (in that order) its element count (int64)
  and raw little-endian bytes. Storages follow the pickle that uses them, so
  it is read twice: once to learn each storage's dtype, once to build.
  """
  f = io.BytesIO(data)
  first = _Unpickler(f, _no_storages, depth=depth).load()
  if type(first) is not int or first != _LEGACY_MAGIC:
    return first  # a plain pickle: the one object it holds
  protocol = _Unpickler(f, _no_storages, depth=depth).load()
  _check(protocol == _LEGACY_PROTOCOL, f'legacy protocol {protocol!r}')
  info = _Unpickler(f, _no_storages, depth=depth).load()
  little = info.get('little_endian', True) if isinstance(info, dict) else True
  start = f.tell()
  roots = {}  # key -> (dtype, element count)

  def learn(pid):
    _check(len(pid) == 6, f'unknown persistent id {pid!r}')
    _, tag, key, _, numel, _ = pid
    _check(isinstance(key, str), f'storage key {key!r}')
    roots.setdefault(key, (tag.dtype, _index(numel, 'a storage size')))
    return np.zeros(0, tag.dtype)

  _Unpickler(f, learn, dry=True, depth=depth).load()
  keys = _Unpickler(f, _no_storages, depth=depth).load()
  _check(isinstance(keys, list), 'no storage key list')
  storages = {}
  for key in keys:
    _check(key in roots, f'storage key {key!r} that no tensor uses')
    dtype, numel = roots[key]
    header = f.read(8)
    _check(len(header) == 8, 'the storages are truncated')
    (count,) = struct.unpack('<q', header)
    _check(count == numel, f'storage {key} holds {count} elements, the '
           f'pickle says {numel}')
    raw = f.read(numel * dtype.itemsize)
    _check(len(raw) == numel * dtype.itemsize, 'the storages are truncated')
    storages[key] = _storage(raw, dtype, little)

  def load_storage(pid):
    _, tag, key, _, _, view = pid
    _check(key in storages and storages[key].dtype == tag.dtype,
           f'storage {key!r} is missing or read as two dtypes')
    storage = storages[key]
    if view is None:
      return storage
    _check(isinstance(view, tuple) and len(view) == 3, f'storage view {view!r}')
    offset = _index(view[1], 'a view offset')
    length = _index(view[2], 'a view size')
    _check(offset + length <= storage.size, 'a storage view is out of bounds')
    return storage[offset:offset + length]

  f.seek(start)
  return _Unpickler(f, load_storage, depth=depth).load()


def _no_storages(pid):
  raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')


class _Refused(Exception):
  """A .pth format that is not read at all (the reason is the message)."""


def _read_torch_bytes(data: bytes, depth: int = 0):
  if data.startswith(b'PK\x03\x04'):
    return _read_zip(data, depth)
  if data[257:262] == b'ustar':  # torch's tar format, before 2017
    raise _Refused("PyTorch's old tar format, which is not read")
  return _read_stream(data, depth)


def read_pth(path: str, what: str, fix: str) -> Any:
  """The object a PyTorch .pth holds, read without torch and running nothing.

  Tensors come back as numpy arrays (copies, in this machine's byte order;
  bfloat16 as ml_dtypes.bfloat16), pickled modules and every other class as
  `PickledObject` stand-ins holding their attributes. Raises
  MissingFileError, or BadFileError as one line `<path> is not <what>
  (<why>); <fix>` for a file that cannot be read or is refused (TorchScript,
  tar, anything that is no torch.save file or plain pickle).
  """
  if not epath.Path(path).exists():
    raise MissingFileError(f'No file at {path}; {fix}')
  data = epath.Path(path).read_bytes()
  try:
    return _read_torch_bytes(data)
  except _Refused as e:
    raise BadFileError(f'{path} is not {what}: {e}; {fix}') from None
  except RecursionError:
    raise BadFileError(f'{path} is not {what} (its objects nest too deeply '
                       f'to read); {fix}') from None
  except Exception as e:  # pylint: disable=broad-except
    # Truncated or foreign bytes fail in zipfile or pickle with many types.
    reason = (str(e).strip().splitlines() or [''])[0]
    raise BadFileError(f'{path} is not {what} ({type(e).__name__}: '
                       f'{reason}); {fix}') from e
