"""One test per line of the README's "Deliberate differences from ComfyUI" list.

Each test shows what textenc does, and ComfyUI's side from ComfyUI's documented
code behaviour (``comfy/sd1_clip.py``: ``token_weights`` reads weights with
``float()``; ``escape_important``/``unescape_important`` swap ``\\(``/``\\)`` for
``"\\0\\2"``/``"\\0\\1"``; ``_try_get_embedding`` takes ``name.split()[0]`` and
re-inserts ``name[len(name.strip(',')):]``; ``load_embed`` checks
``os.path.commonpath`` of ``abspath`` paths and no values; ``process_tokens``
drops vectors of another width at encode time and pads at the end;
``set_clip_options`` uses the last layer when ``abs(layer) > num_layers``),
restated here as small rules, never imported from ComfyUI.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from comfy_reference import ComfyTokenizer
from comfy_reference import prompt_weights as comfy_weights
from test_vit_h_numbering import PROMPT, sd2_23, vit_h  # noqa: F401  (fixtures)
from test_vit_h_numbering import _ids as vit_h_ids
from textenc.loading.embeddings import EmbeddingLoader
from textenc.errors import (CheckpointError, ConfigError, EmbeddingWarning, EncodeError, LayerError, PromptError,
                            PromptWarning)
from textenc.prompts.parser import parse_prompt
from textenc.sd import load_clip
from textenc.text_encoders.sd1_clip import SDClipModel
from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer

TINY = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": 64, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 49407}


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    model = SDClipModel(textmodel_json_config=TINY)
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in model.transformer.state_dict().items()}


@pytest.fixture(scope="module")
def hf_clip_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)


def _comfy_try_get_embedding(name_and_rest: str, exists) -> tuple[str | None, str]:
    """ComfyUI's ``_try_get_embedding``: (name loaded or None, leftover text)."""
    split = name_and_rest.split()
    name, leftover = split[0], " ".join(split[1:])
    if exists(name):
        return name, leftover
    stripped = name.strip(",")
    if len(stripped) < len(name):
        return (stripped if exists(stripped) else None), f"{name[len(stripped):]} {leftover}"
    return None, leftover


def test_non_finite_weight():
    # textenc: PromptError naming the fragment and position; ComfyUI: float() gives nan/inf as the weight.
    for literal in ("nan", "inf", "1e39"):
        with pytest.raises(PromptError, match=r"'cat' at character 7 is not a finite float32"):
            parse_prompt(f"a (cat:{literal})")
        assert not abs(comfy_weights(f"a (cat:{literal})")[1][1]) < 3.4e38


def test_width_mismatched_embedding(tmp_path):
    # textenc: skipped at tokenize time; ComfyUI: kept in the windows, dropped at encode time and
    # replaced by padding at the end of the window, so the tokens after it move forward.
    save_file({"emb_params": torch.ones(2, 768)}, tmp_path / "sd15.safetensors")
    save_file({"emb_params": torch.ones(2, 1280)}, tmp_path / "same_rows.safetensors")
    tok = SDTokenizer(embedding_directory=str(tmp_path), embedding_size=1280, pad_with_end=False)
    with pytest.warns(EmbeddingWarning, match="width 768"):
        ours = [t for t, _ in tok.tokenize_with_weights("a embedding:sd15 cat")[0]]
    assert not any(isinstance(t, torch.Tensor) for t in ours)
    # ComfyUI loads any width, so its window is laid out like one with a 2-row embedding of the right width.
    comfy = [t for t, _ in tok.tokenize_with_weights("a embedding:same_rows cat")[0]]
    assert [isinstance(t, torch.Tensor) for t in comfy[2:4]] == [True, True]
    cat = SDTokenizer().encode_units(["cat"])[0][0]
    position = lambda window: next(i for i, t in enumerate(window) if isinstance(t, int) and t == cat)  # noqa: E731
    assert position(ours) == 2 and position(comfy) == 4


