"""Cross-check ``syntax="a1111"`` on Flux (and SD3's chunks and T5 tokens) against Forge's own
text engines (an outside oracle), on CPU.

Usage (torch, transformers, safetensors, Pillow installed)::

    git --git-dir /path/to/stable-diffusion-webui-forge/.git archive HEAD backend/text_processing \\
        | tar -x -C /tmp/forge
    python bench/a1111_families_forge.py --forge /tmp/forge [--threads 1,2]

Forge's ``backend/text_processing`` (``t5_engine.py``, ``classic_engine.py``, ``parsing.py``,
``emphasis.py``, ``textual_inversion.py``) is imported from ``--forge`` at run time (nothing of it
is copied here); the two names it imports from the rest of Forge are stubbed: ``modules.shared.opts``
(holding the emphasis setting) and ``backend.memory_management.text_encoder_device`` (the CPU).
Its engines run on transformers' models with the tiny random weights of ``tests/family_fixtures.py``
(``CLIPTextModel`` for CLIP-L, ``T5EncoderModel`` behind a wrapper returning the last hidden state,
as Forge's own T5 does), and textenc loads the same weights from files.

Compared, per torch thread count and for each emphasis setting ("Original", "No norm", "Ignore",
"None" = textenc's ``weight_mode`` ``a1111``, ``a1111_no_norm``, ``none`` and
``disable_weights=True``):

* Flux, as ``backend/diffusion_engine/flux.py`` assembles it: cond = the T5 engine's output,
  pooled = the classic engine's (CLIP-L, clip skip 1, final norm) pooled output; textenc's
  ``CLIP.tokenize(..., syntax="a1111")`` + ``encode_from_tokens`` must be within 1e-5 relative,
  and the T5 tokens and multipliers (``T5TextProcessingEngine.tokenize_line``) equal;
* ``BREAK`` on Flux: Forge's T5 engine returns one row per part for one prompt (what textenc
  refuses);
* SD3's A1111 chunks: the classic engine's ``tokenize_line`` (Forge's copy of A1111's chunking)
  for CLIP-L (end-padded) and CLIP-G (0 after the first end) against textenc's SD3 windows, and
  the T5 ids of the pieces (``T5TextProcessingEngine.tokenize_line``, before its padding) against
  textenc's SD3 T5 sequence. (A1111's joint L‖G emphasis and unweighted T5 are in no Forge
  engine; ``tests/test_a1111_families.py`` checks them against a restatement of A1111's code.)

Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from family_fixtures import clip_model, t5_model, weights  # noqa: E402

PROMPTS = ["", "a photo of a cat", "a (red:1.3) cat on a [mat], ((tall)) grass (\\(photo\\))",
           "(a (b:1.5):1.2) c, [[d]]", "(long:1.2) " + ", ".join(["snowy forest at dawn"] * 22),
           "café 日本語 12345 </s> typed", "unclosed (bracket and [square"]
EMPHASIS = {"Original": {"weight_mode": "a1111"}, "No norm": {"weight_mode": "a1111_no_norm"},
            "Ignore": {"weight_mode": "none"}, "None": {"weight_mode": "a1111", "disable_weights": True}}
TOLERANCE = 1e-5
WORST = {"cond": 0.0, "pooled": 0.0}  # the largest relative difference seen


def import_forge(path: str):
    """Forge's text engines from ``path`` (a checkout or an extracted ``backend/text_processing``)."""
    root = Path(path).resolve()
    opts = types.SimpleNamespace(emphasis="Original")
    shared = types.ModuleType("modules.shared")
    shared.opts = opts
    modules = types.ModuleType("modules")
    modules.shared = shared
    backend = types.ModuleType("backend")
    backend.__path__ = [str(root / "backend")]
    text_processing = types.ModuleType("backend.text_processing")
    text_processing.__path__ = [str(root / "backend" / "text_processing")]
    memory = types.ModuleType("backend.memory_management")
    memory.text_encoder_device = lambda: torch.device("cpu")
    sys.modules.update({"modules": modules, "modules.shared": shared, "backend": backend,
                        "backend.text_processing": text_processing, "backend.memory_management": memory})
    from backend.text_processing import classic_engine, t5_engine
    return opts, classic_engine, t5_engine


