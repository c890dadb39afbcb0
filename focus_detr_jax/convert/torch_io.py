"""Read PyTorch `.pth` and pickled `.pkl` weight files without torch, and without running code.

Formats, told apart by their bytes: the torch zip (`torch.save`, torch >= 1.6: `<archive>/data.pkl`
over `<archive>/data/<key>` storages), the torch legacy file (torch < 1.6: magic, protocol and sys
info pickles, the object, its storage keys, then each storage as int64 numel + raw data), a plain
pickle (detectron2 `.pkl`, read with `encoding="latin1"` like detectron2) and `.npz`.

The unpickler resolves only tensor/storage rebuild functions, numpy array reconstruction and plain
containers. Any other global (an optimizer class, a `yacs` config, `os.system`) is never imported:
loading fails with `UnsafePickleError` naming each such object and where it sits in the file.
Tensors come back as numpy arrays (bfloat16 as `ml_dtypes.bfloat16`). With torch installed,
`load_file(backend="auto")` reads `.pth` files with `torch.load(weights_only=True)` instead.
"""

import codecs
import collections
import importlib
import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import ml_dtypes
import numpy as np

TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
TORCH_LEGACY_PROTOCOL = 1001


class UnsafePickleError(pickle.UnpicklingError):
  """The file holds objects other than tensors, arrays and plain containers."""


class CheckpointFormatError(ValueError):
  """The file is not a weight file this reader understands (or it is corrupt)."""


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
_TORCH_DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": ml_dtypes.bfloat16, "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "short": "int16",
    "int8": "int8", "uint8": "uint8", "bool": "bool", "complex64": "complex64",
    "complex128": "complex128", "cfloat": "complex64", "cdouble": "complex128",
}


class _TorchDtype:
  """`torch.float32` & co. as found in a pickle: only carries the numpy dtype."""
  table = _TORCH_DTYPES

  def __init__(self, name):
    self.name, self.dtype = name, np.dtype(self.table[name])

  def __repr__(self):
    return f"torch.{self.name}"


class _StorageType(_TorchDtype):
  """`torch.FloatStorage` & co. (checked by exact type: a storage type is no dtype)."""
  table = _STORAGE_DTYPES


def _text(value) -> str:
  return value.decode("ascii") if isinstance(value, bytes) else str(value)


class _Storage:
  """Raw bytes of one storage, read lazily (legacy files fill it after the object pickle)."""

  def __init__(self, dtype: np.dtype, numel: int, key: str):
    self.dtype, self.numel, self.key = dtype, int(numel), key
    self.data = None   # bytes, set by the reader
    self.base, self.offset = None, 0   # legacy storage views: (root storage, element offset)

  def array(self, dtype: np.dtype) -> np.ndarray:
    if self.base is not None:
      flat = self.base.array(self.dtype)[self.offset:self.offset + self.numel]
      return flat if dtype == self.dtype else flat.view(dtype)
    if self.data is None:
      raise CheckpointFormatError(f"storage {self.key} has no data in the file")
    nbytes = self.numel * self.dtype.itemsize
    if len(self.data) < nbytes:
      raise CheckpointFormatError(f"storage {self.key}: {len(self.data)} bytes, expected {nbytes}")
    return np.frombuffer(self.data, dtype=dtype, count=nbytes // dtype.itemsize)


class _LazyTensor:
  """A tensor view over a storage: materialised once every storage has been read."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, _Storage):
      raise CheckpointFormatError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    self.dtype = storage.dtype if dtype is None else dtype

  def materialise(self) -> np.ndarray:
    flat = self.storage.array(self.dtype)
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, self.dtype)
    if len(self.size) != len(self.stride) or any(s < 0 for s in self.stride):
      raise CheckpointFormatError(f"tensor with size {self.size} and stride {self.stride}")
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or last >= flat.size:
      raise CheckpointFormatError(
          f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) reads past the "
          f"end of storage {self.storage.key} ({flat.size} elements)")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * flat.itemsize for s in self.stride), writeable=False)
    return np.array(view, dtype=self.dtype, copy=True)


def _to_little_endian(data: bytes, dtype: np.dtype) -> bytes:
  """Byte-swap the elements of a big-endian storage (complex: each component)."""
  unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
  if unit == 1:
    return data
  return np.frombuffer(data, f">u{unit}").astype(f"<u{unit}").tobytes()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  if type(dtype) is not _TorchDtype:
    raise CheckpointFormatError(f"_rebuild_tensor_v3 with dtype {dtype!r}")
  return _LazyTensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data


class _TensorClass:
  """`torch.Tensor` / `torch.nn.Parameter` as the type argument of `_rebuild_from_type_v2`."""


def _rebuild_from_type_v2(func, new_type, args, state):
  if not isinstance(new_type, _TensorClass):
    raise CheckpointFormatError(f"tensor subclass {new_type!r}")
  return func(*args)


def _no_objects(dtype, what="arrays"):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise UnsafePickleError(f"numpy object {what} are not allowed in weight files")
  return dtype


def _numpy_core(module, name):
  """numpy's pickle helper `module.name`, from `numpy._core` (numpy 2) or `numpy.core`."""
  try:
    return getattr(importlib.import_module(f"numpy._core.{module}"), name)
  except ImportError:
    return getattr(importlib.import_module(f"numpy.core.{module}"), name)


def _numpy_scalar(dtype, data=None):
  scalar, dtype = _numpy_core("multiarray", "scalar"), _no_objects(dtype, "scalars")
  return scalar(dtype) if data is None else scalar(dtype, data)


def _numpy_frombuffer(buf, dtype, shape, order):
  return _numpy_core("numeric", "_frombuffer")(buf, _no_objects(dtype), shape, order)


def _allowed_globals():
  allowed = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("_codecs", "encode"): codecs.encode,
      ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): lambda *a: _no_objects(np.dtype(*a)),
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
      ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
      ("torch", "Tensor"): _TensorClass(), ("torch.nn.parameter", "Parameter"): _TensorClass(),
      ("torch", "Size"): tuple,
  }
  for builtins in ("builtins", "__builtin__"):
    allowed.update({(builtins, t.__name__): t for t in (set, frozenset, complex)})
  for np_mod in ("numpy.core", "numpy._core"):
    allowed[(f"{np_mod}.multiarray", "_reconstruct")] = _numpy_core("multiarray", "_reconstruct")
    allowed[(f"{np_mod}.multiarray", "scalar")] = _numpy_scalar
    allowed[(f"{np_mod}.numeric", "_frombuffer")] = _numpy_frombuffer
  for name in _STORAGE_DTYPES:
    allowed[("torch", name)] = allowed[("torch.storage", name)] = _StorageType(name)
  allowed.update({("torch", name): _TorchDtype(name) for name in _TORCH_DTYPES})
  return allowed


