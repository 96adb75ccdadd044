"""T5XXLModel / UMT5XXlModel: a weighted prompt encoded end to end against transformers'
encoders plus ComfyUI's weighting formula.

Reference (ComfyUI's ``SDClipModel.encode_token_weights`` read from its code): encode the
tokens and the empty prompt ``[1, 0, ...]`` of the same length; every token of weight
``w != 1`` becomes ``(z - z_empty) * w + z_empty``. T5 for SD3/Flux runs unmasked; UMT5
for Wan runs masked (1 up to and including the first ``</s>``) and zeroes the rows after.
T5 returns no pooled output.
"""

from __future__ import annotations

import functools

import pytest
import torch

from t5_weights import TINY, hf_encoder, random_t5_state_dict
from textenc.errors import CheckpointError, EncodeError
from textenc.text_encoders.t5 import T5XXLModel, T5XXLTokenizer, UMT5XXlModel

transformers = pytest.importorskip("transformers")

#: The real T5 vocabulary size, so the bundled tokenizer's ids fit the tiny model.
VOCAB = 32128
PROMPT = "a (red:1.3) cat on a (mat:0.7), (\\(photo\\))"


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    error = float((got - want).abs().max())
    assert error <= rtol * float(want.abs().max()), f"max|Δ| {error:.3g}"


@functools.lru_cache(maxsize=None)
def weights(model_type: str) -> dict[str, torch.Tensor]:
    return random_t5_state_dict(model_type, seed=7, vocab_size=VOCAB)


@functools.lru_cache(maxsize=None)
def oracle(model_type: str):
    return hf_encoder(weights(model_type), model_type, "eager", vocab_size=VOCAB)


def end_mask(ids: torch.Tensor) -> torch.Tensor:
    """ComfyUI's mask: 1 up to and including the first </s> (1), 0 after."""
    seen = (ids == 1).long().cumsum(-1)
    return ((seen == 0) | ((seen == 1) & (ids == 1))).long()


def reference(model_type: str, tokens: list[tuple[int, float]], *, masked: bool, layer: int | None = None):
    ids = torch.tensor([[t for t, _ in tokens]])
    empty = torch.tensor([[1] + [0] * (len(tokens) - 1)])
    w = torch.tensor([w for _, w in tokens], dtype=torch.float32).view(1, -1, 1)
    model = oracle(model_type)

    def encode(x):
        mask = end_mask(x) if masked else None
        with torch.no_grad():
            out = model(input_ids=x, attention_mask=mask, output_hidden_states=True)
            z = out.last_hidden_state if layer is None else model.encoder.final_layer_norm(out.hidden_states[layer])
        return z * mask.unsqueeze(-1) if masked else z

    z, z_empty = encode(ids), encode(empty)
    return torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)


@pytest.fixture(scope="module")
def tokenizer():
    return T5XXLTokenizer(min_length=24)


def test_t5_weighted_prompt_matches_transformers(tokenizer):
    tokens = tokenizer.tokenize_with_weights(PROMPT)
    assert {w for _, w in tokens[0]} == {1.0, 1.3, 0.7, 1.1}
    model = T5XXLModel.from_state_dict(weights("t5"))
    cond, pooled = model.encode_token_weights(tokens)
    assert pooled is None and cond.shape == (1, 24, TINY["d_model"])
    assert_close(cond, reference("t5", tokens[0], masked=False))


def test_t5_clip_set_last_layer(tokenizer):
    tokens = tokenizer.tokenize_with_weights(PROMPT)
    model = T5XXLModel.from_state_dict(weights("t5"))
    cond, _ = model.encode_token_weights(tokens, options={"layer": -2})
    # Block -2's output, with the final layer norm (as ComfyUI); HF hidden_states[i + 1] is block i's output.
    assert_close(cond, reference("t5", tokens[0], masked=False, layer=TINY["num_layers"] - 1))


def test_t5_masked_option_returns_the_mask(tokenizer):
    tokens = tokenizer.tokenize_with_weights(PROMPT)
    model = T5XXLModel.from_state_dict(weights("t5"), attention_mask=True)
    cond, pooled, extra = model.encode_token_weights(tokens)
    ids = torch.tensor([[t for t, _ in tokens[0]]])
    assert torch.equal(extra["attention_mask"], end_mask(ids))
    with torch.no_grad():
        z = oracle("t5")(input_ids=ids, attention_mask=end_mask(ids)).last_hidden_state
    unweighted = torch.tensor([w == 1.0 for _, w in tokens[0]])
    assert_close(cond[:, unweighted], z[:, unweighted])


def test_umt5_wan_masked_and_zeroed(tokenizer):
    tokens = tokenizer.tokenize_with_weights(PROMPT)
    model = UMT5XXlModel.from_state_dict(weights("umt5"))
    cond, pooled = model.encode_token_weights(tokens)
    assert pooled is None
    want = reference("umt5", tokens[0], masked=True)
    assert_close(cond, want)
    end = [t for t, _ in tokens[0]].index(1)
    assert cond[0, end + 1:].eq(0).all()


