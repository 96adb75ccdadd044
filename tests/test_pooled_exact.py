"""Pooled output at an intermediate layer (clip skip, the SD2 and SDXL defaults) is
ComfyUI's bit for bit on CPU with the default attention (issue 27, point 2).

ComfyUI's algorithm, written out from ``comfy/clip_model.py`` and ``comfy/sd1_clip.py``:
``ClipTokenWeightEncoder.encode_token_weights`` puts a prompt's windows in one batch and,
when any weight is not 1, the empty prompt's window after them; ``CLIPTextModel_`` runs
every layer on every row of that batch, takes the intermediate layer's output (final
layer norm or not, by family), final-layer-norms the last layer and pools the row of the
first end token; ``CLIPTextModel`` projects the pooled rows of the whole batch; the
first window's pooled row is the result. The oracle runs that batch through
transformers' ``CLIPTextModelWithProjection`` (eager attention, ``output_hidden_states``:
all rows through all layers), whose bits ComfyUI's default CPU attention has.
Checked for SD1 at clip skip 2, SD2 and SDXL (their defaults), one and two windows,
weighted and not, through ``encode_from_tokens``, ``encode_batch`` (the dataset
encoder's path), ``encode_dataset`` and the ``CLIPTextEncode`` node, at 1 and 2 threads.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from random_weights import randomize_
from test_sd1_clip import END, START, hf_state
from textenc.loading.convert import to_layout
from textenc.sd import load_clip

transformers = pytest.importorskip("transformers")

WIDTH, LAYERS = 128, 4
#: family → (role, pad token, activation, seed) per encoder; the layer ComfyUI uses
#: (SD1 at clip skip 2) and whether that layer is final-layer-normed.
FAMILIES = {
    "sd1": {"roles": (("l", END, "quick_gelu", 11),), "layer": -2, "normed": True, "projected": False},
    "sd2": {"roles": (("h", 0, "gelu", 12),), "layer": -2, "normed": True, "projected": True},
    "sdxl": {"roles": (("l", END, "quick_gelu", 13), ("g", 0, "gelu", 14)), "layer": -2, "normed": False,
             "projected": True},
}
PROMPTS = {
    "plain": "a photo of a red fox in deep snow, highly detailed",
    "weighted": "a (red:1.3) fox in (deep snow:0.7), ((sharp))",
    "two windows": ", ".join(["a (red:1.2) fox in the snow"] * 12),
    "two windows plain": ", ".join(["a red fox in the snow"] * 12),
}


def _hf(activation: str, seed: int) -> torch.nn.Module:
    config = transformers.CLIPTextConfig(
        hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=2,
        projection_dim=WIDTH, hidden_act=activation, eos_token_id=END, bos_token_id=START)
    model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="eager").eval()
    randomize_(model, seed)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Per family: the transformers models by role and the textenc CLIP loaded from a file."""
    folder = tmp_path_factory.mktemp("pooled_exact")
    hf = {name: {role: _hf(act, seed) for role, _, act, seed in spec["roles"]} for name, spec in FAMILIES.items()}
    files = {
        "sd1": to_layout(hf_state(hf["sd1"]["l"], projection=False), "sd1"),
        "sd2": to_layout(hf_state(hf["sd2"]["h"]), "sd2"),
        "sdxl": {**to_layout(hf_state(hf["sdxl"]["l"], projection=False), "sdxl_l"),
                 **to_layout(hf_state(hf["sdxl"]["g"]), "sdxl_g")},
    }
    out = {}
    for name, sd in files.items():
        path = folder / f"{name}.safetensors"
        save_file(sd, str(path))
        clip = load_clip(str(path))
        if name == "sd1":
            clip.clip_layer(-2)  # clip skip 2
        out[name] = {"hf": hf[name], "clip": clip, "path": path}
    return out


