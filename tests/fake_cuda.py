"""A fake ``cuda:0`` device for CPU-only test runs.

Why: on a CPU box every tensor sits on one device, so the classic GPU-only bugs
(a CPU tensor handed to a module whose weights are on the GPU, ``.numpy()`` on a
CUDA tensor, a CPU tensor given to an NCCL collective) pass CI and fail on the
cluster.  Inside ``with fake_cuda():`` tensors can be "on cuda:0" (their data
really lives on CPU) and the device rules of real CUDA are enforced, so those
mistakes raise on CPU exactly as they would on a GPU.

How: a ``TorchFunctionMode`` sees every torch call.  Which tensors are "on
cuda" is kept in a registry of weak references (no tensor subclass, no state
on the tensors), so ``nn.Parameter``s stay ``nn.Parameter``s, ``type(t) is
torch.Tensor`` stays true, pickles carry no trace, and on exit every tensor
simply becomes a plain CPU tensor again.

Covered (mirrors real CUDA):

* ``t.device`` / ``is_cuda`` / ``is_cpu`` / ``get_device()`` / ``repr`` of a
  fake-CUDA tensor say ``cuda:0``; ``torch.device(0)`` is ``cuda:0``.
* ``.to("cuda")``, ``.to(torch.device("cuda", 0))``, ``.to(0)``,
  ``.to(cuda_tensor)``, ``.cuda()``, ``type_as(cuda_tensor)`` and any factory
  called with ``device=`` a CUDA device (``torch.zeros/full/arange/tensor/
  empty/*_like/new_*``...) give fake-CUDA tensors; like real cross-device moves
  they copy (a later write to the source is not seen).  ``.cpu()`` /
  ``.to("cpu")`` give plain CPU copies.  ``cuda:1`` and up raise
  "invalid device ordinal" (one device is visible).
* ``.numpy()`` and ``np.asarray()`` on a fake-CUDA tensor raise the TypeError
  CUDA raises; ``.numpy(force=True)``, ``.tolist()``, ``.item()`` work.
* Any other op mixing fake-CUDA tensors with CPU tensors raises the
  "Expected all tensors to be on the same device" RuntimeError, except what
  real CUDA allows: 0-dim CPU tensors (scalars), ``copy_``, ``t[idx] = value``
  and ``t[idx]``/``index_put_`` with CPU indices, ``torch.tensor/as_tensor``
  data, ``new_tensor`` data, the other tensor of ``view_as/expand_as/
  reshape_as``, ``broadcast_tensors`` and ``autograd.grad`` over tensors on
  both devices.  This is slightly more lenient than CUDA (it accepts 0-dim CPU
  tensors in ``cat``/``matmul`` too): no false alarms on correct code.
  Indexing a CPU tensor with CUDA indices raises.
* Outputs of ops with fake-CUDA inputs are fake-CUDA; in-place ops never move
  their ``self``.  The check happens at the outermost torch call (``F.linear``,
  ``F.scaled_dot_product_attention``...), where CUDA would check too.
* ``module.to("cuda")`` / ``.cuda()`` / ``.cpu()``: parameters (same
  ``Parameter`` objects, as on real CUDA), their ``.grad`` and buffers move;
  ``nn.Parameter(cuda_tensor)`` and ``nn.Linear(..., device="cuda")`` work.
  Assigning a ``.grad`` on the other device raises.
* ``torch.cuda``: ``is_available() -> True``, ``device_count() -> 1``,
  ``current_device() -> 0``, ``set_device(0)``, ``with torch.cuda.device(0)``,
  ``get_device_name()``; its RNG state (``get_rng_state``/``set_rng_state``/
  ``manual_seed``, so ``torch.random.fork_rng`` and RNG checkpoints work; random
  ops still draw from the CPU generator).  Harmless no-ops (documented, not emulated):
  ``synchronize()`` (CPU work is already synchronous), ``empty_cache()``,
  ``reset_peak_memory_stats()``; ``memory_allocated()`` and friends return 0.
  Everything else in ``torch.cuda`` (streams, events, capability, properties,
  graphs) is left as the CPU build has it: it raises "Torch not compiled with
  CUDA enabled" or similar.
* NCCL (``nccl=True``, the default): ``torch.distributed`` collectives and
  point-to-point calls reached through the ``torch.distributed`` namespace
  (``dist.all_reduce`` etc., which is what DeepSpeed's comm layer calls) raise
  "No backend type associated with device type cpu" when given a CPU tensor,
  as the NCCL backend does; with fake-CUDA tensors they run on whatever
  backend was initialised (gloo in tests).  Object collectives
  (``all_gather_object``...) are not checked: torch moves those itself.

Nesting is fine; the outermost context owns the patches (its ``nccl`` option
wins) and undoes them when it exits, also on error.  ``torch.version.cuda``
and ``torch.backends.cuda.is_built()`` keep telling the truth (a CPU build).

Not covered (know these before trusting a green run):

* Only the thread that entered the context is emulated (torch function modes
  are thread-local): DataLoader pin-memory threads and worker processes see
  plain CPU tensors.  Code that runs inside ``backward()`` (custom
  ``autograd.Function.backward``, tensor hooks) is not checked either;
  ``param.grad`` is fake-CUDA once read back after ``backward()``.
* Kernels are CPU kernels: no CUDA numerics, dtype support, non-determinism,
  asynchrony, or out-of-memory.  Random ops on "cuda" use the CPU generator,
  so sampled values differ from a real GPU run with the same seed.
  ``torch.autocast("cuda")`` changes nothing (ops keep their dtype: no CUDA
  kernel runs); ``autocast("cuda", dtype=torch.bfloat16)`` raises, because it
  asks the (absent) device whether it supports bf16.
* ``untyped_storage()``, DLPack, ``torch.save`` of fake-CUDA tensors see the
  CPU truth (a saved checkpoint loads on CPU).  ``device=`` passed
  positionally to a factory (rare) is not seen; ``torch.set_default_device``
  is untested.
* Libraries that cache ``torch.cuda.is_available()`` the first time they are
  asked (DeepSpeed's ``get_accelerator()``, transformers'
  ``is_torch_cuda_available``) keep whatever they saw, also after the context:
  make them ask before entering it.
* ``torch.Generator(device="cuda")`` cannot be made on a CPU build, and the
  device of a generator handed to an op is not checked.
* ``torch.utils.swap_tensors`` is patched to carry the marks along; other
  ways of rebuilding tensors outside torch's Python API are not tracked.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.distributed
import torch.nn as nn
import torch.utils
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._pytree import tree_leaves

__all__ = ["FakeCuda", "fake_cuda", "is_fake_cuda", "CUDA0", "SAME_DEVICE_ERROR"]

CUDA0 = torch.device("cuda", 0)
SAME_DEVICE_ERROR = "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"
_NUMPY_ERROR = (
    "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."
)
_NCCL_CPU_ERROR = "No backend type associated with device type cpu"


# ----------------------------------------------------------------------------------------------- marks
class _Marks:
    """Which tensors are on fake cuda:0: weak references keyed by id, so a mark dies with its tensor."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t

    def add(self, t: torch.Tensor) -> None:
        if t in self:
            return
        key, refs = id(t), self._refs

        def forget(ref: weakref.ref) -> None:
            if refs.get(key) is ref:
                del refs[key]

        refs[key] = weakref.ref(t, forget)

    def discard(self, t: torch.Tensor) -> None:
        if t in self:
            del self._refs[id(t)]

    def set(self, t: torch.Tensor, on_cuda: bool) -> None:
        self.add(t) if on_cuda else self.discard(t)

    def clear(self) -> None:
        self._refs.clear()