def test_weighted_costs_one_empty_encode_per_length(tokenizer):
    model = T5XXLModel.from_state_dict(weights("t5"))
    for prompt in ("(a:1.2) b", "c (d:0.9)"):
        model.encode_token_weights(tokenizer.tokenize_with_weights(prompt))
    assert len(model.empty_cache) == 1


def test_spiece_model_key_is_not_a_weight():
    sd = {**weights("umt5"), "spiece_model": torch.zeros(16, dtype=torch.uint8)}
    model = UMT5XXlModel.from_state_dict(sd)
    assert "spiece_model" not in model.get_sd()


def test_released_config_by_default_and_shape_errors():
    assert T5XXLModel(device="meta").config.d_model == 4096
    assert UMT5XXlModel(device="meta").config.vocab_size == 256384
    with pytest.raises(CheckpointError, match="does not match"):
        T5XXLModel(textmodel_json_config={**TINY, "vocab_size": VOCAB, "num_layers": 2}).load_sd(weights("t5"))


@pytest.mark.parametrize("mode", ["a1111", "a1111_no_norm", "compel", "none"])
def test_other_weight_modes_run_without_pooled(mode, tokenizer):
    tokens = tokenizer.tokenize_with_weights(PROMPT, return_word_ids=True)
    model = T5XXLModel.from_state_dict(weights("t5"))
    cond, pooled = model.encode_token_weights(tokens, options={"weight_mode": mode})
    assert cond.shape == (1, 24, TINY["d_model"]) and pooled is None
    if mode == "none":
        unweighted = [[(t, 1.0) for t, _, _ in tokens[0]]]
        assert torch.equal(cond, model.encode_token_weights(unweighted)[0])


def test_fp16_file_weights_are_not_copied_at_load(tmp_path, tokenizer):
    """A memory-mapped fp16 file encoded at fp32 is cast per call, not copied at load:
    every weight the model holds is the file's own tensor (a full-size T5-XXL fp16 file
    is 9 GB; aligning or casting it at load would hold a second copy). The encoding is
    the same as from weights copied into fresh memory."""
    from safetensors.torch import load_file, save_file

    sd = {k: v.to(torch.float16) for k, v in weights("t5").items()}
    save_file(sd, str(tmp_path / "t5_fp16.safetensors"))
    mapped = load_file(str(tmp_path / "t5_fp16.safetensors"))
    model = T5XXLModel.from_state_dict(mapped)
    held = dict(model.transformer.state_dict(keep_vars=True))
    shared = [k for k, v in mapped.items() if k in held and held[k].data_ptr() == v.data_ptr()]
    assert len(shared) == len(held) and held, f"{len(held) - len(shared)} of {len(held)} weights were copied"
    copied = T5XXLModel.from_state_dict({k: v.clone() for k, v in mapped.items()})
    tokens = tokenizer.tokenize_with_weights("a (red:1.2) fox")
    assert torch.equal(model.encode_token_weights(tokens)[0], copied.encode_token_weights(tokens)[0])


def _outlier_t5() -> T5XXLModel:
    """A small T5 whose feed-forward writes values past fp16's 65504 into the residual stream, as
    the released T5-XXL's outlier features reach 1e3-1e4 and beyond."""
    sd = random_t5_state_dict("t5", seed=3, vocab_size=32128, d_model=256, d_kv=64, d_ff=640, num_heads=4)
    for key in sd:
        if key.endswith("DenseReluDense.wo.weight"):
            sd[key] = sd[key] * 20000
    return T5XXLModel.from_state_dict(sd)


def test_compute_dtypes_on_large_activations():
    """fp16 compute overflows there: a typed EncodeError naming the dtype, never NaN conditioning;
    bf16 (fp32's exponent range) stays finite and near fp32 (its mantissa costs about 1e-2)."""
    model = _outlier_t5()
    tokens = T5XXLTokenizer(min_length=77).tokenize_with_weights("a (red:1.2) fox")
    with torch.inference_mode():
        reference = model.transformer(torch.tensor([[t for t, _ in tokens[0]]]), intermediate_output=-1,
                                      final_layer_norm_intermediate=False)[1]
        assert float(reference.abs().max()) > 65504  # the residual stream leaves fp16's range
        exact = model.encode_token_weights(tokens)[0]
        with pytest.raises(EncodeError, match=r"overflowed in compute dtype torch\.float16; encode in torch\.float32"):
            model.encode_token_weights(tokens, options={"compute_dtype": torch.float16})
        reduced = model.encode_token_weights(tokens, options={"compute_dtype": torch.bfloat16})[0]
    assert torch.isfinite(reduced).all()
    assert float((reduced.float() - exact).abs().max() / exact.abs().max()) < 5e-2
