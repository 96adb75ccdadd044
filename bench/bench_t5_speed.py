"""T5-XXL encode speed on CPU, side by side in one process (issue 25, point 5).

    python bench/bench_t5_speed.py [--layers 2] [--repeats 3] [--threads 2] [--cases flux-256,sd3-77]
        [--comfyui /path/to/ComfyUI --deps /extra/site-packages [--formats fp16,fp8-scaled]]
        [--skip-fp32] [--dir /tmp] [--json out.json]

The model has the released T5 v1.1 XXL's full-size blocks (d_model 4096, d_ff 10240, 64 heads
of 64, vocab 32128) but only ``--layers`` of its 24: a full fp32 T5-XXL is 19 GB and this
bench holds two models at once, so it measures the per-block cost (the embedding and final
norm are the same in both). Inputs: Flux's 256-token and SD3's 77-token padded prompts.
Every row times its candidates interleaved (``common.interleaved``: one warm-up round, then
``--repeats`` rounds, medians compared).

Rows:

* textenc ``T5XXLModel.encode_token_weights`` vs transformers' ``T5EncoderModel`` (SDPA)
  on the same fp32 tensors (shared, not copied), fp32 compute;
* the same textenc call vs the linear-layers floor: its own GEMMs (``textenc.nn.gemm.linear``,
  column blocks over the threads) on the same weights and input shapes, nothing else (limit
  1.15x), and vs ``torch.nn.functional.linear`` alone (one MKL call per Linear, as transformers);
* with ``--comfyui``: textenc from an fp16 and from a scaled-fp8 safetensors file
  (``load_t5_file``, weights kept as stored, cast / decoded per Linear into a reused buffer)
  vs ComfyUI's own ``T5XXLModel`` loading the same file as its ``load_clip`` does on a CPU
  (``convert_old_quants``, ``t5_xxl_detect``: fp16 storage, scaled fp8 through its
  mixed-precision ops with comfy_kitchen, fp32 activations), both ``encode_token_weights``,
  outputs checked ``torch.equal``; ``--deps`` must then reach ComfyUI's own imports
  (psutil, einops, comfy_kitchen: e.g. its venv's site-packages, searched after this venv);
* ``(a:1.2) fox`` vs ``a fox`` through textenc (the empty encoding is cached per length), and
  with ``--comfy-weighted`` through ComfyUI for reference;
* ``compute_dtype`` bf16 vs fp32 on the same model: the drift (max and mean relative
  difference of the output, with its largest magnitude) always; the speed-up timed interleaved
  where the CPU has bf16 units (``avx512_bf16`` / ``amx_bf16``), else one untimed-as-target run
  each (bf16 without those units is emulated: not a speed option there). Random weights do not
  reach the 1e3-1e4 activations of the released T5-XXL, so the drift is indicative only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_t5_memory  # noqa: E402
from common import has_bf16_cpu, interleaved, machine, ratio_row, row  # noqa: E402

from textenc.nn import gemm  # noqa: E402
from textenc.loading.t5_files import KNOWN_CONFIGS, load_t5_file, t5_layout_keys  # noqa: E402
from textenc.text_encoders.t5 import T5XXLModel, T5XXLTokenizer  # noqa: E402

LENGTHS = {"flux-256": 256, "sd3-77": 77}
PROMPT = "a red fox sitting in the snow at dusk, highly detailed photograph"


def random_weights(layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 HF-layout weights of a ``layers``-deep T5-XXL (fan-in scaled Linears, norms near 1)."""
    shapes = dataclasses.replace(KNOWN_CONFIGS["t5-v1_1-xxl"], num_layers=layers)
    bench_t5_memory.XXL = shapes
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in t5_layout_keys(shapes):
        shape = bench_t5_memory._shape(key)
        value = torch.randn(shape, generator=generator)
        if key.endswith("layer_norm.weight"):
            value = value.mul_(0.1).add_(1.0)
        elif len(shape) == 2 and key != "shared.weight" and "relative_attention_bias" not in key:
            value = value.mul_(shape[1] ** -0.5)
        out[key] = value
    return out


