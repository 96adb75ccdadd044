"""Attention backends behind one device-aware entry point.

Every backend is a plain function with the signature
``(q, k, v, heads, mask=None, *, causal=False) -> out`` over
``(batch, tokens, heads * head_dim)`` tensors; ``mask`` is an additive float
mask broadcastable to ``(batch, heads, query_tokens, key_tokens)``
(``-inf``/``-finfo.max`` blocks a position, ``0`` lets it through), or
``None``. ``causal=True`` additionally blocks every key after the query's own
position (query ``i`` sees keys ``0..i``): backends that have a causal kernel
(SDPA, xformers) then skip the blocked half instead of reading a mask.

:func:`optimized_attention_for_device` picks a backend *at call time* from the
device, the arguments and an explicit override; nothing is probed at import.

Override order (first wins):

1. the ``backend=`` argument;
2. the ``TEXTENC_ATTENTION`` environment variable (``sdpa``, ``xformers``,
   ``bmm``, ``split``, ``basic``; empty or ``auto`` means automatic);
3. automatic: xformers on CUDA for large inputs when it is importable;
   per-sequence matmuls (``bmm``) for short fp32 sequences on CPU (CLIP
   text); else torch SDPA, else split attention.

An explicitly requested backend that cannot run raises
:class:`~textenc.errors.BackendUnavailableError` naming the device, the fix and every
accepted value (``auto`` included); an automatic choice falls back and logs why.

>>> import torch
>>> q = k = v = torch.randn(1, 5, 8)
>>> attention = optimized_attention_for_device("cpu", backend="basic")
>>> attention(q, k, v, heads=2).shape
torch.Size([1, 5, 8])
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError

__all__ = [
    "AttentionFunction",
    "ATTENTION_BACKENDS",
    "ACCEPTED_VALUES",
    "ENV_VAR",
    "attention_basic",
    "attention_bmm",
    "attention_sdpa",
    "attention_split",
    "attention_xformers",
    "available_backends",
    "select_backend",
    "optimized_attention_for_device",
]

logger = logging.getLogger(__name__)

ENV_VAR = "TEXTENC_ATTENTION"
#: Query rows processed together by split attention; bounds its peak memory to
#: about ``batch * heads * SPLIT_QUERY_CHUNK * key_tokens`` floats.
SPLIT_QUERY_CHUNK = 1024
#: Longest key sequence for which the automatic choice on CPU is ``bmm``. At 77
#: tokens (CLIP text) it takes 20-30% less time than torch's flash kernel
#: (fp32, batch 1-64, one thread); at 257 (CLIP vision) it is 5-15% slower.
BMM_MAX_TOKENS = 128
#: Most torch CPU threads for which the automatic choice is ``bmm``: it runs
#: one sequence at a time, parallel only across heads. At 1 and 2 threads it
#: measured faster than the flash kernel at batch 1-64 (2 threads, batch 16:
#: 2.3 vs 2.5 ms); more threads were not measured, and there the flash
#: kernel's parallel loop over sequences x heads x query blocks stays.
BMM_MAX_THREADS = 2


class AttentionFunction(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 heads: int, mask: torch.Tensor | None = None, *,
                 causal: bool = False) -> torch.Tensor: ...


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (batch, tokens, heads*dim) -> (batch, heads, tokens, dim)
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (batch, heads, tokens, dim) -> (batch, tokens, heads*dim)
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"attention expects (batch, tokens, width) tensors, got {tuple(q.shape)}")
    if q.shape[-1] % heads:
        raise ValueError(f"width {q.shape[-1]} is not divisible by {heads} heads")


def _mask_for_heads(mask: torch.Tensor | None) -> torch.Tensor | None:
    # Accept (tq, tk), (batch, tq, tk) or (batch, 1|heads, tq, tk).
    if mask is not None and mask.dim() == 3:
        return mask.unsqueeze(1)
    return mask


def _with_causal(mask: torch.Tensor | None, queries: int, keys: int,
                 dtype: torch.dtype, device) -> torch.Tensor:
    """``mask`` (or no mask) with keys after each query's position blocked."""
    blocked = torch.finfo(dtype).min
    causal = torch.full((queries, keys), blocked, dtype=dtype, device=device).triu_(1)
    if mask is None:
        return causal
    # masked_fill, not a sum: two blocked entries added would overflow to -inf.
    return _mask_for_heads(mask).to(dtype).masked_fill(causal != 0, blocked)


