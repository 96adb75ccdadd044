"""``SDClipModel.encode_token_weights`` against transformers and ComfyUI's formulas.

Every reference is computed from a tiny random ``transformers``
``CLIPTextModelWithProjection`` (head size 64, so ``load_clip``'s shape-based
config applies) and the published formula, never from textenc's own output:

* cond: SD1 ``last_hidden_state``; SD2 ``final_layer_norm(hidden_states[-2])``;
  SDXL ``cat(L.hidden_states[-2], G.hidden_states[-2])`` without the final norm.
* pooled: SD1 unprojected at the first end token; SD2/SDXL ``text_embeds``.
* weights (ComfyUI ``sd1_clip.ClipTokenWeightEncoder``): for every token of
  weight w != 1, ``z_empty + (z - z_empty) * w`` with ``z_empty`` the encoding
  of ``[start, end, pad, ...]`` (pad = end for SD1, 0 for SD2 / bigG).

Models are loaded through ``load_clip`` from safetensors files saved in the
real checkpoint key layouts (``convert.to_layout``).

Textual inversion: transformers 5.x ``CLIPTextModel`` has no ``inputs_embeds``
argument, so the reference is a *copy* of the HF model whose token table is
extended with the vector under a new id (49408); HF pools at the first
``eos_token_id`` (49407), not at the argmax id, so the extra id is harmless.
"""

from __future__ import annotations

import concurrent.futures
import copy

import pytest

from textenc.errors import LayerError  # noqa: E402
import torch
from random_weights import randomize_

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from textenc.loading.convert import to_layout  # noqa: E402
from textenc.errors import CheckpointError, PromptError  # noqa: E402
from textenc.sd import load_clip  # noqa: E402
from textenc.text_encoders.sd1_clip import SDClipModel  # noqa: E402

TOL = 1e-5
START, END = 49406, 49407
WIDTH = 128
LAYERS = 3


# ---- oracles and fixtures -------------------------------------------------------

