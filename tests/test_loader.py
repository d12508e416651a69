"""The training loader (saescale.loader): what the chunk shuffle draws, that a resumed stream draws the same
batches, that the buffers are reused, and that damaged chunks are still refused by name."""

import contextlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_train import DiesAt, Killed

from saescale import integrity, loader
from saescale.integrity import DamagedStoreError, writing_every_chunk
from saescale.loader import StreamedBatches, chunk_shuffle
from saescale.normalize import layer_stats
from saescale.sae.train import TrainSpec, train_sae
from saescale.store import _create_store, batch_stream, open_store, split_rows

CHUNK, D, N_TRAIN, N_EVAL = 64, 32, 10 * 64 + 32, 80  # train ends inside a chunk; the last chunk is partial
BATCH, SHUFFLE = 48, 3  # groups of 3 chunks fill 4 batches and carry rows into the next group


def make_store(path: Path, dtype: str = "float16", seed: int = 0) -> Path:
    """A complete activation store of layer 1 in the pipeline's layout, rows of distinct random values."""
    n = N_TRAIN + N_EVAL
    params = {"model": "test", "tokens": {"ctx_len": 16}, "n_train": N_TRAIN, "n_eval": N_EVAL}
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(dtype)
    with writing_every_chunk():
        root = _create_store(path, params, "test", [1], n, D, CHUNK, dtype)
        for s in range(0, n, CHUNK):
            root["L1/x"][s:s + CHUNK] = x[s:s + CHUNK]
            for name, dt in (("token", np.int32), ("window", np.int32), ("position", np.int16)):
                root[name][s:s + CHUNK] = np.zeros(min(CHUNK, n - s), dt)
        root.attrs["complete"] = True
    return path


@pytest.fixture(scope="module")
def store16(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("loader") / "acts.zarr")


def stream(path: Path, seed: int = 3) -> StreamedBatches:
    s = batch_stream(open_store(path), 1, BATCH, seed, in_memory_max_gb=0.0, shuffle_chunks=SHUFFLE)
    assert isinstance(s, StreamedBatches)
    return s


def take(it, n):
    copies = []  # a host batch is valid until the next draw
    for _ in range(n):
        x = next(it)
        copies.append(x.numpy().copy() if isinstance(x, torch.Tensor) else x.copy())
    return copies


def rows_of(batch: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in batch)


def chunk_shuffled_reference(x: np.ndarray, seed: int, epoch: int, steps: int) -> list[np.ndarray]:
    """The chunk shuffle written out on rows in RAM (the former ChunkShuffledBatches): chunks in an order drawn
    from rng(seed, epoch), SHUFFLE at a time appended to the rows left over, all of them permuted, batches
    taken in order and the rest carried."""
    rng = np.random.default_rng([seed, epoch])
    starts = np.arange(0, len(x), CHUNK)
    rng.shuffle(starts)
    buf, out = x[:0], []
    for g in range(0, len(starts), SHUFFLE):
        buf = np.concatenate([buf] + [x[s:s + CHUNK] for s in starts[g:g + SHUFFLE]])
        perm = rng.permutation(len(buf))
        n_full = len(buf) // BATCH
        out += [buf[perm[i * BATCH:(i + 1) * BATCH]] for i in range(n_full)]
        buf = buf[perm[n_full * BATCH:]]
    return out[:steps]