def attention_basic(q, k, v, heads, mask=None, *, causal=False):
    """Reference attention: explicit softmax(q·kᵀ/√d + mask)·v, scores in fp32."""
    _check_shapes(q, k, heads)
    if causal:
        mask = _with_causal(mask, q.shape[1], k.shape[1], torch.float32, q.device)
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(qh.shape[-1])
    # Scores and softmax in fp32: fp16 logits overflow for long sequences.
    scores = torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * scale
    mask = _mask_for_heads(mask)
    if mask is not None:
        scores = scores + mask.float()
    probs = scores.softmax(dim=-1).to(vh.dtype)
    return _merge_heads(torch.matmul(probs, vh))


def attention_sdpa(q, k, v, heads, mask=None, *, causal=False):
    """torch's fused ``scaled_dot_product_attention``."""
    _check_shapes(q, k, heads)
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    if causal and mask is not None:
        # SDPA takes a mask or is_causal, not both.
        mask, causal = _with_causal(mask, q.shape[1], k.shape[1], qh.dtype, q.device), False
    # is_causal aligns the triangle top-left, which is the convention here only
    # when queries and keys are the same rows.
    if causal and q.shape[1] != k.shape[1]:
        mask, causal = _with_causal(None, q.shape[1], k.shape[1], qh.dtype, q.device), False
    mask = _mask_for_heads(mask)
    if mask is not None and mask.dtype != qh.dtype:
        mask = mask.to(qh.dtype)
    # is_causal lets the CPU flash kernel skip the blocked blocks (about 3.7x
    # faster than reading an explicit (T, T) mask at batch 4, 77 tokens).
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal)
    return _merge_heads(out)


def attention_bmm(q, k, v, heads, mask=None, *, causal=False):
    """Per-sequence matmul attention: softmax(q·kᵀ/√d + mask)·v, one sequence at a time.

    Each sequence's heads are strided views of ``(tokens, width)`` rows, so
    nothing is transposed into a copy; the (heads, tq, tk) scores stay in
    cache. Short sequences on CPU run faster this way than through torch's
    flash kernel, whose 32-row query blocks are too small to use the matmul
    units well. Results agree with SDPA to rounding (about 1e-6 at width 768).
    """
    _check_shapes(q, k, heads)
    batch, queries, width = q.shape
    keys, dim = k.shape[1], width // heads
    bias = _with_causal(mask, queries, keys, q.dtype, q.device) if causal else _mask_for_heads(mask)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    scale = 1.0 / math.sqrt(dim)
    out = torch.empty(batch, queries, heads, dim, dtype=q.dtype, device=q.device)
    for b in range(batch):
        # (tokens, width) -> (heads, tokens, dim) views
        qh, kh, vh = (t[b].unflatten(-1, (heads, dim)).transpose(0, 1) for t in (q, k, v))
        if bias is None:
            scores = torch.matmul(qh, kh.transpose(1, 2)).mul_(scale)
        else:
            rows = bias if bias.dim() == 2 else bias[b if bias.shape[0] > 1 else 0]
            scores = torch.baddbmm(rows, qh, kh.transpose(1, 2), alpha=scale)
        # A contiguous result copied in beats matmul(out=) on the strided view
        # (51 vs 59 us per sequence at CLIP-L), and autograd records the copy.
        out[b] = torch.matmul(scores.softmax(dim=-1), vh).transpose(0, 1)
    return out.view(batch, queries, width)