class T5Transformer(torch.nn.Module):
    """transformers' T5 encoder called as Forge calls its own: ``(input_ids) -> last hidden state``."""

    def __init__(self, model):
        super().__init__()
        self.model, self.shared = model, model.shared

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


class CLIPTransformer(torch.nn.Module):
    """transformers' CLIP text model called as Forge calls its own: ``(tokens, output_hidden_states)``
    -> an output with ``hidden_states`` and ``pooler_output``; ``text_model`` and
    ``text_projection`` reachable as Forge reaches them."""

    def __init__(self, with_projection):
        super().__init__()
        self.text_model, self.text_projection = with_projection.text_model, with_projection.text_projection

    def forward(self, input_ids, output_hidden_states=False):
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


def models():
    clip_l, clip_g, t5 = clip_model("l", 31), clip_model("g", 32), t5_model("t5", 33)
    with torch.no_grad():  # CLIP outputs with a mean away from 0 ("Original" divides by it)
        for model in (clip_l, clip_g):
            model.text_model.encoder.layers[1].mlp.fc2.bias += 1.0
            model.text_model.final_layer_norm.bias += 1.0
        t5.encoder.final_layer_norm.weight.add_(1.0)
    return clip_l, clip_g, t5


def tokenizers():
    import transformers
    from textenc.prompts.tokenizer import DEFAULT_VOCAB
    from textenc.text_encoders.t5 import T5_VOCAB
    clip = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    clip.pad_token = "<|endoftext|>"  # Flux's and SD3's tokenizer (CLIP-L): pad = end
    clip_g = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    clip_g.pad_token = "!"  # SD3's tokenizer_2 (CLIP-G): pad id 0
    t5 = transformers.T5TokenizerFast(tokenizer_file=f"{T5_VOCAB}/tokenizer.json")
    return clip, clip_g, t5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def ours(folder: Path, clip_l, clip_g, t5):
    from safetensors.torch import save_file

    from textenc.sd import load_clip
    paths = {}
    for name, model in (("l", clip_l), ("g", clip_g), ("t5", t5)):
        paths[name] = folder / f"{name}.safetensors"
        save_file(weights(model), str(paths[name]))
    return (load_clip([paths["t5"], paths["l"]], clip_type="flux"),
            load_clip([paths["l"], paths["g"], paths["t5"]], clip_type="sd3"))


def check_flux(forge, engines, flux, prompt: str, setting: str) -> list[str]:
    opts, engine_l, engine_t5 = forge[0], engines["l"], engines["t5"]
    opts.emphasis = setting
    kwargs = dict(EMPHASIS[setting])
    mode = kwargs.pop("weight_mode")
    tokens = flux.tokenize(prompt, syntax="a1111", **kwargs)
    cond, pooled = flux.encode_from_tokens(tokens, return_pooled=True, options={"weight_mode": mode})
    engine_t5.emphasis = forge[2].emphasis.get_current_option(setting)()
    chunks, _ = engine_t5.tokenize_line(prompt)
    problems = []
    if [t for t, _ in tokens["t5xxl"][0]] != chunks[0].tokens or \
            [w for _, w in tokens["t5xxl"][0]] != [float(w) for w in chunks[0].multipliers]:
        problems.append("T5 tokens/multipliers differ")
    with torch.no_grad():
        want_cond = engine_t5([prompt])
        want_pooled = engine_l([prompt])[1]
    for name, got, want in (("cond", cond, want_cond), ("pooled", pooled, want_pooled)):
        if got.shape == want.shape:
            WORST[name] = max(WORST[name], relative(got, want))
        if got.shape != want.shape or relative(got, want) > TOLERANCE:
            problems.append(f"{name}: {tuple(got.shape)} vs {tuple(want.shape)}, "
                            f"rel {relative(got, want) if got.shape == want.shape else float('nan'):.2e}")
    return problems


