"""The saved-activation meter: peak bytes autograd holds for backward.

Inside `SavedTensorsMeter()`, every tensor autograd saves for backward passes through a pack
hook. The hook wraps it in a small handle; the handle lives exactly as long as the graph keeps
the saved tensor, so its finaliser tells when autograd lets go. The meter sums live bytes and
keeps their peak. A tensor saved twice (same storage, offset, shape and stride) counts once; a
view counts its own bytes, not its whole storage, so a micro-batch slice of the input costs 1/k
of it. Parameters saved by autograd count too. The number is exact and device-independent.
The meter changes nothing else: it repeats autograd's in-place modification check on unpack.
"""
from __future__ import annotations

import weakref

import torch


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride()))


class _Saved:
    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.version = tensor._version


class SavedTensorsMeter:
    def __init__(self):
        self.current = 0
        self.peak = 0
        self._refs: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        key = _key(tensor)
        count = self._refs.get(key, 0)
        if count == 0:
            self.current += tensor.numel() * tensor.element_size()
            self.peak = max(self.peak, self.current)
        self._refs[key] = count + 1
        handle = _Saved(tensor)
        weakref.finalize(handle, self._release, key, tensor.numel() * tensor.element_size())
        return handle

    @staticmethod
    def _unpack(handle: _Saved) -> torch.Tensor:
        # Autograd skips its in-place check for tensors that went through hooks; make it here, or
        # a measured step would silently compute with weights an optimizer step already changed.
        tensor = handle.tensor
        if tensor._version != handle.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{tensor.type()} {list(tensor.shape)}] is at version "
                f"{tensor._version}; expected version {handle.version} instead.")
        return tensor

    def _release(self, key: tuple, nbytes: int) -> None:
        count = self._refs[key] - 1
        if count == 0:
            del self._refs[key]
            self.current -= nbytes
        else:
            self._refs[key] = count

    def __enter__(self) -> "SavedTensorsMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