def attention_split(q, k, v, heads, mask=None, *, causal: bool = False,
                    query_chunk: int = SPLIT_QUERY_CHUNK):
    """Attention over chunks of query rows, so peak memory stays bounded."""
    _check_shapes(q, k, heads)
    if causal:
        mask = _with_causal(mask, q.shape[1], k.shape[1], torch.float32, q.device)
    qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
    mask = _mask_for_heads(mask)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    kt = kh.transpose(-1, -2)
    out = torch.empty_like(qh)
    for start in range(0, qh.shape[2], query_chunk):
        stop = start + query_chunk
        scores = torch.matmul(qh[:, :, start:stop].float(), kt.float()) * scale
        if mask is not None:
            scores = scores + mask[..., start:stop, :].float()
        out[:, :, start:stop] = torch.matmul(scores.softmax(dim=-1).to(vh.dtype), vh)
    return _merge_heads(out)


def attention_xformers(q, k, v, heads, mask=None, *, causal=False):
    """xformers' memory-efficient attention (CUDA only)."""
    import xformers.ops  # imported only when this backend is chosen

    _check_shapes(q, k, heads)
    if causal and mask is None and q.shape[1] == k.shape[1]:
        batch, tokens, width = q.shape
        qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, width // heads) for t in (q, k, v))
        out = xformers.ops.memory_efficient_attention(
            qh, kh, vh, attn_bias=xformers.ops.LowerTriangularMask())
        return out.reshape(batch, tokens, width)
    if causal:
        mask = _with_causal(mask, q.shape[1], k.shape[1], q.dtype, q.device)
    batch, tokens, width = q.shape
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, width // heads) for t in (q, k, v))
    bias = None
    if mask is not None:
        # xformers wants a bias with the full (batch, heads, tq, tk) shape whose
        # last dimension is padded to a multiple of 8 in memory.
        bias_shape = (batch, heads, tokens, k.shape[1])
        padded = -(-k.shape[1] // 8) * 8
        storage = torch.zeros(bias_shape[:-1] + (padded,), dtype=q.dtype, device=q.device)
        storage[..., : k.shape[1]] = _mask_for_heads(mask).to(q.dtype).expand(bias_shape)
        bias = storage[..., : k.shape[1]]
    out = xformers.ops.memory_efficient_attention(qh, kh, vh, attn_bias=bias)
    return out.reshape(batch, tokens, width)


ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "xformers": attention_xformers,
    "sdpa": attention_sdpa,
    "bmm": attention_bmm,
    "split": attention_split,
    "basic": attention_basic,
}

#: Every value ``backend=`` and ``$TEXTENC_ATTENTION`` accept.
ACCEPTED_VALUES = ("auto", *ATTENTION_BACKENDS)


def _check_override(override: str, available: dict[str, bool], device: str, requested_by: str) -> None:
    """Raise BackendUnavailableError when ``override`` is unknown or cannot run on ``device``."""
    accepted = ", ".join(ACCEPTED_VALUES)
    runnable = ", ".join(["auto"] + [name for name in ATTENTION_BACKENDS if available[name]])
    if override not in ATTENTION_BACKENDS:
        raise BackendUnavailableError(
            f"unknown attention backend {override!r} ({requested_by}); accepted values are {accepted} "
            f"(argument backend= or ${ENV_VAR})")
    if available[override]:
        return
    if override == "xformers" and not device.startswith("cuda"):
        why = f"xformers runs only on CUDA devices and this device is {device!r}"
    elif override == "xformers":
        why = f"xformers is not installed (device {device!r}): pip install 'textenc[xformers]'"
    else:
        why = (f"this torch has no scaled_dot_product_attention (device {device!r}): "
               "upgrade torch")
    raise BackendUnavailableError(
        f"attention backend {override!r} was requested ({requested_by}) but cannot run: {why}; "
        f"on this device use one of {runnable} (accepted values: {accepted})")


def _xformers_importable() -> bool:
    return importlib.util.find_spec("xformers") is not None


def _sdpa_present() -> bool:
    return hasattr(F, "scaled_dot_product_attention")


