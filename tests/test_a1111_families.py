"""``syntax="a1111"`` on SD3 (AUTOMATIC1111's webui) and Flux (Forge) against
:mod:`a1111_family_reference` (their rules restated over transformers' CLIP and T5 models with
the same tiny random weights): tokens, weights, cond and pooled, fp32 within 1e-5 relative."""

from __future__ import annotations

import pytest
import torch

from a1111_family_reference import FluxReference, SD3Reference
from family_fixtures import T5_WIDTH, clip_model, t5_model, weights
from textenc.errors import PromptError
from textenc.sd import load_clip

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

PROMPTS = ["a photo of a cat", "a (red:1.3) cat on a [mat], ((tall)) grass (\\(photo\\))",
           "", "one BREAK two (three:0.5)", "(long:1.2) " + ", ".join(["snowy forest at dawn"] * 22)]
EMPHASIS = {"a1111": "Original", "a1111_no_norm": "No norm", "none": "Ignore"}


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    error = float((got - want).abs().max())
    assert error <= rtol * max(float(want.abs().max()), 1e-30), f"max|Δ| {error:.3g}"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    """Tiny L, G, T5; the CLIP outputs get a mean well away from 0 (A1111's "Original" divides
    by it; a random model's mean near 0 would turn fp32 rounding into large errors)."""
    clip_l, clip_g, t5 = clip_model("l", 21), clip_model("g", 22), t5_model("t5", 23)  # L + G = T5's width
    with torch.no_grad():
        for model in (clip_l, clip_g):
            model.text_model.encoder.layers[1].mlp.fc2.bias += 1.0
            model.text_model.final_layer_norm.bias += 1.0
        t5.encoder.final_layer_norm.weight.add_(1.0)
    return {"l": clip_l, "g": clip_g, "t5": t5}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("a1111fam")
    paths = {}
    for role, model in models.items():
        paths[role] = folder / f"{role}.safetensors"
        save_file(weights(model), str(paths[role]))
    return paths


@pytest.fixture(scope="module")
def tokenizers():
    from textenc.prompts.tokenizer import DEFAULT_VOCAB
    from textenc.text_encoders.t5 import T5_VOCAB
    return (transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB),
            transformers.T5TokenizerFast(tokenizer_file=f"{T5_VOCAB}/tokenizer.json"))


@pytest.fixture(scope="module")
def sd3(files):
    return load_clip([files["l"], files["g"], files["t5"]], clip_type="sd3")


@pytest.fixture(scope="module")
def flux(files):
    return load_clip([files["t5"], files["l"]], clip_type="flux")


def sd3_reference(models, tokenizers, emphasis="Original", with_t5=True):
    return SD3Reference(*tokenizers, models["l"], models["g"], models["t5"] if with_t5 else None,
                        width=T5_WIDTH, emphasis=emphasis)


# ---- SD3 (A1111) ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS)
def test_sd3_tokens_are_a1111_s(sd3, models, tokenizers, prompt):
    """L and G: A1111's chunks (G 0 after the first end); T5: the pieces' ids and ``</s>``,
    unweighted (A1111 never applies T5 multipliers), cut or padded to CLIP's rows."""
    reference = sd3_reference(models, tokenizers)
    tokens = sd3.tokenize(prompt, syntax="a1111")
    chunks = reference.l.chunks(prompt)
    assert [[t for t, _ in w] for w in tokens["l"]] == [reference.l.window_ids(c) for c in chunks]
    assert [[t for t, _ in w] for w in tokens["g"]] == [reference.g.window_ids(c) for c in chunks]
    assert [w for window in tokens["l"] for _, w in window] == \
        pytest.approx([w for c in chunks for w in c.weights])
    assert [t for t, _ in tokens["t5xxl"][0]] == reference.t5_ids(prompt, 77 * len(chunks))
    assert {w for _, w in tokens["t5xxl"][0]} == {1.0}


@pytest.mark.parametrize("mode", list(EMPHASIS))
def test_sd3_cond_and_pooled_equal_a1111(sd3, models, tokenizers, mode):
    reference = sd3_reference(models, tokenizers, EMPHASIS[mode])
    for prompt in PROMPTS if mode == "a1111" else PROMPTS[1::2]:
        cond, pooled = sd3.encode_from_tokens(sd3.tokenize(prompt, syntax="a1111"), return_pooled=True,
                                              options={"weight_mode": mode})
        want_cond, want_pooled = reference.encode([prompt])
        assert cond.shape[1] == 2 * 77 * len(reference.l.chunks(prompt))  # T5 rows = CLIP's rows
        assert_close(cond, want_cond)
        assert_close(pooled, want_pooled)