class _Shared:
    """State shared by every active FakeCuda (nesting reuses it, so inner contexts see outer marks)."""

    lock = threading.Lock()
    depth = 0
    marks = _Marks()
    undo: list[Callable[[], None]] = []


def is_fake_cuda(t: torch.Tensor) -> bool:
    """Whether t is on the fake cuda:0 (False outside the context: everything is CPU again)."""
    return _Shared.depth > 0 and t in _Shared.marks


# --------------------------------------------------------------------------------------------- helpers
def _parse_device(dev: Any) -> torch.device:
    """A device argument as torch.device; a bare int means cuda:<int> as on a CUDA build."""
    if isinstance(dev, int) and not isinstance(dev, bool):
        dev = torch.device("cuda", dev)
    elif not isinstance(dev, torch.device):
        dev = torch.device(dev)
    if dev.type == "cuda":
        if dev.index not in (None, 0):
            raise RuntimeError(f"CUDA error: invalid device ordinal (fake_cuda has one device, asked for {dev})")
        return CUDA0
    return dev


def _is_device_arg(a: Any) -> bool:
    return isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool))


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _same_device_error(func: Any) -> RuntimeError:
    return RuntimeError(f"{SAME_DEVICE_ERROR} (fake_cuda, in {_name(func)})")


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


