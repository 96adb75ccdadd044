"""Textual-inversion loading: formats, prompt syntax, safety."""

from __future__ import annotations

import os
import pickle
import sys
import tracemalloc
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from textenc.loading.embeddings import EmbeddingLoader, load_embed
from textenc.errors import EmbeddingError, EmbeddingWarning
from textenc.prompts.tokenizer import SDTokenizer

START, END = 49406, 49407
WIDTH = 768


def vectors(rows, width=WIDTH, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator).to(dtype)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "embeddings"
    (root / "sub" / "deeper").mkdir(parents=True)
    return root


def tokens_of(tok, prompt):
    return tok.tokenize_with_weights(prompt, return_word_ids=True)[0]


# --- formats ------------------------------------------------------------------

def test_every_format_loads(folder):
    value = vectors(2)
    torch.save({"string_to_param": {"*": value}, "name": "a1111", "step": 3}, folder / "a1111.pt")
    torch.save({"<tok>": value}, folder / "diffusers.bin")
    torch.save(value, folder / "plain.pt")
    torch.save([{"x": value}], folder / "listed.pt")
    save_file({"clip_l": value, "clip_g": vectors(2, 1280)}, folder / "keyed.safetensors")
    save_file({"emb_params": value}, folder / "single.safetensors")
    save_file({"bundle_emb.foo.string_to_param.*": value, "lora_unet.x": vectors(1, 4)}, folder / "bundle.safetensors")
    save_file({"bundle_emb.foo.clip_l": value}, folder / "bundle2.safetensors")
    for name in ["a1111", "diffusers", "plain", "listed", "keyed", "single", "bundle", "bundle2", "keyed.safetensors"]:
        loaded = load_embed(name, str(folder), WIDTH, "clip_l")
        assert loaded is not None and torch.equal(loaded, value), name
    assert load_embed("keyed", str(folder), 1280, "clip_g").shape == (2, 1280)


def test_missing_returns_none_and_invalid_raises(folder):
    assert load_embed("nothing", str(folder), WIDTH) is None
    torch.save(vectors(1, 1024), folder / "wide.pt")
    with pytest.raises(EmbeddingError, match="width 1024"):
        load_embed("wide", str(folder), WIDTH)


@pytest.mark.parametrize(("content", "reason"), [
    (torch.full((1, WIDTH), float("nan")), "NaN"),
    (torch.zeros(0), "empty"),
    (torch.zeros(1, 1, WIDTH), "1-D or 2-D"),
    (torch.zeros(2, WIDTH, dtype=torch.int64), "floating"),
    ({"a": "not a tensor"}, "tensor"),
])
def test_invalid_contents_are_rejected(folder, content, reason):
    torch.save(content, folder / "bad.pt")
    result = EmbeddingLoader(str(folder), WIDTH).lookup("bad")
    assert result.status == "rejected" and reason in result.reason and str(folder) in result.reason


def test_corrupt_files_name_their_path(folder):
    (folder / "broken.safetensors").write_bytes(b"\x00" * 20)
    (folder / "broken2.pt").write_bytes(b"not a pickle at all")
    for name in ["broken", "broken2"]:
        result = EmbeddingLoader(str(folder), WIDTH).lookup(name)
        assert result.status == "rejected" and name in result.reason


# --- prompts ---------------------------------------------------------------------

def test_prompt_with_embeddings(folder):
    value = vectors(3)
    save_file({"emb_params": value}, folder / "sub" / "deeper" / "style.safetensors")
    tok = SDTokenizer(embedding_directory=str(folder))
    plain = SDTokenizer()
    cat = plain.encode_units(["cat"])[0][0]
    out = tokens_of(tok, "a (embedding:style:1.2) cat")
    a = plain.encode_units(["a"])[0][0]
    assert out[1] == (a, 1.0, 1)
    assert [torch.equal(t, value[i]) and w == 1.2 and i_ == 2 for i, (t, w, i_) in enumerate(out[2:5])] == [True] * 3
    assert out[5] == (cat, 1.0, 3)  # " cat" is the third group
    # with extension, trailing comma, leftover text
    out = tokens_of(tok, "embedding:style.safetensors, embedding:style, dog")
    comma, dog = plain.encode_units([","])[0][0], plain.encode_units(["dog"])[0][0]
    assert all(isinstance(t, torch.Tensor) for t, _, _ in out[1:4]) and out[1][2] == 1
    assert out[4] == (comma, 1.0, 2)  # the comma left over after the name is its own group
    assert all(isinstance(t, torch.Tensor) for t, _, _ in out[5:8]) and out[5][2] == 3
    assert out[8:10] == [(comma, 1.0, 4), (dog, 1.0, 4)] and out[10] == (END, 1.0, 0)
    report = tok.inspect("embedding:style")
    assert report.embeddings[0].status == "found" and report.embeddings[0].vectors.shape == (3, WIDTH)


def test_one_dimensional_embedding_is_one_token(folder):
    torch.save(vectors(1)[0], folder / "one.pt")
    out = tokens_of(SDTokenizer(embedding_directory=str(folder)), "embedding:one")
    assert isinstance(out[1][0], torch.Tensor) and out[2] == (END, 1.0, 0)


