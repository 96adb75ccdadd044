"""encode-dataset on SD3, Flux and Wan (issue 26 point 4), on tiny random CLIP-L, CLIP-G, T5
and UMT5 files in their real key layouts (``family_fixtures``).

Every stored caption is checked against a direct ``CLIP.encode_from_tokens`` of it at the
same torch thread count (1 and 2); the T5 rows are stored at each caption's own length (the
family's minimum or longer), never padded to a common one; the exports are checked against
what kohya sd-scripts writes, its keys, shapes and dtypes written out here from its source
(kohya-ss/sd-scripts 48d368f, ``library/strategy_flux.py`` ``FluxTextEncoderOutputsCachingStrategy``
and ``library/strategy_sd3.py`` ``Sd3TextEncoderOutputsCachingStrategy``: ``np.savez`` of
float32 outputs, int64 tokenizer attention masks and Python-bool flags).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dataset_fixtures import encoder, folder_bytes, ray_session
from family_fixtures import G_WIDTH, L_WIDTH, T5_WIDTH, TinyFamily
from textenc.dataset import export_diffusers, export_kohya, open_captions, open_shards
from textenc.errors import DatasetError
from textenc.sd import load_clip

CAPTIONS = ["a photo of a cat", "a (red:1.3) fox in the snow", "", "a photo of a cat",
            " ".join(["word"] * 300), "a caption, with punctuation!", "[bracket] (x:0.5) done"]
FILES = {"flux": ("l", "t5"), "sd3": ("l", "g", "t5"), "wan": ("umt5",)}
MIN_LENGTH = {"flux": 256, "sd3": 77, "wan": 512}
_encode = encoder(dtype="fp32", shard_rows=3, batch_size=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> TinyFamily:
    return TinyFamily(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    return path


def _model(family: TinyFamily, kind: str) -> list[str]:
    return [str(family.paths[name]) for name in FILES[kind]]


@pytest.fixture(scope="module")
def encoded(family, captions, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoded")
    for kind in FILES:
        _encode(captions, _model(family, kind), root / kind, clip_type=kind)
    return {kind: root / kind for kind in FILES}


def _direct(family: TinyFamily, kind: str, texts, threads: int, *, min_length: int | None = None):
    """ComfyUI's encoding of each text by the family's CLIP, alone, at ``threads`` threads;
    ``min_length`` builds the tokenizer with that T5 minimum (as ComfyUI's ``t5xxl_min_length``)."""
    clip = load_clip(_model(family, kind), clip_type=kind)
    if min_length is not None:
        clip.tokenizer.t5xxl.min_length = min_length
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return [clip.encode_from_tokens(clip.tokenize(text), return_pooled=True) for text in texts]
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("kind", sorted(FILES))
def test_every_caption_equals_a_direct_encode(kind, family, encoded):
    direct = _direct(family, kind, CAPTIONS, 1)
    stored = list(open_shards(encoded[kind]))
    assert [caption_id for caption_id, _, _ in stored] == list(range(len(CAPTIONS)))
    for (_, cond, pooled), (want_cond, want_pooled) in zip(stored, direct):
        assert torch.equal(cond, want_cond[0])
        assert (pooled is None and want_pooled is None) if kind == "wan" else torch.equal(pooled, want_pooled[0])


@pytest.mark.parametrize("kind", sorted(FILES))
def test_t5_rows_are_stored_at_each_captions_own_length(kind, family, encoded):
    for caption in open_captions(encoded[kind]):
        tokens = 1 + len(CAPTIONS[caption.id].split()) if caption.id == 4 else None
        assert caption.t5.shape[1] == T5_WIDTH
        if tokens is None:
            assert caption.t5.shape[0] == MIN_LENGTH[kind]  # short: the family's minimum, no more
        else:
            assert caption.t5.shape[0] == caption.t5_tokens > MIN_LENGTH[kind]  # long: its tokens, no padding
    manifest_layout = json.loads((encoded[kind] / "manifest.json").read_text())["layout"]
    assert manifest_layout["t5_width"] == T5_WIDTH and manifest_layout["kind"] == "sequence"
    with safe_open(str(encoded[kind] / "shard-00000.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert {"t5", "t5_offsets", "t5_tokens"} <= names
    assert ("cond" in names) == (kind == "sd3") and ("pooled" in names) == (kind != "wan")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_two_threads_and_a_longer_t5_minimum(kind, family, captions, tmp_path):
    out = tmp_path / "out"
    _encode(captions, _model(family, kind), out, clip_type=kind, threads=2, t5_min_length=320)
    direct = _direct(family, kind, CAPTIONS, 2, min_length=320)
    for caption, (want_cond, want_pooled) in zip(open_captions(out), direct):
        assert caption.t5.shape[0] >= 320
        assert torch.equal(caption.cond, want_cond[0]) and torch.equal(caption.pooled, want_pooled[0])


def test_resume_rebuilds_a_missing_shard_byte_identical(family, captions, encoded, tmp_path):
    out = tmp_path / "flux"
    _encode(captions, _model(family, "flux"), out, clip_type="flux")
    assert folder_bytes(out) == folder_bytes(encoded["flux"])
    (out / "shard-00001.safetensors").unlink()
    report = _encode(captions, _model(family, "flux"), out, clip_type="flux")
    assert report.shards_written == 1 and folder_bytes(out) == folder_bytes(encoded["flux"])
    with pytest.raises(DatasetError, match="t5_min_length"):
        _encode(captions, _model(family, "flux"), out, clip_type="flux", t5_min_length=512)


def test_diffusers_export(encoded, tmp_path):
    for kind, pooled_width in (("flux", L_WIDTH), ("sd3", L_WIDTH + G_WIDTH), ("wan", None)):
        assert export_diffusers(encoded[kind], tmp_path / kind, attention_mask=True) == len(CAPTIONS)
        with safe_open(str(tmp_path / kind / "0.safetensors"), "pt") as handle:
            names = set(handle.keys())
            embeds, mask = handle.get_tensor("prompt_embeds"), handle.get_tensor("prompt_attention_mask")
            clip_rows = 77 if kind == "sd3" else 0
            assert embeds.shape == (1, clip_rows + MIN_LENGTH[kind], T5_WIDTH)
            assert mask.dtype == torch.int64 and mask.shape == embeds.shape[:2]
            t5_tokens = int(mask.sum()) - clip_rows
            assert t5_tokens == next(open_captions(encoded[kind])).t5_tokens > 1
            if pooled_width is None:
                assert "pooled_prompt_embeds" not in names
            else:
                assert handle.get_tensor("pooled_prompt_embeds").shape == (1, pooled_width)


def _kohya_expected(kind: str, t5_length: int, clip_rows: int) -> dict[str, tuple[tuple, np.dtype]]:
    """What sd-scripts' np.savez writes per caption (shape, dtype), from its source."""
    if kind == "flux":
        return {"l_pooled": ((L_WIDTH,), np.float32), "t5_out": ((t5_length, T5_WIDTH), np.float32),
                "txt_ids": ((t5_length, 3), np.float32), "t5_attn_mask": ((t5_length,), np.int64),
                "apply_t5_attn_mask": ((), np.bool_)}
    return {"lg_out": ((clip_rows, L_WIDTH + G_WIDTH), np.float32), "lg_pooled": ((L_WIDTH + G_WIDTH,), np.float32),
            "t5_out": ((t5_length, T5_WIDTH), np.float32), "clip_l_attn_mask": ((clip_rows,), np.int64),
            "clip_g_attn_mask": ((clip_rows,), np.int64), "t5_attn_mask": ((t5_length,), np.int64),
            "apply_lg_attn_mask": ((), np.bool_), "apply_t5_attn_mask": ((), np.bool_)}


@pytest.mark.parametrize("kind,suffix", [("flux", "_flux_te.npz"), ("sd3", "_sd3_te.npz")])
def test_kohya_export_has_sd_scripts_keys_shapes_and_dtypes(kind, suffix, family, encoded, tmp_path):
    assert export_kohya(encoded[kind], tmp_path) == len(CAPTIONS)
    direct = _direct(family, kind, CAPTIONS[:2], 1)
    for row in (0, 1):
        arrays = np.load(tmp_path / f"{row}{suffix}")
        expected = _kohya_expected(kind, MIN_LENGTH[kind], 77)
        assert sorted(arrays.files) == sorted(expected)
        for key, (shape, dtype) in expected.items():
            assert arrays[key].shape == shape and arrays[key].dtype == dtype, key
        assert not arrays["apply_t5_attn_mask"]  # ComfyUI runs T5 unmasked
        cond, pooled = direct[row]
        t5 = cond[0, -MIN_LENGTH[kind]:]
        assert np.array_equal(arrays["t5_out"], t5.numpy())
        # the T5 tokenizer's mask: ones through </s> ("a photo of a cat" is 7 pieces + </s>)
        ones = int(arrays["t5_attn_mask"].sum())
        assert arrays["t5_attn_mask"][:ones].all() and ones == (8 if row == 0 else ones)
        if kind == "flux":
            assert np.array_equal(arrays["l_pooled"], pooled[0].numpy()) and not arrays["txt_ids"].any()
        else:
            assert np.array_equal(arrays["lg_out"], cond[0, :77, :L_WIDTH + G_WIDTH].numpy())
            assert np.array_equal(arrays["lg_pooled"], pooled[0].numpy())
            # CLIP's mask: <start> a photo of a cat <end> = 7 ones
            assert row or arrays["clip_l_attn_mask"].tolist() == [1] * 7 + [0] * 70


def test_kohya_has_no_wan_cache_and_pooled_only_needs_pooled(family, captions, encoded, tmp_path):
    with pytest.raises(DatasetError, match="no text-encoder cache for 'wan'"):
        export_kohya(encoded["wan"], tmp_path / "wan")
    with pytest.raises(DatasetError, match="no pooled output"):
        _encode(captions, _model(family, "wan"), tmp_path / "pooled", clip_type="wan", outputs="pooled")


def test_sd3_from_the_single_file_checkpoint_is_the_same_encoding(family, captions, encoded, tmp_path):
    _encode(captions, str(family.paths["sd3"]), tmp_path / "single", clip_type="sd3")
    assert [c[1].tolist() for c in open_shards(tmp_path / "single")] == \
        [c[1].tolist() for c in open_shards(encoded["sd3"])]


@pytest.mark.slow
def test_ray_engine_writes_the_local_bytes_for_flux(family, captions, encoded, tmp_path):
    with ray_session(240):
        _encode(captions, _model(family, "flux"), tmp_path / "ray", clip_type="flux", engine="ray", workers=2)
    assert folder_bytes(tmp_path / "ray") == folder_bytes(encoded["flux"])


def test_command_line_takes_several_model_files(family, captions, encoded, tmp_path, capsys):
    from textenc.dataset import main
    out = tmp_path / "cli"
    code = main([str(captions), "--model", str(family.paths["l"]), "--model", str(family.paths["t5"]),
                 "--clip-type", "flux", "--out", str(out), "--dtype", "fp32", "--shard-rows", "3",
                 "--batch-size", "2", "--no-progress"])
    assert code == 0 and "7" in capsys.readouterr().out
    assert folder_bytes(out) == folder_bytes(encoded["flux"])


def test_max_windows_counts_t5_tokens_in_77s(family, captions, tmp_path):
    report = _encode(captions, _model(family, "wan"), tmp_path / "out", clip_type="wan", max_windows=3)
    assert [entry["row"] for entry in report.rejected] == [4]  # 1201 UMT5 tokens (the tiny vocabulary)
    assert report.rejected[0]["reason"] == "caption needs 16 windows, more than max_windows=3"  # ceil(1201 / 77)


def test_sd3_clip_rows_are_stored_without_comfyuis_zero_columns(family, captions, tmp_path):
    """With T5 wider than L ‖ G (as the released 768 + 1280 < 4096), only L ‖ G is stored."""
    import transformers
    from family_fixtures import T5_SHAPE, T5_VOCAB_SIZE, weights
    from random_weights import randomize_
    from safetensors.torch import save_file

    wide = transformers.T5EncoderModel._from_config(
        transformers.T5Config(vocab_size=T5_VOCAB_SIZE, **{**T5_SHAPE, "d_model": 256}), attn_implementation="sdpa")
    randomize_(wide, 9)
    save_file(weights(wide.eval()), str(tmp_path / "t5_wide.safetensors"))
    model = [str(family.paths["l"]), str(family.paths["g"]), str(tmp_path / "t5_wide.safetensors")]
    _encode(captions, model, tmp_path / "out", clip_type="sd3", limit=2)
    with safe_open(str(tmp_path / "out" / "shard-00000.safetensors"), "pt") as handle:
        assert handle.get_slice("cond").get_shape() == [2 * 77, L_WIDTH + G_WIDTH]
        assert handle.get_slice("t5").get_shape() == [2 * 77, 256]
    clip = load_clip(model, clip_type="sd3")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for caption_id, cond, _ in open_shards(tmp_path / "out"):
            want = clip.encode_from_tokens(clip.tokenize(CAPTIONS[caption_id]))[0]
            assert want.shape[-1] == 256 and not want[:77, L_WIDTH + G_WIDTH:].any()
            assert torch.equal(cond, want)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("kind, syntax", [("wan", "a1111"), ("sd3", "compel")])
def test_a_syntax_the_family_does_not_define_is_refused_before_any_caption(family, captions, tmp_path, kind,
                                                                             syntax):
    """One PromptError up front (issue 26 point 6), not one rejected caption per row."""
    from textenc.errors import PromptError

    with pytest.raises(PromptError, match=rf"syntax='{syntax}' is not defined for .*the syntaxes that apply"):
        _encode(captions, _model(family, kind), tmp_path / "out", clip_type=kind, syntax=syntax)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a1111_syntax_encodes_sd3_and_flux(family, tmp_path, kind):
    """``syntax="a1111"`` (A1111's SD3, Forge's Flux): every stored caption equals
    ``CLIP.encode(caption, syntax="a1111")`` (tests/test_a1111_families.py checks that one
    against the projects' rules)."""
    texts = ["a photo of a cat", "a (red:1.3) fox in the [snow]", ""]
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    _encode(source, _model(family, kind), tmp_path / "out", clip_type=kind, syntax="a1111")
    clip = load_clip(_model(family, kind), clip_type=kind)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stored = list(open_shards(tmp_path / "out"))
        assert len(stored) == len(texts)
        for caption_id, cond, pooled in stored:
            want, want_pooled = clip.encode_from_tokens(clip.tokenize(texts[caption_id], syntax="a1111"),
                                                        return_pooled=True, options={"weight_mode": "a1111"})
            torch.testing.assert_close(cond, want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pooled, want_pooled[0], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(previous)
    if kind == "sd3":  # A1111 fits SD3's T5 to the CLIP rows: no other length to ask for
        with pytest.raises(DatasetError, match="t5_min_length=256: with syntax='a1111'"):
            _encode(source, _model(family, kind), tmp_path / "out2", clip_type=kind, syntax="a1111",
                    t5_min_length=256)
