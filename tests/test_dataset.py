"""encode-dataset: exactness against direct encoding, ids, crash/resume, refusals,
the Ray engine, bad input, readers and exporters (tiny random CLIP, real SD1 layout)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dataset_fixtures import encoder, folder_bytes, random_captions, ray_session
from textenc.dataset import encode_dataset, export_diffusers, export_kohya, main, open_shards
from textenc.dataset.format import TEMP_SUFFIX
from textenc.errors import DatasetError

NUM_CAPTIONS = 1500
SHARD_ROWS = 250

pytestmark = pytest.mark.usefixtures("one_torch_thread")
_encode = encoder(dtype="fp32", shard_rows=SHARD_ROWS, batch_size=64)
_files = folder_bytes


class Interrupted(RuntimeError):
    """Raised from the writer hook to simulate a killed run."""


@pytest.fixture(scope="module")
def clip(tiny_model):
    from textenc.sd import load_clip
    return load_clip(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> tuple[Path, list[str]]:
    return random_captions(tmp_path_factory, NUM_CAPTIONS, seed=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, captions, tiny_model):
    """One uninterrupted local run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    report = _encode(captions[0], tiny_model, out)
    return out, report


# ---- exactness ----------------------------------------------------------------------

def test_every_caption_equals_a_direct_encode(reference, captions, clip):
    out, report = reference
    texts = captions[1]
    seen = []
    for caption_id, cond, pooled in open_shards(out):
        direct_cond, direct_pooled = clip.encode_from_tokens(clip.tokenize(texts[caption_id]),
                                                             return_pooled=True)
        assert torch.equal(cond, direct_cond[0]), caption_id
        assert torch.equal(pooled, direct_pooled[0]), caption_id
        seen.append(caption_id)
    assert seen == list(range(NUM_CAPTIONS))  # complete, unique, in input order
    assert report.encoded == NUM_CAPTIONS and not report.rejected
    assert sum(report.windows_histogram.values()) == NUM_CAPTIONS
    assert len(report.windows_histogram) > 1  # short and long captions were batched apart


def test_weighted_and_clip_skip_match_direct(tmp_path, captions, tiny_model, clip):
    _encode(captions[0], tiny_model, tmp_path, clip_skip=2, weight_mode="a1111", limit=300)
    options = {"layer": -2, "weight_mode": "a1111"}
    for caption_id, cond, pooled in open_shards(tmp_path):
        tokens = clip.tokenize(captions[1][caption_id])
        direct_cond, direct_pooled = clip.encode_from_tokens(tokens, return_pooled=True, options=options)
        assert torch.equal(cond, direct_cond[0])
        # The pooled row of an intermediate layer: a few ulp (see test_dataset_batching).
        assert (pooled - direct_pooled[0]).abs().max() <= 1e-6 * max(1.0, direct_pooled.abs().max())


def test_shard_layout_and_manifest(reference):
    out, _ = reference
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == NUM_CAPTIONS // SHARD_ROWS
    assert manifest["totals"]["encoded"] == NUM_CAPTIONS
    with safe_open(str(out / "shard-00001.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        offsets = handle.get_tensor("window_offsets")
        assert handle.get_tensor("ids").tolist() == list(range(SHARD_ROWS, 2 * SHARD_ROWS))
        assert handle.get_tensor("cond").shape[0] == int(offsets[-1]) * 77
        assert handle.get_tensor("pooled").shape == (SHARD_ROWS, 128)
    assert json.loads(metadata["options"])["dtype"] == "fp32"
    assert metadata["model_fingerprint"] == manifest["model_fingerprint"]
    with safe_open(str(out / "empty.safetensors"), "pt") as handle:
        assert handle.get_tensor("cond").shape == (77, 128)


@pytest.mark.parametrize("file", ["../outside.safetensors", "/etc/passwd", "shard-00001.safetensors", None])
def test_manifest_cannot_point_readers_outside_the_folder(tmp_path, reference, file):
    """A shard entry must name that shard's own file in the folder: a path
    elsewhere (or another shard's name) is refused before anything is opened."""
    folder = tmp_path / "out"
    folder.mkdir()
    for name, data in _files(reference[0]).items():
        (folder / name).write_bytes(data)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / "shard-00000.safetensors").read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["file"] = file
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="does not name this folder's shard file"):
        next(open_shards(folder))


def test_unreadable_shard_is_a_dataset_error(tmp_path, reference):
    for name, data in _files(reference[0]).items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "shard-00000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DatasetError, match="shard-00000.safetensors: unreadable shard"):
        next(open_shards(tmp_path, verify=False))  # with the sha256 check, that refuses it first


# ---- resume -----------------------------------------------------------------------------

