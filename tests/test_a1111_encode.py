"""A1111 conditioning: textenc (``syntax="a1111"`` windows through ``SDClipModel``) against
``a1111_reference``: A1111's chunking and emphasis written independently from its rules,
on transformers' CLIP text model.

The text models are tiny random transformers models (every parameter random); textenc
loads the same weights. Tolerance 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch

from a1111_prompts import ALL_PROMPTS
from a1111_reference import OracleClip, active_entry, oracle_schedule
from random_weights import randomize_
from textenc.prompts.dialects import SYNTAXES
from textenc.errors import PromptError
from textenc.sd import CLIP, conditioning_at_step
from textenc.text_encoders.sd1_clip import SD1ClipModel, SD1Tokenizer, SDClipModel
from textenc.prompts.tokenizer import DEFAULT_VOCAB

transformers = pytest.importorskip("transformers")

TOL = 1e-5
WIDTH = 64
START, END = 49406, 49407


def make_hf(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        projection_dim=WIDTH, hidden_act="quick_gelu", eos_token_id=END, bos_token_id=START)
    model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="eager").eval()
    randomize_(model, seed)
    with torch.no_grad():
        # "Original" emphasis divides by the window's mean. A random model's outputs have a
        # mean near 0, which turns fp32 rounding (1e-6 between any two CLIP implementations)
        # into errors far above it; real CLIP outputs have a mean well away from 0.
        model.text_model.final_layer_norm.bias += 1.0
    return model


def text_config(pad: int) -> dict:
    return {"vocab_size": 49408, "hidden_size": WIDTH, "intermediate_size": 128, "num_hidden_layers": 3,
            "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "projection_dim": WIDTH, "bos_token_id": START, "eos_token_id": END,
            "pad_token_id": pad}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: one thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_model():
    return make_hf(7)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)


def our_model(hf_model, pad: int = END) -> SDClipModel:
    model = SDClipModel(textmodel_json_config=text_config(pad), return_projected_pooled=False,
                        special_tokens={"start": START, "end": END, "pad": pad})
    model.load_sd({k: v.clone() for k, v in hf_model.state_dict().items() if k != "text_projection.weight"})
    return model


@pytest.fixture(scope="module")
def clip(hf_model) -> CLIP:
    model = SD1ClipModel(textmodel_json_config=text_config(END))
    model.load_sd({k: v.clone() for k, v in hf_model.state_dict().items() if k != "text_projection.weight"})
    return CLIP(model, SD1Tokenizer())


@pytest.mark.parametrize("emphasis, mode", [("Original", "a1111"), ("No norm", "a1111_no_norm"),
                                            ("Ignore", "none")])
def test_conditioning_equals_a1111(hf_model, hf_tokenizer, emphasis, mode):
    """Every prompt of the set (>100: doctests, edge cases, long tag and clause prompts)."""
    reference = OracleClip(hf_tokenizer, hf_model, emphasis=emphasis)
    model, tokenizer = our_model(hf_model), SD1Tokenizer().tokenizer
    prompts = ALL_PROMPTS if mode == "a1111" else ALL_PROMPTS[::4]
    worst = 0.0
    for prompt in prompts:
        expected = reference.encode([prompt])
        windows = tokenizer.tokenize_with_weights(prompt, syntax="a1111")
        got = model.encode_token_weights(windows, options={"weight_mode": mode})[0]
        assert got.shape == expected.shape, prompt
        worst = max(worst, (got - expected).abs().max().item())
    assert worst < TOL


def test_openclip_padding_and_clip_skip(hf_model, hf_tokenizer):
    """``id_pad`` 0 after the first end token (SD2/SDXL-G) and CLIP skip 2 (A1111's
    ``CLIP_stop_at_last_layers``: hidden_states[-2] through the final layer norm)."""
    reference = OracleClip(hf_tokenizer, hf_model, pad_id=0, skip=2)
    model = our_model(hf_model, pad=0)
    tokenizer = SD1Tokenizer(pad_with_end=False).tokenizer
    for prompt in ALL_PROMPTS[::5]:
        windows = tokenizer.tokenize_with_weights(prompt, syntax="a1111")
        got = model.encode_token_weights(windows, options={"weight_mode": "a1111", "layer": -2})[0]
        torch.testing.assert_close(got, reference.encode([prompt]), atol=TOL, rtol=0)


def _reference_schedule(reference, prompt, steps):
    """A1111 encodes all texts of one prompt's schedule as one batch."""
    schedule = oracle_schedule(prompt, steps)
    conds = reference.encode([text for _, text in schedule])
    return schedule, conds


