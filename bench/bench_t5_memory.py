"""Peak RSS of loading a full-size T5-XXL and encoding one 256-token input (issue 25, point 4).

Writes a random full-size T5-XXL (4.76 B parameters) to ``--dir`` in one of three formats,
streamed tensor by tensor so the writer never holds the model:

* ``fp16``: ``t5xxl_fp16.safetensors`` layout (9.5 GB);
* ``fp8-scaled``: ComfyUI's ``t5xxl_fp8_e4m3fn_scaled.safetensors`` layout (``scaled_fp8``
  marker, per-Linear ``scale_weight`` / ``scale_input``; 4.9 GB);
* ``q8_0``: ``t5-v1_1-xxl-encoder-Q8_0.gguf`` layout (llama.cpp names; 5.1 GB).

Then a fresh process loads it with :func:`textenc.loading.t5_files.load_t5_file` (finite
check on), assigns it to layers from :mod:`textenc.nn.ops` (``manual_cast``) and runs a
forward through the embedding and every Linear at fp32 compute, 256 tokens. Its peak RSS
(``VmHWM``, file pages it touched included) must stay within file size + 1 GiB.

The forward is the T5 block's Linear calls (q, k, v, o; wi_0, wi_1, wo with gated GELU)
on the embedded tokens; attention itself and the norms are left out (they add no weight
memory: the T5 model is a separate module).

    python bench/bench_t5_memory.py --format fp16 [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from textenc.loading.t5_files import KNOWN_CONFIGS, T5Shapes, t5_layout_keys  # noqa: E402

XXL: T5Shapes = KNOWN_CONFIGS["t5-v1_1-xxl"]
FILES = {"fp16": "t5xxl_fp16.safetensors", "fp8-scaled": "t5xxl_fp8_e4m3fn_scaled.safetensors",
         "q8_0": "t5-v1_1-xxl-encoder-Q8_0.gguf"}
LINEAR = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")
GIB = 1 << 30


def _shape(key: str) -> tuple[int, ...]:
    s, inner = XXL, XXL.num_heads * XXL.d_kv
    if key == "shared.weight":
        return (s.vocab_size, s.d_model)
    if key.endswith("relative_attention_bias.weight"):
        return (s.num_buckets, s.num_heads)
    if key.endswith("layer_norm.weight"):
        return (s.d_model,)
    if key.endswith(".o.weight"):
        return (s.d_model, inner)
    if key.endswith(".wo.weight"):
        return (s.d_model, s.d_ff)
    return (s.d_ff, s.d_model) if ".wi_" in key else (inner, s.d_model)


def _random(shape, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator).mul_(0.05)


def _write_safetensors(path: Path, fp8: bool) -> None:
    """Stream a safetensors file: header first, then each tensor's bytes."""
    generator = torch.Generator().manual_seed(0)
    plan = []
    for key in t5_layout_keys(XXL):
        quantised = fp8 and key.endswith(LINEAR)
        plan.append((key, "F8_E4M3" if quantised or (fp8 and key == "shared.weight") else "F16", _shape(key)))
        if quantised:
            layer = key[:-len(".weight")]
            plan += [(f"{layer}.scale_weight", "F32", ()), (f"{layer}.scale_input", "F32", ())]
    if fp8:
        plan.append(("scaled_fp8", "F8_E4M3", (0,)))
    header, offset = {}, 0
    for key, dtype, shape in plan:
        size = int(np.prod(shape, dtype=np.int64)) * (4 if dtype == "F32" else 1 if dtype.startswith("F8") else 2)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for key, dtype, shape in plan:
            if dtype == "F32":
                value = torch.tensor(1.0 if key.endswith("scale_input") else 0.002, dtype=torch.float32)
            elif dtype == "F8_E4M3":
                value = _random(shape, generator).mul_(20).to(torch.float8_e4m3fn)
            else:
                value = (torch.ones(shape) if key.endswith("layer_norm.weight") else _random(shape, generator)).half()
            out.write(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")


def _write_gguf(path: Path) -> None:
    """Stream a Q8_0 GGUF with llama.cpp's T5 names (gguf's own name map)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, XXL.num_layers)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    plan = []
    for key in t5_layout_keys(XXL):
        name = names.get_name(key[:-len(".weight")]) + ".weight"
        shape = _shape(key)
        if len(shape) == 2 and "relative_attention_bias" not in key:
            block, size = GGML_QUANT_SIZES[Q.Q8_0]
            byte_shape = (shape[0], shape[1] // block * size)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=Q.Q8_0)
            plan.append(("q8", byte_shape))
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
            plan.append(("f32", shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for kind, shape in plan:
        if kind == "q8":
            # Bytes <= 0x3B: each block's fp16 scale is finite and below 1, int8 values 0..59.
            writer.write_tensor_data(rng.integers(0, 0x3C, size=shape, dtype=np.uint8))
        else:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
    writer.close()


def _skeleton() -> torch.nn.Module:
    """Modules named as the HF layout, built on the meta device from textenc's ops."""
    from textenc.nn import ops
    root = torch.nn.Module()
    with torch.device("meta"):
        for key in t5_layout_keys(XXL):
            *path, leaf = key.split(".")
            module = root
            for part in path[:-1]:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            shape = _shape(key)
            if key.endswith(LINEAR):
                layer = ops.manual_cast.Linear(shape[1], shape[0], bias=False, dtype=torch.float16)
            elif len(shape) == 2:
                layer = ops.manual_cast.Embedding(*shape, dtype=torch.float16)
            else:
                layer = torch.nn.Module()
                layer.weight = torch.nn.Parameter(torch.empty(shape), requires_grad=False)
            module.add_module(path[-1], layer)
    return root


def _forward(model: torch.nn.Module, tokens: int) -> torch.Tensor:
    ids = torch.randint(0, XXL.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    x = model.shared(ids, out_dtype=torch.float32)
    x = x / x.norm(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for block in model.encoder.block.children():
        attention, ffn = getattr(block.layer, "0").SelfAttention, getattr(block.layer, "1").DenseReluDense
        out += attention.o(attention.q(x) + attention.k(x) + attention.v(x))
        out += ffn.wo(torch.nn.functional.gelu(ffn.wi_0(x), approximate="tanh") * ffn.wi_1(x))
    return out


def peak_rss() -> int:
    """This process's peak resident set (``VmHWM``), in bytes: unlike ``ru_maxrss`` it starts
    afresh at ``exec``, so the writer's peak does not carry over into the measuring process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(path: Path, tokens: int) -> dict:
    """Load ``path`` and run the forward; called in a fresh process."""
    from textenc.loading.t5_files import load_t5_file
    baseline = peak_rss()
    start = time.perf_counter()
    checkpoint = load_t5_file(path)
    model = _skeleton()
    model.load_state_dict(checkpoint.for_compute(torch.float32), strict=True, assign=True)
    loaded = time.perf_counter()
    rss_loaded = peak_rss()
    with torch.inference_mode():
        out = _forward(model, tokens)
    done = time.perf_counter()
    return {"file_bytes": path.stat().st_size, "peak_rss": peak_rss(),
            "rss_after_load": rss_loaded, "rss_after_import": baseline, "load_s": loaded - start,
            "encode_s": done - loaded, "finite": bool(torch.isfinite(out).all()), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=sorted(FILES), default="fp16")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the written file")
    parser.add_argument("--layers", type=int, default=24, help="fewer blocks, for a quick smoke run")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global XXL
    XXL = dataclasses.replace(XXL, num_layers=args.layers)
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens)))
        return
    path = args.dir / (FILES[args.format] if args.layers == 24 else f"{args.layers}-layer-{FILES[args.format]}")
    start = time.perf_counter()
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        _write_gguf(partial) if args.format == "q8_0" else _write_safetensors(partial, fp8=args.format == "fp8-scaled")
        partial.rename(path)
    written = time.perf_counter() - start
    try:
        child = subprocess.run([sys.executable, __file__, "--measure", str(path), "--tokens", str(args.tokens),
                                "--threads", str(args.threads), "--layers", str(args.layers)], check=True, capture_output=True, text=True)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result.update(format=args.format, write_s=written, limit=result["file_bytes"] + GIB,
                  within=result["peak_rss"] <= result["file_bytes"] + GIB)
    print(json.dumps(result))
    print(f"{args.format}: file {result['file_bytes'] / GIB:.2f} GiB, peak RSS {result['peak_rss'] / GIB:.2f} GiB "
          f"(after import {result['rss_after_import'] / GIB:.2f}, after load {result['rss_after_load'] / GIB:.2f}); "
          f"limit file + 1 GiB = {result['limit'] / GIB:.2f} GiB: {'PASS' if result['within'] else 'FAIL'}; "
          f"load {result['load_s']:.1f} s, encode {result['encode_s']:.1f} s ({args.tokens} tokens, "
          f"{args.threads} threads)")


if __name__ == "__main__":
    main()
