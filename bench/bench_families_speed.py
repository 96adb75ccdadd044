"""Flux and SD3 prompt encoding speed on CPU against ComfyUI and diffusers, in one process (issue 26).

    python bench/bench_families_speed.py --comfyui /path/to/ComfyUI [--deps /extra/site-packages]
        [--families flux,sd3] [--t5-layers 2] [--repeats 3] [--threads 2] [--json out.json]

Weights: full-size CLIP-L (123M) and CLIP-G (695M) text encoders with random weights (fan-in
scaled, ``common.randomize_``) in the real Hugging Face key layouts, and a T5 v1.1 XXL with the
released full-size blocks (d_model 4096, d_ff 10240, 64 heads of 64, vocab 32128) but only
``--t5-layers`` of its 24 (default 2): a full fp32 T5-XXL is 19 GB and this bench holds two copies
of every weight (as ``bench/bench_t5_speed.py``), so T5's share of each encode is about a twelfth
of the real one. fp32 storage and compute throughout, ``--threads`` torch threads.

Candidates (each timed by ``common.interleaved``: one warm-up round, then ``--repeats`` rounds in
alternating order, medians of wall and process-CPU time):

* textenc: ``load_clip(state_dicts=..., clip_type="flux"/"sd3")`` on the transformers models'
  own tensors (shared, not copied), ``clip.encode_from_tokens(clip.tokenize(prompt),
  return_pooled=True)``;
* ComfyUI: its own ``FluxClipModel`` / ``SD3ClipModel`` (``--comfyui`` tree imported at run time
  with ``--cpu``; T5 depth set through its ``t5xxl_model_config`` model option, each part given the
  same weights by its ``load_sd``, a copy), ``tokenize_with_weights`` + ``encode_token_weights``;
* diffusers: ``FluxPipeline.encode_prompt`` / ``StableDiffusion3Pipeline.encode_prompt`` on
  pipelines built from the same transformers encoders and tokenizers only (transformer, VAE and
  scheduler None), at ComfyUI's T5 length (Flux 256, SD3 77: "matched") and at diffusers' default
  ``max_sequence_length`` (Flux 512, SD3 256). SD3 with ``do_classifier_free_guidance=False``.
  diffusers reads no prompt weights, so it runs the short prompt only.

Outputs checked: textenc vs ComfyUI ``torch.equal`` (cond and pooled); textenc vs diffusers
"matched": max relative difference of cond and pooled.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_t5_speed  # noqa: E402
from common import _no_init, hf_text_config, interleaved, machine, randomize_, ratio_row  # noqa: E402

from textenc.sd import load_clip  # noqa: E402

PROMPTS = {"short": "a red fox sitting in the snow at dusk, highly detailed photograph",
           "weighted": "a (red:1.3) fox sitting in the (snow:0.8) at dusk, (highly detailed:1.1) photograph"}
PARTS = {"flux": ("l", "t5"), "sd3": ("l", "g", "t5")}
COMFY_T5_LENGTH = {"flux": 256, "sd3": 77}
DIFFUSERS_T5_LENGTH = {"flux": 512, "sd3": 256}
VOCAB = REPO / "textenc" / "vocab"


def hf_encoders(parts: tuple, t5_layers: int) -> dict:
    """transformers encoders with random weights: CLIP-L/G with projection, a shallow T5-XXL."""
    import transformers

    out = {}
    for seed, (part, config) in enumerate((("l", "sd1_clip_config"), ("g", "clip_g"))):
        if part in parts:
            model = _no_init(transformers.CLIPTextModelWithProjection, hf_text_config(config)).eval()
            randomize_(model, seed)
            out[part] = model
    if "t5" in parts:
        out["t5"] = bench_t5_speed.hf_model(bench_t5_speed.random_weights(t5_layers), t5_layers)
    return out


def hf_tokenizers() -> dict:
    import transformers

    # from_pretrained on the folder: transformers 5's CLIPTokenizer(vocab_file=..., merges_file=...) by
    # keyword silently builds a wrong tokenizer ("a red fox" -> [0, 2, 2, ...]). SD3's tokenizer_2 (CLIP-G) pads with "!" (id 0), as
    # ComfyUI's clip_g (pad_with_end=False).
    clip = transformers.CLIPTokenizer.from_pretrained
    return {"l": clip(str(VOCAB), model_max_length=77), "g": clip(str(VOCAB), model_max_length=77, pad_token="!"),
            "t5": transformers.T5TokenizerFast(tokenizer_file=str(VOCAB / "t5" / "tokenizer.json"),
                                                    model_max_length=512)}


def textenc_clip(family: str, encoders: dict):
    prefixes = {"l": "clip_l.transformer.", "g": "clip_g.transformer.", "t5": ""}
    sds = [(part, {prefixes[part] + k: v for k, v in model.state_dict().items()
                   if not k.endswith("position_ids")}) for part, model in encoders.items()]
    return load_clip(None, clip_type=family, state_dicts=sds)


def comfy_family(te, family: str, encoders: dict, t5_layers: int):
    options = {"t5xxl_model_config": {"num_layers": t5_layers}}
    if family == "flux":
        model, tokenizer = te.flux.FluxClipModel(dtype=torch.float32, model_options=options), te.flux.FluxTokenizer()
    else:
        model, tokenizer = te.sd3_clip.SD3ClipModel(dtype=torch.float32, model_options=options), \
            te.sd3_clip.SD3Tokenizer()
    for part, attribute in (("l", "clip_l"), ("g", "clip_g"), ("t5", "t5xxl")):
        if part in encoders:  # per part, as ComfyUI tells L and G apart by depth
            sd = {k: v for k, v in encoders[part].state_dict().items() if not k.endswith("position_ids")}
            getattr(model, attribute).load_sd(sd)
    return tokenizer, model.eval()


def flat_clip_text_model(with_projection):
    """transformers ``CLIPTextModel`` on the same tensors as ``with_projection`` (not copied).

    transformers 5's ``CLIPTextModel`` holds the text tower's modules itself (keys without the
    ``text_model.`` prefix), so assigning ``.text_model`` would leave its own weights empty.
    """
    import transformers

    model = _no_init(transformers.CLIPTextModel, with_projection.config).eval()
    source = with_projection.state_dict()
    model.load_state_dict({k: source[k] if k in source else source["text_model." + k] for k in model.state_dict()},
                          strict=True, assign=True)
    return model


def diffusers_pipeline(family: str, encoders: dict, tokenizers: dict):
    import diffusers
    import transformers

    if family == "flux":
        clip_l = flat_clip_text_model(encoders["l"])  # Flux reads pooler_output: no projection
        return diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=clip_l, tokenizer=tokenizers["l"],
                                      text_encoder_2=encoders["t5"], tokenizer_2=tokenizers["t5"], transformer=None)
    return diffusers.StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=encoders["l"], tokenizer=tokenizers["l"],
        text_encoder_2=encoders["g"], tokenizer_2=tokenizers["g"], text_encoder_3=encoders["t5"],
        tokenizer_3=tokenizers["t5"])


def diffusers_encode(family: str, pipe, prompt: str, length: int):
    """(cond, pooled) of diffusers' encode_prompt at T5 ``max_sequence_length`` = ``length``."""
    if family == "flux":
        cond, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=length)
        return cond, pooled
    cond, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                            do_classifier_free_guidance=False, max_sequence_length=length)
    return cond, pooled


