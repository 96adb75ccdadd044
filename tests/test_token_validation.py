"""Typed errors for inputs that used to hang or raise untyped errors: a tokenizer window
too short to pack, and hand-built token windows given to the encoder."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hypothesis_profiles import examples
from textenc.errors import CheckpointError, ConfigError, PromptError, TextencError
from textenc.prompts.tokenizer import SDTokenizer
from textenc.text_encoders.sd1_clip import SDClipModel

START, END = 49406, 49407
TINY = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": 64, "bos_token_id": START, "eos_token_id": END,
        "pad_token_id": END}


# --- max_length -------------------------------------------------------------------------

@pytest.mark.parametrize("length", [8, 2, 0, -5, 9.0, True, "77"])
def test_window_too_short_to_pack_is_refused(length):
    # A 7-token group (the longest never split) must fit an empty window beside start and end.
    with pytest.raises(ConfigError, match="max_length must be an int of at least 9"):
        SDTokenizer(max_length=length)


def test_tokenizer_data_max_length_is_checked_too():
    with pytest.raises(ConfigError, match="at least 9"):
        SDTokenizer(tokenizer_data={"clip_l_max_length": 5})


def test_minimum_window_packs_the_longest_unsplit_group():
    tok = SDTokenizer(max_length=9)
    assert tok.minimum_max_length() == 9
    windows = tok.tokenize_with_weights("a b c d e f g", return_word_ids=True)  # 7 tokens, one group
    assert len(windows) == 1 and [t for t, _, _ in windows[0]][0] == START and windows[0][-1][0] == END
    assert SDTokenizer(max_length=8, has_start_token=False).minimum_max_length() == 8


# --- encode_from_tokens ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    model = SDClipModel(textmodel_json_config=TINY, cache_size=8)
    generator = torch.Generator().manual_seed(0)
    model.load_sd({k: torch.randn(v.shape, generator=generator) * 0.02
                   for k, v in model.transformer.state_dict().items()})
    return model


def window(tokens, length=77):
    pairs = [(START, 1.0)] + [(t, 1.0) for t in tokens] + [(END, 1.0)]
    return pairs + [(END, 1.0)] * (length - len(pairs))


@pytest.mark.parametrize(("windows", "message"), [
    ([window([-1])], "window 0, position 1: token id -1"),
    ([window([2 ** 63])], "window 0, position 1: token id 9223372036854775808"),
    ([window([5]), window([1.5])], "window 1, position 1: a token must be an int id"),
    ([window(["a"])], "window 0, position 1: a token must be an int id"),
    ([window([None])], "window 0, position 1: a token must be an int id"),
    ([window([torch.tensor(1.0)])], "window 0, position 1: an embedding vector must be a 1-D tensor"),
    ([window([torch.ones(2, 64)])], "window 0, position 1: an embedding vector must be a 1-D tensor"),
    ([window([1], 154)], "hold 154 tokens, but the text encoder takes 1 to 77"),
    ([[]], "hold 0 tokens"),
    ([window([1]), window([1], 70)], "window 1 has 70 tokens, window 0 has 77"),
    ([[(START, "x")] * 77], "window 0, position 0: the weight must be a number"),
    ([[(START,)] * 77], r"window 0, position 0: expected \(token, weight\)"),
    ([[(START, 1.0, "w")] * 77], "window 0, position 0: the word id must be an int"),
    ([5], "token windows must be lists"),
])
def test_malformed_windows_raise_prompt_errors(model, windows, message):
    with pytest.raises(PromptError, match=message):
        model.encode_token_weights(windows)


def test_id_beyond_the_vocabulary_names_window_and_position(model):
    with pytest.raises(CheckpointError, match=r"token id 49408 is outside .* \(window 1, position 2\)"):
        model.encode_token_weights([window([5]), window([5, 49408])])


def test_integer_likes_encode_as_ints(model):
    plain = model.encode_token_weights([window([320, 2368])])[0]
    assert torch.equal(model.encode_token_weights([window([np.int64(320), np.int32(2368)])])[0], plain)


_JUNK = st.sampled_from([0, 320, -1, 2 ** 63, 49408, 1.5, "a", None, torch.tensor(1.0), torch.ones(64),
                         torch.ones(2, 64), (1,), True])


@settings(max_examples=examples(100), deadline=None)
@given(st.lists(st.lists(_JUNK, max_size=4), min_size=1, max_size=3), st.sampled_from([77, 76, 78, 0]))
def test_hand_built_windows_raise_only_typed_errors(model, tokens_per_window, length):
    windows = [window(tokens, length) if length else [] for tokens in tokens_per_window]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.encode_token_weights(windows)
        except TextencError:
            pass
