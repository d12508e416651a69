"""Training batches: drawn from rows in RAM, or streamed from the Zarr store fast enough to keep a GPU busy.

Both sources draw step s's batch from (seed, s) alone, so a resumed run sees exactly the batches of an
uninterrupted one. Each offers three views of the same batches:
- `host_batches(start_step, pin)`: [batch, d] tensors in the store's dtype, written into a ring of a few
  preallocated buffers (page-locked with `pin`, so a copy to the GPU can run asynchronously). A buffer is the
  caller's from the draw that returns it until the next draw.
- `device_batches(start_step, device)`: the same on `device`, still in the store's dtype (float16 crosses
  PCIe at half the bytes of float32); the caller casts on the device. On CUDA each copy runs on a side
  stream one batch ahead, overlapping the training step.
- `batches(start_step)`: float32 numpy arrays the caller may keep (the interface `train_together` reads).

Streaming (`StreamedBatches`) shuffles exactly as the loader before it did, by chunks: each epoch e draws,
from rng(seed, e), a random order of the stored chunks; `shuffle_chunks` (S) chunks at a time join the rows
left over from the previous group, and those rows are permuted uniformly; consecutive slices of the
permutation are the batches, and the rows that do not fill a batch carry into the next group. A batch thus
mixes rows of S chunks plus the carried rows. Rows within a batch are stored in ascending row order (a
batch is a set of rows to the loss), which lets each batch be gathered chunk by chunk straight from the
store's files.

Reads stay checked (`saescale.integrity`): every chunk is CRC32C-verified each time it is read, and its
values are checked to be finite once per run (the first read), since a chunk that passed its checksum once
holds the same bytes on every later read.
"""

from __future__ import annotations

import atexit
import mmap
import queue
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple, TypeVar

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from saescale.integrity import Checked

RING = 3  # batch buffers: one the consumer holds (or is copying to the GPU), one ready, one being gathered


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    if batch_size > n_rows:
        raise ValueError(f"train.batch_size {batch_size} exceeds the {n_rows} stored training rows")
    return n_rows // batch_size


# ---- the shuffle, as pure logic on row ids ------------------------------------------------------------


class Group(NamedTuple):
    chunks: list[int]          # stored chunks first read for this group, in the order drawn
    batches: list[np.ndarray]  # row ids of each batch, ascending
    carried: set[int]          # chunks holding rows carried into the next group