def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, reference, captions, tiny_model):
    finished = []

    def crash_after_two(index: int) -> None:
        finished.append(index)
        if len(finished) == 2:
            raise Interrupted("simulated kill")

    with pytest.raises(Interrupted):
        _encode(captions[0], tiny_model, tmp_path, on_shard_written=crash_after_two)
    (tmp_path / ("shard-00004.safetensors" + TEMP_SUFFIX)).write_bytes(b"half a shard")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.safetensors")}
    report = _encode(captions[0], tiny_model, tmp_path)
    assert report.shards_skipped == 2 and report.shards_written == report.shards - 2
    for name, mtime in before.items():
        assert (tmp_path / name).stat().st_mtime_ns == mtime  # skipped, not rewritten
    assert _files(tmp_path) == _files(reference[0])  # also: no temporary file left


def test_damaged_or_missing_shard_is_rebuilt_identically(tmp_path, reference, captions, tiny_model):
    _encode(captions[0], tiny_model, tmp_path, limit=500)
    damaged = tmp_path / "shard-00000.safetensors"
    original = damaged.read_bytes()
    damaged.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    (tmp_path / "shard-00001.safetensors").unlink()
    report = _encode(captions[0], tiny_model, tmp_path, limit=500)
    assert report.shards_written == 2 and damaged.read_bytes() == original


def test_changed_options_or_model_are_refused(tmp_path, captions, tiny_model, capsys):
    _encode(captions[0], tiny_model, tmp_path, limit=50)
    with pytest.raises(DatasetError, match="different options"):
        _encode(captions[0], tiny_model, tmp_path, limit=50, dtype="fp16")
    code = main([str(captions[0]), "--model", str(tiny_model), "--out", str(tmp_path),
                 "--limit", "50", "--shard-rows", str(SHARD_ROWS), "--no-progress"])
    assert code == 1  # a runtime error (2 is for usage errors)
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--overwrite" in error
    other = tmp_path.parent / "other_model.safetensors"
    state = {k: v.clone() for k, v in safe_open_all(tiny_model).items()}
    first = sorted(state)[0]
    state[first] = state[first] + 1
    save_file(state, str(other))
    with pytest.raises(DatasetError, match="model_fingerprint"):
        _encode(captions[0], other, tmp_path, limit=50)
    report = _encode(captions[0], tiny_model, tmp_path, limit=50, dtype="fp16", overwrite=True)
    assert report.shards_written == 1


def safe_open_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# ---- ray ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_engine_writes_the_same_bytes(tmp_path, reference, captions, tiny_model):
    with ray_session(150):
        report = _encode(captions[0], tiny_model, tmp_path, engine="ray", workers=2)
    assert report.shards_written == NUM_CAPTIONS // SHARD_ROWS
    assert _files(tmp_path) == _files(reference[0])


def test_ray_missing_is_a_typed_error(monkeypatch, tmp_path, captions, tiny_model):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(DatasetError, match=r"textenc\[ray\]"):
        _encode(captions[0], tiny_model, tmp_path, engine="ray", limit=10)


# ---- bad input ----------------------------------------------------------------------------

def _all_rows_once(out: Path, num_rows: int) -> tuple[list, list]:
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        with safe_open(str(out / shard["file"]), "pt") as handle:
            rows += handle.get_tensor("rows").tolist()
    rejected = [entry["row"] for entry in manifest["rejected"]]
    assert sorted(rows + rejected) == list(range(num_rows))
    return rows, manifest["rejected"]


def test_bad_rows_are_rejected_with_reasons_and_no_row_is_lost(tmp_path, tiny_model):
    path = tmp_path / "bad.txt"
    lines = [b"a red cat", b"caf\xe9 latin-1", b"x" * 1_000_000, b"(bad:weight", b"", b"a dog"]
    path.write_bytes(b"\n".join(lines * 3) + b"\n")
    _, rejected = _all_rows_once(_run(path, tiny_model, tmp_path / "out", shard_rows=4), 18)
    reasons = {entry["row"] % 6: entry["reason"] for entry in rejected}
    assert "UTF-8" in reasons[1] and "max_chars" in reasons[2]
    assert set(reasons) <= {1, 2, 3}


def _run(path, model, out, **kwargs) -> Path:
    encode_dataset(path, model=model, out=out, dtype="fp32", progress=False, **kwargs)
    return out


def test_jsonl_bad_lines_and_missing_column(tmp_path, tiny_model):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "a cat", "key": "k0"}\n{"text": \n{"caption": "x", "key": "k2"}\n'
                     b'{"text": "caf\xe9", "key": "k3"}\n\n{"text": "a dog", "key": "k4"}\n')
    out = _run(path, tiny_model, tmp_path / "out", id_column="key")
    rows, rejected = _all_rows_once(out, 5)
    assert rows == [0, 4] and len(rejected) == 3
    assert [caption_id for caption_id, _, _ in open_shards(out)] == ["k0", "k4"]
    with pytest.raises(DatasetError, match=r"no line has the column 'caption_text'; columns are "
                                           r"\['text', 'key', 'caption'\] \(choose one with --column\)"):
        _run(path, tiny_model, tmp_path / "out2", column="caption_text")
    with pytest.raises(DatasetError, match=r"no line has the column 'id'; columns are \['text', 'key', "
                                           r"'caption'\] \(choose one with --id-column\)"):
        _run(path, tiny_model, tmp_path / "out2", id_column="id")


