"""Tests for textenc.loading.checkpoint: safe loading and typed errors on hostile files."""

from __future__ import annotations

import ast
import builtins
import json
import pickle
import resource
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from textenc.loading.checkpoint import check_finite, load_state_dict, read_safetensors_header
from textenc.errors import CheckpointError, TextencError

TEXTENC_DIR = Path(__file__).resolve().parent.parent / "textenc"


def _write_safetensors(path: Path, header: dict, data: bytes = b"", *, raw_len: int | None = None) -> Path:
    """Write a safetensors file by hand, so tests can make malformed ones."""
    encoded = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded) if raw_len is None else raw_len))
        handle.write(encoded)
        handle.write(data)
    return path


def _expect_error(path: Path, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


def _resident_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- good files ---------------------------------------------------------------


def test_safetensors_round_trip(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, tmp_path / "m.safetensors")
    loaded = load_state_dict(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)
    entries = read_safetensors_header(tmp_path / "m.safetensors")
    assert sorted(entry.name for entry in entries) == ["a", "b"]
    assert all(entry.end - entry.begin == tensors[entry.name].nbytes for entry in entries)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".pth"])
def test_torch_round_trip_unwraps_state_dict(tmp_path: Path, suffix: str) -> None:
    tensors = {"w": torch.randn(2, 2)}
    torch.save({"state_dict": tensors, "global_step": 7}, tmp_path / f"m{suffix}")
    loaded = load_state_dict(tmp_path / f"m{suffix}")
    assert torch.equal(loaded["w"], tensors["w"]) and list(loaded) == ["w"]


def test_legacy_torch_format_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(3))


def test_big_sparse_safetensors_is_memory_mapped(tmp_path: Path) -> None:
    size = 2**30  # 1 GiB of zeros, sparse on disk.
    path = _write_safetensors(tmp_path / "big.safetensors",
                              {"x": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size + size)
    resident, peak = _resident_mb(), _peak_mb()
    loaded = load_state_dict(path)
    assert loaded["x"].shape == (size,)
    assert _resident_mb() - resident <= 64
    assert _peak_mb() - peak <= 64


# -- path problems ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.safetensors", "does not exist")


def test_directory(tmp_path: Path) -> None:
    _expect_error(tmp_path, "directory")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    _expect_error(path, "empty")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    _expect_error(path, "extension")


# -- hostile safetensors ---------------------------------------------------------


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_truncated_safetensors(tmp_path: Path) -> None:
    save_file({"a": torch.randn(64, 64)}, tmp_path / "full.safetensors")
    raw = (tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[: len(raw) // 2])
    _expect_error(path, "truncated")


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    _expect_error(path, "truncated")


def test_header_length_beyond_file(tmp_path: Path) -> None:
    path = _write_safetensors(tmp_path / "h.safetensors", {}, raw_len=10**12)
    _expect_error(path, "header claims")


def test_huge_tensor_claim_allocates_nothing(tmp_path: Path) -> None:
    size = 100 * 2**30  # 100 GiB claimed, 16 bytes present.
    path = _write_safetensors(tmp_path / "huge.safetensors",
                              {"x": _entry("U8", [size], 0, size)}, b"\0" * 16)
    peak = _peak_mb()
    _expect_error(path, "truncated")
    assert _peak_mb() - peak <= 64


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}
    _expect_error(_write_safetensors(tmp_path / "o.safetensors", header, b"\0" * 24), "overlap")


def test_duplicate_keys_in_header(tmp_path: Path) -> None:
    encoded = ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
               '"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}').encode()
    path = tmp_path / "d.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * 8)
    _expect_error(path, "duplicate key 'a'")


def test_unknown_dtype(tmp_path: Path) -> None:
    path = _write_safetensors(tmp_path / "x9.safetensors", {"a": _entry("X9", [1], 0, 4)}, b"\0" * 4)
    _expect_error(path, "unknown dtype 'X9'")


def test_shape_does_not_match_span(tmp_path: Path) -> None:
    path = _write_safetensors(tmp_path / "s.safetensors", {"a": _entry("F32", [3], 0, 8)}, b"\0" * 8)
    _expect_error(path, "needs 12 bytes")


@pytest.mark.parametrize("header", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_header_not_a_json_object(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "j.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    _expect_error(path, "header")


def test_bad_record(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}
    _expect_error(_write_safetensors(tmp_path / "r.safetensors", header, b"\0" * 4), "non-negative")


# -- hostile pickles ---------------------------------------------------------------


class _WritesMarker:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch_zip_pt", "torch_zip_ckpt", "torch_legacy_ckpt", "raw_pickle_bin"])
def test_malicious_pickle_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.ones(1), "evil": _WritesMarker(marker)}}
    suffix = {"torch_zip_pt": ".pt", "raw_pickle_bin": ".bin"}.get(writer, ".ckpt")
    path = tmp_path / f"evil{suffix}"
    if writer == "raw_pickle_bin":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer != "torch_legacy_ckpt")
    error = _expect_error(path)
    assert not marker.exists()
    assert "weights_only=False" not in str(error) and "never runs code" in str(error)
    if writer != "raw_pickle_bin":  # The refused global is named.
        assert "io.open" in str(error) and "safetensors" in str(error)


def test_non_tensor_values_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(1), "step": 3}, path)
    _expect_error(path, "'step'", "not a tensor")


def test_not_a_dict_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    _expect_error(path, "not a state dict")


def test_truncated_zip(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(256)}, path)
    path.write_bytes(path.read_bytes()[:300])
    _expect_error(path, "truncated")


