"""Readers of data files that need no TensorFlow: IDX files (MNIST's format) and a user's own
images (a folder of PNG/JPEG files, or an `.npz`), with the one error they raise: `DataError`.

`datasets` re-exports all three names; the input pipelines there build on `read_idx`.
`NATIVE_SIZES`: the stored image sizes of the built-in data sets, read by `datasets` (which
registers them with it) and by `evaluation.metrics` (stats file names) without TensorFlow.
"""

from __future__ import annotations

import gzip
import os
import pickle
import warnings
import zipfile
import zlib

import numpy as np
from PIL import Image


class DataError(ValueError):
    """A damaged or wrong data file; the message names the file and what is wrong with it."""


# (H, W) of the stored images of the built-in data sets (LSUN, FFHQ, CelebAHQ: any size).
NATIVE_SIZES = {"CIFAR10": (32, 32), "SVHN": (32, 32), "CELEBA": (218, 178), "MNIST": (28, 28),
                "FashionMNIST": (28, 28)}


# ----------------------------------------------------------------------------- IDX files

# IDX type codes (third magic byte) -> numpy dtype; multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: str) -> bytes:
    """The bytes of a file (gunzipped for `.gz`); DataError if it cannot be read."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except gzip.BadGzipFile as e:
        raise DataError(f"{path}: not a valid gzip file ({e}).") from None
    except (EOFError, zlib.error) as e:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt ({e}).") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}).") from None


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (plain, or gzip-compressed when the name ends in `.gz`).

    Returns the array with the shape stored in the header, e.g. images `[N, 28, 28]` uint8 or
    labels `[N]` uint8, in native byte order. Raises DataError for a damaged or non-IDX file.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(shape, dtype=np.int64))
    if len(shape) != ndim or len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes of "
            f"data) but the file holds {max(len(raw) - header, 0)} bytes after the header."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------- a user's images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_NPZ_KEYS = ("images", "samples")
_NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error,
                    pickle.UnpicklingError)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> [..., 1]: ITU-R 601-2 luma in Pillow's fixed-point form (its 'L')."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def _check_image_size(path: str, wh: tuple[int, int], size: int) -> None:
    """DataError unless an image's header size (W, H) is size x size: checked before the
    pixels are decoded (a 0.6 MB PNG can declare 12000 x 12000 pixels: GBs decoded)."""
    width, height = wh
    if (height, width) != (size, size):
        raise DataError(
            f"{path}: the image is {height}x{width} (HxW) but the model takes {size}x{size}; "
            f"crop or resize it first (images are not resized silently)."
        )


def _read_image(path: str, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 [size, size, channels]."""
    try:
        with warnings.catch_warnings():  # a large size is refused below, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only
        with img:
            _check_image_size(path, img.size, size)
            img.load()
            mode, (width, height) = img.mode, img.size
            # 16/32-bit integer or float pixels would be clipped to 8 bits by convert().
            wide = mode.startswith(("I", "F"))
            # Pillow's 'L' is the 601-2 luma; 'RGB' repeats grey and drops alpha.
            pixels = None if wide else np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot be read as an image ({e}).") from None
    if wide:
        raise DataError(f"{path}: pixel mode {mode!r} is not 8-bit; save it with 8 bits/channel.")
    _check_image_size(path, (width, height), size)
    return pixels.reshape(size, size, channels)


# ----------------------------------------------------------------------------- .npz files

# The most one array of an .npz (or .npy) file may declare before it is read: a file of a few
# MB can declare GBs in a deflated member (a "zip bomb"); Inception statistics of 50,000
# images (float64 [50000, 2048], 0.8 GB) fit.
MAX_NPZ_ARRAY_BYTES = 2 << 30


