"""A1111's chunking: textenc's ``syntax="a1111"`` windows against A1111's chunking rules
(``a1111_reference``: written independently from A1111's rules, on ``transformers.CLIPTokenizer``)."""

from __future__ import annotations

import pytest

from a1111_prompts import ALL_PROMPTS, clause_prompts, tag_prompts
from a1111_reference import OracleClip, a1111_embedding_folder
from textenc.errors import PromptError
from textenc.text_encoders.sd1_clip import SD1Tokenizer
from textenc.text_encoders.sdxl_clip import SDXLTokenizer
from textenc.prompts.tokenizer import DEFAULT_VOCAB, InspectReport, SDTokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)


def reference_windows(clip: OracleClip, prompt: str) -> list[tuple[list[int], list[float]]]:
    return [(clip.window_ids(c), c.weights) for c in clip.chunks(prompt)]


def ours(tokenizer: SDTokenizer, prompt: str, **kwargs) -> list[tuple[list, list[float]]]:
    windows = tokenizer.tokenize_with_weights(prompt, syntax="a1111", **kwargs)
    return [([t for t, _ in w], [w_ for _, w_ in w]) for w in windows]


@pytest.mark.parametrize("pad_with_end", [True, False], ids=["sd1-pad-end", "openclip-pad-0"])
@pytest.mark.parametrize("backtrack", [20, 0, 5, 74])
def test_windows_equal_a1111(hf_tokenizer, pad_with_end, backtrack):
    tokenizer = SDTokenizer(pad_with_end=pad_with_end)
    clip = OracleClip(hf_tokenizer, pad_id=None if pad_with_end else 0, backtrack=backtrack)
    prompts = ALL_PROMPTS if backtrack in (20, 0) else tag_prompts(15, seed=backtrack) + clause_prompts(15, seed=backtrack)
    for prompt in prompts:
        expected = reference_windows(clip, prompt)
        got = ours(tokenizer, prompt, comma_padding_backtrack=backtrack)
        assert got == expected, prompt


def test_long_tag_prompts_cover_commas_15_to_25_tokens_from_chunk_ends(hf_tokenizer):
    """Without backtracking, the last comma of a full chunk lies d tokens from its end; the
    set holds both d in 15-20 (A1111 moves the text after it) and 21-25 (it does not)."""
    clip = OracleClip(hf_tokenizer, backtrack=0)
    distances = []
    for prompt in clause_prompts(40):
        for chunk in clip.chunks(prompt)[:-1]:
            body = chunk.ids[1:-1]
            commas = [i for i, t in enumerate(body) if t == clip.comma_id]
            if clip.end_id not in body and commas:
                distances.append(75 - commas[-1])
    assert sum(15 <= d <= 20 for d in distances) >= 5 and sum(21 <= d <= 25 for d in distances) >= 5
    tokenizer = SDTokenizer()
    moved = [m for p in clause_prompts(40) for m in tokenizer.inspect(p, syntax="a1111").moves]
    assert len(moved) >= 10 and all(0 <= m.num_tokens <= 19 for m in moved)


def test_break_rules_and_empty_chunks():
    tokenizer = SDTokenizer()

    def count(prompt):
        return len(tokenizer.tokenize_with_weights(prompt, syntax="a1111"))
    assert count("") == 1 and count("BREAK") == 1 and count("a BREAK") == 1
    assert count("BREAK a") == 2 and count("a BREAK BREAK b") == 3 and count("(a BREAK b)") == 1
    windows = tokenizer.tokenize_with_weights("(a BREAK b)", syntax="a1111")
    assert [round(w, 6) for _, w in windows[0][1:4]] == [1.1, -1.1, 1.1]  # "break" the word, at -1.1


def test_exactly_75_tokens_fill_one_chunk_and_76_make_two():
    tokenizer = SDTokenizer()
    assert len(tokenizer.tokenize_with_weights(" ".join(["cat"] * 75), syntax="a1111")) == 1
    windows = tokenizer.tokenize_with_weights(" ".join(["cat"] * 76), syntax="a1111")
    assert len(windows) == 2 and windows[0][76][0] == 49407 and windows[1][1][0] == 2368


def test_wrappers_pass_syntax_through(hf_tokenizer):
    clip = OracleClip(hf_tokenizer)
    prompt = ", ".join(["a red fox"] * 30)
    expected = [t for t, _ in reference_windows(clip, prompt)]
    sd1 = SD1Tokenizer().tokenize_with_weights(prompt, syntax="a1111")["l"]
    assert [[t for t, _ in w] for w in sd1] == expected
    sdxl = SDXLTokenizer().tokenize_with_weights(prompt, syntax="a1111")
    assert [[t for t, _ in w] for w in sdxl["l"]] == expected
    clip_g = OracleClip(hf_tokenizer, pad_id=0)
    assert [[t for t, _ in w] for w in sdxl["g"]] == [t for t, _ in reference_windows(clip_g, prompt)]


