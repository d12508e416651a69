"""Damage checks for the Zarr stores (activations and tokens).

Activations are stored raw (they barely compress), so a flipped byte would otherwise read back as a
plausible float: every chunk carries a CRC32C checksum (zarr's `crc32c` codec, ~6 GB/s here). A complete
store must also hold every chunk, since zarr reads a missing chunk file as zeros without complaint. Reads
through `open_checked(...)` turn a failed chunk into a message that names the store and the rule that rewrites it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

CHECKSUM = (Crc32cCodec(),)  # pass as `compressors=` when creating an array


class DamagedStoreError(RuntimeError):
    """A store that claims to be complete but cannot be read as written."""


def advice(path: str | Path, rule: str) -> str:
    return f"delete {path} and rerun snakemake: the '{rule}' rule writes it again (later stages rerun after it)"


@contextlib.contextmanager
def writing_every_chunk() -> Iterator[None]:
    """zarr skips chunks that equal the fill value; writing them all lets `missing_chunks` tell a lost chunk
    file from one that was never needed."""
    with zarr.config.set({"array.write_empty_chunks": True}):
        yield


def missing_chunks(group: zarr.Group) -> list[str]:
    """'name: initialized/expected' for every array of `group` (recursively) that lacks chunk files."""
    out = []
    for name, array in group.arrays():
        if array.nchunks_initialized < array.nchunks:
            out.append(f"{array.path or name}: {array.nchunks_initialized}/{array.nchunks} chunks")
    for _, sub in group.groups():
        out += missing_chunks(sub)
    return out


def require_finite(x: np.ndarray, where: str, path: str | Path, rule: str) -> np.ndarray:
    """Activations are finite by construction (extraction refuses overflow), so a NaN or Inf means damage."""
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise DamagedStoreError(f"{path}: {where} holds {bad} NaN/Inf values; {advice(path, rule)}")
    return x


class Checked:
    """A zarr group or array whose failed reads (checksum mismatch, truncated chunk) and non-finite float
    values raise DamagedStoreError naming the store; everything else is the wrapped object's."""

    def __init__(self, node: Any, path: str | Path, rule: str):
        self._node, self._path, self._rule = node, path, rule

    def __getitem__(self, key: Any) -> Any:
        return self._read(lambda: self._node[key], key)

    @property
    def oindex(self) -> "_Indexer":
        return _Indexer(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def __contains__(self, key: str) -> bool:
        return key in self._node

    def _read(self, read, key: Any) -> Any:
        try:
            out = read()
        except ValueError as exc:
            # zarr's messages for a bad checksum or a chunk of the wrong size; other ValueErrors are bugs
            if "checksum" not in str(exc) and "reshape" not in str(exc):
                raise
            where = f"{self._node.path}[{_describe(key)}]"
            raise DamagedStoreError(f"{self._path}: chunk data of {where} is damaged ({exc}); "
                                    f"{advice(self._path, self._rule)}") from exc
        if isinstance(out, (zarr.Group, zarr.Array)):
            return Checked(out, self._path, self._rule)
        if isinstance(out, np.ndarray) and out.dtype.kind == "f":
            require_finite(out, f"{self._node.path}[{_describe(key)}]", self._path, self._rule)
        return out


class _Indexer:
    def __init__(self, array: Checked):
        self._array = array

    def __getitem__(self, key: Any) -> Any:
        return self._array._read(lambda: self._array._node.oindex[key], key)


def _describe(key: Any) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    parts = []
    for k in keys:
        if isinstance(k, slice):
            parts.append(f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}")
        elif isinstance(k, np.ndarray):
            parts.append(f"<{k.size} indices>")
        else:
            parts.append(str(k))
    return ", ".join(parts)


def open_checked(path: str | Path, rule: str, kind: str) -> Checked:
    """A complete store, opened read-only, with every chunk present; `kind` names it in messages."""
    root = zarr.open_group(str(path), mode="r")
    if not root.attrs.get("complete"):
        raise RuntimeError(f"{path} is not a complete {kind}; rerun the {rule} rule")
    missing = missing_chunks(root)
    if missing:
        raise DamagedStoreError(f"{path}: chunk files are missing ({'; '.join(missing)}); {advice(path, rule)}")
    return Checked(root, path, rule)
