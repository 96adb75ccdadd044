"""CONDITIONING helpers against hand-computed values (ComfyUI nodes.py semantics)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from textenc.conditioning import (conditioning_average, conditioning_combine, conditioning_concat, conditioning_zero_out,
                                  unclip_conditioning, validate_conditioning)
from textenc.errors import TextencError


def _entry(values, pooled=None, **extras):
    cond = torch.tensor(values, dtype=torch.float32)
    if pooled is not None:
        extras["pooled_output"] = torch.tensor(pooled, dtype=torch.float32)
    return [cond, extras]


VISION = SimpleNamespace(image_embeds=torch.ones(1, 4))


def test_unclip_appends_without_mutating():
    existing = {"clip_vision_output": "old", "strength": 0.5, "noise_augmentation": 0.0}
    cond = [_entry([[[1.0, 2.0]]], unclip_conditioning=[existing]), _entry([[[3.0, 4.0]]])]
    out = unclip_conditioning(cond, VISION, 0.8, 0.2)
    assert out is not cond
    assert out[0][1]["unclip_conditioning"] == [existing, {
        "clip_vision_output": VISION, "strength": 0.8, "noise_augmentation": 0.2}]
    assert len(out[1][1]["unclip_conditioning"]) == 1
    # Input lists and dicts are unchanged.
    assert cond[0][1]["unclip_conditioning"] == [existing]
    assert "unclip_conditioning" not in cond[1][1]
    assert out[0][0] is cond[0][0]


def test_unclip_zero_strength_returns_input():
    cond = [_entry([[[1.0]]])]
    assert unclip_conditioning(cond, VISION, 0, 0.5) is cond


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": float("nan"), "noise_augmentation": 0.0}, "strength"),
    ({"strength": 1.0, "noise_augmentation": 1.5}, "noise_augmentation"),
    ({"strength": True, "noise_augmentation": 0.0}, "strength"),
])
def test_unclip_rejects_bad_numbers(kwargs, message):
    with pytest.raises(TextencError, match=message):
        unclip_conditioning([_entry([[[1.0]]])], VISION, **kwargs)


def test_unclip_rejects_output_without_embeds():
    with pytest.raises(TextencError, match="image_embeds"):
        unclip_conditioning([_entry([[[1.0]]])], object(), 1.0, 0.0)


def test_concat_uses_first_from_entry_and_warns(caplog):
    to = [_entry([[[1.0, 1.0]]], pooled=[[9.0, 9.0]]), _entry([[[2.0, 2.0], [3.0, 3.0]]])]
    src = [_entry([[[5.0, 6.0]]]), _entry([[[7.0, 8.0]]])]
    with caplog.at_level(logging.WARNING, logger="textenc.conditioning"):
        out = conditioning_concat(to, src)
    assert "only the first" in caplog.text
    assert out[0][0].tolist() == [[[1.0, 1.0], [5.0, 6.0]]]
    assert out[1][0].tolist() == [[[2.0, 2.0], [3.0, 3.0], [5.0, 6.0]]]
    assert out[0][1]["pooled_output"].tolist() == [[9.0, 9.0]]
    assert out[0][1] is not to[0][1]


def test_concat_rejects_width_mismatch():
    with pytest.raises(TextencError, match="width 2 .* width 3"):
        conditioning_concat([_entry([[[1.0, 1.0]]])], [_entry([[[1.0, 1.0, 1.0]]])])


def test_combine_is_list_concatenation():
    a, b = [_entry([[[1.0]]])], [_entry([[[2.0]]]), _entry([[[3.0]]])]
    out = conditioning_combine(a, b)
    assert [float(c.sum()) for c, _ in out] == [1.0, 2.0, 3.0]
    assert out[0][1] is not a[0][1]


def test_average_pads_from_with_zeros_and_blends_pooled():
    to = [_entry([[[1.0], [1.0], [1.0]]], pooled=[[2.0]])]
    src = [_entry([[[5.0]]], pooled=[[6.0]])]
    out = conditioning_average(to, src, 0.75)
    # 1*0.75 + 5*0.25 = 2.0; padded rows: 1*0.75 + 0 = 0.75
    assert out[0][0].flatten().tolist() == [2.0, 0.75, 0.75]
    assert out[0][1]["pooled_output"].tolist() == [[2.0 * 0.75 + 6.0 * 0.25]]


def test_average_cuts_longer_from_and_takes_from_pooled():
    to = [_entry([[[0.0]]])]
    src = [_entry([[[4.0], [8.0]]], pooled=[[6.0]])]
    out = conditioning_average(to, src, 0.5)
    assert out[0][0].flatten().tolist() == [2.0]
    assert out[0][1]["pooled_output"].tolist() == [[6.0]]
    assert "pooled_output" not in to[0][1]


def test_average_without_pooled_anywhere():
    out = conditioning_average([_entry([[[2.0]]], pooled=[[1.0]])], [_entry([[[4.0]]])], 0.5)
    assert out[0][0].item() == 3.0
    assert out[0][1]["pooled_output"].tolist() == [[1.0]]


def test_zero_out_zeros_cond_and_pooled_only():
    cond = [_entry([[[1.0, 2.0]]], pooled=[[3.0]], other=7)]
    out = conditioning_zero_out(cond)
    assert out[0][0].tolist() == [[[0.0, 0.0]]]
    assert out[0][1]["pooled_output"].tolist() == [[0.0]]
    assert out[0][1]["other"] == 7
    assert cond[0][1]["pooled_output"].tolist() == [[3.0]]


@pytest.mark.parametrize("bad, message", [
    ([], "non-empty list"),
    ("text", "non-empty list"),
    ([[torch.zeros(1, 2, 3)]], r"\[cond, dict\] pair"),
    ([[torch.zeros(2, 3), {}]], r"3-d tensor.*\(2, 3\)"),
    ([[torch.zeros(1, 2, 3), []]], "extras must be a dict"),
    ([[torch.zeros(1, 2, 3), {"pooled_output": 1}]], "pooled_output"),
])
def test_validation_names_the_problem(bad, message):
    with pytest.raises(TextencError, match=message):
        validate_conditioning(bad)
