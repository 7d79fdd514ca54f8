"""PyTorch `.pth` files without PyTorch.

`load_torch_checkpoint(path)` reads anything `torch.save` writes from tensors, dicts,
lists, tuples, numbers, strings and numpy scalars (zip format of PyTorch >= 1.6 and
the older legacy stream), e.g. pytorch-fid's Inception weights or score_sde_pytorch's
`checkpoint_<k>.pth`. A restricted unpickler rebuilds only those: any other global in
the file is refused, so no code from the file runs.

A hostile or damaged file fails with `WeightFileError` (naming the file) before any
large allocation:
- the pickle is walked opcode by opcode (`pickletools.genops`) before it is loaded,
  so a truncated stream or a length field longer than the file fails cleanly;
- zip members must be stored or deflated and may not overlap, and together they may
  declare at most 100 times the file's size plus 1 MiB (PyTorch stores members
  uncompressed; weights re-packed with deflate shrink far less than 100:1); members
  are streamed and never read past their declared size;
- each storage's declared size (elements x item size) must fit in the bytes the
  file holds for it, and each tensor view must lie inside its storage;
- all tensors together may take at most twice the stored bytes plus 1 MiB, which
  stops stride-0 views from expanding a tiny storage to gigabytes.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np


class WeightFileError(pickle.UnpicklingError, ValueError):
    """A `.pth` file that is truncated, malformed, hostile or not what was expected.

    The message names the file. A ValueError (bad input) and, as before this class
    existed, a `pickle.UnpicklingError`.
    """


TORCH_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# numpy scalars in checkpoints (e.g. score_sde_pytorch's learning rate, a float64).
_NUMPY_SCALAR_DTYPES = frozenset("b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8 c8 c16".split())
_MAX_INFLATION = 100
_INFLATION_SLACK_BYTES = 1 << 20
_TENSOR_EXPANSION = 2
_TENSOR_SLACK_BYTES = 1 << 20

# --------------------------------------------------------------------------------------
# Objects the restricted unpickler builds
# --------------------------------------------------------------------------------------


class _Malformed(pickle.UnpicklingError):
    """Raised while unpickling for content that is well-formed pickle but not allowed;
    `_unpickle` prefixes the file name."""


def _truncated(path: str, err: BaseException) -> WeightFileError:
    return WeightFileError(f"{path} is truncated or not a PyTorch checkpoint "
                           f"({type(err).__name__}: {err})")


class _NoBuild:
    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        # A BUILD opcode on one of our stand-ins could rewrite it; nothing legitimate does.
        raise _Malformed(f"BUILD applied to {type(self).__name__}")


class _StorageType(_NoBuild):
    """Stand-in for a `torch.<X>Storage` class referenced by a pickle."""

    __slots__ = ("dtype",)

    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


class _Storage(_NoBuild):
    """A flat typed buffer; `data` is filled once every declared size has been checked."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _TensorRef(_NoBuild):
    """A strided view of a `_Storage`, checked to lie inside it; materialized (copied)
    once all storages are read."""

    __slots__ = ("storage", "offset", "size", "stride", "nbytes")

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        if not isinstance(storage, _Storage):
            raise _Malformed("tensor rebuilt from something that is not a storage")
        geometry = (offset, *size, *stride)
        if (not all(isinstance(v, int) for v in geometry) or len(size) != len(stride)
                or min(geometry) < 0):
            raise _Malformed(
                f"bad tensor geometry offset={offset!r} size={size!r} stride={stride!r}")
        numel = math.prod(size)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if numel and last >= storage.numel:
            raise _Malformed(
                f"tensor (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) "
                f"reads past its storage of {storage.numel} elements")
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)
        self.nbytes = numel * storage.dtype.itemsize

    def materialize(self) -> np.ndarray:
        data = self.storage.data
        if not self.nbytes:
            return np.zeros(self.size, self.storage.dtype)
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size,
            strides=tuple(s * data.itemsize for s in self.stride), writeable=False)
        return np.array(view)