def make_hf(activation: str, seed: int) -> torch.nn.Module:
    """Tiny HF text model with every parameter random (HF init hides swapped biases)."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=2,
        projection_dim=WIDTH, hidden_act=activation, eos_token_id=END, bos_token_id=START)
    model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="sdpa").eval()
    randomize_(model, seed)
    return model


def text_config(activation: str, pad: int) -> dict:
    """Config dict for building ``SDClipModel`` directly on the tiny HF weights."""
    return {"vocab_size": 49408, "hidden_size": WIDTH, "intermediate_size": 256,
            "num_hidden_layers": LAYERS, "num_attention_heads": 2, "max_position_embeddings": 77,
            "hidden_act": activation, "layer_norm_eps": 1e-5, "projection_dim": WIDTH,
            "bos_token_id": START, "eos_token_id": END, "pad_token_id": pad}


def hf_state(model: torch.nn.Module, *, projection: bool = True) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if projection or k != "text_projection.weight"}


@pytest.fixture(scope="session")
def hf_models() -> dict[str, torch.nn.Module]:
    """OpenAI CLIP-L uses quick_gelu; OpenCLIP ViT-H and bigG use gelu."""
    return {"l": make_hf("quick_gelu", 1), "h": make_hf("gelu", 2), "g": make_hf("gelu", 3)}


@pytest.fixture(scope="session")
def clips(hf_models, tmp_path_factory) -> dict:
    """``load_clip`` on files in the SD1, SD2 and SDXL checkpoint key layouts."""
    folder = tmp_path_factory.mktemp("ckpt")
    files = {
        "sd1": to_layout(hf_state(hf_models["l"], projection=False), "sd1"),
        "sd2": to_layout(hf_state(hf_models["h"]), "sd2"),
        "sdxl": {**to_layout(hf_state(hf_models["l"], projection=False), "sdxl_l"),
                 **to_layout(hf_state(hf_models["g"]), "sdxl_g")},
    }
    out = {}
    for name, sd in files.items():
        save_file(sd, str(folder / f"{name}.safetensors"))
        out[name] = load_clip(str(folder / f"{name}.safetensors"))
        assert out[name].clip_type == name
    return out


def sd1_model(hf_models, **kwargs) -> SDClipModel:
    """A fresh SD1-style ``SDClipModel`` on the tiny L weights (own caches)."""
    kwargs.setdefault("return_projected_pooled", False)
    model = SDClipModel(textmodel_json_config=text_config("quick_gelu", END), **kwargs)
    model.load_sd(hf_state(hf_models["l"], projection=False))
    return model


def hf_run(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(torch.as_tensor(ids).reshape(-1, 77), attention_mask=attention_mask,
                     output_hidden_states=True)


def first_end(row) -> int:
    return list(row).index(END)


def hf_cond(kind: str, hf_models, ids_by_role: dict, layer: int | None = None):
    """The (windows, 77, D) reference cond and (windows, P) pooled for one model kind."""
    if kind == "sd1":
        out = hf_run(hf_models["l"], ids_by_role["l"])
        z = out.last_hidden_state if layer is None else \
            hf_models["l"].text_model.final_layer_norm(out.hidden_states[layer])
        rows = [first_end(r) for r in ids_by_role["l"]]
        pooled = out.last_hidden_state[torch.arange(len(rows)), rows]  # unprojected
        return z, pooled
    if kind == "sd2":
        out = hf_run(hf_models["h"], ids_by_role["h"])
        return hf_models["h"].text_model.final_layer_norm(out.hidden_states[-2]), out.text_embeds
    out_l, out_g = hf_run(hf_models["l"], ids_by_role["l"]), hf_run(hf_models["g"], ids_by_role["g"])
    return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), out_g.text_embeds


def empty_ids(pad: int) -> list[int]:
    return [START, END] + [pad] * 75


ROLES = {"sd1": {"l": END}, "sd2": {"h": 0}, "sdxl": {"l": END, "g": 0}}


def comfy_weighted(kind, hf_models, ids_by_role, weights_by_role):
    """ComfyUI's formula, per encoder, from HF outputs; SDXL concatenates L and G."""
    parts = []
    for role, pad in ROLES[kind].items():
        one = {"l": "sd1", "h": "sd2", "g": "sd2"}[role]
        model = hf_models[role]
        out, empty = hf_run(model, ids_by_role[role]), hf_run(model, empty_ids(pad))
        if kind == "sdxl":
            z, z_empty = out.hidden_states[-2], empty.hidden_states[-2]
        elif one == "sd2":
            norm = model.text_model.final_layer_norm
            z, z_empty = norm(out.hidden_states[-2]), norm(empty.hidden_states[-2])
        else:
            z, z_empty = out.last_hidden_state, empty.last_hidden_state
        z = z.clone()
        for i, row in enumerate(weights_by_role[role]):
            for j, w in enumerate(row):
                if w != 1.0:
                    z[i, j] = z_empty[0, j] + (z[i, j] - z_empty[0, j]) * w
        parts.append(z.reshape(1, -1, z.shape[-1]))
    return torch.cat(parts, dim=-1)


def split(tokens: dict) -> tuple[dict, dict]:
    ids = {r: [[p[0] for p in w] for w in windows] for r, windows in tokens.items()}
    weights = {r: [[p[1] for p in w] for w in windows] for r, windows in tokens.items()}
    return ids, weights


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() <= tol


# ---- parity ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_unweighted_prompt_equals_hf(kind, clips, hf_models):
    clip = clips[kind]
    tokens = clip.tokenize("a photo of a red fox, highly detailed")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    ids, _ = split(tokens)
    z, ref_pooled = hf_cond(kind, hf_models, ids)
    assert close(cond, z.reshape(1, -1, z.shape[-1]))
    assert close(pooled, ref_pooled[0:1])


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_weighted_prompt_equals_comfy_formula(kind, clips, hf_models):
    clip = clips[kind]
    tokens = clip.tokenize("a (red:1.5) fox in (deep snow:0.6), [x], ((sharp))")
    ids, weights = split(tokens)
    assert any(w != 1.0 for ws in weights.values() for row in ws for w in row)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert close(cond, comfy_weighted(kind, hf_models, ids, weights))
    # Weights never touch the pooled output (ComfyUI pools the unweighted first window).
    assert close(pooled, hf_cond(kind, hf_models, ids)[1][0:1])


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_three_window_prompt(kind, clips, hf_models):
    clip = clips[kind]
    words = "red fox cat dog tree house river snow blue green light dark".split()
    text = " ".join(f"({words[i % 12]}:1.2)" if i % 7 == 0 else words[i % 12] for i in range(200))
    tokens = clip.tokenize(text)
    ids, weights = split(tokens)
    assert all(len(w) == 3 for w in ids.values())
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    ref = comfy_weighted(kind, hf_models, ids, weights)
    assert cond.shape[1] == 77 * 3
    assert close(cond, ref)
    # Pooled from the first window only.
    assert close(pooled, hf_cond(kind, hf_models, ids)[1][0:1])