def hf_model(weights: dict[str, torch.Tensor], layers: int):
    import transformers
    s = KNOWN_CONFIGS["t5-v1_1-xxl"]
    config = transformers.T5Config(d_model=s.d_model, d_kv=s.d_kv, d_ff=s.d_ff, num_layers=layers,
                                   num_heads=s.num_heads, vocab_size=s.vocab_size, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, dropout_rate=0.0)
    with torch.device("meta"):
        model = transformers.T5EncoderModel._from_config(config, attn_implementation="sdpa")
    model.load_state_dict(weights, strict=False, assign=True)
    model.encoder.embed_tokens = model.shared
    return model.eval()


def linear_floor(weights: dict[str, torch.Tensor], tokens: int, product=gemm.linear):
    """The GEMMs alone: every Linear's product on an input of the right shape (``gemm.linear``:
    the column blocks textenc's Linears run; ``F.linear``: one MKL call each, as transformers)."""
    mats = [w for k, w in weights.items() if k.endswith(bench_t5_memory.LINEAR)]
    inputs = {n: torch.randn(1, tokens, n) for n in {w.shape[1] for w in mats}}

    def run():
        for w in mats:
            product(inputs[w.shape[1]], w)
    return run


def tokens_for(tokenizer: T5XXLTokenizer, prompt: str):
    return tokenizer.tokenize_with_weights(prompt)


def encoder(model, tokens):
    return lambda: model.encode_token_weights(tokens)


def fp32_rows(args, rows: list) -> None:
    weights = random_weights(args.layers)
    ours = T5XXLModel.from_state_dict(weights)
    hf = hf_model(weights, args.layers)
    with torch.inference_mode():
        for case, length in LENGTHS.items():
            tokens = tokens_for(T5XXLTokenizer(min_length=length), PROMPT)
            ids = torch.tensor([[t for t, _ in tokens[0]]])
            a, b = ours.encode_token_weights(tokens)[0], hf(input_ids=ids).last_hidden_state
            drift = float((a - b).abs().max() / b.abs().max())
            stats = interleaved({"ours": encoder(ours, tokens), "hf": lambda: hf(input_ids=ids),
                                 "floor": linear_floor(weights, ids.shape[1]),
                                 "F.linear": linear_floor(weights, ids.shape[1], torch.nn.functional.linear)},
                                repeats=args.repeats)
            label = f"{case}, {args.layers}/24 full-size blocks, fp32"
            rows.append(ratio_row("T5 vs transformers T5EncoderModel (sdpa)", label, stats["ours"], stats["hf"],
                                  1.0, ref_label="hf", higher_is_better=True, note=f"max rel diff {drift:.1e}"))
            rows.append(ratio_row("T5 vs linear-layers floor", label, stats["ours"], stats["floor"], 1.15,
                                  ref_label="gemm.linear", note="its own GEMMs alone (column blocks)"))
            rows.append(ratio_row("T5 vs F.linear GEMMs alone", label, stats["ours"], stats["F.linear"], 1.15,
                                  ref_label="F.linear", note="one MKL call per Linear, as transformers"))
            weighted = interleaved({"weighted": encoder(ours, tokens_for(T5XXLTokenizer(min_length=length),
                                                                          "(a:1.2) fox")),
                                    "plain": encoder(ours, tokens_for(T5XXLTokenizer(min_length=length), "a fox"))},
                                   repeats=args.repeats)
            rows.append(ratio_row("T5 weighted vs unweighted prompt", label, weighted["weighted"], weighted["plain"],
                                  1.05, ref_label="plain", note="empty encoding cached per length"))
            for line in rows[-4:]:
                print(json.dumps(line), flush=True)
        bf16_rows(args, rows, ours)
    del ours, hf, weights
    gc.collect()