def test_missing_and_wrong_width_warn_and_continue(folder):
    torch.save(vectors(1, 1024), folder / "sd2.pt")
    tok = SDTokenizer(embedding_directory=str(folder))
    plain = SDTokenizer()
    for prompt in ["embedding:nope cat", "embedding:sd2 cat"]:
        with pytest.warns(EmbeddingWarning, match="nope|sd2"):
            out = tokens_of(tok, prompt)
        assert out[1] == (plain.encode_units(["cat"])[0][0], 1.0, 1) and out[2] == (END, 1.0, 0)
    report = tok.inspect("embedding:nope embedding:sd2") if False else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddingWarning)
        report = tok.inspect("embedding:nope x embedding:sd2")
    assert [e.status for e in report.embeddings] == ["missing", "rejected"]
    assert len(report.missing) == 1 and "1024" in report.rejected[0].reason


def test_zero_row_file_is_found_with_no_vectors(folder):
    # ComfyUI loads a (0, width) tensor; its empty group still uses a word id
    # (conformance: tests/test_comfy_embedding_reading.py).
    torch.save(torch.zeros(0, WIDTH), folder / "none.pt")
    result = EmbeddingLoader(str(folder), WIDTH).lookup("none")
    assert result.status == "found" and result.vectors.shape == (0, WIDTH)


def test_cache_follows_file_changes(folder):
    loader = EmbeddingLoader(str(folder), WIDTH, cache_size=2)
    torch.save(vectors(1, seed=1), folder / "e.pt")
    first = loader.lookup("e").vectors
    assert loader.lookup("e").vectors is first
    torch.save(vectors(2, seed=2), folder / "e.pt")
    os.utime(folder / "e.pt", ns=(1, 10**18))
    assert loader.lookup("e").vectors.shape == (2, WIDTH)


# --- safety ------------------------------------------------------------------------

_AUDIT = {"active": False, "opened": []}


def _audit(event, args):
    if _AUDIT["active"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _AUDIT["opened"].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def test_traversal_and_symlinks_are_refused_and_never_opened(tmp_path, folder):
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save(vectors(1), outside / "secret.pt")
    torch.save(vectors(1), tmp_path / "secret.pt")
    os.symlink(outside / "secret.pt", folder / "link.pt")
    os.symlink(outside, folder / "linkdir")
    tok = SDTokenizer(embedding_directory=str(folder))
    names = ["../secret", "../outside/secret.pt", str(outside / "secret"), "link", "linkdir/secret", ".", "..",
             "sub/../../secret", "..\\secret"]
    _AUDIT["opened"].clear()
    _AUDIT["active"] = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name in names:
                tok.tokenize_with_weights(f"embedding:{name} cat")
    finally:
        _AUDIT["active"] = False
    root = os.path.realpath(folder)
    assert [p for p in _AUDIT["opened"] if not os.path.realpath(p).startswith(root + os.sep)] == []
    assert len([w for w in caught if issubclass(w.category, EmbeddingWarning)]) == len(names)
    assert EmbeddingLoader(str(folder), WIDTH).lookup("link").status == "rejected"
    assert EmbeddingLoader(str(folder), WIDTH).lookup("").status == "rejected"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickles_never_execute(tmp_path, folder):
    marker = tmp_path / "marker"
    torch.save({"string_to_param": {"*": _Evil(str(marker))}}, folder / "evil.pt")
    (folder / "evil2.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    for name in ["evil", "evil2"]:
        result = EmbeddingLoader(str(folder), WIDTH).lookup(name)
        assert result.status == "rejected"
    assert not marker.exists()


def _torch_zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_zip_bomb_is_refused_within_memory(folder):
    pkl = zipfile.ZipFile(_save_legacy_like(folder / "template.pt")).read("archive/data.pkl")
    _torch_zip(folder / "bomb.pt", {"archive/data.pkl": pkl, "archive/data/0": b"\0" * (80 << 20)},
               zipfile.ZIP_DEFLATED)
    assert os.path.getsize(folder / "bomb.pt") < 512 * 1024
    tracemalloc.start()
    try:
        result = EmbeddingLoader(str(folder), WIDTH).lookup("bomb")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.status == "rejected" and "limit" in result.reason
    assert peak < 64 << 20


def _save_legacy_like(path, value=None):
    """A torch zip whose pickle names a storage but which weights_only refuses."""
    value = vectors(2, dtype=torch.float16) if value is None else value
    torch.save({"string_to_param": {"*": value}, "extra": _Unsafe()}, path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    renamed = {"archive/" + name.split("/", 1)[1]: data for name, data in members.items()}
    _torch_zip(path, renamed)
    return path


class _Unsafe:  # a global weights_only refuses, which the fallback must not import
    pass


def test_fallback_reader_honours_stored_dtype(folder):
    value = vectors(2, dtype=torch.float16)
    _save_legacy_like(folder / "legacy.pt", value)
    with pytest.raises(Exception):
        torch.load(folder / "legacy.pt", weights_only=True)
    loaded = load_embed("legacy", str(folder), WIDTH)
    assert loaded.dtype == torch.float16 and torch.equal(loaded, value)


def test_threads_share_the_loader(folder):
    import concurrent.futures

    save_file({"emb_params": vectors(2)}, folder / "t.safetensors")
    tok = SDTokenizer(embedding_directory=str(folder))
    expected = tok.tokenize_with_weights("embedding:t (cat:1.2)")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: tok.tokenize_with_weights("embedding:t (cat:1.2)"), range(32)))
    for result in results:
        assert all((torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b) and w == v
                   for (a, w), (b, v) in zip(result[0], expected[0]))


# --- names with commas, value bound, messages (issues 15 and 16) ----------------------------

def test_commas_are_stripped_at_both_ends_and_stay_as_text(folder):
    """ComfyUI's ``_try_get_embedding`` retries ``name.strip(',')``; the commas stay text here."""
    value = vectors(2)
    save_file({"emb_params": value}, folder / "EasyNegative.safetensors")
    tok, plain = SDTokenizer(embedding_directory=str(folder)), SDTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingWarning)
        for prompt, before, after in [("embedding:,,EasyNegative lowres", ",,", " lowres"),
                                      ("embedding:EasyNegative,, lowres", "", ",, lowres"),
                                      ("embedding:,EasyNegative, lowres", ",", ", lowres")]:
            out = [t for t, _, _ in tokens_of(tok, prompt)]
            head, tail = plain.encode_units([before])[0] if before else [], plain.encode_units([after])[0]
            assert out[1:len(head) + 1] == head, prompt
            assert [torch.equal(t, v) for t, v in zip(out[len(head) + 1:len(head) + 3], value)] == [True, True]
            assert out[len(head) + 3:len(head) + 3 + len(tail) + 1] == tail + [END], prompt