# ------------------------------------------------------------------------------------------ the mode
class FakeCuda(TorchFunctionMode):
    """Torch function mode that makes CPU tensors play cuda:0 (see the module docstring).

    Use ``with fake_cuda():``.  Nesting and re-entering are fine: the outermost context
    owns the patches and the marks, and restores everything when it exits (also on error).
    """

    def __init__(self, *, nccl: bool = True) -> None:
        super().__init__()
        self.nccl = nccl
        self._pushed: list[bool] = []

    # -- context management
    def __enter__(self) -> FakeCuda:
        with _Shared.lock:
            if _Shared.depth == 0:
                _Shared.marks.clear()
                _Shared.undo = _install_patches(nccl=self.nccl)
            _Shared.depth += 1
        push = not any(isinstance(m, FakeCuda) for m in _get_current_function_mode_stack())
        self._pushed.append(push)
        if push:
            try:
                super().__enter__()
            except BaseException:
                self._pushed.pop()
                _leave()
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._pushed.pop():
                super().__exit__(exc_type, exc, tb)
        finally:
            _leave()

    # -- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            special = _SPECIAL.get(func)
        except TypeError:  # an unhashable callable: nothing special about it
            special = None
        if special is not None:
            return special(func, args, kwargs)
        if kwargs.get("device") is not None:
            return _factory(func, args, kwargs)
        return _generic(func, args, kwargs)


def _leave() -> None:
    with _Shared.lock:
        _Shared.depth -= 1
        if _Shared.depth == 0:
            undo, _Shared.undo = _Shared.undo, []
            _Shared.marks.clear()
            for restore in reversed(undo):
                restore()


@contextlib.contextmanager
def fake_cuda(*, nccl: bool = True) -> Iterator[FakeCuda]:
    """``with fake_cuda():`` run the block as if cuda:0 existed (see the module docstring)."""
    with FakeCuda(nccl=nccl) as mode:
        yield mode


# ------------------------------------------------------------------------------- generic op handling
def _check_and_run(func, args, kwargs, checked: list[torch.Tensor]):
    """Run func; raise like CUDA if `checked` mixes fake-CUDA and non-scalar CPU tensors.

    Returns (output, whether the op ran on cuda)."""
    marks = _Shared.marks
    on_cuda = cpu_seen = False
    for t in checked:
        if t in marks:
            on_cuda = True
        elif t.device.type == "cpu" and t.dim() != 0:  # 0-dim CPU tensors are scalars, which CUDA accepts
            cpu_seen = True
    if on_cuda and cpu_seen:
        raise _same_device_error(func)
    return func(*args, **kwargs), on_cuda


def _mark_outputs(out: Any, inputs: Any) -> None:
    """Mark every tensor in out that is not one of the inputs (in-place ops never move their self)."""
    seen = {id(t) for t in _tensors(inputs)}
    for t in _tensors(out):
        if id(t) not in seen:
            _Shared.marks.add(t)


