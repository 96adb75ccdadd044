"""``inspect(syntax="a1111")`` units against the independent A1111 oracle (``a1111_reference``,
on ``transformers.CLIPTokenizer``): each unit's prompt token count, and the word id its
tokens carry in the windows."""

from __future__ import annotations

import contextlib
import json

import pytest

from a1111_prompts import ALL_PROMPTS, clause_prompts, long_words_prompt, tag_prompts
from a1111_reference import BREAK_MARK, OracleClip, a1111_embedding_folder, oracle_attention
from textenc.cli import main
from textenc.errors import EmbeddingWarning
from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer

transformers = pytest.importorskip("transformers")

BREAK_UNIT = (0, "break", "BREAK", 1.0, 0)  # as the comfy dialect reports a BREAK


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)


def reference_units(clip: OracleClip, prompt: str) -> list[tuple]:
    """``(word_id, kind, text, weight, num_tokens)`` per oracle piece: text pieces are
    numbered from 1 and a break takes no number; a piece's tokens are its transformers
    tokens (no start/end), one per vector for an embedding's name."""
    units, word_id = [], 0
    for text, weight in oracle_attention(prompt):
        if (text, weight) == BREAK_MARK:
            units.append(BREAK_UNIT)
            continue
        word_id += 1
        items = clip.piece_items(text, weight)
        units.append((word_id, "text", text, weight,
                      sum(1 if item.kind == "token" else int(item.rows.shape[0]) for item in items)))
    return units


def check_report(clip: OracleClip, tokenizer: SDTokenizer, prompt: str, **options) -> list[tuple]:
    """The report's units are the oracle's, and the prompt tokens of its windows (where the
    oracle's chunks have them) carry the unit word ids, each as often as its count says."""
    report = tokenizer.inspect(prompt, syntax="a1111", **options)
    expected = reference_units(clip, prompt)
    got = [(u.word_id, u.kind, u.text, u.weight, u.num_tokens) for u in report.units]
    assert got == expected, prompt
    chunks = clip.chunks(prompt)
    assert len(report.windows) == len(chunks), prompt
    carried = []
    for window, chunk in zip(report.windows, chunks):
        size = chunk.ids.index(clip.end_id) - 1  # the prompt tokens between start and first end
        assert [t.word_id for t in window[:1] + window[1 + size:]] == [0] * (len(window) - size), prompt
        carried += [t.word_id for t in window[1:1 + size]]
    assert len(carried) == sum(unit[4] for unit in expected), prompt
    assert carried == [unit[0] for unit in expected for _ in range(unit[4])], prompt
    return got


@pytest.mark.parametrize("backtrack", [20, 0, 5])
def test_units_count_tokens_and_carry_window_word_ids(hf_tokenizer, backtrack):
    clip = OracleClip(hf_tokenizer, backtrack=backtrack)
    tokenizer = SDTokenizer()
    prompts = ALL_PROMPTS if backtrack in (20, 0) else tag_prompts(15, seed=9) + clause_prompts(15, seed=9)
    for prompt in prompts:
        check_report(clip, tokenizer, prompt, comma_padding_backtrack=backtrack)


def test_example_prompts(hf_tokenizer):
    clip, tokenizer = OracleClip(hf_tokenizer), SDTokenizer()
    got = check_report(clip, tokenizer, "a [red] fox in the snow, (big:1.2) tree")
    assert [count for *_, count in got] == [1, 1, 5, 1, 1]
    got = check_report(clip, tokenizer, "a [red] fox BREAK in the snow")
    assert got[3] == BREAK_UNIT and got[4][:2] == (4, "text") and got[4][4] == 3
    nested = check_report(clip, tokenizer, "x ((y [z (w:1.4)] v)) u, BREAK BREAK (q:0.5)")
    assert nested.count(BREAK_UNIT) == 2 and sum(unit[4] for unit in nested) == 8
    long = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 20) + " BREAK " + long_words_prompt(120, 3)
    report = tokenizer.inspect(long, syntax="a1111")
    assert report.moves and len(report.windows) >= 4  # backtracking moved text, several chunks
    check_report(clip, tokenizer, long)


def test_disabled_weights_is_one_unit(hf_tokenizer):
    report = SDTokenizer().inspect("(a:1.3) BREAK [b]", syntax="a1111", disable_weights=True)
    count = len(hf_tokenizer("(a:1.3) BREAK [b]", add_special_tokens=False)["input_ids"])
    assert [(u.word_id, u.kind, u.weight, u.num_tokens) for u in report.units] == [(1, "text", 1.0, count)]


@pytest.fixture()
def embedding_folder(tmp_path):
    folder, vectors = a1111_embedding_folder(tmp_path, seed=7)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")  # refused: stays text
    return folder, vectors


@pytest.mark.parametrize("prompt", [
    "a photo of myemb, in the snow", "(myemb:1.3) and [style two]", "myembmyemb style two",
    " ".join(["cat"] * 73) + " myemb",  # does not fit: the chunk closes first
    " ".join(["cat"] * 58) + ", " + " ".join(["dog"] * 14) + " myemb dog dog",  # backtracking moves it
    "BREAK myemb BREAK", "embedding:nothere, (nothere:1.2), myemb", "a broken (style:1.1)",
])
def test_units_count_embedding_vectors(hf_tokenizer, embedding_folder, prompt):
    folder, vectors = embedding_folder
    clip = OracleClip(hf_tokenizer, embeddings=vectors)
    tokenizer = SDTokenizer(embedding_directory=str(folder))
    refused = pytest.warns(EmbeddingWarning, match="broken") if "broken" in prompt else contextlib.nullcontext()
    with refused:
        check_report(clip, tokenizer, prompt)


def test_cli_prints_unit_counts(hf_tokenizer, capsys):
    def count(text: str) -> int:
        return len(hf_tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = "a [red] fox BREAK in the snow"
    assert main(["inspect", prompt, "--syntax", "a1111"]) == 0
    out = capsys.readouterr().out
    units = out[out.index("units:\n"):out.index("chunk 0:")].splitlines()[1:]
    assert units == [f"  word   1  text       weight 1        {count('a '):>3} token(s)  'a '",
                     f"  word   2  text       weight 0.9091   {count('red'):>3} token(s)  'red'",
                     f"  word   3  text       weight 1        {count(' fox'):>3} token(s)  ' fox'",
                     "  word   0  break      weight 1          0 token(s)  'BREAK'",
                     f"  word   4  text       weight 1        {count('in the snow'):>3} token(s)  'in the snow'"]
    assert "     1     530        1     4  in</w>" in out  # the window's tokens carry word 4
    assert main(["inspect", prompt, "--syntax", "a1111", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(u["word_id"], u["weight"], u["num_tokens"]) for u in report["units"]] == \
        [(1, 1.0, 1), (2, 1 / 1.1, 1), (3, 1.0, 1), (0, 1.0, 0), (4, 1.0, 3)]