def _comfy_list_embedding(items: list, width: int) -> torch.Tensor:
    """ComfyUI's ``load_embed`` rule for a list-format file (comfy/sd1_clip.py): every tensor of
    the model's width, flattened to rows and concatenated; ``torch.cat`` of nothing raises."""
    rows = [t.reshape(-1, t.shape[-1]) for item in items for t in item.values() if t.shape[-1] == width]
    return torch.cat(rows, dim=0)


def test_list_embedding_without_rows_of_the_width(tmp_path):
    items = [{"a": torch.ones(2, 768)}, {"b": torch.ones(768)}]
    torch.save(items, tmp_path / "old_list.pt")
    with pytest.raises(ValueError, match="non-empty list"):  # ComfyUI: the prompt fails
        _comfy_list_embedding(items, 1280)
    assert _comfy_list_embedding(items, 768).shape == (3, 768)  # the same file at its own width loads
    tok = SDTokenizer(embedding_directory=str(tmp_path), embedding_size=1280)
    with pytest.warns(EmbeddingWarning, match=r"old_list\.pt: the list holds no tensor of width 1280"):
        ours = tok.tokenize_with_weights("a embedding:old_list cat")
    with pytest.warns(EmbeddingWarning, match="missing"):
        missing = tok.tokenize_with_weights("a embedding:nothing_here cat")
    assert ours == missing
    same_width = SDTokenizer(embedding_directory=str(tmp_path), embedding_size=768)
    vectors = [t for t, _ in same_width.tokenize_with_weights("a embedding:old_list cat")[0] if isinstance(t, torch.Tensor)]
    assert len(vectors) == 3 and all(torch.equal(v, torch.ones(768)) for v in vectors)


def test_comma_handling(tmp_path):
    # textenc: leading commas stay text before the embedding; ComfyUI re-inserts the name's last characters.
    save_file({"emb_params": torch.ones(1, 768)}, tmp_path / "EasyNegative.safetensors")
    tok, plain = SDTokenizer(embedding_directory=str(tmp_path)), SDTokenizer()
    ours = [t for t, _ in tok.tokenize_with_weights("embedding:,,EasyNegative lowres")[0]]
    loaded, leftover = _comfy_try_get_embedding(",,EasyNegative lowres", lambda n: n == "EasyNegative")
    assert loaded == "EasyNegative" and leftover == "ve lowres"  # ComfyUI's text after the embedding
    head, tail = plain.encode_units([",,"])[0], plain.encode_units([" lowres"])[0]
    assert ours[1:1 + len(head)] == head and isinstance(ours[1 + len(head)], torch.Tensor)
    assert ours[2 + len(head):2 + len(head) + len(tail)] == tail
    assert plain.encode_units([leftover])[0] != tail


def test_escaped_parenthesis_sentinels():
    # textenc: user text "\0\1" stays as it is; ComfyUI's unescape turns it into ")".
    assert [s.text for s in parse_prompt("x\0\1y")] == ["x\0\1y"]
    comfy_text = "".join(t for t, _ in comfy_weights("x\0\1y")).replace("\0\1", ")").replace("\0\2", "(")
    assert comfy_text == "x)y"


