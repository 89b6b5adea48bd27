"""The saved-activation meter: peak bytes autograd holds for backward.

Inside `SavedTensorsMeter()`, every tensor autograd saves for backward passes through a pack
hook. The hook wraps it in a small handle; the handle lives exactly as long as the graph keeps
the saved tensor, so its finaliser tells when autograd lets go. The meter sums live bytes and
keeps their peak. A tensor saved twice (same storage, offset, shape and stride) counts once; a
view counts its own bytes, not its whole storage, so a micro-batch slice of the input costs 1/k
of it. Parameters saved by autograd count too. The number is exact and device-independent.
The meter changes nothing else: it repeats autograd's in-place modification check on unpack.

Under activation checkpointing (runner.execution.recompute; torch.utils.checkpoint, non-reentrant),
saved-tensor hooks nest and the innermost wins, so the meter sees what checkpoint itself keeps:
each checkpointed block's inputs (checkpoint saves them outside its own hooks), and nothing of
what the block saves inside (checkpoint's hooks keep an empty holder instead). What the meter
would miss is the backward: when backward reaches a block, checkpoint runs its forward again and
holds every tensor the block saves until the block's backward has used it. `recomputation()`
counts those, on top of what the graph holds at that moment, so the peak under checkpointing is
max(the forward's peak, the graph's bytes + one block's recomputed tensors) and not the forward's
alone (one checkpointed block around a whole model saves nothing, and the meter says so).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, List

import torch


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride()))


class _Saved:
    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.version = tensor._version


class SavedTensorsMeter:
    """Inside `with SavedTensorsMeter() as meter:`, meter.peak is the peak of saved bytes."""

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

    def recomputed(self, tensors: dict, tensor: torch.Tensor) -> None:
        """A tensor a recomputation saves: counted once, on top of what the graph holds now."""
        key = _key(tensor)
        if key not in self._refs and key not in tensors:  # an input checkpoint kept is counted already
            tensors[key] = tensor.numel() * tensor.element_size()
            self.peak = max(self.peak, self.current + sum(tensors.values()))

    def __enter__(self) -> "SavedTensorsMeter":
        self._hooks.__enter__()
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        self._hooks.__exit__(*exc)


_active: List[SavedTensorsMeter] = []  # the meters measuring now, innermost last


@contextmanager
def recomputation() -> Iterator[None]:
    """Around a checkpointed block's recomputation in backward: the innermost meter counts it."""
    # The block's recomputed tensors are all held when its recomputation ends and let go one by
    # one as its backward uses them, so that moment is the block's peak: counting them at pack
    # time, then forgetting them, gives it exactly (blocks are recomputed one after another).
    # checkpoint's recomputation hooks are the innermost here and must still see every tensor,
    # so the meter's hook calls theirs. torch has no public way to read the innermost hooks;
    # where its private one is missing, the recomputation goes uncounted.
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if _active and top is not None else None
    meter = _active[-1] if _active else None
    if hooks is None or getattr(hooks[0], "__self__", None) is meter:  # no meter, or no hooks between
        yield
        return
    pack, unpack = hooks
    tensors: dict = {}  # this recomputation's new tensors: key -> bytes

    def counted(tensor: torch.Tensor):
        meter.recomputed(tensors, tensor)
        return pack(tensor)

    with torch.autograd.graph.saved_tensors_hooks(counted, unpack):
        yield