def relative(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"n/a (shapes {tuple(a.shape)} vs {tuple(b.shape)})"
    return f"{float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)):.1e}"


def family_rows(te, family: str, args) -> list:
    encoders = hf_encoders(PARTS[family], args.t5_layers)
    clip = textenc_clip(family, encoders)
    tokenizer, comfy = comfy_family(te, family, encoders, args.t5_layers)
    pipe = diffusers_pipeline(family, encoders, hf_tokenizers())
    label = f"{family}, {args.t5_layers}/24 T5 blocks, fp32, {torch.get_num_threads()} threads"
    rows = []
    with torch.inference_mode():
        for case, prompt in PROMPTS.items():
            candidates = {
                "textenc": lambda p=prompt: clip.encode_from_tokens(clip.tokenize(p), return_pooled=True),
                "comfy": lambda p=prompt: comfy.encode_token_weights(tokenizer.tokenize_with_weights(p))}
            if case == "short":
                for name, length in (("diffusers", COMFY_T5_LENGTH[family]),
                                     ("diffusers-default", DIFFUSERS_T5_LENGTH[family])):
                    candidates[name] = lambda p=prompt, n=length: diffusers_encode(family, pipe, p, n)
            outs = {name: fn() for name, fn in candidates.items()}
            (cond, pooled), theirs = outs["textenc"], outs["comfy"]
            note = f"outputs torch.equal: cond {torch.equal(cond, theirs[0])}, pooled {torch.equal(pooled, theirs[1])}"
            stats = interleaved(candidates, repeats=args.repeats)
            rows.append(ratio_row(f"{family} textenc vs ComfyUI (speed-up)", f"{case} prompt, {label}",
                                  stats["textenc"], stats["comfy"], 0.95, ref_label="comfy",
                                  higher_is_better=True, note=note))
            if case == "short":
                d_cond, d_pooled = outs["diffusers"]
                note = (f"T5 {COMFY_T5_LENGTH[family]} both; max rel diff cond {relative(cond, d_cond)}, "
                        f"pooled {relative(pooled, d_pooled)}")
                if family == "sd3":  # ComfyUI's SD3 clip_l pooled is unprojected, diffusers' projected
                    note += (f" (L part {relative(pooled[:, :768], d_pooled[:, :768])}, "
                             f"G part {relative(pooled[:, 768:], d_pooled[:, 768:])})")
                rows.append(ratio_row(f"{family} textenc vs diffusers encode_prompt, matched (speed-up)",
                                      f"{case} prompt, {label}", stats["textenc"], stats["diffusers"], 0.0,
                                      ref_label="diffusers", higher_is_better=True, note=note))
                rows.append(ratio_row(f"{family} textenc vs diffusers encode_prompt, its default (speed-up)",
                                      f"{case} prompt, {label}", stats["textenc"], stats["diffusers-default"], 0.0,
                                      ref_label="diffusers", higher_is_better=True,
                                      note=f"T5 {COMFY_T5_LENGTH[family]} vs {DIFFUSERS_T5_LENGTH[family]} tokens; "
                                           f"diffusers cond shape {tuple(outs['diffusers-default'][0].shape)}"))
            rows[-1]["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            for row in rows[-3 if case == "short" else -1:]:
                print(json.dumps(row), flush=True)
    del clip, comfy, pipe, encoders
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI source tree")
    parser.add_argument("--deps", help="an extra folder for ComfyUI's imports (appended to sys.path)")
    parser.add_argument("--families", default="flux,sd3")
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from comfy_crosscheck_families import import_comfy

    te = import_comfy(args.comfyui, args.deps)
    import diffusers

    info = {**machine(), "diffusers": diffusers.__version__}
    print(json.dumps(info), flush=True)
    rows = [row for family in args.families.split(",") for row in family_rows(te, family, args)]
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(json.dumps({"end": info["loadavg_end"]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
