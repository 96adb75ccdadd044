"""Weights kept in a packed, stored form (scaled fp8, GGUF blocks) and decoded at call time.

A :class:`PackedWeight` is a ``torch.Tensor`` that reports the weight's logical
shape and a float dtype but holds no float data: it keeps the stored bytes
(memory-mapped from the file) and decodes them when an op needs values. So a
state dict of packed weights loads into an ordinary model with
``load_state_dict(..., assign=True)`` (the shape check passes, nothing is
copied), and a T5-XXL stays at its file size in memory.

Decoding:

* the ``ops`` layers (:mod:`textenc.nn.ops`) call :meth:`PackedWeight.decode`
  with the compute dtype, once per forward, and drop the result after use;
* ``F.embedding`` decodes only the rows it looks up;
* any other op (``.sum()``, ``.to()``, ``F.linear`` outside ``ops``) decodes the
  whole weight to :attr:`dtype` first, so it computes what the decoded weight
  would.

Subclasses say how bytes become values: :class:`ScaledFloat8Weight` here (torch
only); the GGUF one lives in :mod:`textenc.loading.gguf_files`.

>>> raw = torch.tensor([[1.0, -2.0]]).to(torch.float8_e4m3fn)
>>> weight = ScaledFloat8Weight(raw, torch.tensor(0.5))
>>> weight.shape, weight.dtype, weight.decode(torch.float32)
(torch.Size([1, 2]), torch.float32, tensor([[ 0.5000, -1.0000]]))
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import tree_map

from ..errors import CheckpointError

__all__ = ["PackedWeight", "ScaledFloat8Weight", "decode_weight", "float8_is_finite"]

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)

#: ``scratch(shape, dtype)``: a reusable temporary lent to :meth:`PackedWeight.decode_into`.
Scratch = Callable[[torch.Size, torch.dtype], torch.Tensor]


class PackedWeight(torch.Tensor):
    """A weight stored packed; values exist only while an op uses them.

    Subclasses implement :meth:`_decode_rows` and :attr:`stored_bytes`.
    """

    # Functions go straight to __torch_dispatch__, whose results are plain tensors.
    __torch_function__ = torch._C._disabled_torch_function_impl

    #: Whether :meth:`decode_into` writes into a caller's buffer (else only :meth:`decode`).
    decodes_into: bool = False

    @staticmethod
    def __new__(cls, *args, shape: tuple[int, ...], dtype: torch.dtype, **kwargs):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=torch.device("cpu"), requires_grad=False)

    def decode(self, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """The whole weight as a plain tensor in ``dtype`` (default :attr:`dtype`) on ``device``."""
        return self.decode_rows(slice(None), dtype).to(device=device)

    def decode_into(self, out: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        """Decode into ``out`` (contiguous, this weight's shape, the compute dtype); returns ``out``.

        Only where :attr:`decodes_into` is true; gives the bits :meth:`decode` gives.
        ``scratch(shape, dtype)``, where given, lends a reusable temporary (of a dtype other
        than ``out``'s) valid until the next call.
        """
        raise NotImplementedError(f"{type(self).__name__} decodes only into new tensors")

    def decode_rows(self, rows: slice | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``rows`` of the first dimension (a slice or an index tensor), decoded."""
        return self._decode_rows(rows, dtype or self.dtype)

    def _decode_rows(self, rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    @property
    def stored_bytes(self) -> int:
        """Bytes the packed form holds (the file's share, not a decoded copy)."""
        raise NotImplementedError

    def is_finite(self, *, rows_per_chunk: int = 1024) -> bool:
        """Whether every decoded value is finite, decoding a chunk of rows at a time."""
        for start in range(0, self.shape[0], rows_per_chunk):
            chunk = self.decode_rows(slice(start, start + rows_per_chunk), torch.float32)
            if not bool(torch.isfinite(chunk).all()):
                return False
        return True

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"stored_bytes={self.stored_bytes})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default:
            # Parameter(packed) and load_state_dict(assign=True) detach: keep the object.
            return args[0]
        if func is torch.ops.aten.embedding.default and isinstance(args[0], PackedWeight):
            weight, indices = args[0], args[1]
            flat = indices.reshape(-1)
            return weight.decode_rows(flat).reshape(*indices.shape, weight.shape[-1])
        unpacked = tree_map(lambda x: x.decode() if isinstance(x, PackedWeight) else x, (args, kwargs))
        return func(*unpacked[0], **unpacked[1])


class ScaledFloat8Weight(PackedWeight):
    """A float8 weight times one scale: ComfyUI's scaled fp8 (``scale_weight``) and its
    ``comfy_quant`` float8 tensorwise format (``weight_scale``).

    Decoding is ``raw.to(dtype) * scale.to(dtype)``: both cast to the compute dtype,
    then multiplied in it, as comfy_kitchen's ``dequantize_per_tensor_fp8`` (which
    ComfyUI's mixed-precision ops call for these layers) computes it.

    Args:
        raw: The stored ``float8_e4m3fn`` / ``float8_e5m2`` tensor (kept, not copied).
        scale: A one-element tensor.
        dtype: The dtype :meth:`decode` gives by default (and ``.dtype`` reports).
    """

    def __new__(cls, raw: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        return super().__new__(cls, shape=tuple(raw.shape), dtype=dtype)

    def __init__(self, raw: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        if raw.dtype not in _FLOAT8:
            raise CheckpointError(f"raw must be float8_e4m3fn or float8_e5m2, got {raw.dtype}")
        if scale.numel() != 1:
            raise CheckpointError(f"scale must hold one value, got shape {tuple(scale.shape)}")
        self.raw, self.scale = raw, scale.reshape(())

    decodes_into = True

    def _decode_rows(self, rows, dtype):
        return self.raw[rows].to(dtype) * self.scale.to(dtype)

    def decode_into(self, out: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
        # Every code's value computed as _decode_rows computes it (exact float8 -> dtype,
        # then one rounded multiply in dtype), into a 256-entry table, then gathered: the
        # same bits, at about a third of the CPU time of converting element by element.
        codes = torch.arange(256, dtype=torch.uint8).view(self.raw.dtype)
        table = codes.to(out.dtype) * self.scale.to(out.dtype)
        flat = self.raw.reshape(-1).view(torch.uint8)
        index = scratch(flat.shape, torch.int32) if scratch else torch.empty(flat.shape, dtype=torch.int32)
        torch.index_select(table, 0, index.copy_(flat), out=out.view(-1))
        return out

    @property
    def stored_bytes(self) -> int:
        return self.raw.numel() * self.raw.element_size()

    def is_finite(self, *, rows_per_chunk: int = 1024) -> bool:
        scale = self.scale.float()
        if not bool(torch.isfinite(scale)) or not float8_is_finite(self.raw, rows_per_chunk=rows_per_chunk):
            return False
        if bool(torch.isfinite(scale.abs() * torch.finfo(self.raw.dtype).max)):
            return True  # no finite float8 value times this scale can overflow float32
        return super().is_finite(rows_per_chunk=rows_per_chunk)


#: Exponent-and-mantissa bits that are all ones in a float8 NaN (e4m3fn) or inf/NaN (e5m2).
_FLOAT8_NONFINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def float8_is_finite(tensor: torch.Tensor, *, rows_per_chunk: int = 1024) -> bool:
    """Whether a float8 tensor holds no NaN or infinity, read from its bit patterns a chunk
    of rows at a time (no float32 copy of the weight).

    >>> float8_is_finite(torch.tensor([1.0, 448.0]).to(torch.float8_e4m3fn))
    True
    """
    mask = _FLOAT8_NONFINITE[tensor.dtype]
    bits = tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1).view(torch.uint8)
    return not any(bool(((bits[i:i + rows_per_chunk] & mask) == mask).any())
                   for i in range(0, bits.shape[0], rows_per_chunk))


def decode_weight(weight: torch.Tensor | None, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> torch.Tensor | None:
    """``weight`` decoded to ``dtype`` when packed; other tensors are returned as they are."""
    if isinstance(weight, PackedWeight):
        return weight.decode(dtype, device)
    return weight
