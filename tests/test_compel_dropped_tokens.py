"""``syntax="compel"`` truncation says what it drops (issue 28, point 4).

compel 2.5.1 keeps the first 75 tokens of each prompt by default
(``truncate_long_prompts=True``) and says nothing. textenc keeps compel's result
and adds a :class:`~textenc.errors.PromptWarning` naming how many tokens were
dropped and the option that keeps them (``truncate_long_prompts=False``; on the
command line ``--no-truncate-long-prompts``), plus ``InspectReport.dropped_tokens``
and an ``inspect`` line. The oracle for the counts is compel's own
``EmbeddingsProvider`` with ``truncate=True`` (tokens kept) and ``truncate=False``
(tokens in the prompt), on the bundled CLIP vocabulary as an HF tokenizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

compel = pytest.importorskip("compel")
transformers = pytest.importorskip("transformers")

import compel_prompts  # noqa: E402
from compel_prompts import LONG_SENTENCES, LONG_SPAN, LONG_TAGS, LONG_WORDS  # noqa: E402
from textenc.errors import PromptWarning  # noqa: E402
from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LONG_FRAGMENT = "(" + " ".join(["red"] * 90) + ")1.2 sky"  # one fragment past 75 on its own
BLEND = f'("{LONG_WORDS}", "a cat").blend(0.7, 0.3)'
CONJUNCTION = f'("{LONG_SPAN}", "{LONG_TAGS}").and()'
LONG = [LONG_SENTENCES, LONG_TAGS, LONG_WORDS, LONG_SPAN, LONG_FRAGMENT, BLEND, CONJUNCTION]


@pytest.fixture(scope="module")
def parser():
    with compel_prompts.one_compel_parser(compel) as built:
        yield built


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB, model_max_length=77)


def compel_counts(parser, hf_tokenizer, prompt: str) -> tuple[int, int]:
    """(kept, total) prompt tokens of ``prompt`` as compel 2.5.1 lays it out, over every
    ``.and()`` part and ``.blend()`` member (each is one compel prompt)."""
    from compel.embeddings_provider import EmbeddingsProvider
    from compel.prompt_parser import Blend

    encoder = SimpleNamespace(device="cpu")
    specials = {hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id}
    counts = []
    for truncate in (True, False):
        provider = EmbeddingsProvider(hf_tokenizer, encoder, truncate=truncate)
        count = 0
        for part in parser.parse_conjunction(prompt).prompts:
            for member in (part.prompts if isinstance(part, Blend) else [part]):
                fragments = [f.text for f in member.children]
                weights = [f.weight for f in member.children]
                ids = provider.get_token_ids_and_expand_weights(fragments, weights, "cpu")[0]
                count += sum(1 for token in ids.tolist() if token not in specials)
        counts.append(count)
    return counts[0], counts[1]


@pytest.mark.parametrize("prompt", LONG, ids=["sentences", "tags", "words", "span", "fragment", "blend", "and"])
def test_the_warning_counts_what_compel_drops(prompt, parser, hf_tokenizer):
    kept, total = compel_counts(parser, hf_tokenizer, prompt)
    assert total > kept
    tokenizer = SDTokenizer()
    with pytest.warns(PromptWarning) as caught:
        tokenizer.tokenize_with_weights(prompt, syntax="compel")
    messages = [str(w.message) for w in caught if "truncate_long_prompts" in str(w.message)]
    assert messages == [f"syntax='compel' dropped {total - kept} of the prompt's {total} tokens: compel's "
                        f"truncate_long_prompts=True (the default) keeps the first 75"
                        f"{' of each .and()/.blend() prompt' if prompt in (BLEND, CONJUNCTION) else ''}; "
                        "pass truncate_long_prompts=False to keep them all"]
    with pytest.warns(PromptWarning, match="dropped"):
        report = tokenizer.inspect(prompt, syntax="compel")
    assert report.dropped_tokens == total - kept
    assert sum(1 for window in report.windows for token in window if token.word_id) == kept


@pytest.mark.parametrize("prompt", ["a (cat)0.5 on a mat", " ".join(["mountain"] * 75), LONG_WORDS])
def test_no_warning_when_nothing_is_dropped(prompt):
    tokenizer = SDTokenizer()
    truncate = prompt != LONG_WORDS  # a long prompt drops nothing without truncation
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptWarning)
        tokenizer.tokenize_with_weights(prompt, syntax="compel", truncate_long_prompts=truncate)
        report = tokenizer.inspect(prompt, syntax="compel", truncate_long_prompts=truncate)
    assert report.dropped_tokens == 0


def test_the_warning_points_at_the_caller():
    with pytest.warns(PromptWarning, match="dropped") as caught:
        SDTokenizer().tokenize_with_weights(LONG_WORDS, syntax="compel")
    assert caught[0].filename == __file__


def _textenc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "textenc", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.slow
def test_inspect_command_line_warns_and_reports(tmp_path, parser, hf_tokenizer):
    kept, total = compel_counts(parser, hf_tokenizer, LONG_WORDS)
    result = _textenc("inspect", "--syntax", "compel", LONG_WORDS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"textenc: warning: syntax='compel' dropped {total - kept} of the prompt's {total} tokens: compel's "
        "truncate_long_prompts=True (the default) keeps the first 75; pass --no-truncate-long-prompts to keep "
        "them all"]
    assert (f"truncated: {total - kept} prompt token(s) dropped, {kept} kept (compel's truncate_long_prompts=True, "
            "the default, keeps the first 75 of each prompt); --no-truncate-long-prompts keeps them all"
            in result.stdout.splitlines())
    whole = _textenc("inspect", "--syntax", "compel", "--no-truncate-long-prompts", LONG_WORDS, cwd=tmp_path)
    assert whole.returncode == 0 and whole.stderr == ""
    assert "truncated:" not in whole.stdout


@pytest.mark.slow
def test_encode_command_line_warns(tmp_path, tiny_model, parser, hf_tokenizer):
    kept, total = compel_counts(parser, hf_tokenizer, LONG_WORDS)
    result = _textenc("encode", "--syntax", "compel", "--model", str(tiny_model), "--out",
                      str(tmp_path / "out.safetensors"), LONG_WORDS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "dropped" in line] == [
        f"textenc: warning: syntax='compel' dropped {total - kept} of the prompt's {total} tokens: compel's "
        "truncate_long_prompts=True (the default) keeps the first 75; pass --no-truncate-long-prompts to keep "
        "them all"]


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_dataset_warns_once_then_counts(tmp_path, tiny_model, parser, hf_tokenizer, capsys, engine):
    """One line per caption would flood a dataset's log: the first caption's warning,
    then one line counting the others. With Ray the actors count their truncations and the
    driver says them as the local engine does; the 90-word caption of shard 1 repeats
    shard 0's and reuses its encoding (no second warning)."""
    import contextlib

    from textenc.dataset.cli import main as dataset_main

    captions = [" ".join(["word"] * size) for size in (80, 90, 100, 90, 20)]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    kept, total = compel_counts(parser, hf_tokenizer, captions[0])
    args = [str(tmp_path / "captions.txt"), "--model", str(tiny_model), "--out", str(tmp_path / "out"),
            "--syntax", "compel", "--no-progress"]
    session = contextlib.nullcontext()
    if engine == "ray":
        import dataset_fixtures

        args += ["--engine", "ray", "--workers", "2", "--shard-rows", "2"]
        session = dataset_fixtures.ray_session(240)
    with session:
        status = dataset_main(args)
    err = capsys.readouterr().err.splitlines()
    if engine == "ray":  # Ray's own lines come from this test's ray.init (the command's is quiet)
        err = [line for line in err if line.startswith("python -m textenc")]
    assert status == 0
    assert err == [
        f"python -m textenc.dataset: warning: syntax='compel' dropped {total - kept} of the prompt's {total} "
        "tokens: compel's truncate_long_prompts=True (the default) keeps the first 75; pass "
        "--no-truncate-long-prompts to keep them all",
        "python -m textenc.dataset: warning: syntax='compel' dropped tokens of 2 more caption(s) as well "
        "(compel's truncate_long_prompts=True keeps one window); pass --no-truncate-long-prompts to keep them all"]


