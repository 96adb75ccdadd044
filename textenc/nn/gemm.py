"""How a Linear multiplies: ``F.linear``, or on CPU its large fp32 GEMMs in column blocks.

With a few prompt tokens and a large weight (T5-XXL: 77 or 256 rows against 4096 x 4096 and
10240 x 4096 weights) MKL's own threading of one ``sgemm`` leaves much of the machine idle.
Measured on a 2-core AMD EPYC (Zen 3, AVX2, 2.45 GHz: 78 GFLOP/s peak per core) at 2 threads,
``F.linear`` reaches 51-59 GFLOP/s at 77 rows and 77-83 at 256; the same product cut into
blocks of 512 output columns, each a single-threaded ``sgemm``, handed to the threads as they
finish, reaches 97-103 and 107-121 (1.4-1.85x). Small products (CLIP-L's 768-wide layers) are
faster left whole, so only weights of at least :data:`MIN_WEIGHT_ELEMENTS` are split.

The bits are ``F.linear``'s: column ``j`` of the result is the same dot products over ``K``
in the same order whichever block computes it, as long as MKL blocks ``K`` the same way for
the pieces. That is checked, not assumed: the first product of each shape (rows, columns,
depth, threads, bias, alignment) is computed both ways and compared bit for bit; a shape whose
blocks differ is never split again and gets ``F.linear``'s result. Outputs therefore stay
bit-equal to ComfyUI's (which calls ``F.linear``) at every thread count.

The blocks run on the calling thread and a process-wide pool of ``torch.get_num_threads() - 1``
workers (made on first use, one per thread count, made afresh in a forked child), each told by MKL's
``mkl_set_num_threads_local(1)`` to use one thread; the calling thread does the same for its
blocks and restores its own setting after. Where torch has no MKL (ARM, macOS), with one
thread, on other devices or dtypes, when autograd needs the graph, or inside a worker, the
product is ``F.linear``'s path unchanged.

>>> import torch
>>> x, w = torch.randn(3, 8), torch.randn(5, 8)
>>> torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
True
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["linear", "split_applies", "MIN_WEIGHT_ELEMENTS"]

#: Weights with fewer elements are multiplied whole (CLIP-L's 768 x 3072 and CLIP-G's
#: 1280 x 5120 are; T5-XXL's 4096 x 4096 and 10240 x 4096 are not).
MIN_WEIGHT_ELEMENTS = 8 * 2**20

#: Bit-equality verdicts per product shape: True (split gives F.linear's bits) or False.
_VERDICTS: dict[tuple, bool] = {}
#: Verdicts kept at most (a new prompt length is a new shape); past it they are checked anew.
_MAX_VERDICTS = 4096
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


class _MKL:
    """MKL's thread-local thread count, reached through torch's own library."""

    def __init__(self, library: ctypes.CDLL) -> None:
        # The mixed-case names are MKL's C interface (int by value); the lower-case
        # exports of libtorch_cpu are the Fortran ones (int by reference).
        self._set_local = library.MKL_Set_Num_Threads_Local
        self._set_local.argtypes, self._set_local.restype = [ctypes.c_int], ctypes.c_int
        self._max_threads = library.MKL_Get_Max_Threads
        self._max_threads.argtypes, self._max_threads.restype = [], ctypes.c_int

    def set_local(self, threads: int) -> int:
        """Set this thread's MKL thread count (0: back to the global one); returns the previous."""
        return self._set_local(threads)

    def works(self) -> bool:
        """Whether a local setting of 1 takes effect and can be undone in this thread."""
        before = self._max_threads()
        previous = self.set_local(1)
        single = self._max_threads() == 1
        self.set_local(previous)
        return single and self._max_threads() == before


def _mkl() -> _MKL | None:
    """The MKL handle, or None where torch's CPU library does not carry MKL."""
    if "mkl" not in _STATE:
        handle = None
        if torch.backends.mkl.is_available():
            for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
                path = Path(torch.__file__).parent / "lib" / name
                if path.exists():
                    try:
                        candidate = _MKL(ctypes.CDLL(str(path)))
                        handle = candidate if candidate.works() else None
                    except (OSError, AttributeError):
                        handle = None
                    break
        _STATE["mkl"] = handle
    return _STATE["mkl"]


def _in_worker() -> bool:
    return getattr(_WORKER, "active", False)


_WORKER = threading.local()


def _start_worker(mkl: _MKL) -> None:
    _WORKER.active = True
    mkl.set_local(1)


def _pool(threads: int, mkl: _MKL) -> ThreadPoolExecutor:
    """The worker pool for ``threads`` threads in this process. One pool per thread count is
    kept (none is shut down under a caller still using it); a forked child starts afresh, as
    its parent's worker threads do not exist in it."""
    with _LOCK:
        if _STATE.get("pid") != os.getpid():
            _STATE["pid"], _STATE["pools"] = os.getpid(), {}
        pools = _STATE["pools"]
        if threads not in pools:
            pools[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="textenc-gemm",
                                                initializer=_start_worker, initargs=(mkl,))
        return pools[threads]