class _DtypeSpec(_NoBuild):
    """What `numpy.dtype(name, align, copy)` and its BUILD state describe, without
    handing file data to numpy's own dtype unpickling."""

    __slots__ = ("dtype",)

    def __init__(self, name: Any, align: Any = False, copy: Any = False):
        if name not in _NUMPY_SCALAR_DTYPES:
            raise _Malformed(f"numpy dtype {name!r} is not allowed; allowed: "
                             f"{sorted(_NUMPY_SCALAR_DTYPES)}")
        self.dtype = np.dtype(name)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in "<>|=":
            raise _Malformed(f"bad numpy dtype state {state!r}")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(spec: Any, data: Any = None) -> np.generic:
    if not isinstance(spec, _DtypeSpec) or not isinstance(data, bytes) \
            or len(data) != spec.dtype.itemsize:
        raise _Malformed("malformed numpy scalar")
    return np.frombuffer(data, spec.dtype)[0]


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Malformed(f"unsupported _codecs.encode({encoding!r})")
    return text.encode("latin1")


class _Global(_NoBuild):
    """An allowed global: a fresh callable per lookup."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that knows only tensors, storages, OrderedDict and numpy scalars; any
    other global is refused. Records every storage and tensor it creates."""

    def __init__(self, file: Any, storages: dict[str, _Storage], tensors: list[_TensorRef],
                 legacy: bool):
        super().__init__(file, encoding="utf-8")
        self.storages, self.tensors, self.legacy = storages, tensors, legacy

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                        *unused: Any) -> _TensorRef:
        # torch._utils._rebuild_tensor(_v2); requires_grad, hooks, metadata are unused.
        tensor = _TensorRef(storage, offset, tuple(size), tuple(stride))
        self.tensors.append(tensor)
        return tensor

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        fn = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
            ("numpy.core.multiarray", "scalar"): _numpy_scalar,
            ("numpy._core.multiarray", "scalar"): _numpy_scalar,
            ("numpy", "dtype"): _DtypeSpec,
            ("_codecs", "encode"): _latin1_encode,
        }.get((module, name))
        if fn is None:
            raise _Malformed(
                f"refusing to load global '{module}.{name}': only tensor data "
                "(torch._utils._rebuild_tensor_v2, torch.*Storage), collections.OrderedDict "
                "and numpy scalars are allowed in a weights file")
        return _Global(fn)

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or not pid:
            raise _Malformed(f"unsupported persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage" or len(pid) != (6 if self.legacy else 5):
            raise _Malformed(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if self.legacy and pid[5] is not None:
            raise _Malformed("storage views (pre-1.0 PyTorch files) are unsupported")
        if (not isinstance(storage_type, _StorageType) or not isinstance(numel, int)
                or numel < 0 or not isinstance(key, str | int)):
            raise _Malformed(f"bad storage record {pid!r}")
        key = str(key)
        storage = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
            raise _Malformed(f"storage {key!r} is declared twice differently")
        return storage


class _Capped:
    """Read-only file view that never reads past `end`, so no length field in a file
    can make a read allocate more than the file holds."""

    def __init__(self, f: Any, end: int):
        self.f, self.end = f, end

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.end - self.f.tell())
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline(max(0, self.end - self.f.tell()))

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int) -> int:
        return self.f.seek(pos)


def _unpickle(f: _Capped, path: str, storages: dict[str, _Storage],
              tensors: list[_TensorRef], legacy: bool) -> Any:
    """One pickle from `f`: first checked opcode by opcode, then loaded restricted."""
    start = f.tell()
    try:
        for _ in pickletools.genops(f):
            pass
        f.seek(start)
        return _RestrictedUnpickler(f, storages, tensors, legacy).load()
    except _Malformed as err:
        raise WeightFileError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, EOFError, struct.error, RecursionError) as err:
        # Anything else the pickle machinery raises means the stream is damaged.
        raise _truncated(path, err) from None


# --------------------------------------------------------------------------------------
# The two file formats
# --------------------------------------------------------------------------------------


