"""Parity of textenc's CLIP text and vision models with Hugging Face transformers.

The reference is transformers' ``CLIPTextModelWithProjection`` /
``CLIPVisionModelWithProjection`` built from the same config with random
weights (SDPA attention, eval mode); its state dict is loaded into ours with
strict key matching, so a renamed, missing or extra parameter fails here too.
Every bundled config is checked at reduced width and depth (same activation,
head dimension, MLP ratio, projection ratio and eps), plus the full-size
CLIP ViT-L/14 text model used by SD1.x.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from random_weights import randomize_
import transformers
from transformers.initialization import no_init_weights

from textenc.nn import ops
from textenc.nn.clip_model import CLIPTextModel, CLIPVisionModelProjection
from textenc.nn.config import load_text_config, load_vision_config
from textenc.errors import ConfigError

FP32_TOL = 1e-5
#: Measured deviations versus fp32 transformers are stated next to each use.
BF16_TOL = 0.1
FP16_WEIGHTS_TOL = 5e-3
BOS, EOS = 49406, 49407
TEXT_CONFIGS = ["sd1_clip_config", "sd2_clip_config", "clip_g"]
VISION_CONFIGS = ["clip_vision_config_vitl", "clip_vision_config_vitl_336",
                  "clip_vision_config_h", "clip_vision_config_g"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def hf_model(cls, hf_config, seed: int):
    """A transformers model (SDPA, eval) with our random weights; HF's own init is
    skipped because randomize_ overwrites every parameter anyway."""
    with no_init_weights():
        model = cls._from_config(hf_config, attn_implementation="sdpa")
    randomize_(model, seed)
    return model.eval()


def reduced(cfg, *, layers: int, image_size: int | None = None) -> dict:
    """A small config with the same head dim, MLP ratio, projection ratio, act and eps.

    A quarter of the heads (so the reduced configs stay distinct: 3/4/5 text heads).
    """
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    heads = cfg.num_attention_heads // 4
    width = head_dim * heads
    values = dataclasses.asdict(cfg)
    values.update(
        hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers,
        intermediate_size=width * cfg.intermediate_size // cfg.hidden_size,
        projection_dim=width * cfg.projection_dim // cfg.hidden_size)
    assert values["intermediate_size"] * cfg.hidden_size == width * cfg.intermediate_size
    if image_size is not None:
        values["image_size"] = image_size
    return values


def text_pair(values: dict, seed: int = 0, **hf_overrides):
    hf_values = {**values, "eos_token_id": EOS, **hf_overrides}
    hf = hf_model(transformers.CLIPTextModelWithProjection,
                  transformers.CLIPTextConfig(**hf_values), seed)
    ours = CLIPTextModel(values).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def make_ids(batch_pad: int, *, seed: int = 1, tokens: int = 77):
    """Three prompts: padded after an early EOS, full length, and an early first EOS
    followed by more text and a second EOS (pooling must take the first).

    Returns ids (3, T), a 1/0 padding mask (3, T) and the first-EOS positions.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, BOS, (3, tokens), generator=generator)
    ids[:, 0] = BOS
    ids[0, 8], ids[0, 9:] = EOS, batch_pad
    ids[1, -1] = EOS
    ids[2, 3], ids[2, 40] = EOS, EOS
    mask = torch.ones(3, tokens, dtype=torch.long)
    mask[0, 9:] = 0
    return ids, mask, torch.tensor([8, tokens - 1, 3])