def test_sd3_plain_text_setting(sd3, models, tokenizers):
    """``disable_weights`` (A1111's emphasis "None"): on a prompt without syntax, weights 1."""
    reference = sd3_reference(models, tokenizers, "None")
    cond = sd3.encode("a red fox in the snow", syntax="a1111", disable_weights=True)
    assert_close(cond, reference.encode(["a red fox in the snow"])[0])
    tokens = sd3.tokenize("(red:1.5) BREAK fox", syntax="a1111", disable_weights=True)
    assert len(tokens["l"]) == 1 and {w for _, w in tokens["l"][0]} == {1.0}
    literal = tokenizers[1]("(red:1.5) BREAK fox", add_special_tokens=False)["input_ids"] + [1]
    assert [t for t, _ in tokens["t5xxl"][0]] == literal + [0] * (77 - len(literal))


def test_sd3_schedule_is_one_a1111_batch(sd3, models, tokenizers):
    """Texts of one schedule: one batch, chunks padded with empty ones, one mean per chunk index,
    every text's T5 padded to the longest text's CLIP rows."""
    from a1111_reference import oracle_schedule
    # the first text's T5 ids (past 77) are cut to its one chunk alone, and come back in the batch
    prompt, steps = "[a red fox:((a blue bird)), " + "tall grass, " * 30 + ":3] " + "snowy, " * 30, 6
    schedule = oracle_schedule(prompt, steps)
    texts = [text for _, text in schedule]
    want_cond, want_pooled = sd3_reference(models, tokenizers).encode(texts)
    got = sd3.encode_scheduled(prompt, steps=steps, syntax="a1111")
    assert len(got) == len(schedule) == 2
    alone = sd3.tokenize(texts[0], syntax="a1111")
    full = sd3_reference(models, tokenizers).t5_ids(texts[0], 10**4)
    assert len(alone["l"]) == 1 and full.index(1) >= 77 and len(alone["t5xxl"][0]) == 77
    for index, (cond, extra) in enumerate(got):
        assert_close(cond, want_cond[index:index + 1])
        assert_close(extra["pooled_output"], want_pooled[index:index + 1])


def test_sd3_without_t5_has_zero_t5_rows(files, models, tokenizers):
    """A1111's ``sd3_enable_t5`` off (its default): the T5 rows are zeros."""
    clip = load_clip([files["l"], files["g"]], clip_type="sd3")
    prompt = PROMPTS[1]
    cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt, syntax="a1111"), return_pooled=True,
                                           options={"weight_mode": "a1111"})
    want_cond, want_pooled = sd3_reference(models, tokenizers, with_t5=False).encode([prompt])
    assert cond.shape[-1] == 4096  # ComfyUI's and A1111's width without T5
    want_cond = torch.nn.functional.pad(want_cond, (0, 4096 - T5_WIDTH))
    assert_close(cond, want_cond)
    assert_close(pooled, want_pooled)
    assert not cond[0, 77:].any()


def test_sd3_without_clip_is_refused(files):
    clip = load_clip([files["t5"]], clip_type="sd3")
    with pytest.raises(PromptError, match="needs CLIP-L and CLIP-G"):
        clip.encode("a cat", syntax="a1111")


def test_sd3_a1111_tokens_need_an_a1111_weight_mode(sd3):
    with pytest.raises(PromptError, match="weight_mode 'a1111', 'a1111_no_norm' or 'none'"):
        sd3.encode("a cat", syntax="a1111", options={"weight_mode": "comfy"})
    tokens = sd3.tokenize(PROMPTS[1], syntax="a1111")  # no weight_mode: the tokens' own, a1111
    assert torch.equal(sd3.encode_from_tokens(tokens), sd3.encode_from_tokens(tokens, options={"weight_mode": "a1111"}))


# ---- Flux (Forge) --------------------------------------------------------------------------

FLUX_PROMPTS = [p for p in PROMPTS if "BREAK" not in p]