def _generic(func, args, kwargs):
    out, on_cuda = _check_and_run(func, args, kwargs, _tensors((args, kwargs)))
    if on_cuda:
        _mark_outputs(out, (args, kwargs))
    return out


def _factory(func, args, kwargs):
    """A call with device=...: the device decides, tensor arguments are templates or data."""
    target = _parse_device(kwargs["device"])
    kwargs = dict(kwargs)
    if kwargs.get("pin_memory"):
        if target.type == "cuda":
            raise RuntimeError("Only dense CPU tensors can be pinned")
        kwargs["pin_memory"] = False  # a CPU-only build cannot pin; pinned memory is still CPU memory
    if target.type == "cuda":
        kwargs["device"] = torch.device("cpu")
    out = func(*args, **kwargs)
    if target.type == "cuda":
        _mark_outputs(out, (args, kwargs))
    return out


# --------------------------------------------------------------------------------- special functions
_SPECIAL: dict[Any, Callable] = {}


def _special(*funcs: Any) -> Callable[[Callable], Callable]:
    def register(handler: Callable) -> Callable:
        for f in funcs:
            _SPECIAL[f] = handler
        return handler

    return register


def _getter(name: str) -> Any:
    return getattr(torch.Tensor, name).__get__


def _setter(name: str) -> Any:
    return getattr(torch.Tensor, name).__set__


@_special(_getter("device"))
def _device(func, args, kwargs):
    return CUDA0 if args[0] in _Shared.marks else func(*args, **kwargs)


@_special(_getter("is_cuda"))
def _is_cuda(func, args, kwargs):
    return True if args[0] in _Shared.marks else func(*args, **kwargs)


@_special(_getter("is_cpu"))
def _is_cpu(func, args, kwargs):
    return False if args[0] in _Shared.marks else func(*args, **kwargs)


@_special(torch.Tensor.get_device)
def _get_device(func, args, kwargs):
    return 0 if args[0] in _Shared.marks else func(*args, **kwargs)


@_special(torch.device)
def _torch_device(func, args, kwargs):
    if len(args) == 1 and not kwargs and isinstance(args[0], int) and not isinstance(args[0], bool):
        return torch.device("cuda", args[0])  # a bare ordinal names a CUDA device on a CUDA build
    return func(*args, **kwargs)


def _move(t: torch.Tensor, res: torch.Tensor, target_cuda: bool) -> torch.Tensor:
    """Finish a device move: a real cross-device move is a copy, never the same tensor."""
    if res is t and (t in _Shared.marks) != target_cuda:
        res = t.clone()
    if res is not t:
        _Shared.marks.set(res, target_cuda)
    return res


@_special(torch.Tensor.to)
def _to(func, args, kwargs):
    t, rest = args[0], list(args[1:])
    kwargs = dict(kwargs)
    if kwargs.get("device") is not None:
        target = _parse_device(kwargs["device"])
        if target.type == "cuda":
            kwargs["device"] = torch.device("cpu")
    elif rest and isinstance(rest[0], torch.Tensor):
        target = CUDA0 if rest[0] in _Shared.marks else rest[0].device
    elif rest and rest[0] is not None and _is_device_arg(rest[0]):
        target = _parse_device(rest[0])
        if target.type == "cuda":
            rest[0] = torch.device("cpu")
    else:  # dtype-only conversion: stays where it is
        target = CUDA0 if t in _Shared.marks else t.device
    res = func(t, *rest, **kwargs)
    if target.type not in ("cuda", "cpu"):
        return res  # e.g. meta: real tensors of their own kind
    return _move(t, res, target.type == "cuda")


@_special(torch.Tensor.cuda)
def _cuda(func, args, kwargs):
    t = args[0]
    dev = args[1] if len(args) > 1 else kwargs.get("device")
    _check_ordinal(dev)
    fmt = kwargs.get("memory_format", torch.preserve_format)
    if t in _Shared.marks and fmt == torch.preserve_format:
        return t
    res = t.clone(memory_format=fmt)
    _Shared.marks.add(res)
    return res