def test_streamed_batches_hold_the_rows_the_chunk_shuffle_draws(store16):
    s = stream(store16)
    train = zarr.open_array(str(store16 / "L1/x"))[:N_TRAIN]
    got = take(s.host_batches(), 2 * s.steps_per_epoch)
    expected = (chunk_shuffled_reference(train, 3, 0, s.steps_per_epoch)
                + chunk_shuffled_reference(train, 3, 1, s.steps_per_epoch))
    assert len(expected) == len(got) == 2 * (N_TRAIN // BATCH)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == np.float16 and rows_of(g) == rows_of(e), step
    assert not np.array_equal(np.concatenate(got[:s.steps_per_epoch]), train[:s.steps_per_epoch * BATCH])


def test_an_epoch_draws_each_train_row_at_most_once_and_never_an_eval_row():
    epoch = [ids for group in chunk_shuffle(0, N_TRAIN, CHUNK, BATCH, SHUFFLE, 3, 0) for ids in group.batches]
    ids = np.concatenate(epoch)
    assert len(np.unique(ids)) == len(ids) == (N_TRAIN // BATCH) * BATCH and ids.max() < N_TRAIN
    assert all(np.all(np.diff(b) > 0) for b in epoch)  # ascending within a batch: gathered chunk by chunk


@pytest.mark.parametrize("start", [1, 4, 5, 13, 14, 15, 29])  # inside a group, at a group, across epochs
def test_a_resumed_stream_draws_the_batches_of_an_uninterrupted_one(store16, start):
    s = stream(store16)
    assert s.steps_per_epoch == 14
    fresh = take(s.host_batches(0), start + 3)[start:]
    for view in (s.host_batches(start), s.device_batches(start, "cpu")):
        assert all(np.array_equal(a, b) for a, b in zip(take(view, 3), fresh))
    float32 = s.batches(start)
    assert all(np.array_equal(next(float32), b.astype(np.float32)) for b in fresh)


def test_batches_are_gathered_into_a_reused_ring_of_buffers_and_stay_intact_until_the_next_draw(store16):
    s = stream(store16)
    expected = take(s.host_batches(), 12)
    it = s.host_batches()
    pointers = set()
    for e in expected:
        x = next(it)
        time.sleep(0.02)  # the producer fills the other buffers meanwhile
        assert torch.equal(x, torch.from_numpy(e))
        pointers.add(x.data_ptr())
    assert len(pointers) == loader.RING


def test_device_batches_cross_in_the_store_dtype(store16):
    x = next(stream(store16).device_batches(0, "cpu"))
    assert x.dtype == torch.float16 and x.shape == (BATCH, D)


def test_the_float32_interface_yields_arrays_the_caller_may_keep(tmp_path):
    s = stream(make_store(tmp_path / "f32.zarr", "float32"))
    it = s.batches()
    first = next(it)
    copy = first.copy()
    for _ in range(2 * loader.RING):
        next(it)
    assert first.dtype == np.float32 and np.array_equal(first, copy)


def test_mapped_chunk_files_and_zarr_reads_give_the_same_batches(store16):
    mapped, read = stream(store16), stream(store16)
    assert mapped.reader._dir is not None
    read.reader._dir = None  # as for a store zarr alone can read (another layout, a remote store)
    for a, b in zip(take(mapped.host_batches(3), 20), take(read.host_batches(3), 20)):
        assert np.array_equal(a, b)


def test_checksums_run_on_every_read_and_the_finite_check_once_per_chunk(store16, monkeypatch):
    calls = {"crc": 0, "finite": 0}
    crc, finite = loader.google_crc32c.value, integrity.all_finite

    class CountedCrc:
        @staticmethod
        def value(data):
            calls["crc"] += 1
            return crc(data)

    def counted_finite(x):
        calls["finite"] += 1
        return finite(x)

    monkeypatch.setattr(loader, "google_crc32c", CountedCrc)
    monkeypatch.setattr(integrity, "all_finite", counted_finite)
    s = stream(store16)
    take(s.host_batches(), 2 * s.steps_per_epoch)
    n_chunks = -(-N_TRAIN // CHUNK)
    assert calls["finite"] == n_chunks
    # every chunk read once in each epoch (kept while carried rows need it), plus at most the next epoch's first
    # two groups (the producer runs up to a few batches ahead, and reads one group ahead of its gathers)
    assert 2 * n_chunks <= calls["crc"] <= 2 * n_chunks + 2 * SHUFFLE


def chunk_file(store: Path, index: int) -> Path:
    return store / "L1/x" / "c" / str(index) / "0"


def first_failure(path: Path) -> DamagedStoreError:
    s = stream(path)
    with pytest.raises(DamagedStoreError) as err:
        take(s.host_batches(), s.steps_per_epoch)
    msg = str(err.value)
    assert str(path) in msg and "L1/x" in msg and "delete" in msg and "'extract' rule" in msg
    return err.value


def test_a_corrupted_chunk_is_refused_by_its_checksum(tmp_path):
    path = make_store(tmp_path / "acts.zarr")
    f = chunk_file(path, 2)
    data = bytearray(f.read_bytes())
    data[40] ^= 0x01  # one flipped bit of a float16: a plausible value without the checksum
    f.write_bytes(bytes(data))
    assert "checksum" in str(first_failure(path)) and "L1/x[128:192]" in str(first_failure(path))


def test_a_truncated_chunk_is_refused(tmp_path):
    path = make_store(tmp_path / "acts.zarr")
    f = chunk_file(path, 4)
    f.write_bytes(f.read_bytes()[:100])
    assert "damaged" in str(first_failure(path))


def test_non_finite_values_are_refused(tmp_path):
    path = make_store(tmp_path / "acts.zarr")
    x = zarr.open_array(str(path / "L1/x"), mode="r+")
    row = x[70]
    row[3] = np.inf
    x[70] = row  # rewritten through zarr: the checksum is valid, the value is not
    assert "1 NaN/Inf values" in str(first_failure(path))


def test_abandoning_a_stream_stops_its_threads(store16):
    it = stream(store16).host_batches()
    next(it)
    it.close()
    assert not any(t.name.startswith("saescale-loader") for t in threading.enumerate())


def test_training_resumed_on_a_stream_ends_with_the_weights_of_an_uninterrupted_run(store16, tmp_path):
    root = open_store(store16)
    train = root["L1/x"][split_rows(root, "train")].astype(np.float32)
    stats = layer_stats([train], len(train))
    spec = TrainSpec(arch="topk", n=64, k=3, d_model=D, lr=3e-3, batch_size=BATCH, tokens=40 * BATCH,
                     adam_eps=6.25e-10, adam_betas=(0.9, 0.999), auxk_coef=1 / 32, k_aux=16, dead_tokens=512,
                     ema_decay=0.9, log_every=4, checkpoint_seconds=1e-9, seed=0, device="cpu")
    sel = train[:256] / np.linalg.norm(train[:256], axis=1, keepdims=True)

    def run(source, ck):
        return train_sae(source, np.asarray(stats["geometric_median"]), stats["baseline_mse"], spec, ck, sel)

    ref, _, _ = run(stream(store16), tmp_path / "a.pt")
    with pytest.raises(Killed):
        run(DiesAt(stream(store16), 17), tmp_path / "b.pt")  # mid-group, in the second epoch
    resumed, _, _ = run(stream(store16), tmp_path / "b.pt")
    for name, value in ref.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_the_fast_finite_check_agrees_with_isfinite(dtype):
    info = np.finfo(dtype)
    x = np.array([0.0, -0.0, info.max, -info.max, info.tiny, info.smallest_subnormal, 1.0], dtype=dtype)
    x = np.tile(x, 1000)  # several blocks of 1024 values below
    assert integrity.all_finite(x, block=1024)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[-1] = bad  # in the last, partial block
        assert not integrity.all_finite(y, block=1024) and not np.isfinite(y).all()


def test_device_batches_copy_one_batch_ahead_and_release_a_host_buffer_only_after_its_copy(monkeypatch):
    """On CUDA (logical, `fake_cuda`; streams and events recorded by stand-ins): batch i + 1 is copied while
    the step on batch i runs, and the host buffer of batch i is refilled (next draw) only after its copy."""
    from fake_cuda import device_of, fake_cuda

    log = []

    class Event:
        count = 0

        def __init__(self):
            self.n, Event.count = Event.count, Event.count + 1

        def record(self, stream):
            log.append(("copy issued", self.n))

        def synchronize(self):
            log.append(("copy done", self.n))

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_event(self, event):
            pass

    def host():
        for i in range(4):
            log.append(("drawn", i))
            yield torch.full((4, 3), float(i), dtype=torch.float16)

    main = Stream()
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)
    with fake_cuda():
        it = loader.to_device(host(), torch.device("cuda"))
        for i in range(3):
            x = next(it)
            assert device_of(x) == torch.device("cuda", 0) and x.dtype == torch.float16 and bool((x == i).all())
            log.append(("yielded", i))
    for i in range(3):
        assert log.index(("copy done", i)) < log.index(("drawn", i + 1))  # buffer i free only after its copy
        assert log.index(("copy issued", i + 1)) < log.index(("yielded", i))  # the next copy overlaps the step