def _check_sizes(path: str, storages: dict[str, _Storage], tensors: list[_TensorRef],
                 available: Callable[[str], int], check: Callable[[Any], None], obj: Any
                 ) -> None:
    """Everything the pickle declared, against what the file holds, before reading."""
    for key, storage in storages.items():
        if storage.nbytes > (have := available(key)):
            raise WeightFileError(
                f"{path}: storage {key!r} declares {storage.numel} elements "
                f"({storage.nbytes} bytes) but the file holds {max(have, 0)} bytes for it; "
                "truncated or not a PyTorch checkpoint")
    stored = sum(s.nbytes for s in storages.values())
    viewed = sum(t.nbytes for t in tensors)
    limit = _TENSOR_EXPANSION * stored + _TENSOR_SLACK_BYTES
    if viewed > limit:
        raise WeightFileError(
            f"{path}: its tensors would take {viewed} bytes, more than {limit} (twice "
            f"the {stored} stored bytes plus 1 MiB); refusing views (e.g. stride 0) that "
            "expand the stored data")
    check(obj)


def _from_bytes(raw: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
    dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
    return np.frombuffer(raw, dtype, storage.numel).astype(storage.dtype, copy=False)


def _zip_members(zf: zipfile.ZipFile, path: str) -> dict[str, zipfile.ZipInfo]:
    """The members, after refusing what no honest checkpoint contains (module doc)."""
    infos = zf.infolist()
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise WeightFileError(f"{path}: member {info.filename} uses compression "
                                  f"{info.compress_type}; only stored and deflated are read")
    # Each member's local header (30 bytes at least) and data must end before the next
    # member starts, the last before the central directory: no bytes shared.
    end = zf.start_dir
    for info in sorted(infos, key=lambda i: i.header_offset, reverse=True):
        if info.header_offset + 30 + info.compress_size > end:
            raise WeightFileError(f"{path}: zip members overlap or extend past the file")
        end = info.header_offset
    file_size = os.path.getsize(path)
    declared = sum(info.file_size for info in infos)
    limit = _MAX_INFLATION * file_size + _INFLATION_SLACK_BYTES
    if declared > limit:
        raise WeightFileError(
            f"{path}: zip members declare {declared} bytes in all, more than {limit} "
            f"({_MAX_INFLATION} times the file's {file_size} bytes plus 1 MiB); refusing "
            "a zip bomb")
    return {info.filename: info for info in infos}


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, n: int, path: str) -> bytes:
    """The first n (<= declared size) bytes of a member, streamed: never more."""
    try:
        with zf.open(info) as f:
            data = f.read(n)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as err:
        raise _truncated(path, err) from None
    if len(data) != n:
        raise WeightFileError(f"{path}: member {info.filename} ends after {len(data)} of "
                              f"{n} bytes; truncated or not a PyTorch checkpoint")
    return data