@pytest.mark.parametrize("prompt, steps", [
    ("a [red:blue:0.5] fox, (detailed:1.3)", 10),
    ("[a|b|(c:1.4)] in the [snow:rain:3]", 6),
    ("[((long)):" + ", ".join(["a red fox in the snow"] * 16) + ":4] end", 8),  # 1 vs 2 chunks
    ("a [b:c:2] [d:e:5]", 8),
    ("no editing (at:1.2) all", 5),
])
def test_schedule_equals_a1111_batch(clip, hf_model, hf_tokenizer, prompt, steps):
    """Each text of a schedule with A1111's emphasis over the batch (and empty chunks for
    the shorter texts), and the entry that is active at each step."""
    reference = OracleClip(hf_tokenizer, hf_model)
    schedule, conds = _reference_schedule(reference, prompt, steps)
    conditioning = clip.encode_scheduled(prompt, steps=steps, syntax="a1111")
    for step in range(steps):
        active = conditioning_at_step(conditioning, step, steps)
        assert len(active) == 1
        expected = conds[active_entry(schedule, step)]
        torch.testing.assert_close(active[0][0][0], expected, atol=TOL, rtol=0)


def test_and_parts_weights_and_percent_ranges(clip, hf_model, hf_tokenizer):
    reference = OracleClip(hf_tokenizer, hf_model)
    prompt = "a cat [sitting:running:2] AND a dog:0.7 AND (snow:1.2):-0.5"
    conditioning = clip.encode_scheduled(prompt, steps=4, syntax="a1111")
    assert [(e["start_percent"], e["end_percent"], e["strength"]) for _, e in conditioning] == [
        (0.0, 0.75, 1.0), (0.75, 1.0, 1.0), (0.0, 1.0, 0.7), (0.0, 1.0, -0.5)]
    parts = [("a cat [sitting:running:2] ", 1.0), (" a dog", 0.7), (" (snow:1.2)", -0.5)]
    for step in range(4):
        active = conditioning_at_step(conditioning, step, 4)
        assert [w for _, _, w in active] == [w for _, w in parts]
        for (cond, pooled, _), (text, _) in zip(active, parts):
            schedule, conds = _reference_schedule(reference, text, 4)
            torch.testing.assert_close(cond[0], conds[active_entry(schedule, step)], atol=TOL, rtol=0)
            assert pooled.shape == (1, WIDTH)
    assert len(clip.encode_scheduled("a AND b", steps=3, syntax="a1111", split_and=False)) == 1


def test_syntax_sets_the_default_weight_mode(clip):
    prompt = "a (red:1.5) fox"
    a1111 = clip.encode(prompt, syntax="a1111")
    tokens = clip.tokenize(prompt, syntax="a1111")
    assert torch.equal(a1111, clip.encode_from_tokens(tokens, options={"weight_mode": "a1111"}))
    assert not torch.equal(a1111, clip.encode_from_tokens(tokens))  # token lists carry no mode
    named = clip.encode(prompt, syntax="a1111", options={"weight_mode": "none"})
    assert torch.equal(named, clip.encode_from_tokens(tokens, options={"weight_mode": "none"}))
    assert torch.equal(clip.encode(prompt), clip.encode_from_tokens(clip.tokenize(prompt)))  # comfy


def test_comfy_schedule_is_one_entry_over_the_whole_range(clip):
    (entry,) = clip.encode_scheduled("a [b:c:2] AND d", steps=4)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a [b:c:2] AND d"), return_pooled=True)
    assert torch.equal(entry[0], cond) and torch.equal(entry[1]["pooled_output"], pooled)
    assert (entry[1]["start_percent"], entry[1]["end_percent"]) == (0.0, 1.0)