def test_blank_embedding_name(tmp_path, hf_clip_tokenizer):
    # textenc: "embedding:" with no word after it is plain text; ComfyUI's _try_get_embedding takes
    # split()[0] of nothing and raises IndexError (with an embedding folder).
    save_file({"emb_params": torch.ones(1, 768)}, tmp_path / "cat.safetensors")
    tok, plain = SDTokenizer(embedding_directory=str(tmp_path)), SDTokenizer()
    comfy = ComfyTokenizer(hf_clip_tokenizer, embeddings={"cat": torch.ones(1, 768)})
    for prompt in ("a embedding:", "a embedding:  ", "embedding:\n"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", EmbeddingWarning)
            assert tok.tokenize_with_weights(prompt) == plain.tokenize_with_weights(prompt)
        with pytest.raises(IndexError):
            comfy.tokenize_with_weights(prompt)


def test_path_escaping_names(tmp_path):
    # textenc: '..', absolute names and symlinks leaving the folder are refused; ComfyUI checks only
    # that abspath(join(folder, name)) lies in the folder, without resolving symlinks.
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    save_file({"emb_params": torch.ones(1, 768)}, folder / "style.safetensors")
    save_file({"emb_params": torch.ones(1, 768)}, tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
    loader = EmbeddingLoader(str(folder), 768)
    for name in ("sub/../style", str(folder / "style"), "link"):
        assert loader.lookup(name).status == "rejected", name
        candidate = os.path.abspath(os.path.join(str(folder), name))
        assert os.path.commonpath((str(folder), candidate)) == str(folder)  # ComfyUI would load it


def test_out_of_range_layer():
    # textenc: LayerError; ComfyUI: abs(layer) > num_layers silently means the last layer.
    model = SDClipModel(textmodel_json_config=TINY)
    with pytest.raises(LayerError):
        model.set_clip_options({"layer": -30})
    assert abs(-30) > model.num_layers  # ComfyUI's rule then picks "last"


def test_prompt_window_limit():
    # textenc: a prompt needing more than max_windows=256 windows is refused; ComfyUI encodes any length.
    prompt = "cat " * (256 * 75 + 1)
    with pytest.raises(PromptError, match="max_windows=256"):
        SDTokenizer().tokenize_with_weights(prompt)
    assert len(SDTokenizer().tokenize_with_weights(prompt, max_windows=None)) == 257


def test_embedding_values_beyond_the_bound(tmp_path):
    # textenc: values above 2**14 are refused at load; ComfyUI's load_embed checks no value.
    save_file({"emb_params": torch.full((1, 768), 1e30)}, tmp_path / "huge.safetensors")
    assert EmbeddingLoader(str(tmp_path), 768).lookup("huge").status == "rejected"
    assert EmbeddingLoader(str(tmp_path), 768, max_abs_value=math.inf).lookup("huge").status == "found"


def test_non_finite_checkpoint_weights(tmp_path, tiny_weights):
    # textenc: CheckpointError naming the tensor; ComfyUI loads it and returns NaN conditioning.
    bad = {**tiny_weights, "text_model.final_layer_norm.bias": torch.full((64,), float("nan"))}
    with pytest.raises(CheckpointError, match="final_layer_norm.bias"):
        load_clip(None, state_dicts=[("nan", bad)])
    clip = load_clip(None, state_dicts=[("nan", bad)], require_finite=False)
    z = clip.cond_stage_model.encoder.transformer(torch.tensor([[49406, 49407]]))[0]
    assert not torch.isfinite(z).any()  # what ComfyUI's forward returns


def test_non_finite_conditioning(tiny_weights):
    # textenc: EncodeError naming the likely cause; ComfyUI returns the NaN/Inf conditioning.
    clip = load_clip(None, state_dicts=[("tiny", tiny_weights)])
    window = list(clip.tokenize("a cat")["l"][0])
    window[1] = (window[1][0], 1e300)
    with pytest.raises(EncodeError, match="a prompt weight"):
        clip.encode_from_tokens({"l": [window]})
    z = clip.encode_from_tokens(clip.tokenize("a cat"))[0]
    assert not torch.isfinite((z - z.mean()) * torch.tensor(1e300).float()).all()  # ComfyUI's arithmetic


def test_missing_layers_of_a_known_model():
    # textenc: CheckpointError naming the layers; ComfyUI builds 12 layers from its config and leaves
    # the missing one uninitialised (load_state_dict(strict=False) only logs the keys).
    from test_hostile_files import _clip_l_like

    with pytest.raises(CheckpointError, match=r"missing layer\(s\) \[11\]"):
        load_clip(None, state_dicts=[("short", _clip_l_like(11))])
    missing = torch.nn.Linear(2, 2).load_state_dict({}, strict=False).missing_keys
    assert missing == ["weight", "bias"]  # torch's strict=False, as ComfyUI calls it: no error


def test_vit_h_last_layer_of_a_23_layer_sd2_file(vit_h, sd2_23):
    # textenc: diffusers' 23-layer SD2 file is numbered as ViT-H's 24 layers; ViT-H's last
    # layer (-1, 23, clip skip 1) is a LayerError and pooled comes from the file's last layer,
    # projected, as diffusers computes it. ComfyUI builds 24 layers from its config and loads
    # the file with strict=False: layer 23 keeps the values its constructor left, and
    # ComfyUI's ops build Linear/LayerNorm without resetting parameters (torch.empty memory).
    clip = load_clip(str(sd2_23))
    with pytest.raises(LayerError, match=r"layer -1 is ViT-H's last layer.*23 of ViT-H's 24 layers"):
        clip.clone().clip_layer(-1)
    tokens = clip.tokenize(PROMPT)
    _, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    with torch.no_grad():
        text_embeds = vit_h["short"](torch.tensor([vit_h_ids()])).text_embeds
    assert float((pooled - text_embeds).abs().max()) <= 1e-5
    assert torch.nn.Linear(2, 2).load_state_dict({}, strict=False).missing_keys == ["weight", "bias"]


def test_token_id_beyond_the_vocabulary(tiny_weights):
    # textenc: CheckpointError naming the mismatch; ComfyUI: torch's embedding lookup raises IndexError.
    small = {**TINY, "vocab_size": 1000}
    model = SDClipModel(textmodel_json_config=small)
    model.load_sd({k: (v[:1000] if "token_embedding" in k else v) for k, v in tiny_weights.items()})
    with pytest.raises(CheckpointError, match="vocabulary of 1000 tokens"):
        model.encode_token_weights([[(49406, 1.0), (49407, 1.0)]])
    with pytest.raises(IndexError):
        torch.nn.Embedding(1000, 4)(torch.tensor([49406]))


def test_malformed_hand_built_tokens(tiny_weights):
    # textenc: PromptError naming the window and position; ComfyUI: torch's errors (its
    # process_tokens builds torch.LongTensor of the ids, then the embedding and position lookups run).
    model = SDClipModel(textmodel_json_config=TINY)
    model.load_sd(tiny_weights)
    window = [(49406, 1.0)] + [(49407, 1.0)] * 76
    for bad, untyped in ((-1, IndexError), (2 ** 63, (OverflowError, RuntimeError, ValueError))):
        with pytest.raises(PromptError, match="window 0, position 1"):
            model.encode_token_weights([window[:1] + [(bad, 1.0)] + window[2:]])
        with pytest.raises(untyped):
            torch.nn.Embedding(10, 4)(torch.LongTensor([[bad]]))
    with pytest.raises(PromptError, match="hold 154 tokens"):
        model.encode_token_weights([window * 2])
    with pytest.raises(RuntimeError):  # ComfyUI: positions (1, 77) cannot broadcast over 154 tokens
        torch.zeros(1, 154, 4) + torch.zeros(1, 77, 4)


def test_window_too_short_to_pack():
    # textenc: ConfigError naming the minimum; ComfyUI's packing moves a group shorter than
    # max_word_length (8) to a fresh window whenever it does not fit, so a 7-token group in a
    # window of 8 (start + 6 + end) never fits and moves forever.
    with pytest.raises(ConfigError, match="at least 9"):
        SDTokenizer(max_length=8)


def test_large_weights_warn_but_encode_as_comfyui():
    # Not a difference in the result: ComfyUI's weight, plus a PromptWarning naming the fragment.
    with pytest.warns(PromptWarning, match="8080"):
        ours = [(s.text, s.weight) for s in parse_prompt("(see https://example.com:8080) fox")]
    assert ours == comfy_weights("(see https://example.com:8080) fox")