@_special(torch.Tensor.cpu)
def _cpu(func, args, kwargs):
    t = args[0]
    return _move(t, func(*args, **kwargs), False)


@_special(torch.Tensor.type_as)
def _type_as(func, args, kwargs):
    t, other = args[0], args[1]
    return _move(t, func(*args, **kwargs), other in _Shared.marks)


@_special(torch.Tensor.type)
def _type(func, args, kwargs):
    t = args[0]
    if len(args) == 1 and kwargs.get("dtype") is None and t in _Shared.marks:
        return "torch.cuda." + func(t).removeprefix("torch.")  # e.g. torch.cuda.FloatTensor
    return _generic(func, args, kwargs)


@_special(torch.Tensor.numpy)
def _numpy(func, args, kwargs):
    if args[0] in _Shared.marks and not kwargs.get("force"):
        raise TypeError(_NUMPY_ERROR)
    return func(*args, **kwargs)


@_special(torch.Tensor.__array__)
def _array(func, args, kwargs):
    if args[0] in _Shared.marks:
        raise TypeError(_NUMPY_ERROR)
    return func(*args, **kwargs)


@_special(torch.Tensor.pin_memory)
def _pin_memory(func, args, kwargs):
    if args[0] in _Shared.marks:
        raise RuntimeError(
            "cannot pin '" + _type(torch.Tensor.type, args[:1], {}) + "' only dense CPU tensors can be pinned"
        )
    return args[0].clone()  # a CPU-only build cannot pin; a pinned copy is still a CPU tensor


@_special(torch.Tensor.copy_)
def _copy_(func, args, kwargs):
    return func(*args, **kwargs)  # copies between devices are allowed and never move self


@_special(torch.Tensor.__setitem__)
def _setitem(func, args, kwargs):
    return func(*args, **kwargs)  # CPU indices and values are fine on CUDA (copied over)


@_special(torch.Tensor.__getitem__)
def _getitem(func, args, kwargs):
    t, idx = args[0], args[1]
    if t in _Shared.marks:  # CPU indices are allowed on a CUDA tensor
        out = func(*args, **kwargs)
        _mark_outputs(out, (t,))
        return out
    if any(i in _Shared.marks and i.dim() != 0 for i in _tensors(idx)):
        raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor (cpu)")
    return func(*args, **kwargs)


@_special(torch.Tensor.index_put_, torch.Tensor.index_put, torch.index_put, torch.index_put_)
def _index_put(func, args, kwargs):
    t = args[0]
    values = args[2] if len(args) > 2 else kwargs.get("values")
    out, on_cuda = _check_and_run(func, args, kwargs, _tensors((t, values)))  # indices may be on CPU
    if on_cuda:
        _mark_outputs(out, (args, kwargs))
    return out


@_special(torch.Tensor.expand_as, torch.Tensor.view_as, torch.Tensor.reshape_as, torch.Tensor.is_same_size)
def _shape_of_other(func, args, kwargs):
    """These read only the other tensor's shape, so CUDA does not care where it lives."""
    out, on_cuda = _check_and_run(func, args, kwargs, _tensors(args[:1]))
    if on_cuda:
        _mark_outputs(out, args)
    return out


def _mark_like(outs: Any, ins: Any) -> None:
    """Output i is on the device of input i (ops that handle each tensor separately)."""
    for o, i in zip(outs, ins):
        if isinstance(o, torch.Tensor) and o is not i:
            _Shared.marks.set(o, i in _Shared.marks)


@_special(torch.broadcast_tensors)
def _broadcast_tensors(func, args, kwargs):
    out = func(*args, **kwargs)  # only views: each input keeps its device
    _mark_like(out, args)
    return out


@_special(torch.autograd.grad)
def _autograd_grad(func, args, kwargs):
    inputs = kwargs["inputs"] if "inputs" in kwargs else args[1]
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    out = func(*args, **kwargs)  # each gradient lives where its input does
    _mark_like(out, inputs)
    return out