def test_sdxl_schedule_equals_a1111(hf_tokenizer):
    """SDXL: each encoder chunks and weights on its own (CLIP-L pads with the end token,
    OpenCLIP-G with 0), both at the penultimate layer without the final norm; the cond is
    L beside G and the pooled output G's projected one of the first chunk."""
    from textenc.text_encoders.sdxl_clip import SDXLClipModel, SDXLTokenizer

    def hf(width, seed):
        torch.manual_seed(seed)
        config = transformers.CLIPTextConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=2,
            projection_dim=width, hidden_act="gelu", eos_token_id=END, bos_token_id=START)
        model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="eager").eval()
        randomize_(model, seed)
        with torch.no_grad():  # see make_hf
            model.text_model.encoder.layers[1].mlp.fc2.bias += 1.0
        return model

    hf_l, hf_g = hf(64, 11), hf(96, 12)
    configs = {}
    for role, model, pad in (("l", hf_l, END), ("g", hf_g, 0)):
        width = model.config.hidden_size
        configs[role] = {**text_config(pad), "hidden_size": width, "intermediate_size": 2 * width,
                         "hidden_act": "gelu", "projection_dim": width}
    model = SDXLClipModel(l_config=configs["l"], g_config=configs["g"])
    model.load_sd({k: v.clone() for k, v in hf_l.state_dict().items() if k != "text_projection.weight"})
    model.load_sd({k: v.clone() for k, v in hf_g.state_dict().items()})
    model.clip_l.special_tokens = {"start": START, "end": END, "pad": END}
    model.clip_g.special_tokens = {"start": START, "end": END, "pad": 0}
    sdxl = CLIP(model, SDXLTokenizer(), clip_type="sdxl")
    ref_l = OracleClip(hf_tokenizer, hf_l, skip=2, final_norm=False)
    ref_g = OracleClip(hf_tokenizer, hf_g, pad_id=0, skip=2, final_norm=False)
    prompt, steps = "[a red fox:((a blue bird)):3], " + ", ".join(["snowy forest at dawn"] * 14), 6
    schedule = oracle_schedule(prompt, steps)
    texts = [text for _, text in schedule]
    cond_l, cond_g = ref_l.encode(texts), ref_g.encode(texts)
    conditioning = sdxl.encode_scheduled(prompt, steps=steps, syntax="a1111")
    assert len(conditioning) == len(schedule)
    for index, (cond, extra) in enumerate(conditioning):
        expected = torch.cat([cond_l[index], cond_g[index]], dim=-1)
        torch.testing.assert_close(cond[0], expected, atol=TOL, rtol=0)
        torch.testing.assert_close(extra["pooled_output"][0], ref_g.first_pooled[index], atol=TOL, rtol=0)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_encode_scheduled_refuses_a_too_long_prompt_before_reading_its_schedule(clip, syntax, monkeypatch):
    """max_prompt_chars holds before the schedule parser sees the text (it read a
    100M-character prompt first, for minutes, and only then did the tokenizer refuse it)."""
    import textenc.prompts.dialects as dialects

    limited = CLIP(clip.cond_stage_model, SD1Tokenizer(max_prompt_chars=100))
    read = []
    real = dialects.prompt_schedules
    monkeypatch.setattr("textenc.sd.prompt_schedules", lambda *a, **k: read.append(a) or real(*a, **k))
    with pytest.raises(PromptError, match=r"101 characters, more than max_prompt_chars=100"):
        limited.encode_scheduled("[a:b:2]" + "x" * 94, steps=4, syntax=syntax)
    assert read == []
    assert len(limited.encode_scheduled("[a:b:2]" + "x" * 93, steps=4, syntax=syntax)) >= 1
    assert len(read) == 1


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("steps", [0, -1, None, "5", True, 2.0])
def test_encode_scheduled_checks_steps_for_every_syntax(clip, syntax, steps):
    """Only a1111 checked steps: comfy and compel raised ZeroDivisionError or TypeError,
    or accepted -1."""
    with pytest.raises(PromptError, match=r"steps must be a positive int"):
        clip.encode_scheduled("a cat", steps=steps, syntax=syntax)