@torch.no_grad()
def check_text_parity(hf, ours, ids, attention_mask, *, every_layer: bool = True) -> None:
    ref = hf(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
    ref_pooled = hf.text_model(input_ids=ids, attention_mask=attention_mask).pooler_output
    layers = ours.num_layers
    hidden = ref.hidden_states
    assert len(hidden) == layers + 1

    out = ours(ids, attention_mask=attention_mask)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert max_diff(out.pooled_output, ref_pooled) <= FP32_TOL
    assert max_diff(out.projected_pooled, ref.text_embeds) <= FP32_TOL
    assert out.intermediate is None

    # Every layer index (positive and negative), each with both final-norm
    # settings and both tail modes (the full product would double the runtime).
    for index in [*range(layers), *range(-layers, 0)] if every_layer else [-2]:
        expected_raw = hidden[index % layers + 1]
        expected_normed = hf.text_model.final_layer_norm(expected_raw)
        flip = index < 0
        for normed, expected, return_last in ((False, expected_raw, not flip),
                                              (True, expected_normed, flip)):
            out = ours(ids, attention_mask=attention_mask, intermediate_output=index,
                       final_layer_norm_intermediate=normed, return_last_hidden=return_last)
            assert max_diff(out.intermediate, expected) <= FP32_TOL, (index, normed)
            assert max_diff(out.pooled_output, ref_pooled) <= FP32_TOL, (index, return_last)
            assert max_diff(out.projected_pooled, ref.text_embeds) <= FP32_TOL
            if return_last:
                assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
            else:
                assert out.last_hidden_state is None

    stacked = ours(ids, attention_mask=attention_mask, intermediate_output="all",
                   final_layer_norm_intermediate=False).intermediate
    assert max_diff(stacked, torch.stack(hidden[1:], dim=1)) <= FP32_TOL


@pytest.mark.parametrize("name", TEXT_CONFIGS)
def test_text_parity_reduced(name):
    cfg = load_text_config(name)
    hf, ours = text_pair(reduced(cfg, layers=3))
    ids, mask, _ = make_ids(cfg.pad_token_id)
    check_text_parity(hf, ours, ids, mask)
    check_text_parity(hf, ours, ids, None, every_layer=False)  # "all" still covers each layer
    with torch.no_grad():  # the padding mask must actually change the padded prompt
        assert max_diff(hf(input_ids=ids[:1], attention_mask=mask[:1]).last_hidden_state,
                        hf(input_ids=ids[:1]).last_hidden_state) > 1e-2


# Our CPU attention paths against their transformers counterparts: "bmm" (the
# automatic choice for fp32 CLIP text on CPU at 1-2 threads) computes softmax(q·kᵀ·s + mask)·v
# as transformers' eager attention does, "sdpa" calls the same kernel as
# transformers' sdpa. Across the pairs the two fp32 results differ by up to
# ~1.03e-5 at full size (measured; each is ~1.2e-5 from a float64 forward), so
# a cross comparison would test fp32 rounding, not the model.
@pytest.mark.slow
@pytest.mark.parametrize("backend, hf_attention", [("bmm", "eager"), ("sdpa", "sdpa")])
def test_text_parity_full_size_clip_l(backend, hf_attention):
    """SD1.x's CLIP ViT-L/14 text model at full size (123M params), one batch-2 pass each."""
    cfg = load_text_config("sd1_clip_config")
    hf, ours = text_pair(dataclasses.asdict(cfg), seed=3)
    hf.set_attn_implementation(hf_attention)
    ids, mask, _ = make_ids(cfg.pad_token_id)
    ids, mask = ids[[0, 2]], mask[[0, 2]]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ref_pooled = hf.text_model.final_layer_norm(ref.hidden_states[-1])[
            torch.arange(2), torch.tensor([8, 3])]
        full = ours(ids, attention_mask=mask, intermediate_output=-2,
                    final_layer_norm_intermediate=False, attention_backend=backend)
        tail = ours(ids, attention_mask=mask, intermediate_output=-2, return_last_hidden=False,
                    attention_backend=backend)
    assert max_diff(full.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert max_diff(full.intermediate, ref.hidden_states[-2]) <= FP32_TOL
    assert max_diff(full.pooled_output, ref_pooled) <= FP32_TOL
    assert max_diff(full.projected_pooled, ref.text_embeds) <= FP32_TOL
    assert tail.last_hidden_state is None
    assert max_diff(tail.intermediate,
                    hf.text_model.final_layer_norm(ref.hidden_states[-2])) <= FP32_TOL
    assert max_diff(tail.projected_pooled, ref.text_embeds) <= FP32_TOL
    # docs/python-api.md (Attention backends): each path equals its counterpart bit for bit,
    # at 1 and 2 threads.
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                full = ours(ids, attention_mask=mask, intermediate_output=-2,
                            final_layer_norm_intermediate=False, attention_backend=backend)
            assert torch.equal(full.last_hidden_state, ref.last_hidden_state), threads
            assert torch.equal(full.intermediate, ref.hidden_states[-2]), threads
    finally:
        torch.set_num_threads(before)


def test_legacy_eos_token_id_config_pools_like_transformers(tmp_path):
    """Configs saved before transformers PR #24773 (diffusers' SD1.x/SDXL
    text_encoder/config.json) say eos_token_id=2; HF then pools at the argmax
    id, i.e. the first 49407. Loading that config.json must pool the same row."""
    small = reduced(load_text_config("sd1_clip_config"), layers=2)
    hf_cfg = transformers.CLIPTextConfig(**{**small, "bos_token_id": 0, "eos_token_id": 2,
                                            "pad_token_id": 1})
    hf = hf_model(transformers.CLIPTextModelWithProjection, hf_cfg, 5)
    hf_cfg.save_pretrained(tmp_path)
    ours = CLIPTextModel(load_text_config(tmp_path / "config.json")).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids, mask, first_eos = make_ids(EOS)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids)
        expected = hf.text_model.final_layer_norm(ref.hidden_states[-1])[
            torch.arange(3), first_eos]
    assert max_diff(out.pooled_output, expected) <= FP32_TOL
    assert max_diff(out.projected_pooled, ref.text_embeds) <= FP32_TOL


@torch.no_grad()
def test_embeds_and_num_tokens_match_token_path():
    """Encoding from input embeddings with an explicit pooled position (the
    textual-inversion path) equals HF on the same tokens."""
    hf, ours = text_pair(reduced(load_text_config("sd2_clip_config"), layers=2), seed=7)
    ids, mask, first_eos = make_ids(0)
    ref = hf(input_ids=ids, attention_mask=mask)
    embeds = hf.text_model.embeddings.token_embedding(ids)
    out = ours(embeds=embeds, attention_mask=mask, num_tokens=(first_eos + 1).tolist())
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert max_diff(out.projected_pooled, ref.text_embeds) <= FP32_TOL


@torch.no_grad()
@pytest.mark.parametrize("threads", [1, 2])
def test_row_groups_pool_each_group_as_if_alone(threads):
    """``row_groups`` runs the pooled-only tail after an intermediate layer group by
    group: each group's pooled rows equal that group encoded alone bit for bit, and
    transformers' pooled output (its full last layer) within 1e-5."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hf, ours = text_pair(reduced(load_text_config("sd2_clip_config"), layers=3), seed=5)
        batches = [make_ids(0, seed=s) for s in range(1, 4)]
        ids = torch.cat([b[0] for b in batches] + [batches[0][0][:1]])  # groups of 3, 3, 3, 1
        mask = torch.cat([b[1] for b in batches] + [batches[0][1][:1]])
        groups = [3, 3, 3, 1]
        kwargs = dict(intermediate_output=-2, return_last_hidden=False)
        out = ours(ids, mask, row_groups=groups, **kwargs)
        start = 0
        for size in groups:
            alone = ours(ids[start:start + size], mask[start:start + size], **kwargs)
            assert torch.equal(out.pooled_output[start:start + size], alone.pooled_output)
            assert torch.equal(out.projected_pooled[start:start + size], alone.projected_pooled)
            assert torch.equal(out.intermediate[start:start + size], alone.intermediate)
            start += size
        ref = hf(input_ids=ids, attention_mask=mask)
        assert max_diff(out.projected_pooled, ref.text_embeds) <= FP32_TOL
        with pytest.raises(ConfigError, match="summing to the batch"):
            ours(ids, mask, row_groups=[3, 3], **kwargs)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", TEXT_CONFIGS)
def test_text_low_precision_against_fp32_transformers(name):
    cfg = load_text_config(name)
    values = reduced(cfg, layers=3)
    hf, ours32 = text_pair(values, seed=11)
    ids, mask, _ = make_ids(cfg.pad_token_id)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)

        bf16 = CLIPTextModel(values, dtype=torch.bfloat16).eval()
        bf16.load_state_dict(hf.state_dict(), strict=True)
        out = bf16(ids, attention_mask=mask, dtype=torch.bfloat16)
        assert out.last_hidden_state.dtype == torch.bfloat16
        # bf16 has an 8-bit mantissa (rel. step 2**-8 = 3.9e-3); through 3 layers
        # of O(1) LayerNormed activations we measured max |diff| <= 0.06 (last
        # hidden) and <= 0.03 (projected). Bound 0.1; an unmasked padding token or
        # a wrong pooled row is O(1).
        assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= BF16_TOL
        assert max_diff(out.projected_pooled, ref.text_embeds) <= BF16_TOL

        # fp16 storage, fp32 compute: the only error is rounding the weights.
        fp16 = CLIPTextModel(values, dtype=torch.float16, operations=ops.manual_cast).eval()
        fp16.load_state_dict(hf.state_dict(), strict=True)
        out = fp16(ids, attention_mask=mask, dtype=torch.float32)
        assert all(p.dtype == torch.float16 for p in fp16.parameters())
        assert out.last_hidden_state.dtype == torch.float32
        # Only the weights are rounded to fp16 (rel. 2**-11 = 4.9e-4); measured
        # max |diff| <= 3e-3. Bound 5e-3.
        assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP16_WEIGHTS_TOL
        assert max_diff(out.projected_pooled, ref.text_embeds) <= FP16_WEIGHTS_TOL

        # Against HF run on the same fp16-rounded weights the computation is fp32
        # throughout, so fp32 parity holds.
        for p in hf.parameters():
            p.copy_(p.half().float())
        ref_rounded = hf(input_ids=ids, attention_mask=mask)
        assert max_diff(out.last_hidden_state, ref_rounded.last_hidden_state) <= FP32_TOL
        assert max_diff(out.projected_pooled, ref_rounded.text_embeds) <= FP32_TOL


def vision_pair(values: dict, seed: int = 0):
    hf_values = {k: v for k, v in values.items() if k not in ("image_mean", "image_std")}
    hf = hf_model(transformers.CLIPVisionModelWithProjection,
                  transformers.CLIPVisionConfig(**hf_values), seed)
    ours = CLIPVisionModelProjection(values).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize("name", VISION_CONFIGS)
@torch.no_grad()
def test_vision_parity_reduced(name):
    cfg = load_vision_config(name)
    assert cfg.patch_size == 14
    # Keep the 14-pixel patch and the image/patch ratio's flavour: 224 -> 56 (4x4
    # patches), 336 -> 84 (6x6).
    image_size = cfg.image_size // 4
    values = reduced(cfg, layers=2, image_size=image_size)
    hf, ours = vision_pair(values, seed=2)
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(4))
    ref = hf(pixel_values=pixels, output_hidden_states=True)
    pooled = hf.vision_model(pixel_values=pixels).pooler_output

    out = ours(pixels)
    assert max_diff(out.last_hidden_state, ref.last_hidden_state) <= FP32_TOL
    assert max_diff(out.image_embeds, ref.image_embeds) <= FP32_TOL
    assert max_diff(ours.vision_model(pixels)[2], pooled) <= FP32_TOL
    for index in (0, 1, -1, -2):
        out = ours(pixels, intermediate_output=index)
        assert max_diff(out.intermediate, ref.hidden_states[index % 2 + 1]) <= FP32_TOL
        assert max_diff(out.image_embeds, ref.image_embeds) <= FP32_TOL

    bf16 = CLIPVisionModelProjection(values, dtype=torch.bfloat16).eval()
    bf16.load_state_dict(hf.state_dict(), strict=True)
    low = bf16(pixels.bfloat16())
    # See the text test: bf16 rounding through 2 layers, measured <= 0.031.
    assert max_diff(low.image_embeds, ref.image_embeds) <= BF16_TOL

    fp16 = CLIPVisionModelProjection(values, dtype=torch.float16,
                                     operations=ops.manual_cast).eval()
    fp16.load_state_dict(hf.state_dict(), strict=True)
    cast = fp16(pixels)
    assert cast.image_embeds.dtype == torch.float32
    # fp16 weight rounding only, measured <= 2.1e-3.
    assert max_diff(cast.image_embeds, ref.image_embeds) <= FP16_WEIGHTS_TOL
