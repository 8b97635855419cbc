"""A stand-in CUDA device on the CPU, so that CI (no GPU) catches device mixing.

Inside `FakeCuda()` (a TorchFunctionMode), a tensor asked for on "cuda" — a
factory's `device="cuda"`, `.to("cuda")`, `.cuda()`, `module.to("cuda")` — is
made on the CPU but marked as living on the compute side: it reports
`device == cuda:0` and `is_cuda`, `.numpy()` refuses it, and `.to("cpu")` /
`.cpu()` give an unmarked copy. Any other operation that combines a marked
tensor with an unmarked one of one or more dimensions raises `DeviceMixError`,
where CUDA raises "Expected all tensors to be on the same device". Copies
(`copy_`, `.to`) are the only crossings, as on a real device; 0-dim CPU tensors
mix freely, as CUDA allows.

The mark belongs to the storage (views, in-place results and a parameter whose
`.data` was replaced share it) and dies with it. Results of an operation are
marked exactly when one of its inputs is.
"""

import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
_CPU = torch.device("cpu")
_BASE = torch._C.TensorBase
# dst.copy_(src) crosses devices on CUDA too; module.to asks whether a parameter can take the moved tensor's place
_COPIES = {_BASE.copy_, torch._has_compatible_shallow_copy_type}


def _getter(func, attribute: str) -> bool:
    """Whether `func` reads the tensor property `attribute` (a getset descriptor's __get__)."""
    return getattr(func, "__self__", None) is getattr(_BASE, attribute) and func.__name__ == "__get__"


def _setter(func, attribute: str) -> bool:
    return getattr(func, "__self__", None) is getattr(_BASE, attribute) and func.__name__ == "__set__"


class DeviceMixError(RuntimeError):
    pass


def _device_of(value) -> torch.device | None:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    return None


class FakeCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}
        self.crossings = 0  # tensors moved to the compute side: proof that the mode saw the run

    # ------------------------------------------------------------------ marks

    def marked(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() == 0:
            return False
        storage = tensor.untyped_storage()
        ref = self._marked.get(id(storage))
        return ref is not None and ref() is storage

    def _mark(self, tensor: torch.Tensor, on_compute: bool) -> None:
        if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() == 0:
            return
        storage = tensor.untyped_storage()
        if on_compute:
            self._marked[id(storage)] = weakref.ref(storage)
        else:
            self._marked.pop(id(storage), None)

    # ------------------------------------------------------------------ dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _getter(func, "device"):
            return CUDA if self.marked(args[0]) else func(*args)
        if _getter(func, "is_cuda"):
            return self.marked(args[0])
        if func is _BASE.numpy and self.marked(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy (FakeCuda)")
        if func in (_BASE.to, _BASE.cuda, _BASE.cpu):
            return self._move(func, args, kwargs)
        target = _device_of(kwargs.get("device"))
        if target is not None and target.type == "cuda":  # a factory on the compute device
            kwargs["device"] = _CPU
            out = func(*args, **kwargs)
            self._mark_outputs(out, True)
            return out
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_compute = [t for t in tensors if self.marked(t)]
        crossing = func in _COPIES or _setter(func, "data")  # `param.data = t`: param takes t's storage
        if on_compute and not crossing:
            plain = [t for t in tensors if not self.marked(t) and t.dim() > 0 and t.numel() > 0
                     and t.device.type == "cpu"]
            if plain:
                name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
                raise DeviceMixError(f"{name}: tensors on cuda:0 and cpu mixed "
                                     f"(cpu shapes {[tuple(t.shape) for t in plain]})")
        out = func(*args, **kwargs)
        if crossing:
            return out  # the destination keeps its storage's side
        self._mark_outputs(out, bool(on_compute))
        return out

    def _mark_outputs(self, out, on_compute: bool) -> None:
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._mark(value, on_compute)

    def _move(self, func, args, kwargs):
        source = args[0]
        if func is _BASE.cuda:
            target = CUDA
            args, kwargs = (source,), {}
            func = _BASE.to
            args = (source, _CPU)
        elif func is _BASE.cpu:
            target = _CPU
        else:
            target = None
            rest = list(args[1:])
            for index, value in enumerate(rest):
                if isinstance(value, torch.Tensor):  # .to(other): other's device and dtype
                    target = CUDA if self.marked(value) else value.device
                    rest[index] = value.dtype
                elif _device_of(value) is not None and not isinstance(value, int):
                    target = _device_of(value)
                    rest[index] = _CPU
            if "device" in kwargs and kwargs["device"] is not None:
                target = _device_of(kwargs["device"])
                kwargs["device"] = _CPU
            args = (source, *rest)
        was_marked = self.marked(source)
        out = func(*args, **kwargs)
        if target is None or target.type == "meta":
            if target is None:
                self._mark(out, was_marked)
            return out
        to_compute = target.type == "cuda"
        if to_compute != was_marked:  # a real crossing makes a new tensor
            if out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                out = out.clone()
            if to_compute:
                self.crossings += 1
        self._mark(out, to_compute)
        return out
