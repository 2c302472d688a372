"""A second device on a CPU-only machine, strict about device mixing as CUDA is.

CI has no GPU, and on one device a forgotten ``.to(device)`` is invisible: every tensor is
on the CPU anyway. Inside ``standin_device()`` tensors can live on a stand-in device (the
``meta`` device type, chosen because torch accepts it without hardware): they carry real
CPU data, so values, ``.item()`` and ``.cpu()`` work, but every op that mixes a stand-in
tensor with a CPU tensor raises the error CUDA raises ("Expected all tensors to be on the
same device"), and ``.numpy()`` of a stand-in tensor fails as it does for a CUDA tensor.
The exceptions are CUDA's own: 0-dim CPU tensors (scalars), CPU index tensors in indexing,
and copies between devices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

STANDIN = torch.device("meta")
# Ops whose tensor arguments CUDA lets live on another device.
CROSS_DEVICE = {"copy_", "_to_copy", "_copy_from", "_copy_from_and_resize"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}  # indices may be on the CPU


class StandInTensor(torch.Tensor):
    """A tensor that reports the stand-in device and holds its data in a CPU tensor."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> StandInTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=STANDIN, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"StandInTensor({self.inner!r})"

    def tolist(self) -> Any:  # as on CUDA: a copy to the host
        return self.inner.tolist()

    def numpy(self, *, force: bool = False) -> Any:  # as on CUDA: the host must copy it first
        raise TypeError(f"can't convert {STANDIN} (stand-in accelerator) device type tensor to numpy. "
                        "Use Tensor.cpu() to copy the tensor to host memory first.")

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        return self.numpy()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # only under StandInMode


def _on_standin(device: Any) -> bool:
    return device is not None and torch.device(device).type == STANDIN.type


class StandInFactories(TorchFunctionMode):
    """Factory calls asked for the stand-in device (``torch.tensor(data, device=...)`` copies
    to the device outside the dispatcher) build on the CPU and wrap the result."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if not _on_standin(kwargs.get("device")):
            return func(*args, **kwargs)
        kwargs["device"] = torch.device("cpu")
        return tree_map(_wrap, func(*args, **kwargs))


class StandInMode(TorchDispatchMode):
    """Runs every op on the CPU data, checking devices first as CUDA would."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = func.overloadpacket.__name__
        if name == "_fused_sdp_choice":
            return 0  # the math attention kernel: composite, so it runs on the CPU data
        target = kwargs.get("device")
        to_standin = _on_standin(target)
        if to_standin:
            kwargs["device"] = torch.device("cpu")
        checked = args[:1] + args[2:] if name in INDEX_OPS else (args, kwargs)
        tensors = [t for t in tree_flatten(checked)[0] if isinstance(t, torch.Tensor)]
        if any(t.is_meta and not isinstance(t, StandInTensor) for t in tensors):
            raise RuntimeError(f"{func}: a data-less tensor on {STANDIN}, made by a path the stand-in "
                               "does not intercept")
        standin = any(isinstance(t, StandInTensor) for t in tree_flatten((args, kwargs))[0])
        if standin and name not in CROSS_DEVICE:
            mixed = [t for t in tensors if not isinstance(t, StandInTensor) and t.dim() > 0]
            if mixed:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                                   f"devices, {STANDIN} (stand-in accelerator) and cpu! ({func}, a CPU "
                                   f"tensor of shape {tuple(mixed[0].shape)})")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if name == "_local_scalar_dense":
            return out
        if name == "_to_copy" and target is not None:
            wrap = to_standin
        else:
            wrap = to_standin or standin
        return tree_map(_wrap, out) if wrap else out


def _unwrap(t: Any) -> Any:
    return t.inner if isinstance(t, StandInTensor) else t


def _wrap(t: Any) -> Any:
    return StandInTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, StandInTensor) else t


@contextlib.contextmanager
def standin_device() -> Iterator[torch.device]:
    """The stand-in device, usable for the duration of the block."""
    with StandInFactories(), StandInMode():
        yield STANDIN