@_special(torch.Tensor.set_)
def _set_(func, args, kwargs):
    out = func(*args, **kwargs)
    source = args[1] if len(args) > 1 else kwargs.get("source")
    if isinstance(source, torch.Tensor):
        _Shared.marks.set(args[0], source in _Shared.marks)  # self now is source's memory
    return out


@_special(torch.tensor, torch.as_tensor, torch.asarray)
def _from_data(func, args, kwargs):
    """Data is copied (or aliased) to the device asked for, else stays where a tensor's data is."""
    if kwargs.get("device") is not None:
        return _factory(func, args, kwargs)
    data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
    out = func(*args, **kwargs)
    if isinstance(data, torch.Tensor) and data in _Shared.marks and out is not data:
        _Shared.marks.add(out)
    return out


@_special(torch.Tensor.new_tensor)
def _new_tensor(func, args, kwargs):
    if kwargs.get("device") is not None:
        return _factory(func, args, kwargs)
    out = func(*args, **kwargs)  # lands on self's device whatever the data's
    if args[0] in _Shared.marks:
        _Shared.marks.add(out)
    return out


@_special(_setter("data"))
def _set_data(func, args, kwargs):
    t, new = args[0], args[1]
    func(t, new)
    _Shared.marks.set(t, new in _Shared.marks)  # `param.data = x` is how Module.to moves parameters


@_special(_setter("grad"))
def _set_grad(func, args, kwargs):
    t, g = args[0], args[1]
    if g is not None and (g in _Shared.marks) != (t in _Shared.marks):
        raise RuntimeError("assigned grad has data located on a different device (fake_cuda)")
    return func(t, g)


@_special(torch.Tensor.__deepcopy__)
def _deepcopy(func, args, kwargs):
    out = func(*args, **kwargs)  # memo holds unrelated tensors: no device check
    if args[0] in _Shared.marks:
        _Shared.marks.add(out)
    return out


@_special(torch.Tensor.__reduce_ex__, torch._has_compatible_shallow_copy_type)
def _passthrough(func, args, kwargs):
    """Questions about the CPU truth: pickles (see "Not covered"), and Module._apply's layout check."""
    return func(*args, **kwargs)