def test_textual_inversion_vectors_go_into_input_embeddings(hf_models):
    model = sd1_model(hf_models)
    table_before = model.transformer.get_input_embeddings().weight.detach().clone()
    vector = torch.randn(WIDTH, generator=torch.Generator().manual_seed(5))
    window = [(START, 1.0), (320, 1.0), (vector, 1.3), (vector * 0.5, 1.0), (2368, 1.0), (END, 1.0)]
    window += [(END, 1.0)] * (77 - len(window))
    cond, pooled = model.encode_token_weights([window])

    oracle = copy.deepcopy(hf_models["l"])
    oracle.resize_token_embeddings(49410)
    with torch.no_grad():
        oracle.text_model.embeddings.token_embedding.weight[49408] = vector
        oracle.text_model.embeddings.token_embedding.weight[49409] = vector * 0.5
    ids = [START, 320, 49408, 49409, 2368, END] + [END] * 71
    out, empty = hf_run(oracle, ids), hf_run(oracle, empty_ids(END))
    z = out.last_hidden_state.clone()
    z[0, 2] = empty.last_hidden_state[0, 2] + (z[0, 2] - empty.last_hidden_state[0, 2]) * 1.3
    assert close(cond, z)
    assert close(pooled, out.last_hidden_state[0:1, 5])
    assert torch.equal(model.transformer.get_input_embeddings().weight, table_before)


# ---- clip skip --------------------------------------------------------------------

def test_clip_skip_per_call_and_instance_default(hf_models):
    model = sd1_model(hf_models)
    window = [(START, 1.0), (320, 1.0), (2368, 1.0), (END, 1.0)] + [(END, 1.0)] * 73
    ids = [[t for t, _ in window]]
    last = hf_cond("sd1", hf_models, {"l": ids})[0]
    skip = hf_cond("sd1", hf_models, {"l": ids}, layer=-2)[0]
    assert close(model.encode_token_weights([window], options={"layer": -2})[0], skip)
    assert close(model.encode_token_weights([window])[0], last)  # per call: default kept
    model.set_clip_options({"layer": -2})
    assert close(model.encode_token_weights([window])[0], skip)
    model.reset_clip_options()
    assert close(model.encode_token_weights([window])[0], last)
    # ComfyUI silently falls back to the last layer; textenc names the range (README).
    for beyond in (LAYERS, -LAYERS - 1, 100):
        with pytest.raises(LayerError, match=rf"layer {beyond} is out of range.*-{LAYERS}\.\.-1"):
            model.encode_token_weights([window], options={"layer": beyond})
    assert not close(skip, last)


def test_clip_clone_layer_does_not_affect_original(clips, hf_models):
    clip = clips["sd1"]
    tokens = clip.tokenize("a red fox")
    ids, _ = split(tokens)
    clone = clip.clone()
    clone.clip_layer(-2)
    assert close(clone.encode_from_tokens(tokens), hf_cond("sd1", hf_models, ids, layer=-2)[0])
    assert close(clip.encode_from_tokens(tokens), hf_cond("sd1", hf_models, ids)[0])
    assert clip.layer_idx is None


def test_empty_windows_list_is_the_empty_prompt(hf_models):
    model = sd1_model(hf_models)
    cond, pooled = model.encode_token_weights([])
    out = hf_run(hf_models["l"], empty_ids(END))
    assert close(cond, out.last_hidden_state)
    assert close(pooled, out.last_hidden_state[0:1, 1])


