"""Cross-check textenc's SD3, Flux and Wan families against ComfyUI's own code (an outside oracle), on CPU.

Usage (torch, transformers, safetensors, sentencepiece and ComfyUI's import needs installed)::

    python bench/comfy_crosscheck_families.py --comfyui /path/to/ComfyUI [--deps /extra/site-packages]
        [--threads 1,2]

ComfyUI is imported from ``--comfyui`` at run time (nothing of it is copied here) and forced onto
the CPU (its ``--cpu`` flag). Tiny random CLIP-L (width 64), CLIP-G (width 128), T5 v1.1
(d_model 4096, as ComfyUI's SD3 concatenation needs, with 3 small blocks; vocab 32128) and UMT5
(d_model 192, vocab 512, with a tiny SentencePiece model as ``spiece_model``) in the real HF key
layouts (``tests/family_fixtures.py``) are loaded into ComfyUI's ``SD3ClipModel`` (all three, and
every subset), ``FluxClipModel`` and ``WanT5Model`` (their configs shrunk through ComfyUI's own
``<name>_model_config`` model options) and into textenc through ``load_clip(state_dicts=...)``.

Compared, per torch thread count, for each prompt:

* the tokens of ComfyUI's ``SD3Tokenizer`` / ``FluxTokenizer`` / ``WanT5Tokenizer`` and textenc's
  ``CLIP.tokenize`` (with and without word ids): must be equal;
* cond and pooled of ``encode_token_weights`` with the default layers and with ``layer`` -1 / -2
  set on every part as ComfyUI's ``CLIPSetLastLayer`` does (``set_clip_options``), against
  textenc's ``clip_layer``: ``torch.equal`` and the max relative difference.

Exit status 1 when tokens differ, a cond is not bit-equal, or a pooled output differs by more than
1e-5 relative (pooled at a hidden CLIP layer is computed on the pooled row alone in textenc, so it
rounds differently, as ``bench/RESULTS.md`` reports for SD1/SD2/SDXL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from family_fixtures import T5_SHAPE, UMT5_VOCAB_SIZE, clip_model, spiece_bytes, t5_model, weights  # noqa: E402

from textenc.sd import load_clip  # noqa: E402

PROMPTS = ["", "a photo of a cat", "(long:1.2) " + "word " * 100, "a (red:1.3) cat on a (mat:0.7), (\\(photo\\))",
           "((big dog)) </s> typed", "café 日本語 😀 12345", "(a (b:1.5):1.2) c", "  repeated   spaces\nand\nnewlines  "]
T5_WIDE = dict(d_model=4096, d_ff=64, d_kv=16, num_heads=4, num_layers=3)
SD3_SUBSETS = [("l", "g", "t5"), ("l",), ("g",), ("l", "g"), ("t5",), ("l", "t5"), ("g", "t5")]


def import_comfy(path: str, deps: str | None):
    """ComfyUI's family modules, forced onto the CPU before ``model_management`` is imported."""
    sys.path.insert(0, str(Path(path).resolve()))
    if deps:
        sys.path.append(deps)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import comfy.text_encoders.wan
    return comfy.text_encoders


def clip_overrides(model) -> dict:
    c = model.config
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers":
            c.num_hidden_layers, "num_attention_heads": c.num_attention_heads, "projection_dim": c.projection_dim,
            "hidden_act": c.hidden_act}