BF16 = {"compute_dtype": torch.bfloat16}


def bf16_rows(args, rows: list, model) -> None:
    """``compute_dtype`` bf16 against fp32 on ``model`` (fp32 weights): drift, and speed."""
    units = has_bf16_cpu()
    for case, length in LENGTHS.items():
        tokens = tokens_for(T5XXLTokenizer(min_length=length), PROMPT)
        exact = model.encode_token_weights(tokens)[0]
        reduced = model.encode_token_weights(tokens, options=BF16)[0].float()
        scale = float(exact.abs().max())
        drift = (f"max rel diff {float((reduced - exact).abs().max()) / scale:.1e}, mean "
                 f"{float((reduced - exact).abs().mean() / exact.abs().mean()):.1e}, fp32 max |x| {scale:.3g}")
        label = f"{case}, {args.layers}/24 full-size blocks, fp32 weights"
        repeats = args.repeats if units else 1
        stats = interleaved({"bf16": lambda: model.encode_token_weights(tokens, options=BF16),
                             "fp32": encoder(model, tokens)}, repeats=repeats, warmup=1 if units else 0)
        if units:
            rows.append(ratio_row("T5 bf16 compute vs fp32", label, stats["bf16"], stats["fp32"], 1.0,
                                  ref_label="fp32", higher_is_better=True, note=drift))
        else:
            ratio = stats["fp32"].median / stats["bf16"].median
            rows.append(row("T5 bf16 compute vs fp32", label, stats["bf16"].fmt(), "fp32 " + stats["fp32"].fmt(),
                            ratio, "speed-up where bf16 units", None,
                            f"{drift}; no avx512_bf16/amx_bf16 here: bf16 emulated, speed not a target"))
        print(json.dumps(rows[-1]), flush=True)


#: File formats of the ComfyUI rows: name -> written as scaled fp8 (else fp16).
FORMATS = {"fp16": False, "fp8-scaled": True}


def import_comfy(path: str, deps: str | None):
    """ComfyUI's modules from its source tree, forced onto the CPU (``--cpu``)."""
    sys.path.insert(0, str(Path(path).resolve()))
    for folder in (deps or "").split(os.pathsep):
        if folder:
            sys.path.append(folder)  # after ours: only what this venv lacks comes from there
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.sd1_clip
    import comfy.text_encoders.sd3_clip
    import comfy.utils
    return comfy


def comfy_t5(comfy, path: Path, layers: int):
    """ComfyUI's ``T5XXLModel`` loading ``path`` as ``comfy.sd.load_clip`` does on a CPU: old scaled
    fp8 converted to its mixed-precision ops, weight dtype detected (fp16 storage, fp32 compute)."""
    sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    sd, _ = comfy.utils.convert_old_quants(sd, model_prefix="", metadata=metadata)
    detected = comfy.text_encoders.sd3_clip.t5_xxl_detect(sd)
    mm, cpu = comfy.model_management, torch.device("cpu")
    dtype = mm.pick_weight_dtype(detected.get("dtype_t5"), mm.text_encoder_dtype(cpu), cpu)
    options = {"t5xxl_model_config": {"num_layers": layers}}
    if "t5_quantization_metadata" in detected:
        options["t5xxl_quantization_metadata"] = detected["t5_quantization_metadata"]
    model = comfy.text_encoders.sd3_clip.T5XXLModel(device="cpu", dtype=dtype, model_options=options)
    model.load_sd(sd)
    return model, dtype


def comfy_rows(args, rows: list) -> None:
    comfy = import_comfy(args.comfyui, args.deps)
    bench_t5_memory.XXL = dataclasses.replace(KNOWN_CONFIGS["t5-v1_1-xxl"], num_layers=args.layers)
    for fmt in args.formats.split(","):
        path = Path(args.dir) / f"t5bench-{args.layers}-layer-{bench_t5_memory.FILES[fmt]}"
        if not path.exists():
            bench_t5_memory._write_safetensors(path, fp8=FORMATS[fmt])
        try:
            format_rows(args, rows, comfy, fmt, path)
        finally:
            if not args.keep:
                path.unlink(missing_ok=True)
            gc.collect()