def _npy_header(f, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `f`, which is left at the data."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read(f)
    if dtype.hasobject:  # reported as unreadable by read_npz, naming the file
        raise ValueError(f"{name} holds Python objects (dtype {dtype}); only plain numeric "
                         "arrays are read, never pickles")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _read_exactly(f, n: int, where: str) -> bytearray:
    """n bytes of `f` into one writable buffer (no second copy), or DataError if it ends."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:got + (64 << 20)])
        if not k:
            raise DataError(f"{where}: the data ends after {got:,} of {n:,} bytes (a truncated "
                            "file).")
        got += k
    return buf


def _read_npy_stream(f, where: str, stored: int | None, max_rows: int | None,
                     max_bytes: int, name: str = "the array") -> np.ndarray:
    """The array of an .npy stream, or its first `max_rows` rows, after checking what its
    header declares against `stored` (the bytes the container holds, when known) and
    `max_bytes`, before anything large is allocated."""
    shape, fortran, dtype = _npy_header(f, name)
    total = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = f.tell()
    if stored is not None and stored - offset != total:
        raise DataError(f"{where}: the header declares shape {list(shape)} {dtype} ({total:,} "
                        f"bytes) but the file holds {max(stored - offset, 0):,} bytes of data "
                        "(damaged).")
    rows = shape[0] if shape else 1
    if max_rows is not None and shape and not fortran:
        rows = min(rows, max_rows)
    want = total if not shape or fortran or rows == shape[0] \
        else rows * (total // max(shape[0], 1))
    if want > max_bytes:
        raise DataError(f"{where}: declares shape {list(shape)} {dtype}, {want / 2**20:,.0f} "
                        f"MiB to read, more than the {max_bytes / 2**20:,.0f} MiB allowed for "
                        "one array; use a smaller file (or fewer inputs).")
    data = np.frombuffer(_read_exactly(f, want, where), dtype=dtype)
    if fortran:
        return data.reshape(shape[::-1]).T
    array = data.reshape((rows,) + shape[1:] if shape else ())
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def read_npz(path: str, keys=None, *, max_rows: int | None = None,
             max_bytes: int = MAX_NPZ_ARRAY_BYTES) -> dict[str, np.ndarray]:
    """Arrays of an .npz file (all, or those named in `keys` that it holds), each checked from
    its .npy header before it is read: declared sizes beyond `max_bytes`, or beyond what the
    member stores, raise DataError naming the file and the array. With `max_rows`, only the
    first `max_rows` entries along axis 0 are read (streamed out of the member). An .npy file
    under an .npz name gives {'arr_0': its array}. Never unpickles."""
    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                return {"arr_0": _read_npy_stream(f, path, os.path.getsize(path), max_rows,
                                                  max_bytes)}
        arrays = {}
        with zipfile.ZipFile(path) as zf:
            members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
            for key in members if keys is None else [k for k in keys if k in members]:
                info = members[key]
                with zf.open(info) as f:
                    arrays[key] = _read_npy_stream(f, f"{path} (array {key!r})", info.file_size,
                                                   max_rows, max_bytes, f"array {key!r}")
        return arrays
    except DataError:
        raise
    except FileNotFoundError:
        raise
    except _NPZ_READ_ERRORS as e:
        raise DataError(f"{path}: cannot be read as an .npz file ({e}).") from None


def npz_keys(path: str) -> list[str]:
    """The array names of an .npz file, from its directory alone (nothing decompressed)."""
    try:
        if not zipfile.is_zipfile(path):
            return ["arr_0"]
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except _NPZ_READ_ERRORS as e:
        raise DataError(f"{path}: cannot be read as an .npz file ({e}).") from None


def _npz_array(path: str, max_rows: int | None = None) -> np.ndarray:
    """The array under 'images' or 'samples', or the only array, of an .npz file (its first
    `max_rows` entries)."""
    keys = npz_keys(path)
    key = next((k for k in _NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
    if key is None:
        raise DataError(
            f"{path}: holds the arrays {keys}; expected one named {' or '.join(_NPZ_KEYS)}, "
            f"or a single array."
        )
    return read_npz(path, [key], max_rows=max_rows)[key]


def _read_npz(path: str, size: int, channels: int, max_images: int = 0) -> np.ndarray:
    """An .npz of images [N, H, W] or [N, H, W, C] -> uint8 [N, size, size, channels] (the
    first `max_images` of them; 0: all)."""
    x = _npz_array(path, max_images or None)
    x = x[..., None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[0] == 0 or x.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{path}: images of shape {list(x.shape)}; expected [N, H, W] or [N, H, W, C] "
            f"(channels last, C in 1, 3, 4) with N >= 1."
        )
    if x.shape[1:3] != (size, size):
        raise DataError(
            f"{path}: the images are {x.shape[1]}x{x.shape[2]} (HxW) but the model takes "
            f"{size}x{size}; crop or resize them first (images are not resized silently)."
        )
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = (float(x.min()), float(x.max()))
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise DataError(f"{path}: float images must lie in [0, 1]; found [{lo}, {hi}].")
        x = np.round(x * 255.0).astype(np.uint8)
    elif x.dtype != np.uint8:
        raise DataError(f"{path}: dtype {x.dtype}; expected uint8, or float in [0, 1].")
    x = x[..., :3] if x.shape[-1] == 4 else x  # RGBA: drop alpha
    if channels == 1 and x.shape[-1] == 3:
        return _luma(x)
    return np.repeat(x, channels, axis=-1) if x.shape[-1] == 1 else x


def load_images(path: str, image_size: int, num_channels: int,
                max_images: int = 0) -> tuple[np.ndarray, list[str]]:
    """Reads a user's images for a model of `image_size` px and `num_channels` (1 or 3).

    `path` is a folder of PNG/JPEG files (read in name order; other files are ignored), one
    such file, or an `.npz` file (array 'images' or 'samples', or its only array; uint8
    [N, H, W(, C)] or float in [0, 1]; [N, H, W] is grey). Colour images given to a 1-channel
    model become grey (ITU-R 601-2 luma, as Pillow's 'L'); grey ones given to a 3-channel model
    are repeated; alpha is dropped. Images must already be image_size x image_size.

    Returns uint8 `[N, image_size, image_size, num_channels]` and N names: the file names, or
    `npz[i]`. With `max_images` > 0, only the first `max_images` are read (of an .npz: only
    their bytes). Raises FileNotFoundError or DataError naming the path and what is wrong.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels={num_channels}; valid: 1 or 3.")
    accepted = f"a folder of {'/'.join(IMAGE_EXTENSIONS)} images, one such file or an .npz file"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder; expected {accepted}.")
    if path.lower().endswith(".npz") and not os.path.isdir(path):
        x = _read_npz(path, image_size, num_channels, max_images)
        return x, [f"npz[{i}]" for i in range(len(x))]
    if os.path.isdir(path):
        names = sorted(
            n for n in os.listdir(path)
            if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
        )
        if not names:
            raise DataError(
                f"{path}: the folder holds no images; accepted extensions (any case): "
                f"{', '.join(IMAGE_EXTENSIONS)}."
            )
        names = names[:max_images] if max_images > 0 else names
        files = [os.path.join(path, n) for n in names]
    elif path.lower().endswith(IMAGE_EXTENSIONS):
        files, names = [path], [os.path.basename(path)]
    else:
        raise DataError(f"{path}: not an image or .npz file; expected {accepted}.")
    return np.stack([_read_image(f, image_size, num_channels) for f in files]), names
