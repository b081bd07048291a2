"""The trained model as a file people load: ``OUT/model.safetensors``.

The chief writes the global model here when the run finishes, and the latest every
``save_every`` rounds, atomically (a temporary file, fsynced, renamed over the old one): a reader
never sees half a file. Its tensors carry the names the workers announced (torch ``state_dict``
keys, Keras weight paths; ``protocol.messages.check_tensor_names``), else ``global.0``,
``global.1``, ... in the model's order, as in ``checkpoint.npz``.

The format is safetensors (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header length, a JSON header ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``
padded with spaces to 8 bytes, then the raw little-endian tensor bytes. It is written here by
hand, not with the ``safetensors`` package, because the chief's core is numpy-only and every
chief (a Pi's too) should leave a model file behind; the format is those three parts and nothing
else, and tests/test_model_file.py checks what this writes against the ``safetensors`` package's
own reader and what it writes against ``load`` below. Loading it needs no pickle:
``safetensors.torch.load_file``, ``safetensors.numpy.load_file``, ``fedberry.keras.load_weights``
or ``load`` here.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedberry.chief.atomic_file import write_atomically
from fedberry.protocol.spec import Spec, spec_of

log = logging.getLogger("fedberry.chief")

FILE_NAME = "model.safetensors"
# Rounds between the model files written during a run (the last round is always written). The
# checkpoint holds every round already (``fedberry export`` converts it); the model file is for
# people, and writing a large model twice per round would double the chief's disk traffic.
DEFAULT_SAVE_EVERY = 10

# numpy dtype.str -> safetensors dtype (every dtype the wire allows: protocol.limits).
_DTYPES = {"<f2": "F16", "<f4": "F32", "<f8": "F64", "|i1": "I8", "<i2": "I16", "<i4": "I32",
           "<i8": "I64", "|u1": "U8", "<u2": "U16", "<u4": "U32", "<u8": "U64", "|b1": "BOOL"}
_NUMPY = {v: k for k, v in _DTYPES.items()}
# A header is JSON of ~100 bytes per tensor; past this it is not a model file of ours (nor a
# sane one: the safetensors package refuses headers over 100 MB).
MAX_HEADER_BYTES = 100 << 20
# Models of distinct specs whose names are kept: the federation's, and a few refused ones (a
# worker of another model is refused after it joined), so that no flood of them grows the chief.
_MAX_SPECS = 4


def default_names(count: int) -> list[str]:
    """``global.0`` ... ``global.<count-1>``: the names of a model whose workers sent none."""
    return [f"global.{i}" for i in range(count)]


def save(path: str | os.PathLike, arrays: Sequence[np.ndarray],
         names: Sequence[str] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write ``arrays`` to ``path`` as safetensors, atomically, under ``names`` (default
    ``default_names``); ``metadata`` goes into the header's ``__metadata__`` (strings only)."""
    names = list(names) if names is not None else default_names(len(arrays))
    if len(names) != len(arrays) or len(set(names)) != len(names):
        raise ValueError(f"{len(arrays)} tensors need as many distinct names, got {len(names)}")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, a in zip(names, arrays):
        a = np.asarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        dtype = _DTYPES.get(a.dtype.str)
        if dtype is None:
            raise ValueError(f"{name}: dtype {a.dtype} has no safetensors name")
        a = a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray makes 0-d 1-d
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors start 8-byte aligned, as the package writes

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in blobs:
            f.write(memoryview(a.reshape(-1)).cast("B"))

    write_atomically(path, write)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, by name, in the order the file lists them (ours: the
    model's). Raises ValueError naming the file when it is not safetensors."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        (n,) = struct.unpack_from("<Q", data, 0)
        if n > min(MAX_HEADER_BYTES, len(data) - 8):
            raise ValueError(f"a header of {n} bytes in a file of {len(data)}")
        header = json.loads(data[8:8 + n])
        base = 8 + n
        out: dict[str, np.ndarray] = {}
        for name, t in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(_NUMPY[t["dtype"]])
            start, end = (int(x) for x in t["data_offsets"])
            shape = tuple(int(d) for d in t["shape"])
            if not 0 <= start <= end <= len(data) - base:
                raise ValueError(f"{name}: data_offsets {start}..{end} past the file's end")
            a = np.frombuffer(data, dtype, count=(end - start) // dtype.itemsize,
                              offset=base + start)
            out[name] = a.reshape(shape).copy()
        return out
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a safetensors file ({type(exc).__name__}: {exc})"
                         ) from exc


def ordered(tensors: dict[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    """The tensors of ``load`` in the order of ``names`` (a model's own, e.g. its Keras weight
    paths) when the file has them all; else in the file's order (``global.<i>`` by number),
    which is the model's order in every file fedberry writes: the caller checks the shapes.
    Raises ValueError when the counts differ."""
    if all(n in tensors for n in names):
        return [tensors[n] for n in names]
    if len(tensors) != len(names):
        raise ValueError(f"the file holds {len(tensors)} tensors, the model has {len(names)}")
    fallback = default_names(len(tensors))
    if set(tensors) == set(fallback):
        return [tensors[n] for n in fallback]
    return list(tensors.values())


class ModelFile:
    """Where and how often a chief writes its model file, and the names it uses.

    Parameters
    ----------
    path : str or os.PathLike
        ``OUT/model.safetensors``.
    save_every : int
        Rounds between writes during the run; 0: only when it finishes.
    """

    def __init__(self, path: str | os.PathLike, save_every: int = DEFAULT_SAVE_EVERY) -> None:
        if not isinstance(save_every, int) or save_every < 0:
            raise ValueError(f"save_every must be a whole number of rounds >= 0 (0: only at the "
                             f"end), not {save_every!r}")
        self.path = Path(path)
        self.save_every = save_every
        self._names: dict[Spec, tuple[str, ...]] = {}
        self.scheduled: int | None = None  # the round of the last write asked for
        self.written: int | None = None  # the round of the last write that succeeded

    def offer_names(self, names: Sequence[str] | None, spec: Spec) -> None:
        """A joined worker's tensor names (checked by the protocol or the Worker API) for a model
        of ``spec``. The first names given for a spec are kept; the model file takes those of
        its model's spec (a chief without a model adopts the first worker's, which may join
        before the chief knows it). Names never change what is averaged."""
        if names is None or spec in self._names or len(self._names) >= _MAX_SPECS:
            return
        if len(names) == len(spec):
            self._names[spec] = tuple(names)

    def names_for(self, arrays: Sequence[np.ndarray]) -> tuple[str, ...] | None:
        """The names offered for a model like ``arrays``, or None."""
        return self._names.get(spec_of(arrays))

    def due(self, round_: int, final: bool) -> bool:
        """Whether the model of ``round_`` is written (the last round's always is)."""
        if round_ == self.scheduled:
            return False
        return final or (self.save_every > 0 and round_ % self.save_every == 0)

    def write(self, round_: int, arrays: Sequence[np.ndarray]) -> None:
        """Write the model of ``round_`` (off the chief's thread: ``chief.runtime``)."""
        save(self.path, arrays, self.names_for(arrays), {"format": "np", "producer": "fedberry",
                                             "round": str(round_)})
        self.written = round_