def chunk_shuffle(start: int, stop: int, chunk_rows: int, batch_size: int, shuffle_chunks: int, seed: int,
                  epoch: int) -> Iterator[Group]:
    """The row ids of epoch `epoch`'s batches, group by group (see the module docstring). Only ids: a resumed
    stream walks the groups before its first batch without reading a byte of the store."""
    if start % chunk_rows:
        raise ValueError(f"rows {start}:{stop} do not start on a chunk boundary ({chunk_rows} rows)")
    rng = np.random.default_rng([seed, epoch])
    starts = np.arange(start, stop, chunk_rows)
    rng.shuffle(starts)
    carry = np.empty(0, dtype=np.int64)
    for g in range(0, len(starts), shuffle_chunks):
        drawn = starts[g:g + shuffle_chunks]
        ids = np.concatenate([carry] + [np.arange(s, min(s + chunk_rows, stop)) for s in drawn])
        perm = rng.permutation(len(ids))
        n_full = len(ids) // batch_size
        batches = [np.sort(ids[perm[i * batch_size:(i + 1) * batch_size]]) for i in range(n_full)]
        carry = ids[perm[n_full * batch_size:]]
        yield Group([int(s) // chunk_rows for s in drawn], batches, set((carry // chunk_rows).tolist()))


def chunk_runs(ids: np.ndarray, chunk_rows: int) -> list[tuple[int, int, int]]:
    """(chunk, first, end) for each run of ascending `ids` that lies in one stored chunk: batch[first:end]
    comes from that chunk."""
    chunk = ids // chunk_rows
    cuts = np.flatnonzero(np.diff(chunk)) + 1
    bounds = [0, *cuts.tolist(), len(ids)]
    return [(int(chunk[a]), a, b) for a, b in pairwise(bounds)]


# ---- chunk reads ------------------------------------------------------------------------------------


class ChunkReader:
    """Whole stored chunks of a [rows, d] array opened through `integrity.Checked`.

    A local store with the layout `store._create_store` writes (raw little-endian values, then zarr's crc32c
    codec: the chunk file is the values followed by their CRC32C) is read by mapping the chunk file: the
    checksum runs over the page cache and the batch gather reads it directly, with no copy in between.
    Any other layout is read through zarr. Either way the checksum is verified on every read; the finite
    check runs once per chunk for the life of the reader."""

    def __init__(self, array: Checked | zarr.Array):
        if not isinstance(array, Checked):  # a store opened without store.open_store: check its reads all the same
            array = Checked(array, str(getattr(array.store, "root", array.store)), "extract")
        self.array = array
        node = array.unwrapped
        self.chunk_rows, self.d = node.chunks[0], node.shape[1]
        self.dtype = np.dtype(node.dtype)
        self.finite: set[int] = set()
        self._dir = self._local_dir(node)

    def _local_dir(self, node: zarr.Array) -> Path | None:
        codecs = node.metadata.codecs if node.metadata.zarr_format == 3 else ()
        plain = (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], Crc32cCodec)
                 and self.dtype.byteorder in "=|<" and node.chunks[1:] == node.shape[1:])
        if plain and isinstance(node.store, LocalStore):
            return Path(node.store.root) / node.path
        return None

    def read(self, c: int) -> torch.Tensor:
        """Chunk c as a [chunk_rows, d] tensor (rows past the array's end are the fill value)."""
        rows = slice(c * self.chunk_rows, (c + 1) * self.chunk_rows)
        if self._dir is None:
            x = self.array.checksummed(slice(rows.start, min(rows.stop, self.array.shape[0])))
        else:
            x = self._mapped(c, rows)
        if c not in self.finite:
            self.array.require_finite(x, rows)
            self.finite.add(c)
        return torch.from_numpy(x)

    def _mapped(self, c: int, rows: slice) -> np.ndarray:
        node = self.array.unwrapped
        path = self._dir / node.metadata.encode_chunk_key((c, 0))
        expected = self.chunk_rows * self.d * self.dtype.itemsize
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                if size != expected + 4:
                    raise ValueError(f"chunk file {path.name} holds {size} bytes, not the {expected + 4} of "
                                     "its values and checksum")
                # a private (copy-on-write) map: writable for torch, never written, so never copied. Stores
                # are immutable once complete (extraction renames a finished one into place), and the size
                # was checked, so no page of the map can vanish under the reader.
                data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise self.array.damaged(rows, exc) from exc
        # zarr's crc32c codec: the little-endian CRC32C of the values, appended to them
        stored = bytes(data[expected:])
        computed = np.uint32(google_crc32c.value(data[:expected])).tobytes()
        if computed != stored:
            raise self.array.damaged(rows, ValueError(
                f"Stored and computed checksum do not match. Stored: {stored!r}. Computed: {computed!r}."))
        return data[:expected].view(self.dtype).reshape(self.chunk_rows, self.d)


# ---- the two batch sources ------------------------------------------------------------------------------


def _pinned(pin: bool) -> bool:
    return pin and torch.cuda.is_available()  # page-locking needs a CUDA driver; on CPU there is no copy