def check_sd3_tokens(engines, sd3, prompt: str) -> list[str]:
    tokens = sd3.tokenize(prompt, syntax="a1111")
    problems = []
    for role, engine in (("l", engines["l"]), ("g", engines["g"])):
        chunks, _ = engine.tokenize_line(prompt)
        want = []
        for chunk in chunks:
            ids = list(chunk.tokens)
            if engine.id_end != engine.id_pad:  # process_tokens: pad after the first end token
                cut = ids.index(engine.id_end) + 1
                ids = ids[:cut] + [engine.id_pad] * (len(ids) - cut)
            want.append(ids)
        if [[t for t, _ in w] for w in tokens[role]] != want:
            problems.append(f"SD3 {role} chunks differ")
        if [[w for _, w in window] for window in tokens[role]] != [[float(m) for m in c.multipliers] for c in chunks]:
            problems.append(f"SD3 {role} multipliers differ")
    t5_chunks, _ = engines["t5"].tokenize_line(prompt)

    def unpadded(ids: list[int]) -> list[int]:
        while ids and ids[-1] == 0:
            ids = ids[:-1]
        return ids
    if unpadded([t for t, _ in tokens["t5xxl"][0]]) != unpadded(list(t5_chunks[0].tokens)):
        problems.append("SD3 T5 ids differ")
    return problems


def build_engines(forge, clip_l, clip_g, t5):
    opts, classic, t5_engine = forge
    clip_tok, clip_g_tok, t5_tok = tokenizers()
    holder = lambda model: types.SimpleNamespace(transformer=model)  # noqa: E731
    common = dict(embedding_dir=None, minimal_clip_skip=1, clip_skip=1, return_pooled=True)
    return {"l": classic.ClassicTextProcessingEngine(holder(CLIPTransformer(copy.deepcopy(clip_l))), clip_tok,
                                                    embedding_key="clip_l", embedding_expected_shape=64,
                                                    text_projection=False, final_layer_norm=True, **common),
            "g": classic.ClassicTextProcessingEngine(holder(CLIPTransformer(copy.deepcopy(clip_g))), clip_g_tok,
                                                    embedding_key="clip_g", embedding_expected_shape=128,
                                                    text_projection=True, final_layer_norm=False, **common),
            "t5": t5_engine.T5TextProcessingEngine(holder(T5Transformer(t5)), t5_tok)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", required=True, help="folder holding Forge's backend/text_processing")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    forge = import_forge(args.forge)
    clip_l, clip_g, t5 = models()
    engines = build_engines(forge, clip_l, clip_g, t5)
    flux, sd3 = ours(Path(tempfile.mkdtemp()), clip_l, clip_g, t5)
    failed = 0
    for threads in [int(n) for n in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for setting in EMPHASIS:
            for prompt in PROMPTS:
                problems = check_flux(forge, engines, flux, prompt, setting)
                failed += bool(problems)
                print(f"threads {threads} flux {setting:8} {prompt[:40]!r:44} {'ok' if not problems else problems}")
        forge[0].emphasis = "Original"
        for engine in engines.values():
            engine.emphasis = forge[2].emphasis.get_current_option("Original")()
        for prompt in PROMPTS:
            problems = check_sd3_tokens(engines, sd3, prompt)
            failed += bool(problems)
            print(f"threads {threads} sd3 chunks/T5 ids {prompt[:40]!r:44} {'ok' if not problems else problems}")
    forge[0].emphasis = "Original"
    with torch.no_grad():
        rows = engines["t5"](["a cat BREAK a dog"]).shape[0]
    print(f"Forge's T5 engine on one Flux prompt with BREAK: {rows} rows on the batch axis (textenc refuses BREAK)")
    print(f"Flux worst relative difference: cond {WORST['cond']:.2e}, pooled {WORST['pooled']:.2e}")
    print("FAILED" if failed else "all equal", f"({failed} mismatches)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
