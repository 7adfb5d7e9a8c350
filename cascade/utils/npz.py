"""``.npz`` files as ADM's evaluator reads them, written and read in a streaming way.

ADM's evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) takes sample and reference
batches as ``.npz`` files: ``arr_0`` uint8 (N, H, W, 3) images, optionally ``arr_1`` labels,
and reference batches may carry ``mu`` / ``sigma`` (pool features) and ``mu_s`` / ``sigma_s``
(spatial features). It streams ``arr_0`` straight out of the zip member when the member is an
uncompressed ``.npy`` of format version 1.0 or 2.0.

:func:`write_npz` writes exactly that (stored, not deflated; ``.npy`` 1.0 headers) from chunks,
so a 50,000 × 1024² batch never has to be in memory, with a fixed member timestamp so that the
same arrays always give the same bytes (a resumed job's file can be compared by hash). It
writes to a temporary file and renames it into place. :func:`read_header` and
:func:`iter_rows` read shapes and row blocks without loading a whole array.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

__all__ = ["ArraySpec", "NpzError", "write_npz", "npz_keys", "read_header", "iter_rows", "read_array"]

_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: the same bytes for the same arrays


class NpzError(ValueError):
    """A file that is not a readable ``.npz`` of the expected content; the message names the file and the problem."""


@dataclass
class ArraySpec:
    """An array to write: its full shape and dtype, and its row blocks (concatenated along axis 0) in order."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Iterable[np.ndarray]


def write_npz(path: str | Path, arrays: dict[str, ArraySpec]) -> Path:
    """Write ``arrays`` as an uncompressed ``.npz`` (``name.npy`` members, ``.npy`` 1.0), atomically.

    Every chunk must have the declared dtype and trailing shape; their rows must add up to ``shape[0]``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, spec in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                dtype = np.dtype(spec.dtype)
                with zf.open(info, "w", force_zip64=True) as member:
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(spec.shape)}
                    np.lib.format.write_array_header_1_0(member, header)
                    rows = 0
                    for chunk in spec.chunks:
                        chunk = np.ascontiguousarray(chunk)
                        if chunk.dtype != dtype or chunk.shape[1:] != tuple(spec.shape[1:]):
                            raise ValueError(f"{name}: chunk {chunk.dtype} {chunk.shape} does not fit {dtype} {spec.shape}")
                        member.write(chunk.tobytes())
                        rows += len(chunk)
                    if rows != spec.shape[0]:
                        raise ValueError(f"{name}: chunks hold {rows} rows, the header says {spec.shape[0]}")
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an ``.npz`` (without ``.npy``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as error:
        raise NpzError(f"{path} is not a readable .npz file ({type(error).__name__}: {error})") from None


@contextmanager
def _member(path: str | Path, key: str) -> Iterator[tuple[IO[bytes], tuple[int, ...], np.dtype]]:
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                raise NpzError(f"{path} has no array {key!r} (it has {', '.join(npz_keys(path)) or 'none'})")
            with zf.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise NpzError(f"{path}: {key} is a .npy of format {version}; save it with numpy's default (1.0)")
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                if fortran or dtype.hasobject:
                    raise NpzError(f"{path}: {key} is a Fortran-ordered or object array; save it C-ordered with numeric dtype")
                yield f, tuple(shape), dtype
    except (OSError, zipfile.BadZipFile) as error:
        raise NpzError(f"{path} is not a readable .npz file ({type(error).__name__}: {error})") from None


def read_header(path: str | Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of ``key`` in the ``.npz`` at ``path``, without reading its data."""
    with _member(path, key) as (_, shape, dtype):
        return shape, dtype


def iter_rows(
    path: str | Path, key: str, batch_size: int, blocks: Iterable[int] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) blocks of ``key``: block b is rows [b·batch_size, (b+1)·batch_size); all blocks, or those in ``blocks``.

    Reads only the asked blocks (seeking inside the member), so ranks can split one file by block.
    """
    with _member(path, key) as (f, shape, dtype):
        n, row_bytes = shape[0], int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        start = f.tell()
        count = -(-n // batch_size)
        for b in range(count) if blocks is None else blocks:
            first = b * batch_size
            rows = min(batch_size, n - first)
            if rows <= 0:
                continue
            f.seek(start + first * row_bytes)
            data = f.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise NpzError(f"{path}: {key} is truncated (rows {first}..{first + rows} of {n} could not be read)")
            yield first, np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])


def read_array(path: str | Path, key: str) -> np.ndarray:
    """The whole array ``key`` (for small ones: labels, mu, sigma)."""
    with _member(path, key) as (f, shape, dtype):
        count = int(np.prod(shape, dtype=np.int64))
        data = f.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise NpzError(f"{path}: {key} is truncated")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