def _load_zip(path: str, check: Callable[[Any], None]) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise _truncated(path, err) from None
    with zf:
        members = _zip_members(zf, path)
        pickles = [n for n in members if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightFileError(f"{path}: not a PyTorch zip checkpoint (no single */data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if (info := members.get(prefix + "byteorder")) is not None:
            byteorder = _read_member(zf, info, min(info.file_size, 8), path).decode("latin1")
            if byteorder not in ("little", "big"):
                raise WeightFileError(f"{path}: byteorder record {byteorder!r} is neither "
                                      "'little' nor 'big'")
        info = members[pickles[0]]
        data = io.BytesIO(_read_member(zf, info, info.file_size, path))
        storages, tensors = {}, []
        obj = _unpickle(_Capped(data, info.file_size), path, storages, tensors, legacy=False)
        records = {key: members.get(f"{prefix}data/{key}") for key in storages}
        _check_sizes(path, storages, tensors,
                     lambda key: -1 if records[key] is None else records[key].file_size,
                     check, obj)
        for key, storage in storages.items():
            raw = _read_member(zf, records[key], storage.nbytes, path)
            storage.data = _from_bytes(raw, storage, byteorder)
    return obj


def _load_legacy(path: str, check: Callable[[Any], None]) -> Any:
    storages, tensors = {}, []
    with open(path, "rb") as raw:
        end = os.fstat(raw.fileno()).st_size
        f = _Capped(raw, end)

        def load() -> Any:
            return _unpickle(f, path, storages, tensors, legacy=True)

        if raw.read(2) == b"PK":
            raise WeightFileError(f"{path} is truncated or not a PyTorch checkpoint (a zip "
                                  "archive without its central directory)")
        raw.seek(0)
        if load() != TORCH_MAGIC_NUMBER:
            raise WeightFileError(f"{path}: not a PyTorch checkpoint (bad magic number)")
        if load() != TORCH_LEGACY_PROTOCOL:
            raise WeightFileError(f"{path}: unsupported legacy PyTorch protocol version")
        sys_info = load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise WeightFileError(f"{path}: only little-endian legacy PyTorch files are read")
        obj = load()
        keys = load()
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
            raise WeightFileError(f"{path}: storage key list does not match the pickle")
        # Each storage is an int64 element count, then its bytes, in key-list order.
        left = end - raw.tell() - 8 * len(keys)
        _check_sizes(path, storages, tensors, lambda key: left, check, obj)
        if (needed := sum(s.nbytes for s in storages.values())) > left:
            raise WeightFileError(f"{path} is truncated or not a PyTorch checkpoint: its "
                                  f"storages need {needed} bytes, {left} are left")
        for key in map(str, keys):
            storage = storages[key]
            (numel,) = struct.unpack("<q", raw.read(8))
            if numel != storage.numel:
                raise WeightFileError(f"{path}: storage {key} holds {numel} elements, "
                                      f"expected {storage.numel}")
            storage.data = _from_bytes(raw.read(storage.nbytes), storage, "little")
    return obj


def _materialize(obj: Any, path: str) -> Any:
    """Tensors -> numpy arrays, mappings -> dicts; anything unexpected is an error."""
    memo: dict[int, Any] = {}
    scalars = (bool, int, float, complex, str, bytes, type(None), np.generic)

    def walk(x: Any) -> Any:
        if id(x) in memo:  # shared tensors (tied weights) stay one array
            return memo[id(x)]
        if isinstance(x, _TensorRef):
            out = x.materialize()
        elif isinstance(x, Mapping):
            out = memo[id(x)] = {}
            out.update((walk(k), walk(v)) for k, v in x.items())
        elif isinstance(x, list):
            out = memo[id(x)] = []
            out.extend(walk(v) for v in x)
        elif isinstance(x, tuple):
            out = tuple(walk(v) for v in x)
        elif isinstance(x, scalars):
            return x
        else:
            raise WeightFileError(f"{path}: unexpected {type(x).__name__} in the checkpoint")
        memo[id(x)] = out
        return out

    try:
        return walk(obj)
    except WeightFileError:
        raise
    except (RecursionError, TypeError, ValueError) as err:
        raise WeightFileError(f"{path}: malformed checkpoint structure ({err})") from None


def _load(path: str | os.PathLike, check: Callable[[Any], None]) -> Any:
    path = os.fspath(path)
    loader = _load_zip if zipfile.is_zipfile(path) else _load_legacy
    return _materialize(loader(path, check), path)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Read any `torch.save`d file of tensors and plain data, without torch.

    Returns the saved object with tensors as numpy arrays (a copy each, in the
    tensor's shape and dtype; 0-dim included), mappings (OrderedDict too) as dicts, and
    lists, tuples, ints, floats, strings, bytes and numpy scalars as they are. Raises
    `WeightFileError` naming the file for a truncated, malformed or hostile file (see
    the module doc for the limits); no code from the file runs.
    """
    return _load(path, lambda obj: None)


def load_torch_state_dict(path: str | os.PathLike,
                          expected_shapes: Mapping[str, tuple[int, ...]] | None = None
                          ) -> dict[str, np.ndarray]:
    """`load_torch_checkpoint` of a state dict: {name: array}.

    The file must hold one mapping from strings to tensors. With `expected_shapes`,
    each of its names must be present with that (PyTorch) shape, checked before any
    tensor data is read; other names may be present too.
    """
    def check(obj: Any) -> None:
        if not isinstance(obj, Mapping):
            raise WeightFileError(f"{path}: expected a state dict (a mapping), found "
                                  f"{type(obj).__name__}")
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, _TensorRef):
                raise WeightFileError(f"{path}: state dict entry {key!r} is not a tensor")
        wrong = [f"{k}: {obj[k].size if k in obj else 'missing'}, expected {tuple(s)}"
                 for k, s in (expected_shapes or {}).items()
                 if k not in obj or obj[k].size != tuple(s)]
        if wrong:
            raise WeightFileError(f"{path}: {len(wrong)} tensors have the wrong shape or "
                                  f"are missing: {wrong[:5]}")

    return _load(path, check)