class _Batches:
    """What both sources share: the float32 and device views of `host_batches`."""

    batch_size: int

    def batches(self, start_step: int = 0) -> Iterator[np.ndarray]:
        for x in self.host_batches(start_step):
            yield x.to(torch.float32, copy=True).numpy()  # a fresh array: the caller may keep it

    def device_batches(self, start_step: int = 0, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
        device = torch.device(device)
        host = self.host_batches(start_step, pin=device.type == "cuda")
        return host if device.type == "cpu" else to_device(host, device)


class InMemoryBatches(_Batches):
    """Shuffled batches from rows held in RAM: a fresh permutation per epoch, epoch e from rng(seed, e),
    so step s is reproducible and a resumed run sees the same batches as an uninterrupted one."""

    in_memory = True

    def __init__(self, data: np.ndarray, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.steps_per_epoch = steps_per_epoch(len(data), batch_size)

    def host_batches(self, start_step: int = 0, pin: bool = False) -> Iterator[torch.Tensor]:
        """Each batch's rows are read in ascending order (locality), sorted for the whole epoch at once;
        torch's gather runs 3x faster than numpy fancy indexing (15M vs 4M tokens/s at d = 128)."""
        rows, bs = torch.from_numpy(self.data), self.batch_size
        ring = [torch.empty(bs, rows.shape[1], dtype=rows.dtype, pin_memory=_pinned(pin)) for _ in range(2)]
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        n = 0
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            order = torch.from_numpy(np.sort(perm[:self.steps_per_epoch * bs].reshape(-1, bs), axis=1))
            for i in range(skip, self.steps_per_epoch):
                out = ring[n % 2]
                n += 1
                yield torch.index_select(rows, 0, order[i], out=out)
            epoch, skip = epoch + 1, 0


class StreamedBatches(_Batches):
    """Batches streamed from a chunked [rows, d] Zarr array when the rows do not fit in RAM, shuffled by
    chunks (module docstring). A background thread gathers each batch into a ring of preallocated buffers
    while `readers` threads map and checksum the chunks of the next shuffle group. Never random row reads
    (0.25-1.5 s per batch; notes/snakemake.md section 8)."""

    in_memory = False

    def __init__(self, array: Checked, rows: slice, batch_size: int, seed: int, shuffle_chunks: int,
                 readers: int = 1, ring: int = RING):
        self.reader = ChunkReader(array)
        self.rows, self.batch_size, self.seed, self.shuffle_chunks = rows, batch_size, seed, shuffle_chunks
        self.readers, self.ring = readers, ring
        self.steps_per_epoch = steps_per_epoch(rows.stop - rows.start, batch_size)

    def groups(self, epoch: int) -> Iterator[Group]:
        return chunk_shuffle(self.rows.start, self.rows.stop, self.reader.chunk_rows, self.batch_size,
                             self.shuffle_chunks, self.seed, epoch)

    def plan(self, start_step: int) -> Iterator[Group]:
        """Epoch after epoch, the groups from `start_step` on, with the batches of earlier steps set to None."""
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while True:
            step = 0
            for group in self.groups(epoch):
                batches = group.batches[:self.steps_per_epoch - step]
                wanted = [ids if step + i >= skip else None for i, ids in enumerate(batches)]
                step += len(batches)
                yield group._replace(batches=wanted)
            epoch, skip = epoch + 1, 0

    def host_batches(self, start_step: int = 0, pin: bool = False) -> Iterator[torch.Tensor]:
        dtype = torch.from_numpy(np.empty(0, self.reader.dtype)).dtype
        # zeros, not empty: the pages are touched here, not by the first batches' gathers (~0.2 s for the ring)
        slots = [torch.zeros(self.batch_size, self.reader.d, dtype=dtype, pin_memory=_pinned(pin))
                 for _ in range(self.ring)]
        return _ring_stream(slots, lambda ring, stop: self._produce(start_step, ring, stop))

    def _produce(self, start_step: int, ring: _Slots, stop: threading.Event) -> None:
        """Gather the batches of one group while the chunks of the next are read (one group ahead)."""
        with ThreadPoolExecutor(self.readers, thread_name_prefix="saescale-loader-read") as pool:
            live: dict[int, Future] = {}  # chunk -> its read

            def chunk(c: int) -> torch.Tensor:
                if c not in live:  # rows carried from a chunk that was not read ahead (a resume, tiny groups)
                    live[c] = pool.submit(self.reader.read, c)
                return live[c].result()

            current = None
            for group in self.plan(start_step):
                wanted = any(ids is not None for ids in group.batches)
                if wanted:
                    for c in group.chunks:
                        if c not in live:
                            live[c] = pool.submit(self.reader.read, c)
                if current is not None:
                    if not self._gather(current, chunk, ring, stop):
                        return
                    keep = current.carried | (set(group.chunks) if wanted else set())
                    live = {c: f for c, f in live.items() if c in keep}
                current = group

    def _gather(self, group: Group, chunk, ring: _Slots, stop: threading.Event) -> bool:
        chunk_rows = self.reader.chunk_rows
        for ids in group.batches:
            if ids is None:
                continue
            i = ring.free(stop)
            if i is None:
                return False
            out = ring.buffers[i]
            for c, a, b in chunk_runs(ids, chunk_rows):
                torch.index_select(chunk(c), 0, torch.from_numpy(ids[a:b] - c * chunk_rows), out=out[a:b])
            ring.ready(i)
        return True


class _Slots:
    """Indices of ring buffers moving between the producer (free -> ready) and the consumer."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        for i in range(len(buffers)):
            self._free.put(i)

    def free(self, stop: threading.Event) -> int | None:
        while not stop.is_set():
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def ready(self, i) -> None:
        self._ready.put(i)


_DONE = object()
T = TypeVar("T")


def _ring_stream(buffers: list[torch.Tensor], produce) -> Iterator[torch.Tensor]:
    """Run `produce(slots, stop)` in a background thread and yield the buffers it marks ready, in order; a
    buffer returns to the producer when the next one is drawn. The producer's exception is raised here;
    abandoning the iterator stops the thread and waits for it."""
    slots, stop = _Slots(buffers), threading.Event()

    def run() -> None:
        try:
            produce(slots, stop)
            slots.ready(_DONE)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            slots.ready(e)

    thread = threading.Thread(target=run, name="saescale-loader", daemon=True)
    _producers[thread] = stop
    thread.start()
    held = None
    try:
        while True:
            if held is not None:  # the previous batch's buffer is refilled from now on
                slots._free.put(held)
                held = None
            item = slots._ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            held = item
            yield buffers[item]
    finally:
        stop.set()
        if _stop_producer is not None:  # None once the interpreter is tearing the module down
            _stop_producer(thread)


def prefetch(items: Iterator[T], depth: int = 4) -> Iterator[T]:
    """`items` in the same order, produced by a background thread up to `depth` ahead, so chunk reads and
    decompression (which release the GIL) overlap the training step. An exception in the producer is
    raised here; abandoning the iterator stops the thread and waits for it to finish its current item."""
    buf: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buf.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=produce, name="saescale-prefetch", daemon=True)
    _producers[thread] = stop
    thread.start()
    try:
        while True:
            item = buf.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        _stop_producer(thread)


# Running producer threads and their stop events. A daemon thread still inside a native call (a torch gather)
# when the interpreter finalizes aborts the process, so a consumer that stops waits for its producer, and at
# exit every producer left running is stopped and joined first (as `store.prefetch` does).
_producers: dict[threading.Thread, threading.Event] = {}


def _stop_producer(thread: threading.Thread, timeout: float = 60.0) -> None:
    _producers.pop(thread, threading.Event()).set()
    if not sys.is_finalizing() and thread is not threading.current_thread():
        thread.join(timeout)


@atexit.register
def _stop_producers() -> None:
    for thread in list(_producers):
        _stop_producer(thread)


def to_device(host: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """Host batches on a CUDA device, copied on a side stream one batch ahead: the copy of batch i + 1 runs
    while the step on batch i does. Host buffers are page-locked (`host_batches(pin=True)`), so the copies are
    truly asynchronous; a host buffer is released (next draw) only once its copy has finished."""
    side = torch.cuda.Stream(device)

    def issue(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(side):
            dev = torch.empty(x.shape, dtype=x.dtype, device=device)
            dev.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return dev, done

    batch, copied = issue(next(host))
    while True:
        copied.synchronize()  # its host buffer may now be refilled
        following = issue(next(host))
        main = torch.cuda.current_stream(device)
        main.wait_event(copied)
        batch.record_stream(main)  # allocated on the side stream, freed only after the main stream's use
        yield batch
        batch, copied = following
