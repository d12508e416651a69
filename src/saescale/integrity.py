"""Damage checks for the Zarr stores (activations and tokens).

Activations are stored raw (they barely compress), so a flipped byte would otherwise read back as a
plausible float: every chunk carries a CRC32C checksum (zarr's `crc32c` codec, ~6 GB/s here). A complete
store must also hold every chunk, since zarr reads a missing chunk file as zeros without complaint. Reads
through `open_checked(...)` turn a failed chunk into a message that names the store and the rule that rewrites it.
Values are checked to be finite on every such read; the streamed training loader (`saescale.loader`) reads each
chunk again every epoch, so it verifies the checksum on every read but the values once per chunk per run.
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


_EXPONENT = {2: np.uint16(0x7C00), 4: np.uint32(0x7F800000), 8: np.uint64(0x7FF0000000000000)}


def all_finite(x: np.ndarray, block: int = 1 << 18) -> bool:
    """np.isfinite(x).all() at memory speed: an IEEE float is NaN or Inf exactly when its exponent bits are all
    ones, so the largest masked exponent of each cache-sized block tells (numpy's float16 isfinite is ~8x
    slower)."""
    mask = _EXPONENT.get(x.dtype.itemsize)
    if x.dtype.kind != "f" or mask is None or not x.flags.c_contiguous:
        return bool(np.isfinite(x).all())
    bits = x.reshape(-1).view(mask.dtype)
    scratch = np.empty(min(block, bits.size), dtype=mask.dtype)
    for i in range(0, bits.size, block):
        part = scratch[:min(block, bits.size - i)]
        np.bitwise_and(bits[i:i + block], mask, out=part)
        if part.max() == mask:
            return False
    return True


def require_finite(x: np.ndarray, where: str, path: str | Path, rule: str) -> np.ndarray:
    """Activations are finite by construction (extraction refuses overflow), so a NaN or Inf means damage."""
    if not all_finite(x):
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

    @property
    def unwrapped(self) -> Any:
        return self._node

    def checksummed(self, key: Any) -> Any:
        """A read with the checksum verified but not the values: for readers that check each chunk's values
        once (`require_finite`) and read it again later (the streamed training loader, every epoch)."""
        return self._read(lambda: self._node[key], key, finite=False)

    def require_finite(self, x: np.ndarray, key: Any) -> np.ndarray:
        return require_finite(x, f"{self._node.path}[{_describe(key)}]", self._path, self._rule)

    def damaged(self, key: Any, exc: Exception) -> DamagedStoreError:
        """The error for chunk data under `key` that cannot be read as written (`exc` says how)."""
        return DamagedStoreError(f"{self._path}: chunk data of {self._node.path}[{_describe(key)}] is damaged "
                                 f"({exc}); {advice(self._path, self._rule)}")

    def _read(self, read, key: Any, finite: bool = True) -> Any:
        try:
            out = read()
        except ValueError as exc:
            # zarr's messages for a bad checksum or a chunk of the wrong size; other ValueErrors are bugs
            if "checksum" not in str(exc) and "reshape" not in str(exc):
                raise
            raise self.damaged(key, exc) from exc
        if isinstance(out, (zarr.Group, zarr.Array)):
            return Checked(out, self._path, self._rule)
        if finite and isinstance(out, np.ndarray) and out.dtype.kind == "f":
            self.require_finite(out, key)
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