def equal_at_threads(ours, theirs, tokens, threads: list[int]) -> str:
    """``torch.equal`` of both encodings at each torch thread count, twice each (the second call
    reuses what the first left behind); e.g. ``"1 thread True, 2 threads True"``."""
    before, found = torch.get_num_threads(), []
    try:
        for n in threads:
            torch.set_num_threads(n)
            same = all(torch.equal(ours.encode_token_weights(tokens)[0], theirs.encode_token_weights(tokens)[0])
                       for _ in range(2))
            found.append(f"{n} thread{'s' * (n > 1)} {same}")
    finally:
        torch.set_num_threads(before)
    return ", ".join(found)


def format_rows(args, rows: list, comfy, fmt: str, path: Path) -> None:
    ours = T5XXLModel.from_state_dict(load_t5_file(path).state_dict)
    theirs, dtype = comfy_t5(comfy, path, args.layers)
    with torch.inference_mode():
        for case, length in LENGTHS.items():
            tokenizer = T5XXLTokenizer(min_length=length)
            tokens = tokens_for(tokenizer, PROMPT)
            same = equal_at_threads(ours, theirs, tokens, sorted({1, args.threads}))
            label = f"{case}, {args.layers}/24 full-size blocks, {fmt} file, fp32 compute"
            stats = interleaved({"ours": encoder(ours, tokens), "comfy": encoder(theirs, tokens)},
                                repeats=args.repeats)
            rows.append(ratio_row(f"T5 vs ComfyUI T5 (same {fmt} file)", label, stats["ours"], stats["comfy"], 1.2,
                                  ref_label="comfy", higher_is_better=True,
                                  note=f"ComfyUI weights {str(dtype).replace('torch.', '')}; outputs equal: {same}"))
            print(json.dumps(rows[-1]), flush=True)
            if args.comfy_weighted and fmt == "fp16":
                weighted, plain = tokens_for(tokenizer, "(a:1.2) fox"), tokens_for(tokenizer, "a fox")
                stats = interleaved({"w": encoder(theirs, weighted), "p": encoder(theirs, plain)},
                                    repeats=args.repeats)
                rows.append(ratio_row("ComfyUI weighted vs unweighted (reference)", label, stats["w"], stats["p"],
                                      99, ref_label="plain", note="ComfyUI re-encodes the empty prompt"))
                print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--comfyui", help="a ComfyUI source tree: adds the ComfyUI rows")
    parser.add_argument("--deps", help="extra folders for ComfyUI's imports (os.pathsep-separated; searched "
                        "after this venv), e.g. ComfyUI's own venv's site-packages for psutil, einops, comfy_kitchen")
    parser.add_argument("--formats", default=",".join(FORMATS), help="files for the ComfyUI rows, of "
                        + ", ".join(FORMATS))
    parser.add_argument("--comfy-weighted", action="store_true",
                        help="also time ComfyUI's weighted vs unweighted prompt (reference row)")
    parser.add_argument("--dir", default="/tmp", help="where the test files are written")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--cases", default=",".join(LENGTHS), help="of " + ", ".join(LENGTHS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for case in set(LENGTHS) - set(args.cases.split(",")):
        del LENGTHS[case]
    info = machine()
    print(json.dumps(info), flush=True)
    if not has_bf16_cpu():
        print("bf16 compute: drift reported, speed not a target (no avx512_bf16 / amx_bf16 on this CPU)",
              flush=True)
    rows: list = []
    if not args.skip_fp32:
        fp32_rows(args, rows)
    if args.comfyui:
        comfy_rows(args, rows)
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(json.dumps({"end": info["loadavg_end"]}))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