def models():
    t5 = t5_model("t5", 3, **T5_WIDE)
    umt5 = t5_model("umt5", 4)
    sizes = {"t5": T5_WIDE, "umt5": {k: T5_SHAPE[k] for k in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers")}}
    options = {"clip_l_model_config": clip_overrides(clip_model("l", 1)),
               "clip_g_model_config": clip_overrides(clip_model("g", 2)),
               "t5xxl_model_config": dict(sizes["t5"]),
               "umt5xxl_model_config": {**sizes["umt5"], "vocab_size": UMT5_VOCAB_SIZE}}
    spiece = torch.tensor(list(spiece_bytes()), dtype=torch.uint8)
    sds = {"l": weights(clip_model("l", 1)), "g": weights(clip_model("g", 2)), "t5": weights(t5),
           "umt5": {**weights(umt5), "spiece_model": spiece}}
    return sds, options, spiece


def comfy_family(te, family: str, parts: tuple, sds: dict, options: dict, spiece):
    """ComfyUI's (tokenizer, model) of ``family`` holding the tiny weights."""
    if family == "sd3":
        model = te.sd3_clip.SD3ClipModel(clip_l="l" in parts, clip_g="g" in parts, t5="t5" in parts,
                                         dtype=torch.float32, model_options=options)
        tokenizer = te.sd3_clip.SD3Tokenizer()
        for part, attribute in (("l", "clip_l"), ("g", "clip_g"), ("t5", "t5xxl")):
            if part in parts:  # per part: ComfyUI's own load_sd tells L and G apart by depth (30+ layers)
                getattr(model, attribute).load_sd(sds[part])
    elif family == "flux":
        model, tokenizer = te.flux.FluxClipModel(dtype=torch.float32, model_options=options), te.flux.FluxTokenizer()
        model.clip_l.load_sd(sds["l"])
        model.t5xxl.load_sd(sds["t5"])
    else:
        model = te.wan.WanT5Model(dtype=torch.float32, model_options=options)
        tokenizer = te.wan.WanT5Tokenizer(tokenizer_data={"spiece_model": spiece})
        model.load_sd(sds["umt5"])
    return tokenizer, model


def ours(family: str, parts: tuple, sds: dict):
    named = {"l": "clip_l.transformer.", "g": "clip_g.transformer.", "t5": "", "umt5": ""}  # roles by prefix
    return load_clip(None, clip_type=family, state_dicts=[
        (part, {named[part] + k: v for k, v in sds[part].items()}) for part in parts])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare(te, family: str, parts: tuple, sds: dict, options: dict, spiece, threads: int) -> bool:
    tokenizer, theirs = comfy_family(te, family, parts, sds, options, spiece)
    clip = ours(family, parts, sds)
    tokens_equal = all(clip.tokenize(p, w) == tokenizer.tokenize_with_weights(p, w)
                       for p in PROMPTS for w in (False, True))
    ok = tokens_equal
    for layer in (None, -1, -2):
        mine = clip.clone()
        mine.clip_layer(layer)
        theirs.reset_clip_options()
        if layer is not None:
            theirs.set_clip_options({"layer": layer})
        cond_equal, pooled_equal, worst_cond, worst_pooled = 0, 0, 0.0, 0.0
        for prompt in PROMPTS:
            tokens = tokenizer.tokenize_with_weights(prompt)
            with torch.no_grad():
                out = theirs.encode_token_weights(tokens)
            cond, pooled = mine.encode_from_tokens(tokens, return_pooled=True)
            cond_equal += torch.equal(cond, out[0])
            worst_cond = max(worst_cond, relative(cond, out[0]))
            if pooled is None or out[1] is None:
                pooled_equal += pooled is None and out[1] is None
            else:
                pooled_equal += torch.equal(pooled, out[1])
                worst_pooled = max(worst_pooled, relative(pooled, out[1]))
        # cond and pooled must be bit-equal: since issue 27 point 2 a CLIP part at a hidden layer runs
        # every row through every layer and projects pooled rows in ComfyUI's batch (no tail_rows).
        ok &= cond_equal == len(PROMPTS) and pooled_equal == len(PROMPTS)
        print(f"  {family} {'+'.join(parts)} threads={threads} layer={layer}: tokens equal {tokens_equal}; "
              f"cond {cond_equal}/{len(PROMPTS)} bit-equal (max rel {worst_cond:.1e}); "
              f"pooled {pooled_equal}/{len(PROMPTS)} bit-equal (max rel {worst_pooled:.1e})")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI source tree")
    parser.add_argument("--deps", help="an extra folder for ComfyUI's imports (appended to sys.path)")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    te = import_comfy(args.comfyui, args.deps)
    sds, options, spiece = models()
    ok = True
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        runs = [("sd3", parts) for parts in SD3_SUBSETS] + [("flux", ("l", "t5")), ("wan", ("umt5",))]
        for family, parts in runs:
            ok &= compare(te, family, parts, sds, options, spiece, threads)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
