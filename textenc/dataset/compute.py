"""Compute settings of a dataset run: torch threads per process and the compute dtype.

A shard's bytes depend on these (matmul kernels split their work, and so
their rounding, by thread count and dtype), so a run records them in its
manifest and every encoding process (the local engine, each Ray actor, the
driver for ``empty.safetensors``) applies the same ones.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import DatasetError

__all__ = ["COMPUTE_DTYPES", "DEFAULT_THREADS", "resolve_compute_dtype", "torch_dtype", "torch_threads",
           "cpu_has_bf16_units"]

COMPUTE_DTYPES = ("fp32", "bf16", "fp16", "auto")
# One thread per process unless asked: the same default for the local engine and
# every Ray actor, so equal settings give equal bytes on any machine.
DEFAULT_THREADS = 1
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16_units() -> bool:
    """True when torch reports native bf16 arithmetic on this CPU (AVX512-BF16 or AMX-BF16)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe is not None and probe())


def resolve_compute_dtype(name: str, device: str) -> str:
    """``fp32|bf16|fp16|auto`` on ``device`` → the dtype name that will be used.

    Raises:
        DatasetError: an unknown name, ``bf16`` on a CPU without bf16 units
            (it would run emulated, slower than fp32), ``fp16`` off CUDA.
    """
    if name not in COMPUTE_DTYPES:
        raise DatasetError(f"compute_dtype {name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    on_cuda = device.startswith("cuda")
    if name == "auto":
        if on_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16_units() else "fp32"
    if name == "bf16" and not on_cuda and not cpu_has_bf16_units():
        raise DatasetError("--compute-dtype bf16: torch reports no bf16 units on this CPU "
                           "(needs AVX512-BF16 or AMX); it would run emulated, slower than fp32. "
                           "Use --compute-dtype fp32")
    if name == "fp16" and not on_cuda:
        raise DatasetError(f"--compute-dtype fp16 runs on CUDA only (device {device!r}); "
                           "use fp32, or bf16 on a CPU with bf16 units")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """``"fp32"`` → ``torch.float32`` (and bf16, fp16)."""
    return _TORCH_DTYPES[name]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