def _cpu_threads() -> int:
    return torch.get_num_threads()


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on ``device`` in this environment."""
    device_type = torch.device(device).type
    names = []
    if device_type == "cuda" and _xformers_importable():
        names.append("xformers")
    if _sdpa_present():
        names.append("sdpa")
    return names + ["bmm", "split", "basic"]


def select_backend(
    device_type: str,
    *,
    mask: bool = False,
    small_input: bool = False,
    override: str | None = None,
    xformers_available: bool = False,
    sdpa_available: bool = True,
    dtype: torch.dtype | None = None,
    tokens: int | None = None,
    threads: int = 1,
    device_name: str | None = None,
    requested_by: str | None = None,
) -> str:
    """Pure selection rule: the backend name for the given facts.

    ``dtype`` and ``tokens`` (the key sequence length), when the caller knows
    them, let short fp32 sequences on CPU take ``bmm`` when torch runs at most
    :data:`BMM_MAX_THREADS` CPU ``threads``. ``device_name`` (``"cuda:1"``) and
    ``requested_by`` (``"backend='x'"``, ``"$TEXTENC_ATTENTION=x"``) only make
    error messages exact.

    Raises:
        BackendUnavailableError: ``override`` names an unknown backend or one
            that cannot run with these facts; the message names the device
            and lists every accepted value (``auto`` included) and those that
            can run here.
    """
    available = {"split": True, "basic": True, "bmm": True, "sdpa": sdpa_available,
                 "xformers": xformers_available and device_type == "cuda"}
    if override:
        _check_override(override, available, device_name or device_type,
                        requested_by or f"backend={override!r}")
        return override
    # Short sequences (CLIP text: 77 tokens) gain nothing from xformers' kernel
    # launch overhead; torch's fused SDPA is fastest there on CUDA and MPS.
    if device_type == "cuda" and available["xformers"] and not small_input:
        return "xformers"
    # On CPU in fp32, per-sequence matmuls beat the flash kernel (see
    # BMM_MAX_TOKENS); in bf16 the flash kernel is 1.6x faster than bmm.
    if device_type == "cpu" and small_input and dtype == torch.float32 \
            and tokens is not None and tokens <= BMM_MAX_TOKENS and threads <= BMM_MAX_THREADS:
        return "bmm"
    if available["sdpa"]:
        return "sdpa"
    logger.info("torch SDPA missing; using split attention on %s", device_type)
    return "split"


def optimized_attention_for_device(
    device: torch.device | str,
    mask: bool = False,
    small_input: bool = False,
    *,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
    tokens: int | None = None,
) -> AttentionFunction:
    """Return the fastest attention function for ``device`` (see module docs).

    Args:
        device: where the tensors live (``"cpu"``, ``"cuda"``, ``"mps"``, ...).
        mask: whether calls will pass a mask.
        small_input: whether sequences are short (CLIP text).
        backend: explicit backend name; overrides ``$TEXTENC_ATTENTION``.
        dtype: the dtype of q/k/v, when known.
        tokens: the key sequence length, when known.

    Raises:
        BackendUnavailableError: the requested backend cannot run here.
    """
    environment = os.environ.get(ENV_VAR, "").strip().lower()
    override = backend or environment or None
    requested_by = f"backend={backend!r}" if backend else f"${ENV_VAR}={environment}"
    if override == "auto":
        override = None
    torch_device = torch.device(device)
    device_type = torch_device.type
    xformers_ok = device_type == "cuda" and _xformers_importable()
    name = select_backend(device_type, mask=mask, small_input=small_input,
                          override=override, xformers_available=xformers_ok,
                          sdpa_available=_sdpa_present(), dtype=dtype, tokens=tokens,
                          threads=_cpu_threads() if device_type == "cpu" else 1,
                          device_name=str(torch_device), requested_by=requested_by)
    if backend is None and override is None and device_type == "cuda" and not xformers_ok:
        logger.debug("xformers not importable; using %s on cuda", name)
    return ATTENTION_BACKENDS[name]