# ---- masks ------------------------------------------------------------------------

def _masked_window():
    window = [(START, 1.0), (320, 1.0), (736, 1.0), (3240, 1.0), (END, 1.0)] + [(END, 1.0)] * 72
    mask = torch.tensor([[1] * 5 + [0] * 72])
    return window, mask


def test_return_attention_masks(hf_models):
    model = sd1_model(hf_models, return_attention_masks=True)
    window, mask = _masked_window()
    cond, pooled, extra = model.encode_token_weights([window])
    assert torch.equal(extra["attention_mask"].cpu(), mask)
    assert close(cond, hf_run(hf_models["l"], [[t for t, _ in window]]).last_hidden_state)


def test_enable_attention_masks_and_zero_out_masked(hf_models):
    window, mask = _masked_window()
    ids = [[t for t, _ in window]]
    masked = hf_run(hf_models["l"], ids, attention_mask=mask)
    model = sd1_model(hf_models, enable_attention_masks=True)
    cond, pooled = model.encode_token_weights([window])
    assert close(cond, masked.last_hidden_state)
    assert close(pooled, masked.last_hidden_state[0:1, 4])
    model = sd1_model(hf_models, zero_out_masked=True)
    cond, _ = model.encode_token_weights([window])
    unmasked = hf_run(hf_models["l"], ids).last_hidden_state
    assert close(cond, unmasked * mask.unsqueeze(-1))
    assert cond[0, 5:].abs().max() == 0


# ---- concurrency --------------------------------------------------------------------

def test_threads_sharing_one_model_equal_serial(clips):
    clip = clips["sd1"]
    prompts = ["a red fox", "a (red:1.4) fox, (snow:0.5)", " ".join(f"w{i}" for i in range(120)),
               "((masterpiece)), best quality, [blurry]"]
    option_sets = [{}, {"layer": -2}, {"weight_mode": "a1111"}, {"weight_mode": "compel"},
                   {"weight_mode": "none", "layer": -2}, {"weight_mode": "a1111_no_norm"}]
    jobs = [(p, o) for p in prompts for o in option_sets]

    def encode(job):
        prompt, options = job
        return clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, options=options)

    serial = [encode(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            parallel = list(pool.map(encode, jobs * 2))
            for (c1, p1), (c2, p2) in zip(serial * 2, parallel):
                assert torch.equal(c1, c2) and torch.equal(p1, p2)


# ---- caches ---------------------------------------------------------------------

def count_forwards(model: SDClipModel) -> list[int]:
    calls = [0]
    inner = model.transformer.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    model.transformer.forward = counting
    return calls


def _weighted_windows(count: int) -> list[list]:
    windows = []
    for i in range(count):
        window = [(START, 1.0)] + [(320 + i + j, 1.3 if j % 3 == 0 else 1.0) for j in range(20)]
        windows.append(window + [(END, 1.0)] * (77 - len(window)))
    return windows


def test_empty_encoding_computed_once_per_options(hf_models):
    model = sd1_model(hf_models)
    calls = count_forwards(model)
    one = _weighted_windows(1)
    model.encode_token_weights(one)
    assert calls[0] == 2  # prompt + empty prompt
    model.encode_token_weights(one)
    assert calls[0] == 3  # warm: exactly one forward
    model.encode_token_weights(_weighted_windows(3))
    assert calls[0] == 4  # three windows, one batched forward
    model.encode_token_weights(one, options={"layer": -2})
    assert calls[0] == 6  # new options: its own empty encoding
    model.encode_token_weights(one, options={"layer": -2})
    assert calls[0] == 7


def test_lru_cache_hits_without_forward_and_evicts(hf_models):
    model = sd1_model(hf_models, cache_size=2)
    calls = count_forwards(model)
    prompts = [_weighted_windows(1), [[(START, 1.0), (500, 1.0), (END, 1.0)] + [(END, 1.0)] * 74],
               [[(START, 1.0), (600, 1.0), (END, 1.0)] + [(END, 1.0)] * 74]]
    first = model.encode_token_weights(prompts[0])
    count = calls[0]
    again = model.encode_token_weights(prompts[0])
    assert calls[0] == count
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    model.encode_token_weights(prompts[1])
    model.encode_token_weights(prompts[2])  # evicts prompts[0] (size 2)
    count = calls[0]
    model.encode_token_weights(prompts[0])
    assert calls[0] == count + 1


@pytest.mark.parametrize("cache_size", [0, 4])
def test_results_do_not_alias_cached_tensors(hf_models, cache_size):
    """Mutating a returned cond in place must not change later encodings."""
    model = sd1_model(hf_models, cache_size=cache_size)
    plain = [[(START, 1.0), (500, 1.0), (END, 1.0)] + [(END, 1.0)] * 74]
    for windows in ([], plain):
        cond, pooled = model.encode_token_weights(windows)
        expected = (cond.clone(), pooled.clone())
        cond.mul_(0)
        pooled.mul_(0)
        again = model.encode_token_weights(windows)
        assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])
    weighted = _weighted_windows(1)
    reference = sd1_model(hf_models).encode_token_weights(weighted)[0]
    assert torch.equal(model.encode_token_weights(weighted)[0], reference)


