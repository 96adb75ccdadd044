"""Cross-check textenc's T5 v1.1 / UMT5 encoders against ComfyUI's own code (an outside oracle), on CPU.

Usage (torch, transformers, safetensors and ComfyUI's import needs installed)::

    python bench/comfy_crosscheck_t5.py --comfyui /path/to/ComfyUI [--deps /extra/site-packages]
        [--threads 1,2] [--min-lengths 77,256,512]

ComfyUI is imported from ``--comfyui`` at run time (nothing of it is copied here) and forced
onto the CPU (its ``--cpu`` flag). For T5 v1.1 and UMT5, one set of tiny random weights in the
real HF key layout (``tests/t5_weights.py``, vocab 32128 so the real tokenizer's ids fit) is
loaded into ComfyUI's ``SDClipModel(model_class=comfy.text_encoders.t5.T5)`` (masked and
zeroed after ``</s>`` for UMT5, as ComfyUI's ``UMT5XXlModel``) and into textenc's
``T5XXLModel`` / ``UMT5XXlModel``.

Compared, at each torch thread count and minimum length:

* ``tokenize_with_weights`` (with and without word ids) of textenc's ``T5XXLTokenizer`` and
  ComfyUI's ``SDTokenizer`` configured as its ``T5XXLTokenizer`` (on the same bundled
  tokenizer file): must be equal;
* ``encode_token_weights`` (last layer, and ``layer`` -2 as ``CLIPSetLastLayer`` sets it):
  ``torch.equal`` and max relative difference, for each textenc attention backend
  (``TEXTENC_ATTENTION``) against ComfyUI's CPU default.

Exit status 1 when tokens differ or the default backend (``auto``) is not bit-equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from t5_weights import TINY, random_t5_state_dict  # noqa: E402

from textenc.text_encoders.t5 import T5_VOCAB, T5XXLModel, T5XXLTokenizer, UMT5XXlModel  # noqa: E402

VOCAB = 32128
BACKENDS = ("auto", "basic", "bmm", "sdpa", "split")
PROMPTS = ["", "a photo of a cat", "(long:1.2) " + "word " * 300, "a (red:1.3) cat on a (mat:0.7), (\\(photo\\))",
           "((big dog)) </s> typed", "word " * 90, "café 日本語 😀 12345", "(a (b:1.5):1.2) c",
           "  repeated   spaces\nand\nnewlines  ", "digits 3.14159 and 1,000,000"]


def import_comfy(path: str, deps: str | None):
    """ComfyUI's modules, forced onto the CPU before ``model_management`` is imported."""
    sys.path.insert(0, str(Path(path).resolve()))
    if deps:
        sys.path.append(deps)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sd1_clip
    import comfy.text_encoders.t5
    return comfy.sd1_clip, comfy.text_encoders.t5


def comfy_tokenizer(sd1_clip, min_length: int):
    """ComfyUI's T5XXLTokenizer settings (comfy/text_encoders/sd3_clip.py) on textenc's bundled file."""
    import transformers
    return sd1_clip.SDTokenizer(T5_VOCAB, pad_with_end=False, embedding_size=4096, embedding_key="t5xxl",
                                tokenizer_class=transformers.T5TokenizerFast, has_start_token=False,
                                pad_to_max_length=False, max_length=99999999, min_length=min_length)


def comfy_model(sd1_clip, comfy_t5, model_type: str, sd: dict):
    config = {**TINY, "vocab_size": VOCAB, "model_type": model_type, "dense_act_fn": "gelu_pytorch_tanh",
              "is_gated_act": True}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    masked = model_type == "umt5"
    model = sd1_clip.SDClipModel(device="cpu", textmodel_json_config=f.name, dtype=torch.float32,
                                 special_tokens={"end": 1, "pad": 0}, model_class=comfy_t5.T5,
                                 enable_attention_masks=masked, zero_out_masked=masked, model_options={})
    os.unlink(f.name)
    model.load_sd(sd)
    return model


def compare_encoders(sd1_clip, comfy_t5, tokenizer, threads: int) -> bool:
    """Print one line per (model, backend, layer); True when the ``auto`` backend is bit-equal throughout."""
    ok = True
    for model_type in ("t5", "umt5"):
        sd = random_t5_state_dict(model_type, seed=11, vocab_size=VOCAB)
        theirs = comfy_model(sd1_clip, comfy_t5, model_type, sd)
        for backend in BACKENDS:
            os.environ["TEXTENC_ATTENTION"] = backend
            ours = (UMT5XXlModel if model_type == "umt5" else T5XXLModel).from_state_dict(sd)
            for layer in (None, -2):
                equal, worst = 0, 0.0
                for prompt in PROMPTS:
                    tokens = tokenizer.tokenize_with_weights(prompt)
                    theirs.reset_clip_options() if layer is None else theirs.set_clip_options({"layer": layer})
                    with torch.no_grad():
                        zc, _ = theirs.encode_token_weights(tokens)
                        zo, _ = ours.encode_token_weights(tokens, options=None if layer is None else {"layer": layer})
                    equal += torch.equal(zc, zo)
                    worst = max(worst, float((zc - zo).abs().max() / zc.abs().max()))
                ok &= backend != "auto" or equal == len(PROMPTS)
                print(f"  {model_type} threads={threads} backend={backend} layer={layer}: "
                      f"{equal}/{len(PROMPTS)} bit-equal, max rel diff {worst:.2e}")
        os.environ.pop("TEXTENC_ATTENTION", None)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI source tree")
    parser.add_argument("--deps", help="an extra folder for ComfyUI's imports (appended to sys.path)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--min-lengths", default="77,256,512")
    args = parser.parse_args()
    sd1_clip, comfy_t5 = import_comfy(args.comfyui, args.deps)
    ok = True
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for min_length in (int(n) for n in args.min_lengths.split(",")):
            ours_tok, theirs_tok = T5XXLTokenizer(min_length=min_length), comfy_tokenizer(sd1_clip, min_length)
            tokens_equal = all(ours_tok.tokenize_with_weights(p, w) == theirs_tok.tokenize_with_weights(p, w)
                               for p in PROMPTS for w in (False, True))
            print(f"threads={threads} min_length={min_length}: tokens equal: {tokens_equal}")
            ok &= tokens_equal
            ok &= compare_encoders(sd1_clip, comfy_t5, ours_tok, threads)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
