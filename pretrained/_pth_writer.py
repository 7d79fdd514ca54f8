"""`torch.save`'s zip format written without torch, for score_sde_pytorch exports.

The inverse of `evaluation.pth.load_torch_checkpoint` for what a training checkpoint holds:
dicts, lists, tuples, strings, ints, floats, bools, None and numpy arrays (as tensors). The
pickle is emitted opcode by opcode (protocol 2) with only the globals PyTorch's
`weights_only=True` loader allows (`torch._utils._rebuild_tensor_v2`, the typed storages,
`collections.OrderedDict`), so `torch.load` reads it with its safe default. Layout of the
archive (PyTorch's `torch/serialization.py`): <name>/data.pkl, <name>/byteorder,
<name>/data/<key> (each storage's little-endian bytes), <name>/version.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile

import numpy as np

from evaluation.pth import STORAGE_DTYPES

_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _int(value: int) -> bytes:
    if -2 ** 31 <= value < 2 ** 31:
        return pickle.BININT + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def _str(value: str) -> bytes:
    data = value.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


class _Writer:
    def __init__(self):
        self.storages: dict[str, np.ndarray] = {}

    def tensor(self, array: np.ndarray) -> bytes:
        array = np.ascontiguousarray(array) if array.ndim else np.asarray(array)
        if array.dtype not in _STORAGE_NAMES:
            raise ValueError(f"dtype {array.dtype} has no PyTorch storage type")
        key = str(len(self.storages))
        self.storages[key] = array
        # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)
        storage = _tuple([_str("storage"), _global("torch", _STORAGE_NAMES[array.dtype]),
                          _str(key), _str("cpu"), _int(array.size)]) + pickle.BINPERSID
        stride = [s // array.itemsize for s in array.strides]
        args = [storage, _int(0), _tuple([_int(d) for d in array.shape]),
                _tuple([_int(s) for s in stride]), pickle.NEWFALSE,
                _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE]
        return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + pickle.REDUCE

    def obj(self, value) -> bytes:
        if isinstance(value, np.ndarray):
            return self.tensor(value)
        if value is None:
            return pickle.NONE
        if isinstance(value, (bool, np.bool_)):
            return pickle.NEWTRUE if value else pickle.NEWFALSE
        if isinstance(value, (int, np.integer)):
            return _int(int(value))
        if isinstance(value, (float, np.floating)):
            return pickle.BINFLOAT + struct.pack(">d", float(value))
        if isinstance(value, str):
            return _str(value)
        if isinstance(value, tuple):
            return _tuple([self.obj(v) for v in value])
        if isinstance(value, list):
            return pickle.EMPTY_LIST + pickle.MARK + b"".join(self.obj(v) for v in value) + \
                pickle.APPENDS
        if isinstance(value, dict):
            items = b"".join(self.obj(k) + self.obj(v) for k, v in value.items())
            return pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS
        raise TypeError(f"cannot write a {type(value).__name__} into a .pth file")


def save(obj, path: str, archive: str = "archive") -> None:
    """Writes `obj` as torch.save would (zip format); atomically (a temporary name, renamed)."""
    writer = _Writer()
    data = pickle.PROTO + bytes([2]) + writer.obj(obj) + pickle.STOP
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{archive}/data.pkl", data)
            zf.writestr(f"{archive}/byteorder", "little")
            for key, array in writer.storages.items():
                little = array.astype(array.dtype.newbyteorder("<"), copy=False)
                zf.writestr(f"{archive}/data/{key}", little.tobytes())
            zf.writestr(f"{archive}/version", "3\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
