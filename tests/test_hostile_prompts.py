"""The linear-time rewrites give the results of the patterns and loops they replace
(issue 27, point 5); the timings themselves are in bench/bench_hostile_prompts.py."""

from __future__ import annotations

import os
import random
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from textenc.errors import PromptError
from textenc.loading.embeddings import EmbeddingLoader
from textenc.prompts.dialects.a1111.attention import _split_breaks, parse_attention
from textenc.prompts.dialects.a1111.schedule import MAX_SCHEDULE_TEXTS, _part_weight, prompt_schedule
from textenc.prompts.dialects.compel.grammar import _fused_text
from textenc.prompts.dialects.compel.parser import unescape
from textenc.prompts.tokenizer import SDTokenizer

# A1111's own patterns (modules/prompt_parser.py), the reference for the linear rewrites.
A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
A1111_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
ATOMS = [" ", "\n", "\t", "\u3000", "\xa0", ":", "1", ".", "+", "-", "a", "B", "BREAK", "xBREAK", "BREAKx",
         "\u0661", "e", "5", ")"]


def _strings(seed: int, atoms: list[str], count: int = 3000, longest: int = 10):
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(atoms) for _ in range(rng.randint(0, longest)))


def test_break_split_is_a1111s_pattern():
    for text in _strings(0, ATOMS):
        assert _split_breaks(text) == A1111_BREAK.split(text), repr(text)


def test_and_part_weight_is_a1111s_pattern():
    for text in _strings(1, ATOMS):
        assert _part_weight(text) == A1111_WEIGHT.search(text).groups(), repr(text)


def test_compel_fused_text_is_repeated_unescape():
    atoms = ["\\", "\\\\", "(", ")", '"', "a", " ", "\\(", "\\)", '\\"']
    rng = random.Random(2)
    for _ in range(3000):
        run = ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 6))]
        joined = run[0]
        for text in run[1:]:
            joined = unescape(joined + " " + text)
        assert _fused_text([(text, 1) for text in run]) == joined
        # plain words parsed as one piece count as that many fragments
        words = [rng.choice(["a", "cat", "BREAK"]) for _ in range(rng.randint(1, 4))]
        at = rng.randint(0, len(run))
        texts = run[:at] + words + run[at:]
        pieces = [(text, 1) for text in run[:at]] + [(" ".join(words), len(words))] + [(t, 1) for t in run[at:]]
        expected = texts[0]
        for text in texts[1:]:
            expected = unescape(expected + " " + text)
        assert _fused_text(pieces) == expected


def test_nan_weight_pieces_stay_apart_as_in_a1111():
    huge = "9" * 400  # reads as infinity; times 0 is NaN
    pieces = parse_attention(f"((a\\(b:0):{huge})")
    assert [text for text, _ in pieces] == ["a", "(", "b"]


def test_a1111_max_windows_refused_while_chunking():
    with pytest.raises(PromptError, match=r"more than max_windows=3 \(syntax='a1111'\)"):
        SDTokenizer().tokenize_with_weights("BREAK " * 10, syntax="a1111", max_windows=3)
    assert len(SDTokenizer().tokenize_with_weights("a BREAK b BREAK c", syntax="a1111", max_windows=3)) == 3


def test_schedule_size_refused_before_it_is_made():
    assert len(prompt_schedule("[a|b]", MAX_SCHEDULE_TEXTS)) == MAX_SCHEDULE_TEXTS
    with pytest.raises(PromptError, match="MAX_SCHEDULE_TEXTS"):
        prompt_schedule("[a|b]", 3_000_000)
    edits = "".join(f"[a{i}:b:{i}]" for i in range(1, MAX_SCHEDULE_TEXTS + 1))
    with pytest.raises(PromptError, match="MAX_SCHEDULE_TEXTS"):
        prompt_schedule(edits, 2 * MAX_SCHEDULE_TEXTS)


def test_embedding_misses_are_remembered_until_the_folder_changes(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    for folder in (sub, tmp_path):  # settled: misses in a folder changed in the last 2 s are not kept
        os.utime(folder, ns=(1_000_000_000, 1_000_000_000))
    loader = EmbeddingLoader(str(tmp_path), 768)
    first = loader.lookup("cat")
    assert first.status == "missing"
    assert loader.lookup("cat") is first  # remembered
    save_file({"emb_params": torch.zeros(1, 768)}, str(sub / "cat.safetensors"))
    assert loader.lookup("cat").status == "found"
    os.remove(sub / "cat.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert loader.lookup("cat").status == "missing"


def test_long_spaceless_unit_is_cut_after_digits_without_changing_tokens():
    """A unit past 64K characters with no space is tokenized in pieces cut after an ASCII
    digit; the tokens are transformers' CLIPTokenizer's for the whole text (the oracle)."""
    transformers = pytest.importorskip("transformers")
    from textenc.prompts.budget import space_chunks
    from textenc.prompts.vocabulary import DEFAULT_VOCAB

    hf = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    text = "".join(f"[a{i}:b:{i}]\u00e9\u0301{i % 7}\u0301Σ1x" for i in range(9000))  # ~150K characters
    pieces = list(space_chunks(text, 1 << 16))
    assert len(pieces) > 1 and "".join(pieces) == text
    specials = (hf.bos_token_id, hf.eos_token_id)  # window starts, ends and padding
    windows = SDTokenizer().tokenize_with_weights(text, max_windows=None)
    assert [t for window in windows for t, _ in window if t not in specials] == hf(text)["input_ids"][1:-1]


def test_long_spaceless_prompt_is_refused_a_piece_at_a_time():
    """``[aK:b:K]`` x n (1 MB, no space) is refused after its first pieces are tokenized."""
    text = "".join(f"[a{i}:b:{i}]" for i in range(120_000))[:1 << 20]
    with pytest.raises(PromptError, match=r"in its first (\d+) of") as caught:
        SDTokenizer().tokenize_with_weights(text)
    first = int(re.search(r"in its first (\d+) of", str(caught.value)).group(1))
    assert first < len(text) // 4
