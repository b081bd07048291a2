"""Fashion-MNIST from the IDX files on disk (numpy only, no torch).

The files come from the Debian package ``dataset-fashion-mnist`` (also on Raspberry Pi OS), which
installs them in ``/usr/share/datasets/fashion-mnist``. A directory from a torchvision download
(``FashionMNIST/raw``) works too. The directory is chosen by, in order: the ``data_dir`` argument
(the CLI's ``--data-dir``), the ``FEDBERRY_DATA_DIR`` environment variable, the Debian path.

IDX format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a dtype code, the number of
dimensions, one big-endian uint32 per dimension, then the values in C order, big-endian.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DATA_DIR",
    "ENV_VAR",
    "DatasetNotFoundError",
    "FashionMNIST",
    "IDXFormatError",
    "as_images",
    "load_fashion_mnist",
    "read_idx",
    "resolve_data_dir",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FEDBERRY_DATA_DIR"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SHAPE = (28, 28)

_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# IDX dtype codes; the multi-byte types are big-endian on disk.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetNotFoundError(FileNotFoundError):
    """The Fashion-MNIST files are not in the chosen directory."""


class IDXFormatError(ValueError):
    """A file is not valid IDX (bad magic, truncated, corrupt gzip, unexpected shape)."""


@dataclass(frozen=True)
class FashionMNIST:
    """The four arrays, shared by every caller in the process and therefore read-only.

    ``x_*`` are float32 ``(N, 784)`` in [0, 1]; ``y_*`` are int64 class ids in 0..9 (see
    ``CLASS_NAMES``). Copy before modifying (``x.copy()``): the arrays come from a cache, so an
    in-place edit by one user would silently change the data of another (e.g. the chief's test set).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def as_images(x: np.ndarray) -> np.ndarray:
    """View flat ``(N, 784)`` rows as ``(N, 1, 28, 28)`` images for a CNN (no copy)."""
    return x.reshape(-1, 1, *IMAGE_SHAPE)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory that ``load_fashion_mnist(data_dir)`` reads: argument, env var, default."""
    chosen = data_dir or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser().resolve()


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> FashionMNIST:
    """Load Fashion-MNIST, parsing the files once per directory per process.

    Raises ``DatasetNotFoundError`` (a ``FileNotFoundError``) when files are missing and
    ``IDXFormatError`` (a ``ValueError``) when a file is damaged.
    """
    return _load_cached(resolve_data_dir(data_dir))


@functools.cache
def _load_cached(directory: Path) -> FashionMNIST:
    # Errors are not cached by functools, so installing the package and retrying works.
    paths = _find_files(directory)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    out = {}
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_pair(images, labels, paths[f"x_{split}"], paths[f"y_{split}"])
        # One float32 allocation straight from the uint8 buffer: no float64 intermediate.
        x = np.divide(images.reshape(len(images), -1), np.float32(255), dtype=np.float32)
        y = labels.astype(np.int64)
        for a in (x, y):
            a.setflags(write=False)
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return FashionMNIST(**out)


def _find_files(directory: Path) -> dict[str, Path]:
    found, missing = {}, []
    for key, name in _FILES.items():
        # Prefer the .gz the Debian package ships; accept torchvision's uncompressed copies.
        candidates = [directory / f"{name}.gz", directory / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{name}.gz")
        found[key] = path
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {directory} (missing: {', '.join(missing)}). "
            f"Install it with `sudo apt-get install dataset-fashion-mnist` (Debian, Ubuntu, "
            f"Raspberry Pi OS; files go to {DEFAULT_DATA_DIR}), or point fedberry at a directory "
            f"holding the four IDX files with --data-dir DIR or {ENV_VAR}=DIR."
        )
    return found


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends in ``.gz``) into a read-only array.

    The array is a view on the decompressed bytes (no copy); multi-byte types keep their
    big-endian dtype, which numpy handles transparently.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IDXFormatError(
            f"{path}: not a readable gzip file ({e}); it is truncated or corrupt, "
            f"reinstall or re-download it"
        ) from e
    return _parse_idx(data, path)


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXFormatError(f"{path}: bad magic {data[:4].hex()!r}, this is not an IDX file")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise IDXFormatError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IDXFormatError(f"{path}: IDX header truncated or has no dimensions")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(dims))
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        raise IDXFormatError(
            f"{path}: header says shape {dims} of {dtype} ({expected} bytes with header), "
            f"file has {len(data)} bytes; it is truncated or corrupt"
        )
    return np.frombuffer(data, dtype, count=count, offset=header).reshape(dims)


def _check_pair(images: np.ndarray, labels: np.ndarray, ipath: Path, lpath: Path) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise IDXFormatError(
            f"{ipath}: expected uint8 images of shape (N, 28, 28), got {images.dtype} "
            f"{images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(
            f"{lpath}: expected 1-D uint8 labels, got {labels.dtype} {labels.shape}"
        )
    if len(labels) != len(images):
        raise IDXFormatError(f"{lpath}: {len(labels)} labels for {len(images)} images in {ipath}")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise IDXFormatError(f"{lpath}: label {labels.max()} out of range 0..9")
