"""Node pack contract (as a host loads it) and a small graph run end to end."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from textenc.vision import clip_vision
from textenc.loading import paths
from textenc.nn.config import load_vision_config
from textenc.loading.convert import to_layout
from textenc.errors import CheckpointError, TextencError
from textenc.sd import load_clip
from textenc.prompts.tokenizer import SDTokenizer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VALID_TYPES = {"STRING", "INT", "FLOAT", "BOOLEAN", "CLIP", "CONDITIONING", "CLIP_VISION",
               "CLIP_VISION_OUTPUT", "IMAGE", "PHOTOMAKER"}
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 56, "patch_size": 14,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32}
PROMPT = "a photo of a (red:1.2) cat"


def tiny_text_model():
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=49408, max_position_embeddings=77,
                                         projection_dim=128, hidden_act="quick_gelu")
    return transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="eager").eval()


def save_sd(state_dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, path)


@pytest.fixture(scope="module")
def hf_text():
    return tiny_text_model()


@pytest.fixture(scope="module")
def hf_vision():
    torch.manual_seed(1)
    config = transformers.CLIPVisionConfig(**TINY_VISION)
    return transformers.CLIPVisionModelWithProjection._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_text, hf_vision) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_sd(to_layout(hf_text.state_dict(), "sd1"), root / "text_encoders" / "tiny_sd1.safetensors")
    # A full checkpoint: the text encoder under its SD1 prefix, beside a UNet weight.
    full = {**to_layout(hf_text.state_dict(), "sd1"), "model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4)}
    save_sd(full, root / "checkpoints" / "tiny_full.safetensors")
    save_sd(hf_vision.state_dict(), root / "clip_vision" / "tiny_vision.safetensors")
    (root / "embeddings").mkdir()
    return root


@pytest.fixture()
def models_dir(models, monkeypatch):
    monkeypatch.setattr(paths, "_explicit_dir", str(models))
    # The tiny vision size is not a published one: register it for this test only.
    monkeypatch.setitem(clip_vision.VISION_KINDS, (64, 17), "tiny")
    monkeypatch.setattr(clip_vision, "load_vision_config",
                        lambda spec: load_vision_config(TINY_VISION if spec == "tiny" else spec))
    return models


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def run(pack, name, **inputs):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    return getattr(cls(), cls.FUNCTION)(**inputs)


# --- contract -------------------------------------------------------------------

EXPECTED = {"CLIPLoader", "DualCLIPLoader", "CLIPSetLastLayer", "CLIPTextEncode", "CLIPTextEncodeSDXL",
            "CLIPTextEncodeAdvancedTextenc", "CLIPVisionLoader", "CLIPVisionEncode", "unCLIPConditioning",
            "PhotoMakerLoader", "PhotoMakerEncode", "ConditioningConcat", "ConditioningCombine",
            "ConditioningAverage", "ConditioningZeroOut", "CheckpointCLIPLoaderTextenc",
            # comfy_extras/nodes_sd3.py and nodes_flux.py (their schemas set no display name)
            "TripleCLIPLoader", "CLIPTextEncodeSD3", "CLIPTextEncodeFlux", "FluxGuidance"}

# Stock ComfyUI's display names of its nodes among these (nodes.py's NODE_DISPLAY_NAME_MAPPINGS,
# read from ComfyUI's source; its key "ConditioningAverage " has a trailing space, so that node
# shows its class name).
COMFYUI_DISPLAY_NAMES = {"CLIPLoader": "Load CLIP", "CLIPSetLastLayer": "CLIP Set Last Layer",
                         "CLIPTextEncode": "CLIP Text Encode (Prompt)", "CLIPVisionLoader": "Load CLIP Vision",
                         "CLIPVisionEncode": "CLIP Vision Encode", "ConditioningCombine": "Conditioning (Combine)",
                         "ConditioningConcat": "Conditioning (Concat)"}


def _check_input(node_name: str, input_name: str, spec) -> None:
    where = f"{node_name}.{input_name}"
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, where
    kind, options = spec[0], (spec[1] if len(spec) == 2 else {})
    assert isinstance(options, dict), where
    assert isinstance(options.get("tooltip"), str) and options["tooltip"], f"{where}: no tooltip"
    if isinstance(kind, list):  # COMBO
        assert all(isinstance(choice, str) for choice in kind), where
        if "default" in options:
            assert options["default"] in kind, where
        return
    assert kind in VALID_TYPES, f"{where}: type {kind!r}"
    if kind in ("INT", "FLOAT"):
        assert options["min"] <= options["default"] <= options["max"], where
        assert isinstance(options["default"], int if kind == "INT" else float), where
    if kind == "BOOLEAN":
        assert isinstance(options["default"], bool), where


def test_pack_contract(pack, models_dir):
    aliases = {pack.ALIAS_PREFIX + n for n in EXPECTED if not n.endswith("Textenc")}
    assert set(pack.NODE_CLASS_MAPPINGS) == EXPECTED | aliases
    own = {name for name in EXPECTED if name.endswith("Textenc")}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == own | set(COMFYUI_DISPLAY_NAMES) | aliases
    for alias in aliases:  # an alias is the same class under a name stock ComfyUI won't shadow
        assert pack.NODE_CLASS_MAPPINGS[alias] is pack.NODE_CLASS_MAPPINGS[alias[len(pack.ALIAS_PREFIX):]]
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        types = cls.INPUT_TYPES()
        assert isinstance(types, dict) and isinstance(types["required"], dict), name
        assert set(types) <= {"required", "optional", "hidden"}, name
        inputs = {**types["required"], **types.get("optional", {})}
        for input_name, spec in inputs.items():
            _check_input(name, input_name, spec)
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, name
        assert all(t in VALID_TYPES for t in cls.RETURN_TYPES), name
        if hasattr(cls, "OUTPUT_TOOLTIPS"):
            assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        function = getattr(cls, cls.FUNCTION, None)
        assert callable(function), name
        parameters = inspect.signature(function).parameters
        assert set(inputs) <= set(parameters), f"{name}.{cls.FUNCTION} misses inputs"
        assert isinstance(cls.CATEGORY, str) and cls.CATEGORY, name
        assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION, name
        assert isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS.get(name, name), str), name


def test_no_built_in_display_name_changes(pack):
    """ComfyUI merges a pack's display names into its own: a built-in node's name is given
    only as ComfyUI gives it (ConditioningAverage keeps its class name), the aliases say textenc."""
    for name, display in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        if name in EXPECTED and not name.endswith("Textenc"):
            assert display == COMFYUI_DISPLAY_NAMES[name], name
        else:
            assert display.endswith("(textenc)") or "textenc" in display, name
    assert "ConditioningAverage" not in pack.NODE_DISPLAY_NAME_MAPPINGS
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TextencConditioningAverage"] == "ConditioningAverage (textenc)"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["TextencCLIPLoader"] == "Load CLIP (textenc)"


def test_checkpoint_loader_loads_the_text_encoder_of_a_full_checkpoint(pack, models_dir):
    listed = pack.NODE_CLASS_MAPPINGS["CheckpointCLIPLoaderTextenc"].INPUT_TYPES()["required"]["ckpt_name"][0]
    assert listed == ["tiny_full.safetensors"]
    (from_checkpoint,) = run(pack, "CheckpointCLIPLoaderTextenc", ckpt_name="tiny_full.safetensors")
    (from_file,) = run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="sd1")
    (a,) = run(pack, "CLIPTextEncode", clip=from_checkpoint, text=PROMPT)
    (b,) = run(pack, "CLIPTextEncode", clip=from_file, text=PROMPT)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1]["pooled_output"], b[0][1]["pooled_output"])
    with pytest.raises(CheckpointError, match="CheckpointCLIPLoaderTextenc: ckpt_name"):
        run(pack, "CheckpointCLIPLoaderTextenc", ckpt_name="../text_encoders/tiny_sd1.safetensors")


def test_a_comfyui_clip_is_refused_naming_the_textenc_loaders(pack, models_dir):
    comfy_clip = type("CLIP", (), {"__module__": "comfy.sd"})()  # what ComfyUI's own loaders return
    with pytest.raises(CheckpointError) as error:
        run(pack, "TextencCLIPTextEncode", clip=comfy_clip, text="a cat")
    message = str(error.value)
    assert "got ComfyUI's own CLIP (comfy.sd.CLIP)" in message
    assert '"Load CLIP (textenc)"' in message and '"Load Checkpoint CLIP (textenc)"' in message
    for display in ("Load CLIP (textenc)", "DualCLIPLoader (textenc)", "Load Checkpoint CLIP (textenc)"):
        assert display in pack.NODE_DISPLAY_NAME_MAPPINGS.values()  # the names it gives exist


def test_comfyui_inputs_and_defaults(pack, models_dir):
    required = {name: cls.INPUT_TYPES()["required"] for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    assert required["CLIPLoader"]["clip_name"][0] == ["tiny_sd1.safetensors"]
    assert "stable_diffusion" in required["CLIPLoader"]["type"][0]
    # ComfyUI's DualCLIPLoader lists "sdxl", "sd3", "flux" first (nodes.py), its CLIPLoader
    # "stable_diffusion", ..., "sd3", ..., "wan"; textenc adds its own names to CLIPLoader.
    assert required["DualCLIPLoader"]["type"][0] == ["sdxl", "sd3", "flux"]
    assert {"stable_diffusion", "sd3", "wan", "flux", "auto"} <= set(required["CLIPLoader"]["type"][0])
    assert list(required["TripleCLIPLoader"]) == ["clip_name1", "clip_name2", "clip_name3"]
    assert required["CLIPVisionLoader"]["clip_name"][0] == ["tiny_vision.safetensors"]
    layer = required["CLIPSetLastLayer"]["stop_at_clip_layer"][1]
    assert (layer["default"], layer["min"], layer["max"]) == (-1, -24, -1)
    text = required["CLIPTextEncode"]["text"][1]
    assert text["multiline"] and text["dynamicPrompts"]
    assert list(required["CLIPTextEncodeSDXL"]) == ["clip", "width", "height", "crop_w", "crop_h",
                                                    "target_width", "target_height", "text_g", "text_l"]
    assert required["CLIPVisionEncode"]["crop"][0] == ["center", "none"]
    unclip = required["unCLIPConditioning"]
    assert (unclip["strength"][1]["default"], unclip["strength"][1]["min"], unclip["strength"][1]["max"]) \
        == (1.0, -10.0, 10.0)
    assert (unclip["noise_augmentation"][1]["default"], unclip["noise_augmentation"][1]["max"]) == (0.0, 1.0)
    assert required["PhotoMakerEncode"]["text"][1]["default"] == "photograph of photomaker"
    assert list(required["PhotoMakerEncode"]) == ["photomaker", "image", "clip", "text"]
    # comfy_extras/nodes_sd3.py and nodes_flux.py: sockets, choices, guidance range, categories.
    assert list(required["CLIPTextEncodeSD3"]) == ["clip", "clip_l", "clip_g", "t5xxl", "empty_padding"]
    assert required["CLIPTextEncodeSD3"]["empty_padding"][0] == ["none", "empty_prompt"]
    assert all(required["CLIPTextEncodeSD3"][name][1]["multiline"] for name in ("clip_l", "clip_g", "t5xxl"))
    assert list(required["CLIPTextEncodeFlux"]) == ["clip", "clip_l", "t5xxl", "guidance"]
    assert list(required["FluxGuidance"]) == ["conditioning", "guidance"]
    for name in ("CLIPTextEncodeFlux", "FluxGuidance"):
        guidance = required[name]["guidance"][1]
        assert (guidance["default"], guidance["min"], guidance["max"], guidance["step"]) == (3.5, 0.0, 100.0, 0.1)
    categories = {name: pack.NODE_CLASS_MAPPINGS[name].CATEGORY for name in
                  ("TripleCLIPLoader", "CLIPTextEncodeSD3", "CLIPTextEncodeFlux", "FluxGuidance")}
    assert categories == {"TripleCLIPLoader": "advanced/loaders", "CLIPTextEncodeSD3": "advanced/conditioning",
                          "CLIPTextEncodeFlux": "advanced/conditioning/flux",
                          "FluxGuidance": "advanced/conditioning/flux"}


def test_import_is_cheap():
    code = ("import sys, nodes; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not any(m.startswith('textenc.sd') for m in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "TEXTENC_MODELS_DIR": ""})
    assert result.returncode == 0, result.stderr


# --- graph ------------------------------------------------------------------------

def _hf_cond(hf_text, text: str, layer: int = -1) -> torch.Tensor:
    ids = SDTokenizer().tokenize_with_weights(text)[0]
    input_ids = torch.tensor([[token for token, _ in ids]])
    with torch.no_grad():
        out = hf_text.text_model(input_ids=input_ids, output_hidden_states=True)
        if layer == -1:
            return out.last_hidden_state
        return hf_text.text_model.final_layer_norm(out.hidden_states[layer])


def test_graph_end_to_end(pack, models_dir, hf_text):
    path = models_dir / "text_encoders" / "tiny_sd1.safetensors"
    (clip,) = run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="stable_diffusion")
    (skipped,) = run(pack, "CLIPSetLastLayer", clip=clip, stop_at_clip_layer=-2)
    assert clip.layer_idx is None and skipped.layer_idx == -2

    # Plain CLIPTextEncode against an independent HF forward.
    (plain,) = run(pack, "CLIPTextEncode", clip=clip, text="a photo of a cat")
    torch.testing.assert_close(plain[0][0], _hf_cond(hf_text, "a photo of a cat"), atol=1e-5, rtol=1e-5)
    (plain_skip,) = run(pack, "CLIPTextEncode", clip=skipped, text="a photo of a cat")
    torch.testing.assert_close(plain_skip[0][0], _hf_cond(hf_text, "a photo of a cat", -2),
                               atol=1e-5, rtol=1e-5)

    (positive,) = run(pack, "CLIPTextEncode", clip=skipped, text=PROMPT)
    (negative,) = run(pack, "CLIPTextEncode", clip=skipped, text="blurry")
    library = load_clip(path, clip_type="sd1")
    library.clip_layer(-2)
    expected = library.encode_from_tokens_scheduled(library.tokenize(PROMPT))
    torch.testing.assert_close(positive[0][0], expected[0][0], atol=0, rtol=0)
    torch.testing.assert_close(positive[0][1]["pooled_output"], expected[0][1]["pooled_output"])

    (joined,) = run(pack, "ConditioningConcat", conditioning_to=positive, conditioning_from=negative)
    assert joined[0][0].shape == (1, 154, 128)
    torch.testing.assert_close(joined[0][0][:, 77:], negative[0][0])
    (zeroed,) = run(pack, "ConditioningZeroOut", conditioning=negative)
    assert not zeroed[0][0].any() and not zeroed[0][1]["pooled_output"].any()
    assert negative[0][0].any()
    (both,) = run(pack, "ConditioningCombine", conditioning_1=positive, conditioning_2=negative)
    assert len(both) == 2
    (mixed,) = run(pack, "ConditioningAverage", conditioning_to=positive, conditioning_from=negative,
                   conditioning_to_strength=0.25)
    torch.testing.assert_close(mixed[0][0], positive[0][0] * 0.25 + negative[0][0] * 0.75)

    (vision,) = run(pack, "CLIPVisionLoader", clip_name="tiny_vision.safetensors")
    image = torch.rand(1, 70, 90, 3, generator=torch.Generator().manual_seed(0))
    (seen,) = run(pack, "CLIPVisionEncode", clip_vision=vision, image=image, crop="center")
    direct = clip_vision.load(models_dir / "clip_vision" / "tiny_vision.safetensors").encode_image(image)
    torch.testing.assert_close(seen.image_embeds, direct.image_embeds)
    (stretched,) = run(pack, "CLIPVisionEncode", clip_vision=vision, image=image, crop="none")
    assert not torch.equal(stretched.image_embeds, seen.image_embeds)

    (unclip,) = run(pack, "unCLIPConditioning", conditioning=positive, clip_vision_output=seen,
                    strength=1.0, noise_augmentation=0.1)
    entry = unclip[0][1]["unclip_conditioning"][0]
    assert entry["clip_vision_output"] is seen and entry["noise_augmentation"] == 0.1
    assert "unclip_conditioning" not in positive[0][1]


def test_advanced_encode(pack, models_dir):
    (clip,) = run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="sd1")
    before = clip.tokenizer.clip_l.parse_options
    (default,) = run(pack, "CLIPTextEncodeAdvancedTextenc", clip=clip, text=PROMPT, token_normalization="none",
                     weight_interpretation="comfy", weight_convention="comfy", square_brackets=False,
                     break_keyword=False)
    (plain,) = run(pack, "CLIPTextEncode", clip=clip, text=PROMPT)
    torch.testing.assert_close(default[0][0], plain[0][0])

    text = "a [photo] of a (red:1.2) cat BREAK on a mat"
    (advanced,) = run(pack, "CLIPTextEncodeAdvancedTextenc", clip=clip, text=text,
                      token_normalization="length+mean", weight_interpretation="a1111",
                      weight_convention="a1111", square_brackets=True, break_keyword=True)
    assert clip.tokenizer.clip_l.parse_options == before  # the shared tokenizer is untouched
    tokenizer = SDTokenizer(weight_convention="a1111", square_brackets=True, break_keyword=True)
    tokens = {"l": tokenizer.tokenize_with_weights(text, True)}
    expected = clip.encode_from_tokens(tokens, return_pooled=True,
                                       options={"weight_mode": "a1111", "normalization": "length+mean"})
    assert advanced[0][0].shape == (1, 154, 128)
    torch.testing.assert_close(advanced[0][0], expected[0])
    torch.testing.assert_close(advanced[0][1]["pooled_output"], expected[1])


def test_sdxl_padding_and_type_check(pack, models_dir):
    from nodes.text_encode import pad_to_same_windows

    empty = {"g": [["eg"]], "l": [["el"]]}
    padded = pad_to_same_windows({"g": [["g1"], ["g2"]], "l": [["l1"]]}, empty)
    assert padded == {"g": [["g1"], ["g2"]], "l": [["l1"], ["el"]]}
    padded = pad_to_same_windows({"g": [["g1"]], "l": [["l1"], ["l2"], ["l3"]]}, empty)
    assert padded["g"] == [["g1"], ["eg"], ["eg"]]
    (clip,) = run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="auto")
    with pytest.raises(CheckpointError, match="SDXL"):
        run(pack, "CLIPTextEncodeSDXL", clip=clip, width=1024, height=1024, crop_w=0, crop_h=0,
            target_width=1024, target_height=1024, text_g="a", text_l="b")


def test_photomaker_encode_calls_the_library(pack, models_dir):
    from textenc.vision.photomaker import PhotoMakerIDEncoder, encode_photomaker

    (clip,) = run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="sd1")
    torch.manual_seed(0)
    config = {**TINY_VISION, "image_size": 28}
    encoder = PhotoMakerIDEncoder(config, projection_2_dim=96, embed_dim=128)
    for parameter in encoder.parameters():  # init-free layers: fill them ourselves
        parameter.data.normal_(0.0, 0.2)
    images = torch.rand(2, 40, 40, 3, generator=torch.Generator().manual_seed(1))
    text = "photo of a man photomaker"
    (out,) = run(pack, "PhotoMakerEncode", photomaker=encoder.eval(), image=images, clip=clip, text=text)
    expected = encode_photomaker(encoder, clip, text, images)
    torch.testing.assert_close(out[0][0], expected[0][0])


def test_loaders_follow_symlinks_but_refuse_names_that_climb_out(pack, models_dir, tmp_path, hf_text):
    outside = tmp_path / "shared" / "outside.safetensors"
    outside.parent.mkdir()
    outside.write_bytes((models_dir / "text_encoders" / "tiny_sd1.safetensors").read_bytes())
    for name in ("../../outside.safetensors", str(outside), f"../{tmp_path.name}/outside.safetensors",
                 "sub/../tiny_sd1.safetensors", "..\\tiny_sd1.safetensors"):
        with pytest.raises(CheckpointError, match="CLIPLoader: clip_name .*(climbs out|relative)"):
            run(pack, "CLIPLoader", clip_name=name, type="sd1")
    # A symlink inside the folder to a file outside it is listed and loads, as in ComfyUI.
    link = models_dir / "text_encoders" / "link.safetensors"
    link.symlink_to(outside)
    linked_folder = models_dir / "text_encoders" / "shared"
    linked_folder.symlink_to(outside.parent, target_is_directory=True)
    loop = models_dir / "text_encoders" / "loop"
    loop.symlink_to(models_dir / "text_encoders", target_is_directory=True)
    try:
        listed = paths.get_filename_list("text_encoders")
        assert "link.safetensors" in listed and "shared/outside.safetensors" in listed
        assert not any(name.startswith("loop/loop/") for name in listed)  # the loop ends
        for name in ("link.safetensors", "shared/outside.safetensors"):
            (clip,) = run(pack, "CLIPLoader", clip_name=name, type="sd1")
            (cond,) = run(pack, "CLIPTextEncode", clip=clip, text="a photo of a cat")
            torch.testing.assert_close(cond[0][0], _hf_cond(hf_text, "a photo of a cat"), atol=1e-5, rtol=1e-5)
        # Names the folder does not list are refused, even when the file exists.
        (models_dir / "text_encoders" / "notes.txt").write_text("x")
        broken = models_dir / "text_encoders" / "broken.safetensors"
        broken.symlink_to(tmp_path / "gone.safetensors")
        assert "broken.safetensors" not in paths.get_filename_list("text_encoders")
        for name in ("notes.txt", "broken.safetensors"):
            with pytest.raises(CheckpointError, match="clip_name .*not found"):
                run(pack, "CLIPLoader", clip_name=name, type="sd1")
    finally:
        for path in (link, linked_folder, loop, models_dir / "text_encoders" / "notes.txt",
                     models_dir / "text_encoders" / "broken.safetensors"):
            path.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="CLIPVisionLoader: clip_name .*not found"):
        run(pack, "CLIPVisionLoader", clip_name="missing.safetensors")


def test_wrong_inputs_raise_typed_errors(pack, models_dir):
    with pytest.raises(CheckpointError, match="type"):
        run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="flux")
    with pytest.raises(CheckpointError, match=r"DualCLIPLoader: type 'sd1' is not one of \['sdxl', 'sd3', 'flux'\]"):
        run(pack, "DualCLIPLoader", clip_name1="tiny_sd1.safetensors",
            clip_name2="tiny_sd1.safetensors", type="sd1")
    with pytest.raises(CheckpointError, match="sd2"):
        run(pack, "CLIPLoader", clip_name="tiny_sd1.safetensors", type="sd2")
    with pytest.raises(TextencError):
        run(pack, "CLIPTextEncode", clip=None, text="x")
    with pytest.raises(CheckpointError, match="textenc"):
        run(pack, "CLIPTextEncodeAdvancedTextenc", clip=object(), text="x")
    with pytest.raises(CheckpointError, match="clip must be a CLIP from a textenc loader"):
        run(pack, "CLIPTextEncodeSDXL", clip=object(), width=1024, height=1024, crop_w=0, crop_h=0,
            target_width=1024, target_height=1024, text_g="a", text_l="b")
    with pytest.raises(CheckpointError, match="PhotoMakerEncode: photomaker must be a PHOTOMAKER"):
        run(pack, "PhotoMakerEncode", photomaker=object(), image=torch.rand(1, 8, 8, 3), clip=None,
            text="photo of a man photomaker")


def test_no_models_dir_gives_empty_lists_and_a_clear_error(pack, monkeypatch):
    monkeypatch.setattr(paths, "_explicit_dir", None)
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    assert pack.NODE_CLASS_MAPPINGS["CLIPLoader"].INPUT_TYPES()["required"]["clip_name"][0] == []
    with pytest.raises(CheckpointError, match=paths.ENV_VAR):
        run(pack, "CLIPLoader", clip_name="x.safetensors", type="sd1")