def test_column_options_with_an_input_that_has_no_columns(tmp_path, tiny_model):
    path = tmp_path / "c.txt"
    path.write_text("a cat\n")
    for options in ({"column": "caption"}, {"id_column": "key"}):
        with pytest.raises(DatasetError, match="a txt input has no columns .* for parquet and jsonl"):
            _run(path, tiny_model, tmp_path / "out", **options)


def test_empty_and_missing_inputs_are_typed_errors(tmp_path, tiny_model):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        _run(empty, tiny_model, tmp_path / "out")
    with pytest.raises(DatasetError, match="no such"):
        _run(tmp_path / "nope.jsonl", tiny_model, tmp_path / "out")
    with pytest.raises(DatasetError, match="unknown input type"):
        (tmp_path / "x.csv").write_text("a")
        _run(tmp_path / "x.csv", tiny_model, tmp_path / "out")


def test_parquet_string_ids_and_missing_column(tmp_path, tiny_model, clip):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "pq"
    folder.mkdir()
    for part in range(2):
        table = pa.table({"caption": [f"a photo {part} {i}" for i in range(5)],
                          "key": [f"img/{part}_{i}" for i in range(5)]})
        pq.write_table(table, folder / f"part-{part}.parquet")
    out = _run(folder, tiny_model, tmp_path / "out", column="caption", id_column="key", shard_rows=3)
    got = list(open_shards(out))
    assert [caption_id for caption_id, _, _ in got] == [f"img/{p}_{i}" for p in range(2) for i in range(5)]
    direct = clip.encode_from_tokens(clip.tokenize("a photo 1 4"), return_pooled=True)
    assert torch.equal(got[-1][1], direct[0][0]) and torch.equal(got[-1][2], direct[1][0])
    with pytest.raises(DatasetError, match=r"no column 'text'; columns are \['caption', 'key'\]"):
        _run(folder, tiny_model, tmp_path / "out2")


def test_kohya_folder_dry_run_and_exporters(tmp_path, tiny_model, capsys):
    folder = tmp_path / "kohya" / "sub"
    folder.mkdir(parents=True)
    (folder / "b.txt").write_text("a blue house\n")
    (folder.parent / "a.txt").write_text("a red cat")
    out = tmp_path / "out"
    code = main([str(folder.parent), "--model", str(tiny_model), "--out", str(out), "--dry-run"])
    assert code == 0 and not out.exists()
    printed = capsys.readouterr().out
    assert "shard-00000.safetensors" in printed and "estimated output size" in printed
    _run(folder.parent, tiny_model, out)
    assert [caption_id for caption_id, _, _ in open_shards(out)] == ["a", "sub/b"]
    assert export_diffusers(out, tmp_path / "diffusers") == 2
    with safe_open(str(tmp_path / "diffusers" / "sub" / "b.safetensors"), "pt") as handle:
        assert handle.get_tensor("prompt_embeds").shape == (1, 77, 128)
        assert handle.get_tensor("pooled_prompt_embeds").shape == (1, 128)
    assert export_kohya(out, tmp_path / "kohya_out") == 2
    import numpy as np
    arrays = np.load(tmp_path / "kohya_out" / "a_te_outputs.npz")
    assert arrays["hidden_state"].shape == (77, 128) and arrays["pool"].shape == (128,)


def test_pooled_only_outputs(tmp_path, captions, tiny_model):
    out = _run(captions[0], tiny_model, tmp_path / "out", outputs="pooled", limit=20)
    items = list(open_shards(out))
    assert len(items) == 20 and all(cond is None for _, cond, _ in items)


def test_diffusers_model_folder(tmp_path, reference, captions, tiny_model):
    diffusers_module = pytest.importorskip(
        "textenc.diffusers", reason="textenc/diffusers.py (load_from_diffusers) is not in this checkout yet")
    if not hasattr(diffusers_module, "load_from_diffusers"):
        pytest.skip("textenc.diffusers has no load_from_diffusers yet")
    _encode(captions[0], tiny_model.parent / "diffusers", tmp_path, limit=SHARD_ROWS)
    name = "shard-00000.safetensors"
    with safe_open(str(reference[0] / name), "pt") as ref, safe_open(str(tmp_path / name), "pt") as got:
        assert ref.metadata()["model_fingerprint"] == got.metadata()["model_fingerprint"]
        for key in ("ids", "window_offsets", "cond", "pooled"):
            assert torch.equal(ref.get_tensor(key), got.get_tensor(key)), key


def test_no_process_state_leaks(tmp_path, captions, tiny_model):
    assert os.environ.get("TEXTENC_DATASET") is None
    before = threading.active_count()
    _run(captions[0], tiny_model, tmp_path / "out", limit=10)
    assert threading.active_count() == before  # the tokenizer thread is joined
