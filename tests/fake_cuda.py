"""Fake CUDA: run a stage's tensor code "on cuda" on a machine without a GPU, and fail where real CUDA would
fail on a device mismatch.

`fake_cuda()` is a context manager. Inside it every tensor carries a *logical* device, cpu or cuda:0, kept in a
weak map beside the tensor, while the data stays on the CPU and every op computes real values (unlike
FakeTensorMode, code that reads values, `.item()` or `nonzero()`, runs). A `TorchDispatchMode` sees every op,
checks the logical devices of its tensors and tags its outputs. The rules mirror real CUDA:

1. Placement. `device="cuda"` on a factory function, `x.to("cuda")`, `x.cuda()` and `module.to("cuda")` give
   cuda:0 tensors; `x.cpu()` and `x.to("cpu")` copy back to cpu. Any other new tensor (`torch.from_numpy`,
   a factory without `device=`) is cpu. `x.device`, `x.is_cuda` and `x.get_device()` report the logical device,
   so `torch.zeros(n, device=x.device)` follows x as it does on a GPU.
2. Propagation. An op's outputs take the logical device of its tensor inputs, views and in-place ops included;
   `device="cuda"` wins (`zeros_like(x, device="cuda")`). `device="cpu"` on an op with tensor inputs is read as
   "the input's device": torch's C++ side passes the real device, cpu, when it means "like the input" (autograd's
   backward of `.to(dtype)`, `*_like`, `new_*`), so `zeros_like(x, device="cpu")` of a cuda x is (wrongly)
   cuda here; `x.to("cpu")` and `x.cpu()` are right.
3. Mixing. An op that meets a cuda tensor and a cpu tensor raises `RuntimeError: Expected all tensors to be on
   the same device, but found at least two devices, cuda:0 and cpu!`, with these exceptions, all allowed by
   real CUDA:
   - a 0-dim cpu tensor (a "cpu scalar", e.g. `torch.tensor(2.0)`) may meet cuda tensors (real CUDA allows it
     in elementwise ops; this mode allows it in every op, the one place it is more lenient);
   - cpu index tensors may index a cuda tensor (`x[idx]`, `x[mask]`, `x[idx] = v`); a cuda index into a cpu
     tensor raises, as on a GPU ("indices should be either on cpu or on the same device as the indexed tensor");
   - `dst.copy_(src)` copies between devices.
4. Host. `.numpy()` (and so `np.asarray(x)`) on a cuda tensor raises `TypeError: can't convert cuda:0 device
   type tensor to numpy`, as on a GPU; `.item()` and `.tolist()` work (on a GPU they synchronize).
5. Generators. `torch.Generator(device="cuda")` makes a cuda:0 generator (CPU state underneath); a random op
   whose generator is on another device than its output raises, as real CUDA does.
6. `torch.cuda`: `is_available()` is True, one device; `synchronize`, `empty_cache` and the peak-memory resets
   do nothing and the memory statistics read 0. `x.pin_memory()` returns a copy; `x.is_pinned()` is False.

Not simulated: asynchronous execution and streams, the CUDA caching allocator, dtype support differences
(float64 and every CPU kernel "work" here), `torch.load(map_location="cuda")`. `torch.autocast("cuda")` runs
as CPU autocast, whose list of bf16 ops differs a little from CUDA's. Only cuda:0 exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch._dynamo  # noqa: F401  entering a dispatch mode imports it; it must see Tensor's own methods
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# indexing ops, (self, indices, ...): cpu index tensors may index a cuda self
_INDEX_OPS = {aten.index.Tensor, aten._unsafe_index.Tensor, aten.index_put.default, aten.index_put_.default,
              aten._index_put_impl_.default, aten._unsafe_index_put.default}

_tags = WeakTensorKeyDictionary()          # tensor -> CUDA; absent means cpu
_generator_tags: dict[int, torch.device] = {}  # generator._cdata -> CUDA (ops see a new Python object)
_REAL_DEVICE = torch._C.TensorBase.device
_REAL_DATA = torch._C.TensorBase.data
_REAL_TO = torch._C.TensorBase.to
_REAL_NUMPY = torch._C.TensorBase.numpy
_REAL_MAKE_SUBCLASS = torch._C.TensorBase._make_subclass


def device_of(t: torch.Tensor) -> torch.device:
    """The logical device of a tensor (cpu unless fake CUDA put it on cuda:0)."""
    if _tags.get(t) is not None:
        return CUDA
    real = _REAL_DEVICE.__get__(t)
    return CPU if real.type == "cpu" else real


def _logical(device) -> torch.device | None:
    if device is None:
        return None
    device = torch.device(device) if not isinstance(device, int) else CUDA
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise RuntimeError(f"fake CUDA has one device, cuda:0; got {device}")
        return CUDA
    return device


def _tag(t: torch.Tensor, device: torch.device) -> None:
    if device == CUDA:
        _tags[t] = CUDA
    elif t in _tags:
        del _tags[t]


def _mismatch(a: torch.device, b: torch.device, func) -> RuntimeError:
    first, second = (a, b) if a == CUDA else (b, a)
    return RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                        f"{first} and {second}! (fake CUDA, in {func})")


def _common_device(tensors: list[torch.Tensor], func) -> torch.device | None:
    """The one logical device of `tensors`, cpu scalars aside; raises like real CUDA when there are two."""
    seen: torch.device | None = None
    cpu_scalars = False
    for t in tensors:
        d = device_of(t)
        if d == CPU and t.dim() == 0:
            cpu_scalars = True
            continue
        if seen is None:
            seen = d
        elif d != seen:
            raise _mismatch(seen, d, func)
    return seen if seen is not None else (CPU if cpu_scalars else None)


def _index_device(func, args, kwargs) -> torch.device:
    """Indexing: cpu indices may index a cuda tensor; a cuda index into a cpu tensor may not."""
    self, indices, rest = args[0], args[1], [*args[2:], *kwargs.values()]
    self_device = device_of(self)
    for idx in indices:
        if isinstance(idx, torch.Tensor) and device_of(idx) not in (self_device, CPU):
            raise RuntimeError(f"indices should be either on cpu or on the same device as the indexed tensor "
                               f"({self_device}) (fake CUDA, in {func})")
    others = [self, *(t for t in tree_flatten(rest)[0] if isinstance(t, torch.Tensor))]
    return _common_device(others, func) or self_device


class FakeCudaMode(TorchDispatchMode):
    """Checks and propagates logical devices op by op; see the module docstring for the rules."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat = tree_flatten((args, kwargs))[0]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        kwargs.pop("pin_memory", None)  # no pinned memory without CUDA: plain CPU memory
        requested = _logical(kwargs.pop("device", None))
        if requested == CPU and tensors:
            # torch's C++ side (autograd's ToCopyBackward, *_like, new_*) passes its input's real device, cpu:
            # the output follows the input's logical device instead. Tensor.to("cpu") is patched, not seen here.
            requested = None
        if func in (aten._to_copy.default, aten._pin_memory.default):
            out_device = requested or device_of(args[0])
        elif func is aten.copy_.default:
            out_device = device_of(args[0])
        elif func in _INDEX_OPS:
            out_device = _index_device(func, args, kwargs)
        else:
            common = _common_device(tensors, func)
            out_device = requested or common or CPU
        for g in flat:
            if isinstance(g, torch._C.Generator):
                g_device = _generator_tags.get(g._cdata, CPU)
                if g_device != out_device:
                    raise RuntimeError(f"Expected a '{out_device.type}' device type for generator but found "
                                       f"'{g_device.type}' (fake CUDA, in {func})")
        if requested is not None:
            kwargs["device"] = CPU
        if func is aten._pin_memory.default:
            out = args[0].clone()
        else:
            out = func(*tree_map(lambda a: CPU if isinstance(a, torch.device) else a, args), **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                _tag(t, out_device)
        return out


class FakeGenerator(torch.Generator):
    """torch.Generator that accepts device="cuda": CPU state, logical device cuda:0."""

    def __new__(cls, device=None):
        logical = _logical(device) or CPU
        gen = super().__new__(cls, device=CPU if logical == CUDA else logical)
        if logical == CUDA:
            _generator_tags[gen._cdata] = CUDA
        return gen

    def __init__(self, device=None):
        pass

    def __del__(self):
        _generator_tags.pop(self._cdata, None)

    @property
    def device(self) -> torch.device:
        return _generator_tags.get(self._cdata, CPU)


# --------------------------------------------------------------------------- Python-level Tensor methods

def _to(self, *args, **kwargs):
    copy = kwargs.pop("copy", False)
    if args and isinstance(args[0], torch.Tensor):
        other = args[0]
        device, dtype = device_of(other), other.dtype
        non_blocking = args[1] if len(args) > 1 else kwargs.get("non_blocking", False)
        memory_format = None
    else:
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    current = device_of(self)
    target = _logical(device) or current
    out = _REAL_TO(self, dtype=dtype or self.dtype, non_blocking=non_blocking, copy=copy or target != current,
                   memory_format=memory_format or torch.preserve_format)
    if out is not self:
        _tag(out, target)
    return out


def _cpu(self, memory_format=torch.preserve_format):
    return _to(self, CPU, memory_format=memory_format)


def _cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return _to(self, _logical(device if device is not None else "cuda"), non_blocking=non_blocking,
               memory_format=memory_format)


def _numpy(self, *, force: bool = False):
    if device_of(self) == CUDA:
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first. (fake CUDA)")
    return _REAL_NUMPY(self, force=force)


def _get_data(self):
    data = _REAL_DATA.__get__(self)
    _tag(data, device_of(self))
    return data


def _set_data(self, value):
    _REAL_DATA.__set__(self, value)
    _tag(self, device_of(value))


def _pin_memory(self, device=None):
    out = self.clone()
    _tag(out, device_of(self))
    return out


def _make_subclass(cls, data, require_grad=False, **kwargs):  # nn.Parameter(x) keeps x's device
    out = _REAL_MAKE_SUBCLASS(cls, data, require_grad, **kwargs)
    _tag(out, device_of(data))
    return out


def _on_device(factory):
    """torch.tensor / torch.as_tensor with device="cuda": made on the CPU, then moved (torch would otherwise
    look for a CUDA device guard before the dispatcher is reached)."""

    def make(data, *args, device=None, **kwargs):
        target = _logical(device)
        out = factory(data, *args, **kwargs)
        return _to(out, target) if target is not None else out

    return make


_TENSOR_PATCHES = {
    "device": property(device_of),
    "is_cuda": property(lambda self: device_of(self) == CUDA),
    "is_cpu": property(lambda self: device_of(self) == CPU),
    "get_device": lambda self: 0 if device_of(self) == CUDA else -1,
    "data": property(_get_data, _set_data),
    "to": _to,
    "cpu": _cpu,
    "cuda": _cuda,
    "numpy": _numpy,
    "pin_memory": _pin_memory,
    "is_pinned": lambda self, device=None: False,
    "_make_subclass": staticmethod(_make_subclass),
    "record_stream": lambda self, stream: None,
}

_CUDA_PATCHES = {
    "_lazy_init": lambda: None,  # torch calls it before a factory with device="cuda" reaches the dispatcher
    "is_available": lambda: True,
    "device_count": lambda: 1,
    "current_device": lambda: 0,
    "synchronize": lambda device=None: None,
    "empty_cache": lambda: None,
    "reset_peak_memory_stats": lambda device=None: None,
    "max_memory_allocated": lambda device=None: 0,
    "memory_allocated": lambda device=None: 0,
    "max_memory_reserved": lambda device=None: 0,
    "memory_reserved": lambda device=None: 0,
    "get_device_name": lambda device=None: "fake CUDA (CPU data)",
    "is_bf16_supported": lambda including_emulation=True: True,
}


class FakeStream:
    """A CUDA stream stand-in: work runs in program order on the CPU, so waits and syncs have nothing to do."""

    def __init__(self, device=None, priority: int = 0):
        self.device = CUDA

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else FakeEvent()


class FakeEvent:
    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        pass

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


# Streams and events, patched unless a test has put its own stand-ins there already (tests/test_loader.py)
_STREAM_PATCHES = {
    "Stream": FakeStream,
    "Event": FakeEvent,
    "stream": lambda stream=None: contextlib.nullcontext(),
    "current_stream": lambda device=None: FakeStream(),
    "default_stream": lambda device=None: FakeStream(),
}
_REAL_STREAMS = {name: getattr(torch.cuda, name) for name in _STREAM_PATCHES}


class FakeAutocast(torch.autocast):
    """torch.autocast("cuda") as CPU autocast: the ops that run in bf16 differ a little between the two, but
    a float32 tensor meeting a bf16 one is caught all the same."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Within this block, tensors may live on a logical cuda:0 and device mismatches raise (module docstring)."""
    saved_tensor = {name: torch.Tensor.__dict__.get(name) for name in _TENSOR_PATCHES}
    streams = {name: value for name, value in _STREAM_PATCHES.items() if getattr(torch.cuda, name) is _REAL_STREAMS[name]}
    cuda_patches = {**_CUDA_PATCHES, **streams}
    saved_cuda = {name: getattr(torch.cuda, name) for name in cuda_patches}
    saved_torch = {name: getattr(torch, name) for name in ("Generator", "tensor", "as_tensor", "autocast")}
    try:
        for name, value in _TENSOR_PATCHES.items():
            setattr(torch.Tensor, name, value)
        for name, value in cuda_patches.items():
            setattr(torch.cuda, name, value)
        torch.Generator, torch.autocast = FakeGenerator, FakeAutocast
        torch.tensor, torch.as_tensor = _on_device(torch.tensor), _on_device(torch.as_tensor)
        with FakeCudaMode():
            yield
    finally:
        for name, value in saved_torch.items():
            setattr(torch, name, value)
        for name, value in saved_cuda.items():
            setattr(torch.cuda, name, value)
        for name, value in saved_tensor.items():
            if value is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)