def split_applies(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`linear` may split this product (before the per-shape bit check)."""
    if weight.dim() != 2 or weight.numel() < MIN_WEIGHT_ELEMENTS:
        return False  # every CLIP Linear leaves here, before anything costlier
    threads = torch.get_num_threads()
    if threads < 2:
        return False
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.is_sparse for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # out= products keep no autograd graph
    if not (input.is_contiguous() and weight.is_contiguous()) or input.dim() == 0:
        return False
    if weight.shape[0] < 256 * threads or _in_worker():
        return False
    return _mkl() is not None


def _blocks(columns: int, threads: int) -> list[slice]:
    """Column blocks of 512 (256 where 512 leaves fewer than two per thread)."""
    width = 512 if -(-columns // 512) >= 2 * threads else 256
    return [slice(start, min(columns, start + width)) for start in range(0, columns, width)]


def _block_product(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   target: torch.Tensor, block: slice) -> None:
    if bias is None:
        torch.mm(rows, weight[block].t(), out=target[:, block])
    else:
        torch.addmm(bias[block], rows, weight[block].t(), out=target[:, block])


class _Queue:
    """Block indices handed out one at a time to whichever thread asks first."""

    def __init__(self, count: int) -> None:
        self._next, self._count, self._lock = 0, count, threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._next >= self._count:
                return None
            self._next += 1
            return self._next - 1


def _work(rows, weight, bias, target, blocks: list[slice], queue: _Queue) -> None:
    while (index := queue.take()) is not None:
        _block_product(rows, weight, bias, target, blocks[index])


def _worker_work(inference: bool, *args) -> None:
    # Grad and inference modes are per thread: a worker takes the caller's (writing into an
    # inference tensor outside inference mode is an error).
    with torch.inference_mode() if inference else torch.no_grad():
        _work(*args)


def _split_into(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor) -> None:
    """``target = rows @ weight.T (+ bias)``, column blocks shared out to the threads as they
    finish (a core slowed by another process takes fewer blocks)."""
    threads = torch.get_num_threads()
    mkl = _mkl()
    blocks = _blocks(weight.shape[0], threads)
    queue = _Queue(len(blocks))
    args = (rows, weight, bias, target, blocks, queue)
    pool = _pool(threads, mkl)
    inference = torch.is_inference_mode_enabled()
    pending = [pool.submit(_worker_work, inference, *args) for _ in range(min(threads, len(blocks)) - 1)]
    previous = mkl.set_local(1)
    try:
        _work(*args)
    finally:
        mkl.set_local(previous)
        for future in pending:
            future.result()  # waits for every block (and re-raises a worker's error)


def _whole(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return F.linear(input, weight, bias)
    # What F.linear does for a contiguous input (addmm on the (rows, in) view), so the
    # result has the same bits, written into `out`.
    rows = input.reshape(-1, input.shape[-1])
    target = out.view(-1, out.shape[-1])
    if bias is None:
        torch.mm(rows, weight.t(), out=target)
    else:
        torch.addmm(bias, rows, weight.t(), out=target)
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # NaN payloads included


def _verdict_key(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 target: torch.Tensor) -> tuple:
    return (rows.shape[0], weight.shape[0], weight.shape[1], torch.get_num_threads(), bias is not None,
            rows.data_ptr() % 64, weight.data_ptr() % 64, target.data_ptr() % 64,
            None if bias is None else bias.data_ptr() % 64)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(input, weight, bias)`` with its bits, optionally written into ``out``.

    Args:
        input: ``(..., in_features)``; weight: ``(out_features, in_features)``; bias:
            ``(out_features,)`` or None.
        out: a contiguous ``(..., out_features)`` tensor to write into (no autograd).
    Returns:
        The product, ``out`` when given. Large CPU fp32 products run split over the
        threads (see the module docstring) once their shape has been checked bit-equal.
    """
    if (not split_applies(input, weight, bias) or input.numel() == 0
            or (out is not None and not out.is_contiguous())):
        return _whole(input, weight, bias, out)
    rows = input.reshape(-1, input.shape[-1])
    result = out if out is not None else input.new_empty(input.shape[:-1] + (weight.shape[0],))
    target = result.view(-1, weight.shape[0])
    key = _verdict_key(rows, weight, bias, target)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        if len(_VERDICTS) >= _MAX_VERDICTS:
            _VERDICTS.clear()
        reference = _whole(input, weight, bias, None)
        _split_into(rows, weight, bias, target)
        _VERDICTS[key] = _same_bits(target, reference.reshape(target.shape))
        if not _VERDICTS[key]:
            target.copy_(reference.reshape(target.shape))
        return result
    if not verdict:
        return _whole(input, weight, bias, out)
    _split_into(rows, weight, bias, target)
    return result