def comfy_encode(family: str, hf: dict, tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``(cond (1, 77·W, D), pooled (1, P))`` of ``tokens`` ({role: windows of pairs})."""
    spec = FAMILIES[family]
    conds, pooled = [], None
    for role, pad, _, _ in spec["roles"]:
        windows = tokens[role]
        ids = [[pair[0] for pair in window] for window in windows]
        weights = [[pair[1] for pair in window] for window in windows]
        has_weights = any(w != 1.0 for row in weights for w in row)
        if has_weights:  # the empty prompt rides in the same batch
            ids.append([START, END] + [pad] * 75)
        model = hf[role]
        with torch.no_grad():
            out = model(torch.tensor(ids), output_hidden_states=True)
            hidden = out.hidden_states[spec["layer"]]
            z = model.text_model.final_layer_norm(hidden) if spec["normed"] else hidden
            if spec["projected"]:
                first = out.text_embeds[0:1]  # projected over the whole batch, as ComfyUI
            else:
                row = ids[0].index(END)
                first = out.last_hidden_state[0:1, row]
        z = z.clone()
        if has_weights:
            for k, row in enumerate(weights):
                for j, w in enumerate(row):
                    if w != 1.0:
                        z[k, j] = (z[k, j] - z[-1, j]) * w + z[-1, j]
        conds.append(z[: len(windows)].reshape(1, -1, z.shape[-1]))
        pooled = first
    return torch.cat(conds, dim=-1), pooled


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encode_from_tokens_is_comfyui_bit_for_bit(models, family, threads):
    clip, hf = models[family]["clip"], models[family]["hf"]
    for name, prompt in PROMPTS.items():
        tokens = clip.tokenize(prompt)
        windows = len(next(iter(tokens.values())))
        assert windows == (2 if name.startswith("two") else 1), name
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        ref_cond, ref_pooled = comfy_encode(family, hf, tokens)
        assert torch.equal(cond, ref_cond), (family, name)
        assert torch.equal(pooled, ref_pooled), (family, name, float((pooled - ref_pooled).abs().max()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encode_batch_is_comfyui_bit_for_bit(models, family, threads):
    """The batched encode (the dataset encoder's): prompts of equal window counts share
    one forward; each still gets ComfyUI's bits."""
    clip, hf = models[family]["clip"], models[family]["hf"]
    tokens = [clip.tokenize(prompt) for prompt in PROMPTS.values()]
    for (cond, pooled), one in zip(clip.encode_batch(tokens), tokens):
        ref_cond, ref_pooled = comfy_encode(family, hf, one)
        assert torch.equal(cond, ref_cond) and torch.equal(pooled, ref_pooled), family


def test_dataset_encoder_is_comfyui_bit_for_bit(models, tmp_path, threads):
    from textenc.dataset import encode_dataset, open_shards

    captions = list(PROMPTS.values())
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(captions) + "\n", encoding="utf-8")
    out = tmp_path / "shards"
    encode_dataset(source, model=models["sdxl"]["path"], out=out, dtype="fp32", threads=threads,
                   progress=False)
    clip, hf = models["sdxl"]["clip"], models["sdxl"]["hf"]
    rows = list(open_shards(out))
    assert len(rows) == len(captions)
    for caption, (_, cond, pooled) in zip(captions, rows):
        ref_cond, ref_pooled = comfy_encode("sdxl", hf, clip.tokenize(caption))
        assert torch.equal(cond.reshape(ref_cond.shape), ref_cond)
        assert torch.equal(pooled.reshape(ref_pooled.shape), ref_pooled)


def test_text_encode_node_is_comfyui_bit_for_bit(models, threads):
    from textenc_nodes.text_encode import CLIPTextEncode

    clip, hf = models["sd2"]["clip"], models["sd2"]["hf"]
    prompt = PROMPTS["weighted"]
    ((cond, extra),) = CLIPTextEncode().encode(clip, prompt)[0]
    ref_cond, ref_pooled = comfy_encode("sd2", hf, clip.tokenize(prompt))
    assert torch.equal(cond, ref_cond) and torch.equal(extra["pooled_output"], ref_pooled)


# ---- the faster path, an option at every entry point -------------------------------------

def test_fast_pooled_option_is_close_and_cond_unchanged(models, threads):
    """``fast_pooled`` runs the layers after the intermediate one for the pooled row only:
    cond is the same bits, pooled within fp32 rounding; a batch still equals each prompt alone."""
    for family in FAMILIES:
        clip = models[family]["clip"]
        tokens = [clip.tokenize(prompt) for prompt in PROMPTS.values()]
        batched = clip.encode_batch(tokens, options={"fast_pooled": True})
        for one, (batch_cond, batch_pooled) in zip(tokens, batched):
            exact = clip.encode_from_tokens(one, return_pooled=True)
            fast = clip.encode_from_tokens(one, return_pooled=True, options={"fast_pooled": True})
            assert torch.equal(fast[0], exact[0]), family
            assert float((fast[1] - exact[1]).abs().max()) <= 1e-5, family
            assert torch.equal(batch_cond, fast[0]) and torch.equal(batch_pooled, fast[1]), family


def test_fast_pooled_is_offered_by_every_entry_point(models, tmp_path):
    import inspect

    from textenc.cli import build_parser
    from textenc.dataset import encode_dataset, open_shards
    from textenc.dataset.cli import build_parser as dataset_parser
    from textenc.diffusers import encode_for_pipeline
    from textenc.errors import PromptError
    from textenc_nodes.text_encode import CLIPTextEncodeAdvancedTextenc

    for parser, argv in ((build_parser(), ["encode", "--help"]), (dataset_parser(), ["--help"])):
        help_text = _help(parser, argv)
        assert "--fast-pooled" in help_text and "ComfyUI's" in help_text
    assert inspect.signature(encode_for_pipeline).parameters["fast_pooled"].default is False
    assert "fast_pooled" in inspect.getdoc(encode_for_pipeline)
    node_input = CLIPTextEncodeAdvancedTextenc.INPUT_TYPES()["optional"]["fast_pooled"]
    assert node_input[0] == "BOOLEAN" and node_input[1]["default"] is False and node_input[1]["tooltip"]
    clip = models["sd1"]["clip"]
    with pytest.raises(PromptError, match="fast_pooled must be True or False"):
        clip.encode_from_tokens(clip.tokenize("a fox"), options={"fast_pooled": "yes"})
    # the dataset records it, and its pooled is the API's with the option
    source = tmp_path / "captions.txt"
    source.write_text(PROMPTS["plain"] + "\n", encoding="utf-8")
    out = tmp_path / "fast"
    encode_dataset(source, model=models["sd2"]["path"], out=out, dtype="fp32", fast_pooled=True, progress=False)
    assert '"fast_pooled": true' in (out / "manifest.json").read_text()
    ((_, cond, pooled),) = list(open_shards(out))
    sd2 = models["sd2"]["clip"]
    expected = sd2.encode_from_tokens(sd2.tokenize(PROMPTS["plain"]), return_pooled=True,
                                      options={"fast_pooled": True})
    assert torch.equal(pooled.reshape(expected[1].shape), expected[1])


def _help(parser, argv) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        parser.parse_args(argv)
    return buffer.getvalue()
