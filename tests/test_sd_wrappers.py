"""SD2 / SDXL wrappers and the ``CLIP`` object against transformers.

Models come from ``load_clip`` on files in the real checkpoint layouts (see
``test_sd1_clip``); references are transformers' hidden states.
"""

from __future__ import annotations

import pytest
import torch

from test_sd1_clip import (END, START, clips, close, empty_ids, hf_models, hf_run,  # noqa: F401
                           split)
from textenc.errors import PromptError


def pad_window(tokens, pad):
    body = [(START, 1.0)] + [(t, 1.0) for t in tokens] + [(END, 1.0)]
    return body + [(pad, 1.0)] * (77 - len(body))


def test_sd2_unprojected_pooled_and_clip_layer(clips, hf_models):
    clip = clips["sd2"]
    tokens = clip.tokenize("a red fox")
    ids, _ = split(tokens)
    assert ids["h"][0][5] == 0  # SD2 pads with token 0
    out = hf_run(hf_models["h"], ids["h"])
    _, pooled = clip.encode_from_tokens(tokens, return_pooled="unprojected")
    assert close(pooled, out.last_hidden_state[0:1, 4])
    clone = clip.clone()
    clone.clip_layer(-1)  # last layer, with the final norm
    assert close(clone.encode_from_tokens(tokens), out.last_hidden_state)
    norm = hf_models["h"].text_model.final_layer_norm
    with torch.no_grad():
        assert close(clip.encode_from_tokens(tokens), norm(out.hidden_states[-2]))


def test_sdxl_clip_skip_reaches_both_encoders(clips, hf_models):
    clip = clips["sdxl"].clone()
    tokens = clip.tokenize("a red fox")
    ids, _ = split(tokens)
    clip.clip_layer(-3)
    cond = clip.encode_from_tokens(tokens)
    ref = torch.cat([hf_run(hf_models["l"], ids["l"]).hidden_states[-3],
                     hf_run(hf_models["g"], ids["g"]).hidden_states[-3]], dim=-1)
    assert close(cond, ref)


def test_sdxl_pads_the_shorter_side_with_empty_windows(clips, hf_models):
    model = clips["sdxl"].cond_stage_model
    long_l = [pad_window([320] * 75, END)[:76] + [(END, 1.0)], pad_window([2368], END)]
    short_g = [pad_window([320], 0)]
    cond, pooled = model.encode_token_weights({"l": long_l, "g": short_g})
    assert cond.shape == (1, 154, 256)
    l_ref = hf_run(hf_models["l"], [[t for t, _ in w] for w in long_l]).hidden_states[-2]
    g_ref = torch.cat([hf_run(hf_models["g"], [[t for t, _ in short_g[0]]]).hidden_states[-2],
                       hf_run(hf_models["g"], empty_ids(0)).hidden_states[-2]], dim=1)
    assert close(cond, torch.cat([l_ref.reshape(1, -1, 128), g_ref], dim=-1))
    assert close(pooled, hf_run(hf_models["g"], [[t for t, _ in short_g[0]]]).text_embeds)


def test_scheduled_conditioning_shape(clips, hf_models):
    clip = clips["sdxl"]
    tokens = clip.tokenize("a (red:1.3) fox")
    [[cond, extra]] = clip.encode_from_tokens_scheduled(tokens)
    plain_cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert torch.equal(cond, plain_cond) and torch.equal(extra["pooled_output"], pooled)
    assert set(extra) == {"pooled_output"}


def test_wrappers_name_the_missing_encoder(clips):
    with pytest.raises(PromptError, match="'l'"):
        clips["sd1"].cond_stage_model.encode_token_weights({"h": []})
    with pytest.raises(PromptError, match="'g'"):
        clips["sdxl"].cond_stage_model.encode_token_weights({"l": []})


def test_options_pass_through_wrappers(clips, hf_models):
    clip = clips["sd2"]
    tokens = clip.tokenize("a (red:1.5) fox")
    ids, weights = split(tokens)
    cond = clip.encode_from_tokens(tokens, options={"weight_mode": "a1111_no_norm"})
    norm = hf_models["h"].text_model.final_layer_norm
    with torch.no_grad():
        z = norm(hf_run(hf_models["h"], ids["h"]).hidden_states[-2])
    assert close(cond, z * torch.tensor(weights["h"]).unsqueeze(-1))


def test_sdxl_encoders_of_non_standard_width_get_l_then_g_roles():
    """Custom widths carry no L/G name; file order (L first) decides, as for diffusers' te/te2."""
    import transformers

    from textenc.sd import load_clip

    def state_dict(width, heads):
        cfg = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width,
                                          num_hidden_layers=2, num_attention_heads=heads,
                                          projection_dim=width, eos_token_id=49407)
        return transformers.CLIPTextModelWithProjection._from_config(cfg).state_dict()

    clip = load_clip([], clip_type="sdxl", state_dicts=[("te", state_dict(64, 1)), ("te2", state_dict(128, 2))])
    assert clip.cond_stage_model.clip_l.config.hidden_size == 64
    assert clip.cond_stage_model.clip_g.config.hidden_size == 128
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
    assert cond.shape == (1, 77, 64 + 128) and pooled.shape == (1, 128)