@pytest.mark.parametrize("prompt", FLUX_PROMPTS)
def test_flux_tokens_are_forge_s(flux, models, tokenizers, prompt):
    reference = FluxReference(*tokenizers, models["l"], models["t5"])
    tokens = flux.tokenize(prompt, syntax="a1111")
    want = reference.t5_pairs(prompt)
    assert [t for t, _ in tokens["t5xxl"][0]] == [t for t, _ in want]
    assert [w for _, w in tokens["t5xxl"][0]] == pytest.approx([w for _, w in want])
    chunks = reference.l.chunks(prompt)
    assert [[t for t, _ in w] for w in tokens["l"]] == [reference.l.window_ids(c) for c in chunks]


@pytest.mark.parametrize("mode", list(EMPHASIS))
def test_flux_cond_and_pooled_equal_forge(flux, models, tokenizers, mode):
    reference = FluxReference(*tokenizers, models["l"], models["t5"], emphasis=EMPHASIS[mode])
    for prompt in FLUX_PROMPTS if mode == "a1111" else FLUX_PROMPTS[1:3]:
        cond, pooled = flux.encode_from_tokens(flux.tokenize(prompt, syntax="a1111"), return_pooled=True,
                                               options={"weight_mode": mode})
        want_cond, want_pooled = reference.encode(prompt)
        assert_close(cond, want_cond)
        assert_close(pooled, want_pooled)


def test_flux_plain_text_setting_reads_t5_literally(flux, models, tokenizers):
    reference = FluxReference(*tokenizers, models["l"], models["t5"], emphasis="None")
    prompt = "a (red:1.3) fox BREAK [snow]"
    cond = flux.encode(prompt, syntax="a1111", disable_weights=True)
    assert_close(cond, reference.encode(prompt)[0])


def test_flux_schedule_encodes_each_text_alone(flux, models, tokenizers):
    from a1111_reference import oracle_schedule
    prompt, steps = "a [red:(blue:1.4):2] fox", 4
    reference = FluxReference(*tokenizers, models["l"], models["t5"])
    got = flux.encode_scheduled(prompt, steps=steps, syntax="a1111")
    schedule = oracle_schedule(prompt, steps)
    assert len(got) == len(schedule) == 2
    for (cond, extra), (_, text) in zip(got, schedule):
        want_cond, want_pooled = reference.encode(text)
        assert_close(cond, want_cond)
        assert_close(extra["pooled_output"], want_pooled)


def test_flux_break_is_refused(flux):
    with pytest.raises(PromptError, match="BREAK in a Flux prompt.*syntax='comfy'"):
        flux.tokenize("a cat BREAK a dog", syntax="a1111")


def test_sd3_g_reads_clip_l_s_ids_not_open_clip_s(sd3):
    """A1111's ``Sd3ClipLG`` tokenizes once, with the CLIP-L tokenizer (transformers 4.30.2 + ftfy),
    and G gets those ids: on text whose open_clip clean-up differs, G's window holds CLIP-L's ids
    (expectations from A1111's own tokenizers, ``tests/a1111_text_expected.json``)."""
    import json
    from pathlib import Path

    cases = json.loads((Path(__file__).parent / "a1111_text_expected.json").read_text("utf-8"))["cases"]
    differing = [c for c in cases if isinstance(c["clip_l"], list) and isinstance(c["open_clip"], list)
                 and c["clip_l"] != c["open_clip"] and not set(c["text"]) & set("()[]:\\")
                 and "BREAK" not in c["text"] and len(c["clip_l"]) <= 75]
    assert len(differing) >= 10
    for case in differing:
        tokens = sd3.tokenize(case["text"], syntax="a1111")
        l_ids, g_ids = ([t for t, _ in tokens[role][0]] for role in ("l", "g"))
        assert l_ids[1:1 + len(case["clip_l"])] == case["clip_l"], case["text"]
        first_end = l_ids.index(49407)  # A1111: 0 after the first end token, a typed one too
        assert g_ids == l_ids[:first_end + 1] + [0] * (77 - first_end - 1), case["text"]


def test_sd3_textual_inversion_is_refused(files, tmp_path):
    save_file({"emb_params": torch.randn(2, 64)}, str(tmp_path / "myemb.safetensors"))  # CLIP-L's width
    clip = load_clip([files["l"], files["g"], files["t5"]], clip_type="sd3", embedding_directory=str(tmp_path))
    with pytest.raises(PromptError, match="textual inversion in an SD3 prompt"):
        clip.tokenize("a myemb cat", syntax="a1111")