def compel_kept(parser, hf_tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """compel 2.5.1's ids and per-token weights of one (single-member) truncated prompt."""
    from compel.embeddings_provider import EmbeddingsProvider

    provider = EmbeddingsProvider(hf_tokenizer, SimpleNamespace(device="cpu"), truncate=True)
    member, = parser.parse_conjunction(prompt).prompts
    ids, weights, _ = provider.get_token_ids_and_expand_weights(
        [f.text for f in member.children], [f.weight for f in member.children], "cpu")
    return ids.tolist(), weights.tolist()


PAST_THE_CAP = [LONG_SPAN + " (wide open sea)0.6" * 40,
                "(dim)0.5 " + "".join(f"[a{i}:b:{i}]" for i in range(200))]  # no spaces: cut after digits


@pytest.mark.parametrize("prompt", PAST_THE_CAP, ids=["words", "no-spaces"])
def test_past_max_windows_the_count_is_a_lower_bound(prompt, parser, hf_tokenizer, monkeypatch):
    """Truncation counts up to max_windows × 75 tokens (the length the non-truncating path
    refuses), a few characters at a time here; the kept tokens stay compel's."""
    from textenc.prompts.dialects.compel import tokens

    monkeypatch.setattr(tokens, "_PIECE_CHARS", 40)
    kept, total = compel_counts(parser, hf_tokenizer, prompt)
    tokenizer = SDTokenizer(max_windows=1)
    with pytest.warns(PromptWarning, match="dropped at least") as caught:
        window, = tokenizer.tokenize_with_weights(prompt, syntax="compel")
    ids, weights = compel_kept(parser, hf_tokenizer, prompt)
    assert [t[0] for t in window] == ids
    assert [t[1] for t in window] == pytest.approx(weights)
    assert window[0].compel.pooled_window == tuple(hf_tokenizer(prompt, truncation=True, max_length=77,
                                                                padding="max_length")["input_ids"])
    message, = [str(w.message) for w in caught]
    counted = int(message.split("at least ")[1].split(" ")[0])
    assert 75 <= kept + counted < total
    assert message.startswith(f"syntax='compel' dropped at least {counted} of the prompt's {kept + counted}+ "
                              "tokens (counted up to max_windows windows' worth): compel's truncate_long_prompts")
    with pytest.warns(PromptWarning, match="dropped at least"):
        report = tokenizer.inspect(prompt, syntax="compel")
    assert (report.dropped_tokens, report.dropped_tokens_exact) == (counted, False)
    from textenc.commands.inspect_summary import dropped_lines
    assert dropped_lines(report)[0].startswith(f"truncated: at least {counted} prompt token(s) dropped, {kept} kept")
    with pytest.warns(PromptWarning, match=f"dropped {total - kept} of"):
        exact = SDTokenizer(max_windows=None).inspect(prompt, syntax="compel")
    assert (exact.dropped_tokens, exact.dropped_tokens_exact) == (total - kept, True)
