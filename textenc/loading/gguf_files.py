"""Read a T5 encoder from GGUF (``t5-v1_1-xxl-encoder-Q8_0.gguf`` and the other llama.cpp
types ComfyUI-GGUF users download), memory-mapped, names mapped to the HF layout.

The file is read with the ``gguf`` package (``pip install textenc[gguf]``), after a
bounds check of its header (:func:`check_gguf_header`: ``gguf.GGUFReader`` would loop
for ages on a hostile array length). F32 / F16 / BF16 tensors become plain tensors in
their stored dtype; quantised ones become :class:`GGUFWeight`, decoded at call time with
``gguf.quants.dequantize``, so the values are exactly what ``gguf`` gives. GGUF stores
dimensions fastest-first (ggml ``ne``); the reader's numpy arrays are already in torch
order, ``(out_features, in_features)`` for a Linear.

Names follow llama.cpp's ``MODEL_ARCH.T5ENCODER`` table (``gguf/constants.py``,
``gguf/tensor_mapping.py``): ``token_embd`` = ``shared``, ``enc.blk.{i}.attn_q`` =
``encoder.block.{i}.layer.0.SelfAttention.q``, ``ffn_gate`` = ``wi_0``, ``ffn_up`` =
``wi_1``, ``ffn_down`` = ``wo``, ``enc.output_norm`` = ``encoder.final_layer_norm``.
"""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

import numpy as np
import torch

from textenc.errors import CheckpointError
from textenc.nn.packed import PackedWeight

__all__ = ["GGUFWeight", "read_gguf_t5", "check_gguf_header", "gguf_to_hf_name"]

#: llama.cpp block tensor -> HF T5 name inside ``encoder.block.{i}.``.
BLOCK_NAMES = {
    "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v", "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias", "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo", "ffn_norm": "layer.1.layer_norm",
}
TOP_NAMES = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm",
             "output": "lm_head"}
_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ARCHITECTURES = ("t5", "t5encoder")
_GGUF_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF metadata value types: fixed sizes of the scalars, 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_to_hf_name(name: str) -> str:
    """The HF T5 key of a llama.cpp tensor name (HF names pass through unchanged).

    >>> gguf_to_hf_name("enc.blk.3.ffn_up.weight")
    'encoder.block.3.layer.1.DenseReluDense.wi_1.weight'
    >>> gguf_to_hf_name("dec.blk.0.attn_q.weight")  # a full T5's decoder: set aside by the loader
    'decoder.blk.0.attn_q.weight'
    """
    if name.startswith("dec."):
        return "decoder." + name[len("dec."):]
    if (match := _BLOCK.match(name)) and match.group(2) in BLOCK_NAMES:
        return f"encoder.block.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}.{match.group(3)}"
    stem, _, leaf = name.rpartition(".")
    return f"{TOP_NAMES[stem]}.{leaf}" if stem in TOP_NAMES else name


class GGUFWeight(PackedWeight):
    """A 2-D GGUF tensor in a llama.cpp block format, decoded with ``gguf.quants.dequantize``.

    Args:
        raw: The stored bytes, shape ``(rows, bytes_per_row)`` (a memory-mapped view).
        qtype: The ``gguf.GGMLQuantizationType``.
        shape: The logical ``(rows, columns)``.
    """

    def __new__(cls, raw: np.ndarray, qtype, shape: tuple[int, int]):
        return super().__new__(cls, shape=shape, dtype=torch.float32)

    def __init__(self, raw: np.ndarray, qtype, shape: tuple[int, int]):
        self.raw, self.qtype = raw, qtype

    def _decode_rows(self, rows, dtype):
        raw = self.raw[rows if isinstance(rows, slice) else rows.cpu().numpy()]
        if self.qtype.name == "Q8_0":
            values = _q8_0_blocks(raw, dtype=torch.float32).reshape(raw.shape[0], self.shape[1])
            return values.to(dtype)
        from gguf.quants import dequantize
        return torch.from_numpy(np.ascontiguousarray(dequantize(raw, self.qtype))).to(dtype)

    def is_finite(self, *, rows_per_chunk: int = 1024) -> bool:
        if self.qtype.name == "Q8_0":
            # int8 values times a finite fp16 scale cannot overflow fp32: the scales decide.
            return bool(torch.isfinite(_q8_0_blocks(self.raw, scales_only=True)).all())
        return super().is_finite(rows_per_chunk=rows_per_chunk)

    @property
    def stored_bytes(self) -> int:
        return int(self.raw.nbytes)


#: Bytes of one Q8_0 block: an fp16 scale, then 32 int8 values (ggml ``block_q8_0``).
_Q8_0_BLOCK = 34


def _q8_0_blocks(raw: np.ndarray, *, dtype: torch.dtype = torch.float32,
                 scales_only: bool = False) -> torch.Tensor:
    """Q8_0 decoded in torch, as ``gguf.quants.Q8_0.dequantize_blocks`` computes it in numpy
    (fp16 scale and int8 values both widened to float32, one multiply), ~2x faster.
    Returns ``(blocks, 32)``, or the ``(blocks, 1)`` float16 scales."""
    blocks = torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1, _Q8_0_BLOCK)
    scales = blocks[:, :2].contiguous().view(torch.float16)
    if scales_only:
        return scales
    return blocks[:, 2:].view(torch.int8).to(dtype).mul_(scales.to(dtype))