def test_huge_valued_embedding_is_refused_and_the_rest_encodes(folder):
    save_file({"emb_params": torch.full((1, WIDTH), 1e30)}, folder / "huge.safetensors")
    save_file({"emb_params": torch.full((1, WIDTH), 16384.0)}, folder / "edge.safetensors")
    tok, plain = SDTokenizer(embedding_directory=str(folder)), SDTokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tokens_of(tok, "a embedding:huge cat")
    assert len(caught) == 1 and caught[0].filename == __file__
    message = str(caught[0].message)
    assert "huge.safetensors" in message and "magnitude 1e+30" in message and "16384" in message
    assert [(t, w) for t, w, _ in out] == [(t, w) for t, w, _ in tokens_of(plain, "a cat")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddingWarning)
        report = tok.inspect("embedding:huge x")
    assert [e.status for e in report.embeddings] == ["rejected"] and report.rejected[0].name == "huge"
    assert EmbeddingLoader(str(folder), WIDTH).lookup("edge").status == "found"  # the bound itself passes
    assert EmbeddingLoader(str(folder), WIDTH, max_abs_value=1e31).lookup("huge").status == "found"


def test_missing_messages_say_which_case_and_point_at_the_caller(folder, tmp_path):
    save_file({"emb_params": vectors(1)}, folder / "sub" / "watercolor.safetensors")
    cases = [
        (SDTokenizer(), "embedding:watercolr cat", r"embedding:watercolr read as text: no embedding directory was given"),
        (SDTokenizer(embedding_directory=str(tmp_path / "nope")), "embedding:watercolr cat",
         r"missing: embedding directory '.*nope' does not exist"),
        (SDTokenizer(embedding_directory=str(folder)), "embedding:watercolr cat",
         r"missing: no embedding named 'watercolr' in '.*embeddings' \(did you mean 'sub/watercolor'\?\)"),
        (SDTokenizer(embedding_directory=[str(folder), str(tmp_path / "gone")]), "embedding:zzz cat",
         r"no embedding named 'zzz' in '.*embeddings'; directory '.*gone' does not exist"),
    ]
    for tok, prompt, pattern in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok.tokenize_with_weights(prompt)
        assert len(caught) == 1 and caught[0].category is EmbeddingWarning
        assert caught[0].filename == __file__, caught[0].filename
        assert __import__("re").search(pattern, str(caught[0].message)), str(caught[0].message)
    assert EmbeddingLoader(None, WIDTH).lookup("x").reason == "no embedding directory was given"


def test_tokenizer_looks_embeddings_up_in_its_directories(folder):
    value = vectors(2)
    torch.save({"string_to_param": {"*": value}}, folder / "sub" / "style.pt")
    tok = SDTokenizer(embedding_directory=str(folder))
    assert tok.embedding_directories == [str(folder)]
    found = tok.lookup_embedding("style")
    assert found.status == "found" and torch.equal(found.vectors, value)
    assert found.path == os.path.realpath(folder / "sub" / "style.pt")
    missing = tok.lookup_embedding("sub/styles")
    assert missing.status == "missing" and "did you mean 'sub/style'" in missing.reason
    bare = SDTokenizer()
    assert bare.embedding_directories == []
    assert bare.lookup_embedding("style").status == "missing"
    assert bare.lookup_embedding("style").reason == "no embedding directory was given"