def test_load_sd_clears_caches(hf_models):
    model = sd1_model(hf_models, cache_size=4)
    one = _weighted_windows(1)
    model.encode_token_weights(one)
    other = make_hf("quick_gelu", 11)
    model.load_sd(hf_state(other, projection=False))
    cond, _ = model.encode_token_weights(one)
    ids, weights = [[t for t, _ in w] for w in one], [[w for _, w in win] for win in one]
    assert close(cond, comfy_weighted("sd1", {"l": other}, {"l": ids}, {"l": weights}))


# ---- errors ---------------------------------------------------------------------

def test_encode_before_load_sd_raises():
    model = SDClipModel(textmodel_json_config=text_config("quick_gelu", END))
    with pytest.raises(CheckpointError, match="load_sd"):
        model.encode_token_weights(_weighted_windows(1))


def test_load_sd_reports_every_bad_key_at_once(hf_models):
    model = SDClipModel(textmodel_json_config=text_config("quick_gelu", END))
    sd = hf_state(hf_models["l"])
    del sd["text_model.final_layer_norm.bias"]
    sd["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    sd["text_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        model.load_sd(sd)
    message = str(info.value)
    for key in ("text_model.final_layer_norm.bias", "layers.0.mlp.fc1.weight", "text_model.extra.weight"):
        assert key in message
    with pytest.raises(CheckpointError, match="final_layer_norm.bias"):
        model.load_sd(sd, strict=False)  # missing keys are never tolerated
    assert not model.loaded


def test_strict_false_tolerates_unexpected_keys_only(hf_models):
    model = SDClipModel(textmodel_json_config=text_config("quick_gelu", END), return_projected_pooled=False)
    sd = {**hf_state(hf_models["l"]), "text_model.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="text_model.extra.weight"):
        model.load_sd(sd)
    result = model.load_sd(sd, strict=False)
    assert list(result.unexpected_keys) == ["text_model.extra.weight"]
    window = [(START, 1.0), (500, 1.0), (END, 1.0)] + [(END, 1.0)] * 74
    ids = [[t for t, _ in window]]
    assert close(model.encode_token_weights([window])[0], hf_run(hf_models["l"], ids).last_hidden_state)


def test_unknown_options_raise_prompt_error(hf_models):
    model = sd1_model(hf_models)
    windows = _weighted_windows(1)
    with pytest.raises(PromptError, match="unknown clip option") as error:
        model.encode_token_weights(windows, options={"layr": -2})
    assert "the options are compute_dtype, fast_pooled, layer, layer_norm_hidden_state" in str(error.value)  # the fix
    with pytest.raises(PromptError, match="weight_mode"):
        model.encode_token_weights(windows, options={"weight_mode": "A1111"})
    with pytest.raises(PromptError, match="normalization"):
        model.encode_token_weights(windows, options={"normalization": "avg"})
    with pytest.raises(PromptError, match="weight_mode"):
        model.set_clip_options({"weight_mode": "bogus"})
    with pytest.raises(PromptError, match="weight_mode"):
        SDClipModel(textmodel_json_config=text_config("quick_gelu", END), weight_mode="bogus")