def read_gguf_t5(path: str | Path) -> dict[str, torch.Tensor]:
    """A GGUF T5 encoder's tensors under HF names (memory-mapped, quantised ones packed).

    Raises:
        CheckpointError: ``gguf`` is not installed; the header is truncated, hostile or
            malformed; the architecture is not T5; a tensor type cannot be decoded
            (integer, F64, or a type ``gguf`` has no dequantiser for).
    """
    file = Path(path)
    check_gguf_header(file)
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError(f"{file}: reading GGUF needs the 'gguf' package: "
                              "pip install 'textenc[gguf]'") from exc
    try:
        reader = gguf.GGUFReader(file, mode="c")
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable GGUF file ({exc}); it is truncated or corrupt, "
                              "download it again") from exc
    _check_architecture(file, reader)
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        out[gguf_to_hf_name(tensor.name)] = _tensor(file, tensor, gguf)
    return out


def _check_architecture(file: Path, reader) -> None:
    field = reader.get_field("general.architecture")
    arch = None
    if field is not None:
        try:
            arch = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: unreadable general.architecture ({exc})") from exc
    if arch is not None and arch not in _ARCHITECTURES:
        raise CheckpointError(f"{file}: a GGUF of architecture {arch!r}, not a T5 encoder "
                              f"(expected one of {_ARCHITECTURES})")


def _tensor(file: Path, tensor, gguf) -> torch.Tensor:
    qtype, data = tensor.tensor_type, tensor.data
    kind = gguf.GGMLQuantizationType
    if qtype in (kind.F32, kind.F16):
        return torch.from_numpy(data)
    if qtype == kind.BF16:
        # gguf's BF16 dequantiser shifts the 16 bits up into a float32: a bfloat16 view is the same value.
        return torch.from_numpy(data).view(torch.int16).view(torch.bfloat16)
    integer_or_f64 = qtype.name.startswith(("I", "F")) and qtype.name[1:].isdigit()
    if integer_or_f64 or not hasattr(gguf.quants, qtype.name):
        raise CheckpointError(f"{file}: tensor {tensor.name!r} has type {qtype.name}, which is not a "
                              "float or llama.cpp block format textenc can decode")
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if len(shape) != 2 or data.ndim != 2:
        raise CheckpointError(f"{file}: quantised tensor {tensor.name!r} has shape {shape}; only 2-D "
                              "weights are stored quantised in a T5 encoder")
    return GGUFWeight(data, qtype, shape)


def check_gguf_header(file: Path) -> None:
    """Walk a GGUF header with bounds checks before ``gguf.GGUFReader`` reads it.

    Refuses counts and lengths that do not fit in the file, more than 4 dimensions, and
    tensor sizes past the end: a hostile header cannot make the reader loop or allocate
    without bound.
    """
    try:
        with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _Walker(file, data).walk()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot be read as GGUF ({exc})") from exc


class _Walker:
    """A cursor over a GGUF header that refuses every read past the end of the file."""

    def __init__(self, file: Path, data):
        self.file, self.data, self.pos = file, data, 0

    def fail(self, detail: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: not a valid GGUF file ({detail}); it is truncated, "
                               "corrupt or hostile; download it again")

    def take(self, size: int) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise self.fail(f"a field of {size} bytes at byte {self.pos} runs past the end ({len(self.data)})")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def count(self, per_item: int, what: str) -> int:
        n = self.u64()
        if n * per_item > len(self.data) - self.pos:
            raise self.fail(f"{what} count {n} cannot fit in the {len(self.data) - self.pos} bytes left")
        return n

    def string(self) -> None:
        self.take(self.count(1, "string length"))

    def value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[vtype])
        elif vtype == 8:
            self.string()
        elif vtype == 9 and depth < 2:
            item = self.u32()
            size = _SCALAR_SIZES.get(item, 8 if item == 8 else 12)
            for _ in range(self.count(size, "array")):
                self.value(item, depth + 1)
        else:
            raise self.fail(f"unknown metadata value type {vtype}")

    def walk(self) -> None:
        if self.take(4) != _GGUF_MAGIC:
            raise self.fail("no GGUF magic")
        if self.u32() not in (2, 3):
            raise self.fail("unsupported GGUF version")
        n_tensors, n_fields = self.u64(), self.u64()
        if (n_tensors + n_fields) * 12 > len(self.data):
            raise self.fail(f"{n_tensors} tensors and {n_fields} fields cannot fit in the file")
        for _ in range(n_fields):
            self.string()
            self.value(self.u32())
        for _ in range(n_tensors):
            self.tensor_info()

    def tensor_info(self) -> None:
        self.string()
        n_dims = self.u32()
        if not 1 <= n_dims <= _MAX_DIMS:
            raise self.fail(f"a tensor with {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
        elements = 1
        for _ in range(n_dims):
            elements *= self.u64()
        self.u32()  # type; the reader checks it is known
        offset = self.u64()
        if elements > len(self.data) * 8 or offset > len(self.data):
            raise self.fail(f"a tensor of {elements} elements at data offset {offset} cannot fit in the file")