def test_word_ids_and_bad_options():
    tokenizer = SDTokenizer()
    window = tokenizer.tokenize_with_weights("a (b) c", True, syntax="a1111")[0]
    assert [i for _, _, i in window[:5]] == [0, 1, 2, 3, 0]
    for bad in (-1, 75, 2.5, True, "20"):
        with pytest.raises(PromptError, match="comma_padding_backtrack"):
            tokenizer.tokenize_with_weights("a", syntax="a1111", comma_padding_backtrack=bad)
    plain = tokenizer.tokenize_with_weights("(a) BREAK b", syntax="a1111", disable_weights=True)
    assert len(plain) == 1 and all(w == 1.0 for _, w in plain[0])


def test_inspect_reports_chunks_and_moves():
    tokenizer = SDTokenizer()
    prompt = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 20)
    report = tokenizer.inspect(prompt, syntax="a1111")
    assert isinstance(report, InspectReport)
    assert [(c.num_tokens, c.ended_by) for c in report.chunks] == [(61, "comma"), (20, "end")]
    assert [(m.source, m.num_tokens, m.text) for m in report.moves] == [(0, 14, " ".join(["dog"] * 14))]
    assert len(report.windows) == 2 and report.windows[1][1].text == "dog</w>"


# ---- textual inversion ----------------------------------------------------------

@pytest.fixture()
def embedding_folder(tmp_path):
    return a1111_embedding_folder(tmp_path, seed=5)


def _tokens_and_vectors(window):
    return [t if isinstance(t, int) else ("vec", tuple(t[:3].tolist())) for t, _ in window]


def _reference_with_vectors(clip, prompt):
    """Reference windows with each embedding's rows written where they enter the model."""
    out = []
    for chunk in clip.chunks(prompt):
        tokens = list(clip.window_ids(chunk))
        for slot, rows in chunk.vectors:
            for row in range(min(77 - slot - 1, rows.shape[0])):
                tokens[slot + 1 + row] = ("vec", tuple(rows[row, :3].tolist()))
        out.append((tokens, chunk.weights))
    return out


@pytest.mark.parametrize("prompt", [
    "a photo of myemb, in the snow", "(myemb:1.3) and [style two]", "myembmyemb style two",
    " ".join(["cat"] * 73) + " myemb", ", ".join(["a red fox"] * 17) + ", myemb tail",
    " ".join(["cat"] * 58) + ", " + " ".join(["dog"] * 14) + " myemb dog dog",  # backtracking moves it
    "BREAK myemb BREAK", "style", "two style two",
])
def test_embeddings_are_placed_as_a1111_places_them(hf_tokenizer, embedding_folder, prompt):
    folder, vectors = embedding_folder
    clip = OracleClip(hf_tokenizer, embeddings=vectors)
    tokenizer = SDTokenizer(embedding_directory=str(folder))
    windows = tokenizer.tokenize_with_weights(prompt, syntax="a1111")
    got = [(_tokens_and_vectors(w), [x for _, x in w]) for w in windows]
    assert got == _reference_with_vectors(clip, prompt)


def test_long_piece_read_a_run_at_a_time_keeps_embeddings_across_cuts(hf_tokenizer, embedding_folder):
    """A plain piece past 64K characters is tokenized a cut at a time (here after the one
    space, inside the two-token name ``style two``); the name is still found across the cut."""
    folder, vectors = embedding_folder
    prompt = "ab," * 21844 + "style two" + ",ab" * 50 + " myemb"
    clip = OracleClip(hf_tokenizer, embeddings=vectors)
    tokenizer = SDTokenizer(embedding_directory=str(folder))
    windows = tokenizer.tokenize_with_weights(prompt, syntax="a1111", max_windows=None)
    got = [(_tokens_and_vectors(w), [x for _, x in w]) for w in windows]
    assert got == _reference_with_vectors(clip, prompt)
    assert sum(isinstance(t, tuple) for tokens, _ in got for t in tokens) == 5  # 2 + 3 vectors


def test_inspect_printout_shows_chunks_and_moves():
    from textenc.commands.inspect import format_report as _format_report, report_dict as _report_dict

    report = SDTokenizer().inspect(" ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 20), syntax="a1111")
    text = _format_report(report)
    assert "chunk 0: 61 prompt token(s), ended by comma" in text
    assert "comma backtracking moved 14 token(s) from chunk 0 to chunk 1: 'dog dog" in text
    assert _report_dict(report)["moves"] == [{"source": 0, "num_tokens": 14, "text": " ".join(["dog"] * 14)}]
    assert "chunks" not in _report_dict(SDTokenizer().inspect("a cat"))  # comfy: unchanged


def test_tokenizer_without_start_token_is_refused():
    with pytest.raises(PromptError, match="start and end tokens"):
        SDTokenizer(has_start_token=False).tokenize_with_weights("a", syntax="a1111")
