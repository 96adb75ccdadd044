"""A reusable buffer for the weight casts of ``manual_cast`` layers on CPU.

Casting an fp16 (or scaled fp8) weight to fp32 per Linear allocates a fresh
fp32 tensor each time: for T5-XXL's 10240 x 4096 feed-forward that is 168 MB,
above glibc's mmap threshold, so every cast maps new pages, the kernel zeroes
them on first touch and they are unmapped again after the Linear. Measured on
a 2-core AMD EPYC at 2 threads, a T5-XXL block's seven fresh casts take 0.7-0.9 s
of CPU time, the same casts into a reused buffer 0.1-0.15 s (its GEMMs: 0.9 s at
77 tokens, 2 s at 256).

Inside :func:`reuse_cast_buffer` the layers cast weights into one buffer
instead, sized to the largest weight seen, filled with ``copy_`` (or a packed
weight's :meth:`~textenc.nn.packed.PackedWeight.decode_into`). The values are
the ones ``tensor.to(dtype)`` (or ``decode``) gives, at the same (allocator)
alignment, so the matrix multiply that follows returns the same bits. Memory:
one buffer of the largest weight in the compute dtype per encoding thread (plus
one int32 buffer of it for scaled fp8), freed when the block exits; the weights
themselves stay as stored.

Safety: a cast into the buffer is valid only until the next one, so only a
layer's *weight* uses it (the bias, cast in the same forward, does not), and
only when the cast weight dies with the op (no autograd graph keeps it). The
buffer belongs to the thread that opened the context: the context is a
``ContextVar`` (each thread has its own) and the buffer checks its owner, so a
context copied into another thread falls back to plain casts.

>>> import torch
>>> weight = torch.randn(3, 4).half()
>>> with reuse_cast_buffer():
...     cast = cast_into_buffer(weight, torch.float32) if can_cast_into_buffer(weight) else None
>>> torch.equal(cast, weight.float())
True
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from typing import Iterator

import torch

from .packed import PackedWeight

__all__ = ["CastBuffer", "reuse_cast_buffer", "can_cast_into_buffer", "cast_into_buffer"]


class CastBuffer:
    """One growing flat buffer per dtype, owned by the thread that made it.

    The weight's cast takes the compute dtype's; a packed weight's decoding may take
    another dtype's for its temporaries (scaled fp8: int32 table indices).
    """

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``shape`` view at the buffer's start (its old contents are overwritten)."""
        numel = math.prod(shape)
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < numel:
            self._flat.pop(dtype, None)  # free the smaller one before allocating
            flat = self._flat[dtype] = torch.empty(numel, dtype=dtype)
        return flat[:numel].view(shape)


_CURRENT: contextvars.ContextVar[CastBuffer | None] = contextvars.ContextVar("textenc_cast_buffer", default=None)


@contextlib.contextmanager
def reuse_cast_buffer() -> Iterator[None]:
    """Within the block, ``manual_cast`` layers cast CPU weights into one reused buffer.

    Nested uses share the outer buffer; it is freed when the outermost block exits.
    """
    if _CURRENT.get() is not None:
        yield
        return
    token = _CURRENT.set(CastBuffer())
    try:
        yield
    finally:
        _CURRENT.reset(token)


def can_cast_into_buffer(tensor: torch.Tensor) -> bool:
    """Whether :func:`cast_into_buffer` applies to ``tensor`` here: a :func:`reuse_cast_buffer`
    block is open in this thread, the weight is on the CPU, no autograd graph would keep
    the cast, and a packed weight can decode in place."""
    buffer = _CURRENT.get()
    if buffer is None or buffer.owner != threading.get_ident() or tensor.device.type != "cpu":
        return False
    if tensor.requires_grad and torch.is_grad_enabled():
        return False
    return not isinstance(tensor, PackedWeight) or tensor.decodes_into


def cast_into_buffer(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` cast to ``dtype`` in this thread's buffer, valid until the next call.

    Call only where :func:`can_cast_into_buffer` is true.
    """
    buffer = _CURRENT.get()
    target = buffer.take(tensor.shape, dtype)
    if isinstance(tensor, PackedWeight):
        return tensor.decode_into(target, scratch=buffer.take)  # its temporaries are other dtypes
    return target.copy_(tensor)
