"""Weights a file stores at unaligned byte offsets encode exactly as the same weights aligned.

safetensors hands out views into the memory-mapped file at the offsets the file
stores (here crafted so every tensor starts 4 bytes past a 64-byte boundary),
and CPU matmul kernels may round such weights differently in the last bit. Every
loader that assigns file tensors as parameters copies the unaligned ones
(:func:`textenc.loading.checkpoint.aligned`) and keeps the aligned ones shared with the
file. Checked for single-file text encoders (``load_clip``), ``load_sd`` and CLIP
vision, at torch threads 1 and 2; the reference for "the same weights" is a file
with every tensor 64-byte aligned. And (issue 27, point 3) one model's weights in
every layout a user meets (fp32 and fp16 single files, aligned or not, fp32 and fp16
diffusers folders) encode to the same bits.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from test_clip_vision import TINY, hf_model  # noqa: F401  (fixture)
from test_sd1_clip import END, START, hf_run, hf_state, make_hf, text_config
from textenc.loading.checkpoint import ALIGNMENT, aligned, load_state_dict
from textenc.vision.clip_vision import ClipVisionModel
from textenc.loading.convert import to_layout
from textenc.sd import load_clip
from textenc.text_encoders.sd1_clip import SDClipModel
from textenc.prompts.tokenizer import DEFAULT_VOCAB

transformers = pytest.importorskip("transformers")

PROMPT = "a photo of a red fox, (watercolor:1.2)"
SHIFT = 4  # bytes past a 64-byte boundary: float32-aligned, as a real file can be
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.uint8: "U8"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], *, offset: int) -> None:
    """A safetensors file whose every tensor starts ``offset`` bytes past a 64-byte boundary
    of the file (the header is padded with spaces, gaps are filled with ``U8`` pad tensors)."""
    header: dict[str, dict] = {}
    chunks: list[bytes] = []
    position = 0
    for index, (name, tensor) in enumerate(tensors.items()):
        if not tensor.is_floating_point():  # position_ids buffers: not weights
            continue
        gap = (offset - position) % ALIGNMENT
        if gap:
            header[f"__pad_{index}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [position, position + gap]}
            chunks.append(bytes(gap))
            position += gap
        data = tensor.detach().contiguous().cpu().numpy().tobytes()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [position, position + len(data)]}
        chunks.append(data)
        position += len(data)
    text = json.dumps(header).encode()
    text += b" " * ((-8 - len(text)) % ALIGNMENT)  # data starts on a 64-byte boundary of the file
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def _misalignment(tensors) -> set[int]:
    return {t.data_ptr() % ALIGNMENT for t in tensors if t.numel()}


def _unpadded(raw: dict) -> dict[str, torch.Tensor]:
    """The tensors of a crafted file, without its pad tensors."""
    return {k: t for k, t in raw.items() if not k.startswith("__pad_")}


def _weights(raw: dict) -> list[torch.Tensor]:
    return list(_unpadded(raw).values())


@pytest.fixture(scope="module")
def hf_l():
    return make_hf("quick_gelu", 21)


@pytest.fixture(scope="module")
def files(hf_l, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("aligned")
    state = to_layout(hf_state(hf_l, projection=False), "sd1")
    paths = {}
    for name, offset in (("aligned", 0), ("unaligned", SHIFT)):
        paths[name] = folder / f"{name}.safetensors"
        write_safetensors(paths[name], state, offset=offset)
        paths[f"hf_{name}"] = folder / f"hf_{name}.safetensors"
        write_safetensors(paths[f"hf_{name}"], hf_state(hf_l), offset=offset)
    return paths


def test_the_crafted_files_hold_what_they_claim(files):
    for name, offset in (("unaligned", SHIFT), ("aligned", 0), ("hf_unaligned", SHIFT), ("hf_aligned", 0)):
        assert _misalignment(_weights(load_state_dict(files[name]))) == {offset}, name


def test_aligned_copies_only_unaligned_tensors():
    base = torch.arange(40, dtype=torch.float32)
    out = aligned({"whole": base, "view": base[1:]})
    assert out["whole"] is base  # shared, no copy
    assert out["view"].data_ptr() % ALIGNMENT == 0 and torch.equal(out["view"], base[1:])


def _params(clip) -> list[torch.Tensor]:
    return list(clip.cond_stage_model.state_dict().values())


@pytest.mark.parametrize("threads", [1, 2])
def test_single_file_encodes_bit_identically_from_either_layout(files, hf_l, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        raw = {name: load_state_dict(files[name]) for name in ("aligned", "unaligned")}
        clips = {name: load_clip(None, state_dicts=[(name, raw[name])]) for name in raw}
        for clip in clips.values():
            assert _misalignment(_params(clip)) == {0}
        # Aligned tensors stay shared with the memory-mapped file (no second copy); the
        # unaligned ones are all copies. (SD1 files have no projection: textenc adds one.)
        params = clips["aligned"].cond_stage_model.state_dict()
        in_file = {t.data_ptr() for t in raw["aligned"].values()}
        assert [k for k, t in params.items() if t.data_ptr() not in in_file] == ["clip_l.transformer.text_projection.weight"]
        in_file = {t.data_ptr() for t in raw["unaligned"].values()}
        assert not in_file & {t.data_ptr() for t in _params(clips["unaligned"])}
        outputs = {}
        for name, clip in clips.items():
            outputs[name] = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
        assert torch.equal(outputs["aligned"][0], outputs["unaligned"][0])
        assert torch.equal(outputs["aligned"][1], outputs["unaligned"][1])
        # ... and both are the model: transformers' last hidden state (unweighted tokens).
        plain = clips["unaligned"].encode_from_tokens(clips["unaligned"].tokenize("a photo of a red fox"))
        ids = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)("a photo of a red fox")["input_ids"]
        reference = hf_run(hf_l, ids + [END] * (77 - len(ids))).last_hidden_state
        assert float((plain - reference).abs().max()) <= 1e-5
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_load_sd_aligns_and_encodes_bit_identically(files, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outputs = []
        for name in ("hf_aligned", "hf_unaligned"):
            model = SDClipModel(textmodel_json_config=text_config("quick_gelu", END))
            model.load_sd(_unpadded(load_state_dict(files[name])))
            assert _misalignment(model.transformer.state_dict().values()) == {0}
            outputs.append(model([[START, 320, 1125] + [END] * 74]))
        assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    finally:
        torch.set_num_threads(previous)



@pytest.mark.parametrize("threads", [1, 2])
def test_clip_vision_load_sd_aligns_and_encodes_bit_identically(hf_model, tmp_path, threads):  # noqa: F811
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items() if not k.endswith("position_ids")}
    image = torch.rand(1, 56, 56, 3, generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outputs = []
        for offset in (0, SHIFT):
            path = tmp_path / f"vision_{offset}.safetensors"
            write_safetensors(path, state, offset=offset)
            raw = load_state_dict(path)
            assert _misalignment(_weights(raw)) == {offset}
            model = ClipVisionModel(TINY)
            model.load_sd(_unpadded(raw))
            assert _misalignment(model.get_sd().values()) == {0}
            outputs.append(model.encode_image(image))
        for name in ("image_embeds", "last_hidden_state", "penultimate_hidden_states"):
            assert torch.equal(outputs[0][name], outputs[1][name]), name
    finally:
        torch.set_num_threads(previous)


def test_checkpoint_doctests():
    import doctest

    from textenc.loading import checkpoint

    result = doctest.testmod(checkpoint)
    assert result.attempted >= 3 and result.failed == 0


# ---- one model's weights in every layout (issue 27, point 3) ----------------------------

#: layout → (file dtype, byte offset of every tensor past a 64-byte boundary): fp32 and fp16
#: single files aligned and not (fp16 tensors 2 bytes past, the least a real file can be),
#: and diffusers folders in both dtypes, their weight files unaligned too.
LAYOUTS = {
    "single fp32 aligned": (torch.float32, 0), "single fp32 unaligned": (torch.float32, SHIFT),
    "single fp16 aligned": (torch.float16, 0), "single fp16 unaligned": (torch.float16, 2),
    "diffusers fp32": (torch.float32, SHIFT), "diffusers fp16": (torch.float16, 2),
}


def _diffusers_folder(folder: Path, encoders: list, *, offset: int) -> Path:
    """A minimal SDXL diffusers pipeline folder: model_index.json, text_encoder(_2)/, tokenizer(_2)/.

    ``encoders``: ``(transformers model, its state dict)`` for L and G."""
    index = {"_class_name": "StableDiffusionXLPipeline"}
    for suffix, (model, state), pad in zip(("", "_2"), encoders, ("<|endoftext|>", "!")):
        encoder, tokenizer = folder / f"text_encoder{suffix}", folder / f"tokenizer{suffix}"
        encoder.mkdir(parents=True)
        tokenizer.mkdir()
        architecture = "CLIPTextModelWithProjection" if suffix else "CLIPTextModel"
        index.update({encoder.name: ["transformers", architecture], tokenizer.name: ["transformers", "CLIPTokenizer"]})
        config = model.config.to_dict()
        config.update(architectures=[architecture], model_type="clip_text_model")
        (encoder / "config.json").write_text(json.dumps(config))
        write_safetensors(encoder / "model.safetensors", state, offset=offset)
        for name in ("vocab.json", "merges.txt"):
            (tokenizer / name).write_bytes((Path(DEFAULT_VOCAB) / name).read_bytes())
        (tokenizer / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _fp16_values(model):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    """One SDXL model (weights fp16-representable, so every dtype stores the same values) in
    each of :data:`LAYOUTS`, loaded. SDXL: G's projection multiplies the pooled row alone
    (a one-row product), the matmul that rounds unaligned weights differently on CPUs
    without AVX-512 too."""
    from textenc.diffusers import load_from_diffusers

    l_model, g_model = _fp16_values(make_hf("quick_gelu", 31)), _fp16_values(make_hf("gelu", 32))
    folder = tmp_path_factory.mktemp("layouts")
    weights = [{k: v for k, v in hf_state(model, projection=projection).items() if v.is_floating_point()}
               for model, projection in ((l_model, False), (g_model, True))]
    clips = {}
    for index, (name, (dtype, offset)) in enumerate(LAYOUTS.items()):
        l_state, g_state = ({k: v.to(dtype) for k, v in w.items()} for w in weights)
        if name.startswith("diffusers"):
            path = _diffusers_folder(folder / str(index), [(l_model, l_state), (g_model, g_state)], offset=offset)
            clips[name] = load_from_diffusers(path)
        else:
            path = folder / f"{index}.safetensors"
            write_safetensors(path, {**to_layout(l_state, "sdxl_l"), **to_layout(g_state, "sdxl_g")}, offset=offset)
            assert _misalignment(_weights(load_state_dict(path))) == {offset}
            clips[name] = load_clip(str(path))
    return clips


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layer", [None, -1])
def test_every_layout_encodes_the_same_bits(layouts, threads, layer):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outputs = {}
        for name, clip in layouts.items():
            assert clip.clip_type == "sdxl", name
            clip = clip.clone()
            clip.clip_layer(layer)
            for prompt in (PROMPT, "a photo of a red fox"):
                outputs.setdefault(prompt, {})[name] = clip.encode_from_tokens(clip.tokenize(prompt),
                                                                               return_pooled=True)
        for prompt, by_layout in outputs.items():
            cond, pooled = by_layout["single fp32 aligned"]
            for name, (other_cond, other_pooled) in by_layout.items():
                assert torch.equal(other_cond, cond), (name, prompt)
                assert torch.equal(other_pooled, pooled), (name, prompt)
    finally:
        torch.set_num_threads(previous)