_ALLOWED = _allowed_globals()


class _Forbidden:
  """Stand-in for a global outside the allow-list: inert, records that it was referenced."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def _ignore(self, *args, **kwargs):
    pass

  __init__ = __setstate__ = __setitem__ = append = extend = _ignore

  def __call__(self, *args, **kwargs):
    return type(self)()

  def __repr__(self):
    return f"<{self.qualname}>"


class _RestrictedUnpickler(pickle.Unpickler):
  """pickle.Unpickler that resolves only allow-listed globals; others become `_Forbidden`."""

  def __init__(self, file, storages=None, zip_reader=None, encoding="utf-8"):
    super().__init__(file, encoding=encoding)
    self.forbidden: List[str] = []
    self.storages = storages if storages is not None else {}
    self.zip_reader = zip_reader   # callable(key) -> bytes, for the zip format

  def find_class(self, module, name):
    found = _ALLOWED.get((module, name))
    if found is not None:
      return found
    qualname = f"{module}.{name}"
    self.forbidden.append(qualname)
    return type(name, (_Forbidden,), {"qualname": qualname})

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise CheckpointFormatError(f"unknown persistent id {pid!r}")
    kind = _text(pid[0])
    if kind != "storage":
      self.forbidden.append(f"persistent object of type {kind!r}")
      return _Forbidden()
    if len(pid) not in (5, 6):  # zip: (storage, type, key, location, numel); legacy: + view
      raise CheckpointFormatError(f"unknown storage id {pid!r}")
    _, storage_type, key, _, numel, *view = pid
    if type(storage_type) is not _StorageType:
      self.forbidden.append(f"storage of type {storage_type!r}")
      return _Forbidden()
    key = _text(key)
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(storage_type.dtype, numel, key)
      if self.zip_reader is not None:
        storage.data = self.zip_reader(key)
    if not view or view[0] is None:
      return storage
    view_key, offset, view_size = view[0]
    view_key = _text(view_key)
    if view_key not in self.storages:
      v = self.storages[view_key] = _Storage(storage.dtype, view_size, view_key)
      v.base, v.offset = storage, int(offset)
    return self.storages[view_key]


def _locate(obj, path="") -> List[str]:
  """Paths (`['optimizer']['state']`) of the `_Forbidden` objects inside obj."""
  if isinstance(obj, _Forbidden) or (isinstance(obj, type) and issubclass(obj, _Forbidden)):
    return [f"{obj.qualname} at {path or 'top level'}"]
  if isinstance(obj, dict):
    items = [(repr(k), v) for k, v in obj.items()]
  elif isinstance(obj, (list, tuple, set, frozenset)):
    items = enumerate(obj)
  else:
    return []
  return [found for k, v in items for found in _locate(v, f"{path}[{k}]")]


def _unsafe_message(source, names, located):
  what = "; ".join(located) if located else ", ".join(sorted(set(names)))
  return (f"{source}: refusing to load: the pickle references {what}. Only tensors, numpy arrays "
          "and plain containers (dict, list, tuple, str, numbers) are allowed; unpickling any "
          "other object would import and run code named by the file. If this is a training "
          "checkpoint with optimizer/scheduler/config objects and you trust it, keep only the "
          "weights in an environment with torch: `python -c \"import torch; "
          "c = torch.load('IN', map_location='cpu', weights_only=False); "
          "torch.save({'model': c['model']}, 'OUT.pth')\"` (use the key that holds the "
          "state dict).")


def _map_tree(leaf, obj):
  """`leaf` applied to every non-container of a tree of dicts, lists and tuples."""
  if isinstance(obj, dict):
    return {k: _map_tree(leaf, v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_map_tree(leaf, v) for v in obj)
  return leaf(obj)


def _materialise_leaf(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialise()
  if isinstance(obj, np.ndarray):
    _no_objects(obj.dtype)
  return obj


def _run_unpickler(unpickler, source):
  try:
    result = unpickler.load()
  except (UnsafePickleError, CheckpointFormatError):
    raise
  except Exception as e:  # malformed stream, or a forbidden stand-in used as a real object
    if unpickler.forbidden:
      raise UnsafePickleError(_unsafe_message(source, unpickler.forbidden, [])) from e
    raise CheckpointFormatError(
        f"{source}: not a readable pickle ({type(e).__name__}: {e}); expected a torch .pth/.pt, "
        "a pickled .pkl or an .npz (MindSpore .ckpt files are not supported)") from e
  if unpickler.forbidden:
    raise UnsafePickleError(_unsafe_message(source, unpickler.forbidden, _locate(result)))
  return result


def restricted_loads(data: bytes, encoding: str = "latin1", source: str = "<bytes>"):
  """Unpickle one object from bytes with the restricted unpickler (no persistent ids)."""
  unpickler = _RestrictedUnpickler(io.BytesIO(data), encoding=encoding)
  return _map_tree(_materialise_leaf, _run_unpickler(unpickler, source))


def _read_torch_zip(path: Path):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      if "constants.pkl" in {n.split("/")[-1] for n in names}:
        raise CheckpointFormatError(f"{path} is a TorchScript archive (torch.jit.save), not a "
                                    "state dict; save `model.state_dict()` with torch.save")
      inner = [n for n in names if n.endswith((".pth", ".pt", ".pkl", ".npz"))]
      hint = f"; it wraps {inner[:3]}: unzip it and convert the inner file" if inner else ""
      raise CheckpointFormatError(f"{path}: a zip file but not a torch.save archive (no single "
                                  f"<archive>/data.pkl; entries: {names[:8]}){hint}")
    prefix = pkls[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode().strip()
      if byteorder not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: unknown byteorder {byteorder!r}")

    def read(key):
      name = f"{prefix}data/{key}"
      if name not in names:
        raise CheckpointFormatError(f"{path}: storage {name} is missing from the archive")
      return zf.read(name)

    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), zip_reader=read)
    result = _run_unpickler(unpickler, str(path))
    if byteorder == "big":
      for s in unpickler.storages.values():
        if s.data is not None:
          s.data = _to_little_endian(s.data, s.dtype)
    return _map_tree(_materialise_leaf, result)


def _read_legacy_or_pickle(path: Path):
  """A plain pickle, or a torch legacy file (a series of pickles, then the storages' bytes)."""
  # detectron2 reads .pkl with latin1 (Python 2 pickles); torch reads with utf-8.
  with open(path, "rb") as f:
    storages: Dict[str, _Storage] = {}

    def load():
      return _run_unpickler(_RestrictedUnpickler(f, storages, encoding="latin1"), str(path))

    first = load()
    if first != TORCH_LEGACY_MAGIC:
      return _map_tree(_materialise_leaf, first)
    protocol = load()
    if protocol != TORCH_LEGACY_PROTOCOL:
      raise CheckpointFormatError(f"{path}: torch legacy protocol {protocol}, expected 1001")
    sys_info = load()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    result = load()
    for key in map(_text, load()):
      if key not in storages:
        raise CheckpointFormatError(f"{path}: storage key {key} was not referenced")
      storage = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise CheckpointFormatError(f"{path}: truncated before storage {key}")
      numel, = struct.unpack("<q" if little else ">q", header)
      data = f.read(numel * storage.dtype.itemsize)
      if len(data) != numel * storage.dtype.itemsize:
        raise CheckpointFormatError(f"{path}: storage {key} is truncated")
      storage.data = data if little else _to_little_endian(data, storage.dtype)
      storage.numel = numel
    return _map_tree(_materialise_leaf, result)


def _torch_to_numpy(obj):
  import torch
  if not isinstance(obj, torch.Tensor):
    return obj
  t = obj.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def detect_container(path) -> str:
  """"torch_zip" | "npz" | "pickle" (plain or torch legacy): from the first bytes."""
  path = Path(path)
  with open(path, "rb") as f:
    head = f.read(4)
  if head == b"PK\x03\x04":
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
    if names and all(n.endswith(".npy") for n in names):
      return "npz"
    return "torch_zip"
  return "pickle"   # plain pickle or torch legacy; the unpickler says if it is neither


def load_file(path, backend: str = "auto"):
  """A weight file's content with every tensor as a numpy array.

  `backend`: "auto" (torch.load(weights_only=True) for torch files when torch is installed, the
  built-in reader otherwise), "numpy" (always the built-in reader) or "torch". Raises
  UnsafePickleError (objects other than tensors/arrays/containers) or CheckpointFormatError.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  if sys.byteorder != "little":
    raise CheckpointFormatError("the built-in reader supports little-endian hosts only")
  container = detect_container(path)
  if container == "npz":
    with np.load(path, allow_pickle=False) as data:
      arrays = {}
      for k in data.files:
        try:
          arrays[k] = data[k]
        except ValueError as e:   # an object array (would need pickle)
          raise UnsafePickleError(f"{path}: array {k!r} holds Python objects; weight files may "
                                  f"hold numeric arrays only") from e
      return arrays
  use_torch = backend == "torch" or (backend == "auto" and torch_available())
  if use_torch and (container == "torch_zip" or _is_torch_legacy(path)):
    import torch
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
      # torch refused an object that is not weights, or the file is no torch file (e.g. a zip of
      # another framework): the built-in reader, which never runs code either, names what it
      # found; should it accept the file after all, torch's refusal stands.
      _read_builtin(path, container)
      raise UnsafePickleError(f"{path}: torch.load(weights_only=True) refused the file: {e}") from e
    return _map_tree(_torch_to_numpy, obj)
  return _read_builtin(path, container)


def _read_builtin(path, container):
  return _read_torch_zip(path) if container == "torch_zip" else _read_legacy_or_pickle(path)


def _is_torch_legacy(path) -> bool:
  prefix = pickle.dumps(TORCH_LEGACY_MAGIC, protocol=2)
  with open(path, "rb") as f:
    return f.read(len(prefix)) == prefix


def save_state_dict(state_dict: Dict[str, np.ndarray], path, wrap_model: bool = True) -> Path:
  """Write a flat {key: array} state dict to `path`.

  `.pth` / `.pt`: `torch.save({"model": state_dict})` (needs torch; keys that share one array
  share one tensor, like the aliases detrex saves). `.npz`: `np.savez` (no torch needed).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".npz":
    with open(path, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in state_dict.items()})
    return path
  if path.suffix in (".pth", ".pt"):
    if not torch_available():
      raise RuntimeError(
          f"writing {path} needs torch, which is not installed: write an .npz instead (same keys "
          "and arrays) and convert it where torch is installed with `python -c \"import numpy "
          "as np, torch; d = np.load('IN.npz'); torch.save({'model': {k: torch.from_numpy(d[k]) "
          "for k in d.files}}, 'OUT.pth')\"`")
    import torch
    tensors, by_id = {}, {}
    for k, v in state_dict.items():
      if id(v) not in by_id:
        by_id[id(v)] = torch.from_numpy(np.ascontiguousarray(v))
      tensors[k] = by_id[id(v)]
    torch.save({"model": tensors} if wrap_model else tensors, path)
    return path
  raise ValueError(f"{path}: choose a .pth/.pt (torch) or .npz output file")


__all__ = ["UnsafePickleError", "CheckpointFormatError", "load_file", "restricted_loads",
           "save_state_dict", "torch_available", "detect_container"]