def test_zip_member_declaring_huge_size(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    torch.save({"w": torch.randn(16)}, path)
    raw = bytearray(path.read_bytes())
    central = raw.find(b"PK\x01\x02")  # First central-directory record.
    assert central > 0
    raw[central + 20: central + 28] = struct.pack("<II", 0x7FFFFFF0, 0x7FFFFFF0)
    path.write_bytes(bytes(raw))
    peak = _peak_mb()
    _expect_error(path, "declares")
    assert _peak_mb() - peak <= 64


def test_old_torch_refused_for_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(1)}, path)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    _expect_error(path, "torch >= 2.10")


# -- finiteness ----------------------------------------------------------------------


def test_check_finite_names_first_bad_key(tmp_path: Path) -> None:
    tensors = {"ok": torch.ones(2), "bad": torch.tensor([1.0, float("inf")]), "ids": torch.arange(3)}
    save_file(tensors, tmp_path / "nan.safetensors")
    assert load_state_dict(tmp_path / "nan.safetensors")  # Off by default.
    _expect_error_finite = pytest.raises(CheckpointError, match="'bad'")
    with _expect_error_finite:
        load_state_dict(tmp_path / "nan.safetensors", require_finite=True)
    with pytest.raises(CheckpointError, match="nan.safetensors"):
        check_finite(load_state_dict(tmp_path / "nan.safetensors"), tmp_path / "nan.safetensors")


# -- source audit ----------------------------------------------------------------------


def _unsafe_calls(source: str) -> list[str]:
    """Calls to torch.load without weights_only=True, and any pickle.load(s)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "dill"):
            problems += [f"from {node.module} import {alias.name}" for alias in node.names
                         if alias.name in ("load", "loads", "Unpickler")]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        if owner == "torch" and node.func.attr == "load":
            safe = any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant)
                       and kw.value.value is True for kw in node.keywords)
            if not safe:
                problems.append(f"line {node.lineno}: torch.load without weights_only=True")
        if owner in ("pickle", "_pickle", "dill") and node.func.attr in ("load", "loads", "Unpickler"):
            problems.append(f"line {node.lineno}: {owner}.{node.func.attr}")
    return problems


def test_audit_detects_unsafe_calls() -> None:
    bad = "import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
    assert len(_unsafe_calls(bad)) == 3
    assert _unsafe_calls("torch.load(p, map_location='cpu', weights_only=True)\n") == []


def test_textenc_never_unpickles_unsafely() -> None:
    files = sorted(TEXTENC_DIR.rglob("*.py"))
    assert files
    problems = {str(file): _unsafe_calls(file.read_text()) for file in files}
    assert {file: found for file, found in problems.items() if found} == {}


# -- nested pickles (PhotoMaker-style) -----------------------------------------------


def test_nested_dicts_refused_by_default_with_the_option_named(tmp_path: Path) -> None:
    path = tmp_path / "photomaker.bin"
    torch.save({"id_encoder": {"w": torch.ones(1)}, "lora_weights": {"x": torch.ones(1)}}, path)
    _expect_error(path, "'id_encoder'", "not a tensor", "nested='flatten'")


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_nested_flatten_joins_keys_with_dots(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"photomaker{suffix}"
    inner = {"vision_model": {"w": torch.ones(2)}, "b": torch.zeros(1)}
    torch.save({"id_encoder": inner, "lora_weights": {"x": torch.ones(3)}, "top": torch.ones(4)}, path)
    loaded = load_state_dict(path, nested="flatten")
    assert list(loaded) == ["id_encoder.vision_model.w", "id_encoder.b", "lora_weights.x", "top"]
    assert torch.equal(loaded["id_encoder.vision_model.w"], torch.ones(2))
    flat = tmp_path / "flat.pt"
    torch.save({"w": torch.ones(1)}, flat)
    assert list(load_state_dict(flat, nested="flatten")) == ["w"]


def test_nested_flatten_still_refuses_non_tensors_and_collisions(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.bin"
    torch.save({"id_encoder": {"w": torch.ones(1), "step": 3}}, mixed)
    with pytest.raises(CheckpointError, match=r"'id_encoder\.step' is a int, not a tensor"):
        load_state_dict(mixed, nested="flatten")
    twice = tmp_path / "twice.bin"
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, twice)
    with pytest.raises(CheckpointError, match=r"'a\.b' is in the file twice"):
        load_state_dict(twice, nested="flatten")
    deep: dict = {"w": torch.ones(1)}
    for _ in range(9):
        deep = {"d": deep}
    too_deep = tmp_path / "deep.bin"
    torch.save(deep, too_deep)
    with pytest.raises(CheckpointError, match="more than 8 levels deep"):
        load_state_dict(too_deep, nested="flatten")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_nested_flatten_stays_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"id_encoder": {"w": torch.ones(1), "evil": _WritesMarker(marker)}}, path)
    with pytest.raises(CheckpointError, match="never runs code"):
        load_state_dict(path, nested="flatten")
    assert not marker.exists()


def test_nested_option_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(TextencError, match="nested='refuse' or nested='flatten'"):
        load_state_dict(path, nested="merge")  # type: ignore[arg-type]


def test_self_referencing_pickle_is_refused_when_flattening(tmp_path: Path) -> None:
    loop: dict = {"w": torch.ones(1)}
    loop["self"] = loop
    path = tmp_path / "loop.pt"
    torch.save(loop, path)
    with pytest.raises(CheckpointError, match="levels deep"):
        load_state_dict(path, nested="flatten")
