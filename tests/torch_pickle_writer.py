"""Write numpy arrays as `torch.save` files without torch, for tests.

The inverse of `evaluation.pth.load_torch_state_dict`: `save_torch_state_dict`
writes the zip format of PyTorch >= 1.6 or the older legacy stream, both of which
`torch.load(weights_only=True)` reads (checked by tests/fixtures/make_torch_fixtures.py
--check-writer). `flax_to_torch_state_dict` is the inverse of
`evaluation.weights.torch_state_dict_to_flax`.
"""

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from evaluation.pth import STORAGE_DTYPES, TORCH_LEGACY_PROTOCOL, TORCH_MAGIC_NUMBER
from evaluation.weights import torch_key, torch_layout


def flax_to_torch_state_dict(variables: Any) -> dict[str, np.ndarray]:
    """Flax FID Inception variables -> pytorch-fid state dict (without
    `num_batches_tracked`)."""
    return {
        torch_key(path): np.ascontiguousarray(torch_layout(np.asarray(leaf)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
    }


class GlobalRef:
    """A global (module, name) written into a pickle without importing the module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that reduce callables are callable
        raise TypeError("placeholder for a PyTorch global")


class StorageToPickle:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array

    def little_endian_bytes(self) -> bytes:
        return (self.array if sys.byteorder == "little" else self.array.byteswap()).tobytes()


class TensorToPickle:
    """A tensor viewing a whole `StorageToPickle` with the array's own strides."""

    def __init__(self, storage: StorageToPickle, offset: int = 0, size=None, stride=None):
        array = storage.array
        self.storage, self.offset = storage, offset
        self.size = array.shape if size is None else size
        self.stride = (tuple(s // array.itemsize for s in array.strides)
                       if stride is None else stride)

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False,
                collections.OrderedDict())
        return GlobalRef("torch._utils", "_rebuild_tensor_v2"), args


class TorchPickler(pickle._Pickler):  # the pure-Python pickler lets us emit raw GLOBALs
    def __init__(self, file, legacy: bool, numel_override: dict[str, int] | None = None):
        super().__init__(file, protocol=2)
        self._legacy = legacy
        self._numel = numel_override or {}

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, GlobalRef):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if not isinstance(obj, StorageToPickle):
            return None
        name = next(k for k, v in STORAGE_DTYPES.items() if v == obj.array.dtype)
        numel = self._numel.get(obj.key, obj.array.size)
        pid = ("storage", GlobalRef("torch", name), obj.key, "cpu", numel)
        return (*pid, None) if self._legacy else pid  # legacy adds view_metadata


def pickle_tensors(obj: Any, legacy: bool = False,
                   numel_override: dict[str, int] | None = None) -> bytes:
    """The data.pkl bytes of `obj` (TensorToPickle leaves); `numel_override` makes
    storages declare other element counts than they hold (for hostile-file tests)."""
    buf = io.BytesIO()
    TorchPickler(buf, legacy, numel_override).dump(obj)
    return buf.getvalue()


def write_zip(path: str | os.PathLike, pkl: bytes, storages: Mapping[str, bytes],
              prefix: str = "archive/") -> None:
    """A PyTorch zip checkpoint from a pickle and raw storage records."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(prefix + "data.pkl", pkl)
        zf.writestr(prefix + "byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"{prefix}data/{key}", data)
        zf.writestr(prefix + "version", "3\n")


def write_legacy(path: str | os.PathLike, pkl: bytes, storages: Mapping[str, bytes],
                 numels: Mapping[str, int]) -> None:
    """A legacy-format PyTorch file: headers, the pickle, the key list, then each
    storage as an int64 element count and its bytes."""
    sys_info = {"protocol_version": TORCH_LEGACY_PROTOCOL, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        for header in (TORCH_MAGIC_NUMBER, TORCH_LEGACY_PROTOCOL, sys_info):
            pickle.dump(header, f, protocol=2)
        f.write(pkl)
        pickle.dump(list(storages), f, protocol=2)
        for key, data in storages.items():
            f.write(struct.pack("<q", numels[key]))
            f.write(data)


def save_torch_state_dict(path: str | os.PathLike, sd: Mapping[str, np.ndarray],
                          legacy: bool = False) -> None:
    """Write numpy arrays as a `torch.save`-compatible state dict, without torch.

    `legacy=False` writes the zip format of PyTorch >= 1.6, `legacy=True` the older
    stream format (`_use_new_zipfile_serialization=False`). The file is written to a
    temporary name and renamed into place.
    """
    path = os.fspath(path)
    storages, tensors = [], collections.OrderedDict()
    for i, (key, value) in enumerate(sd.items()):
        array = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d 1-d)
        if array.dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"{key}: dtype {array.dtype} has no PyTorch storage type")
        storages.append(StorageToPickle(str(i), array))
        tensors[key] = TensorToPickle(storages[-1])
    pkl = pickle_tensors(tensors, legacy)
    records = {s.key: s.little_endian_bytes() for s in storages}
    tmp = path + ".tmp"
    if legacy:
        write_legacy(tmp, pkl, records, {s.key: s.array.size for s in storages})
    else:
        write_zip(tmp, pkl, records)
    os.replace(tmp, path)