class _ShowDevice(TorchFunctionMode):
    """Answers only device questions, so torch's own repr prints device='cuda:0' and nothing else changes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            special = _SPECIAL.get(func)
        except TypeError:
            special = None
        if special in (_device, _is_cuda, _is_cpu, _get_device):
            return special(func, args, kwargs)
        return func(*args, **kwargs)


@_special(torch.Tensor.__repr__)
def _repr(func, args, kwargs):
    if args[0] not in _Shared.marks:
        return func(*args, **kwargs)
    with _ShowDevice():  # torch's own printer, with only the device answers changed
        return torch._tensor_str._str(args[0], tensor_contents=kwargs.get("tensor_contents"))


# ------------------------------------------------------------------------------------ global patches
def _patch(undo: list[Callable[[], None]], owner: Any, name: str, value: Any) -> None:
    """Set owner.name = value and remember how to put back exactly what was there."""
    had = name in vars(owner)
    old = vars(owner).get(name)

    def restore() -> None:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)

    setattr(owner, name, value)
    undo.append(restore)


def _check_ordinal(device: Any = None) -> None:
    if device is None:
        return
    if isinstance(device, str) and device.isdigit():
        device = int(device)
    if isinstance(device, torch.device) and device.type != "cuda":
        raise ValueError(f"Expected a cuda device, but got: {device}")
    _parse_device(device if not isinstance(device, str) or device.startswith("cuda") else f"cuda:{device}")


class _CudaDeviceContext:
    """``with torch.cuda.device(0):`` there is only one device, so there is nothing to switch."""

    def __init__(self, device: Any) -> None:
        _check_ordinal(device)
        self.idx = 0

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


class _CudaRng:
    """cuda:0's random generator as state only: get/set/seed work (fork_rng, checkpoints of RNG state), but
    random ops on fake-CUDA tensors draw from the CPU generator (the kernels are CPU kernels)."""

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(0)

    def get_rng_state(self, device: Any = "cuda") -> torch.Tensor:
        _check_ordinal(device)
        return self.gen.get_state()

    def set_rng_state(self, new_state: torch.Tensor, device: Any = "cuda") -> None:
        _check_ordinal(device)
        self.gen.set_state(new_state.clone())

    def manual_seed(self, seed: int) -> None:
        self.gen.manual_seed(int(seed))


def _cuda_patches(undo: list[Callable[[], None]]) -> None:
    cuda = torch.cuda
    rng = _CudaRng()
    zero = lambda device=None: (_check_ordinal(device), 0)[1]  # noqa: E731
    noop = lambda device=None: _check_ordinal(device)  # noqa: E731
    for name, value in {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda device: _check_ordinal(device),
        "device": _CudaDeviceContext,
        "get_device_name": lambda device=None: (_check_ordinal(device), "fake_cuda (CPU)")[1],
        "synchronize": noop,  # CPU kernels are synchronous: nothing to wait for
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": noop,
        "memory_allocated": zero,
        "max_memory_allocated": zero,
        "memory_reserved": zero,
        "max_memory_reserved": zero,
        "get_rng_state": rng.get_rng_state,
        "set_rng_state": rng.set_rng_state,
        "get_rng_state_all": lambda: [rng.get_rng_state()],
        "set_rng_state_all": lambda states: rng.set_rng_state(states[0]),
        "manual_seed": rng.manual_seed,
        "manual_seed_all": rng.manual_seed,
    }.items():
        _patch(undo, cuda, name, value)


def _param_patch(undo: list[Callable[[], None]]) -> None:
    """nn.Parameter(cuda_tensor) builds a new tensor outside torch's dispatch: carry the mark over."""
    original = nn.Parameter.__dict__["__new__"]
    new = original.__func__ if isinstance(original, staticmethod) else original

    def __new__(cls, data=None, requires_grad=True):  # noqa: N807
        p = new(cls, data, requires_grad)
        if data is not None and data in _Shared.marks:
            _Shared.marks.add(p)
        return p

    _patch(undo, nn.Parameter, "__new__", staticmethod(__new__))


def _swap_patch(undo: list[Callable[[], None]]) -> None:
    """torch.utils.swap_tensors swaps two tensors' contents: swap their marks too.

    It refuses tensors that have weak references, so the marks (weakrefs) are dropped first."""
    original = torch.utils.swap_tensors

    @functools.wraps(original)
    def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
        m1, m2 = t1 in _Shared.marks, t2 in _Shared.marks
        _Shared.marks.discard(t1)
        _Shared.marks.discard(t2)
        try:
            original(t1, t2)
        except BaseException:
            _Shared.marks.set(t1, m1)
            _Shared.marks.set(t2, m2)
            raise
        _Shared.marks.set(t1, m2)
        _Shared.marks.set(t2, m1)

    _patch(undo, torch.utils, "swap_tensors", swap_tensors)


_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)


def _nccl_patches(undo: list[Callable[[], None]]) -> None:
    """The NCCL backend only takes CUDA tensors: check what goes through torch.distributed."""
    if not torch.distributed.is_available():
        return
    for name in _COLLECTIVES:
        original = getattr(torch.distributed, name, None)
        if original is None:
            continue

        def checked(*args: Any, __original=original, **kwargs: Any) -> Any:
            if any(t not in _Shared.marks for t in _tensors((args, kwargs))):
                raise RuntimeError(
                    f"{_NCCL_CPU_ERROR} (fake_cuda NCCL check, in torch.distributed.{__original.__name__})"
                )
            return __original(*args, **kwargs)

        _patch(undo, torch.distributed, name, functools.wraps(original)(checked))


def _install_patches(*, nccl: bool) -> list[Callable[[], None]]:
    undo: list[Callable[[], None]] = []
    try:
        _cuda_patches(undo)
        _param_patch(undo)
        _swap_patch(undo)
        if nccl:
            _nccl_patches(undo)
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise
    return undo
