"""Weight modes and weight normalisations against their published formulas.

The encodings come from the tiny random transformers oracle of
``test_sd1_clip``; each mode's formula is applied here by hand:

* a1111 (AUTOMATIC1111 ``sd_hijack_clip``): ``z * w``, then each window is
  rescaled so its mean equals the unweighted window's mean;
* a1111_no_norm: ``z * w``;
* compel: not here; ``test_compel_oracle`` compares it with the real compel package;
* none: the unweighted encoding.

Normalisations are checked on hand-computed weight tables (word ids).
"""

from __future__ import annotations

import math

import pytest
import torch

from test_sd1_clip import END, START, close, hf_models, hf_run, sd1_model  # noqa: F401
from textenc.errors import PromptError
from textenc.text_encoders.weighting import normalize_weights


def window(units, *, word_ids: bool = True):
    """(tokens, weight) units → one padded window with word ids (special tokens: 0)."""
    body = [(START, 1.0, 0)]
    for word_id, (tokens, weight) in enumerate(units, start=1):
        body += [(t, weight, word_id) for t in tokens]
    body += [(END, 1.0, 0)]
    body += [(END, 1.0, 0)] * (77 - len(body))
    return body if word_ids else [p[:2] for p in body]


UNITS_A = [([320], 1.0), ([736, 3240], 1.4), ([530], 1.0), ([2368, 1615], 0.5), ([4006], 1.0)]
UNITS_B = [([1929], 1.0), ([539], 0.7), ([1400, 1000], 1.2)]


def ids_and_weights(windows):
    return ([[p[0] for p in w] for w in windows],
            torch.tensor([[p[1] for p in w] for w in windows], dtype=torch.float64))


def hf_z(hf_models, windows, attention_mask=None):
    return hf_run(hf_models["l"], ids_and_weights(windows)[0], attention_mask).last_hidden_state


# ---- modes ------------------------------------------------------------------------

def test_comfy_keeps_weight_one_tokens_bit_for_bit(hf_models):
    model = sd1_model(hf_models)
    windows = [window(UNITS_A)]
    weighted = model.encode_token_weights(windows)[0]
    plain = model.encode_token_weights([[(p[0], 1.0) for p in windows[0]]])[0]
    _, weights = ids_and_weights(windows)
    same = (weights[0] == 1.0)
    assert torch.equal(weighted[0, same], plain[0, same])
    assert not torch.equal(weighted[0, ~same], plain[0, ~same])


def test_a1111_rescales_each_window_to_its_mean(hf_models):
    model = sd1_model(hf_models, weight_mode="a1111")
    windows = [window(UNITS_A), window(UNITS_B)]
    cond = model.encode_token_weights(windows)[0]
    z = hf_z(hf_models, windows).double()
    _, weights = ids_and_weights(windows)
    expected = []
    for i in range(2):
        scaled = z[i] * weights[i].unsqueeze(-1)
        expected.append(scaled * (z[i].mean() / scaled.mean()))
    assert close(cond, torch.cat(expected).unsqueeze(0))
    # Per window, not over the whole prompt: one global mean would differ.
    scaled = z * weights.unsqueeze(-1)
    assert not close(cond, (scaled * (z.mean() / scaled.mean())).reshape(1, -1, z.shape[-1]))


def test_a1111_no_norm_is_plain_scaling(hf_models):
    model = sd1_model(hf_models)
    windows = [window(UNITS_A), window(UNITS_B)]
    cond = model.encode_token_weights(windows, options={"weight_mode": "a1111_no_norm"})[0]
    _, weights = ids_and_weights(windows)
    expected = hf_z(hf_models, windows).double() * weights.unsqueeze(-1)
    assert close(cond, expected.reshape(1, -1, expected.shape[-1]))


def test_none_ignores_weights(hf_models):
    model = sd1_model(hf_models, weight_mode="none")
    windows = [window(UNITS_A)]
    assert close(model.encode_token_weights(windows)[0], hf_z(hf_models, windows))


# ---- normalisation: hand tables ----------------------------------------------------

# word ids: 0 special; unit 1 = two tokens at 1.5, unit 2 = one token at 0.5, unit 3 = three at 1.0
WORD_IDS = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 0, 0]])
WEIGHTS = torch.tensor([[1.0, 1.5, 1.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
LEN_1 = 1 + 0.5 / math.sqrt(2)                     # 1.3535533905932737
MEAN_SHIFT = 1 - (1.5 * 2 + 0.5 + 3) / 6           # -1/12
LEN_MEAN_SHIFT = 1 - (LEN_1 * 2 + 0.5 + 3) / 6
HAND = {
    "none": [1.0, 1.5, 1.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
    "length": [1.0, LEN_1, LEN_1, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
    "mean": [1.0, 1.5 + MEAN_SHIFT, 1.5 + MEAN_SHIFT, 0.5 + MEAN_SHIFT,
             1 + MEAN_SHIFT, 1 + MEAN_SHIFT, 1 + MEAN_SHIFT, 1.0, 1.0],
    "length+mean": [1.0, LEN_1 + LEN_MEAN_SHIFT, LEN_1 + LEN_MEAN_SHIFT, 0.5 + LEN_MEAN_SHIFT,
                    1 + LEN_MEAN_SHIFT, 1 + LEN_MEAN_SHIFT, 1 + LEN_MEAN_SHIFT, 1.0, 1.0],
}


@pytest.mark.parametrize("normalization", list(HAND))
def test_normalize_weights_hand_tables(normalization):
    out = normalize_weights(WEIGHTS, WORD_IDS, normalization)
    assert torch.allclose(out, torch.tensor([HAND[normalization]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(WEIGHTS[0, :2], torch.tensor([1.0, 1.5], dtype=torch.float64))  # input untouched


def test_length_counts_a_unit_across_windows():
    """A unit split by the window edge keeps one word id: its length is all its tokens."""
    word_ids = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]])
    weights = torch.tensor([[1.0, 2.0, 2.0, 1.0], [1.0, 2.0, 2.0, 1.0]], dtype=torch.float64)
    out = normalize_weights(weights, word_ids, "length")
    assert torch.allclose(out[:, 1:3], torch.full((2, 2), 1.5, dtype=torch.float64))


@pytest.mark.parametrize("normalization", ["length", "mean", "length+mean"])
def test_normalization_end_to_end(hf_models, normalization):
    units = [([736, 3240], 1.5), ([530], 0.5), ([320, 2368, 1615], 1.0)]
    windows = [window(units)]
    cond = sd1_model(hf_models).encode_token_weights(windows, options={"normalization": normalization})[0]
    weights = torch.tensor([1.0] + HAND[normalization][1:7] + [1.0] * 70, dtype=torch.float64)
    z = hf_z(hf_models, windows).double()
    z_empty = hf_run(hf_models["l"], [START, END] + [END] * 75).last_hidden_state.double()
    changed = (weights != 1.0).unsqueeze(-1)
    expected = torch.where(changed, z_empty + (z - z_empty) * weights.unsqueeze(-1), z)
    assert close(cond, expected)


def test_normalization_needs_word_ids(hf_models):
    model = sd1_model(hf_models)
    with pytest.raises(PromptError, match="word ids"):
        model.encode_token_weights([window(UNITS_A, word_ids=False)], options={"normalization": "mean"})
