"""``embedding:name`` read as ComfyUI reads it, against the ComfyUI-rules oracle.

The oracle (:class:`comfy_reference.ComfyTokenizer` with an ``embeddings`` mapping)
restates ComfyUI's ``SDTokenizer.tokenize_with_weights`` and ``_try_get_embedding``:
the name is ``rest.split()[0]`` (so whitespace after the colon is skipped), a file with
no rows is an empty group that still uses a word id, and a missing name uses none.
Plain-word ids come from ``transformers.CLIPTokenizer``.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from comfy_reference import ComfyTokenizer
from hypothesis_profiles import examples
from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer

WIDTH = 768


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)


@pytest.fixture(scope="module")
def embeddings() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"cat": torch.randn(2, WIDTH, generator=generator), "empty": torch.zeros(0, WIDTH),
            "one": torch.randn(WIDTH, generator=generator)}


@pytest.fixture(scope="module")
def pair(hf, embeddings, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    for name, value in embeddings.items():
        save_file({"emb_params": value}, folder / f"{name}.safetensors")
    return SDTokenizer(embedding_directory=str(folder)), ComfyTokenizer(hf, embeddings=embeddings)


def _comparable(windows: list[list[tuple]]) -> list[list[tuple]]:
    """Windows with each embedding vector as a tuple of its values (tensors do not compare with ==)."""
    return [[(tuple(t.tolist()) if isinstance(t, torch.Tensor) else t, w, i) for t, w, i in window]
            for window in windows]


def _check(pair, prompt: str) -> list[list[tuple]]:
    ours, comfy = pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing embeddings, large weights
        got = ours.tokenize_with_weights(prompt, return_word_ids=True)
    assert _comparable(got) == _comparable(comfy.tokenize_with_weights(prompt, return_word_ids=True)), prompt
    return got


@pytest.mark.parametrize("prompt", [
    "a embedding:empty b", "embedding:empty", "a embedding:empty embedding:cat b", "embedding:empty embedding:empty x",
    "x " * 74 + "embedding:empty y", "(embedding:empty:1.2) b", "a embedding:one b",
])
def test_zero_row_embedding_uses_a_word_id(pair, prompt):
    _check(pair, prompt)


def test_zero_row_embedding_word_ids_jump(pair):
    window = _check(pair, "a embedding:empty b")[0]
    assert [i for _, _, i in window[:4]] == [0, 1, 3, 0]


@pytest.mark.parametrize("prompt", [
    "a embedding: cat", "a embedding:  \tcat dog", "a\nembedding: cat", "embedding: cat", "(embedding: cat:1.2) x",
    "a embedding: missing dog", "a embedding: empty b", "a embedding:\ncat", "a embedding: cat\n dog",
])
def test_space_after_the_colon_is_skipped(pair, prompt):
    _check(pair, prompt)


def test_space_after_the_colon_loads_the_embedding(pair):
    window = _check(pair, "a embedding: cat")[0]
    assert [isinstance(t, torch.Tensor) for t, _, _ in window[2:4]] == [True, True]


_WORDS = st.sampled_from(["a", "cat", "empty", "one", "missing", " ", "\n", "\t", "embedding:", " embedding:",
                          "\nembedding:", "(", ")", ":1.2", "x y z w v u t s r"])


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(_WORDS, max_size=30))
def test_matches_comfy_reference_with_embeddings(pair, words):
    prompt = "".join(words)
    try:
        pair[1].tokenize_with_weights(prompt)
    except IndexError:  # ComfyUI's blank name: a listed difference (tests/test_comfy_differences.py)
        assume(False)
    assume(not re.search(r"embedding:\s*,", prompt))  # leading commas: a listed difference
    _check(pair, prompt)
