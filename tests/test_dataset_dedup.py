"""A caption repeated anywhere in a run (within a shard or in another one) is encoded once
and written for each of its rows; the bytes are those of encoding every row."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors import safe_open

from dataset_fixtures import folder_bytes
from textenc.dataset import encode_dataset, open_shards
from textenc.sd import load_clip

SHARD_ROWS = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(4)
    pool = ["a cat", "a (red:1.2) house at night", "", "x " * 90, "long " * 200, "a dog", "portrait"]
    texts = [rng.choice(pool) for _ in range(60)] + [f"unique caption {i}" for i in range(60)]
    rng.shuffle(texts)
    return texts


def _expected_reused(texts: list[str], max_chars: int, *, across_shards: bool) -> int:
    """Rows whose caption occurred earlier (in the same shard, or anywhere before), not rejected."""
    count = 0
    seen = set()
    for start in range(0, len(texts), SHARD_ROWS):
        if not across_shards:
            seen = set()
        for text in texts[start:start + SHARD_ROWS]:
            if text in seen and len(text) <= max_chars:
                count += 1
            seen.add(text)
    return count


def _encode(tmp_path, texts, name, **kwargs):
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return encode_dataset(path, model=kwargs.pop("model"), out=tmp_path / name, dtype="fp32",
                          shard_rows=SHARD_ROWS, batch_size=8, max_chars=600, progress=False, **kwargs)


def test_repeats_are_encoded_once_and_written_for_each_row(tmp_path, tiny_model, texts):
    report = _encode(tmp_path, texts, "dedup", model=tiny_model)
    expected = _expected_reused(texts, 600, across_shards=True)
    within = _expected_reused(texts, 600, across_shards=False)
    assert within > 30 and expected > within and report.reused == expected
    assert f"{expected} reused" in report.summary()
    # The manifest counts repeats within each shard: the same whichever shards one run encoded.
    manifest = json.loads((tmp_path / "dedup" / "manifest.json").read_text())
    assert manifest["totals"]["reused"] == within
    assert sum(s["reused"] for s in manifest["shards"]) == within
    # The row mapping: every row holds its own caption's encoding, in input order.
    clip = load_clip(str(tiny_model))
    seen = []
    for row, cond, pooled in open_shards(tmp_path / "dedup"):
        direct_cond, direct_pooled = clip.encode_from_tokens(clip.tokenize(texts[row]), return_pooled=True)
        assert torch.equal(cond, direct_cond[0]) and torch.equal(pooled, direct_pooled[0]), row
        seen.append(row)
    rejected = {entry["row"]: entry["reason"] for entry in manifest["rejected"]}
    assert sorted(seen + list(rejected)) == list(range(len(texts)))
    assert {texts[r] for r in rejected} == {"long " * 200}  # every repeat of it, same reason
    assert len(set(rejected.values())) == 1


def test_without_dedup_the_same_tensors(tmp_path, tiny_model, texts):
    _encode(tmp_path, texts, "dedup", model=tiny_model)
    report = _encode(tmp_path, texts, "plain", model=tiny_model, dedup=False)
    assert report.reused == 0
    for index in range(len(texts) // SHARD_ROWS):
        name = f"shard-{index:05d}.safetensors"
        with safe_open(str(tmp_path / "dedup" / name), "pt") as a, \
                safe_open(str(tmp_path / "plain" / name), "pt") as b:
            assert a.keys() == b.keys()
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (name, key)


@pytest.mark.parametrize("reuse_bytes", [None, 1])
def test_repeats_in_other_shards_are_reused_with_the_same_bytes(tmp_path, tiny_model, monkeypatch, reuse_bytes):
    """Every row after the first shard repeats a caption of an earlier shard (one of them
    rejected, too long); at REUSE_BYTES=1 only one encoding is kept past its shard."""
    import textenc.dataset.pipeline as pipeline

    if reuse_bytes is not None:
        monkeypatch.setattr(pipeline, "REUSE_BYTES", reuse_bytes)
    base = ["a cat", "a (red:1.2) house at night", "x " * 90, "long " * 200, "a dog"] * 8  # 40 rows
    texts = base + base[::-1] + base[3:] + base[:3]
    report = _encode(tmp_path, texts, "dedup", model=tiny_model)
    plain = _encode(tmp_path, texts, "plain", model=tiny_model, dedup=False)
    for name in (f"shard-{index:05d}.safetensors" for index in range(3)):  # the metadata records dedup
        with safe_open(str(tmp_path / "dedup" / name), "pt") as a, safe_open(str(tmp_path / "plain" / name), "pt") as b:
            assert a.keys() == b.keys()
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (name, key)
    assert report.rejected == plain.rejected and len(report.rejected) == 24  # every "long " row
    within = _expected_reused(texts, 600, across_shards=False)
    if reuse_bytes is None:
        assert report.reused == 96 - 4  # every kept row but the first of each caption
    else:
        assert within < report.reused < 96 - 4
    # A resumed run writes the same folder, manifest included (it counts repeats per shard).
    fresh = folder_bytes(tmp_path / "dedup")
    for index in (1, 2):
        (tmp_path / "dedup" / f"shard-{index:05d}.safetensors").unlink()
    resumed = _encode(tmp_path, texts, "dedup", model=tiny_model)
    assert resumed.shards_written == 2 and folder_bytes(tmp_path / "dedup") == fresh


def test_a_finished_rerun_says_so_and_small_runs_show_a_rate(tmp_path, tiny_model):
    texts = ["a cat", "a dog"] * 5
    first = _encode(tmp_path, texts, "out", model=tiny_model)
    assert re.search(r"wrote 1 of 1 shards \(0 skipped\), [0-9.]+ MB; [0-9.]+ captions/s$", first.summary())
    rate = first.summary().rsplit("; ", 1)[1].split()[0]
    assert float(rate) > 0, first.summary()  # three digits, not "0"
    again = _encode(tmp_path, texts, "out", model=tiny_model)
    assert "already complete: all 1 shards were written by an earlier run, nothing to encode" in again.summary()
    assert "captions/s" not in again.summary() and "wrote 0" not in again.summary()


@pytest.mark.slow
def test_ray_reuses_repeats_across_shards_with_the_local_bytes(tmp_path, tiny_model):
    """With Ray, too, a caption repeated in another shard is encoded once (the shard
    writing the repeat reads the earlier shard's encoding): the same folder as the local
    engine and the same report, fresh and resumed (shards 1 and 2 rebuilt, 2 reading 1)."""
    import dataset_fixtures

    base = ["a cat", "a (red:1.2) house at night", "x " * 90, "long " * 200, "a dog"] * 8  # 40 rows
    texts = base + base[::-1] + base[3:] + base[:3]
    local = _encode(tmp_path, texts, "local", model=tiny_model)
    fresh = folder_bytes(tmp_path / "local")
    for index in (1, 2):
        (tmp_path / "local" / f"shard-{index:05d}.safetensors").unlink()
    local_resumed = _encode(tmp_path, texts, "local", model=tiny_model)
    with dataset_fixtures.ray_session(240):
        ray_report = _encode(tmp_path, texts, "ray", model=tiny_model, engine="ray", workers=2)
        assert folder_bytes(tmp_path / "ray") == fresh
        for index in (1, 2):
            (tmp_path / "ray" / f"shard-{index:05d}.safetensors").unlink()
        ray_resumed = _encode(tmp_path, texts, "ray", model=tiny_model, engine="ray", workers=2)
    assert ray_report.reused == local.reused == 96 - 4  # every kept row but the first of each caption
    assert ray_report.rejected == local.rejected and len(ray_report.rejected) == 24
    assert ray_resumed.shards_written == 2 and folder_bytes(tmp_path / "ray") == fresh
    # resumed: shard 0's own repeats, then shards 1 and 2 reusing across the two of them
    assert ray_resumed.reused == local_resumed.reused
    assert _expected_reused(texts, 600, across_shards=False) < ray_resumed.reused < ray_report.reused


class _InlineRay:
    """Just enough of Ray to run the ray engine's driver and actors in this process, one
    task at a time in the order handed out (a ref is the value itself)."""

    class exceptions:
        RayError = RuntimeError

    def is_initialized(self) -> bool:
        return True

    def remote(self, **options):
        def wrap(cls):
            class Handle:
                def __init__(self, instance) -> None:
                    self.encode = _InlineMethod(instance.encode)

            return type("Actor", (), {"remote": staticmethod(lambda **kwargs: Handle(cls(**kwargs)))})
        return wrap

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref.value

    def kill(self, actor) -> None:
        pass


class _InlineMethod:
    def __init__(self, method) -> None:
        self.method = method

    def options(self, num_returns: int):
        return self

    def remote(self, *args):
        done, later = self.method(*args)
        return _Ref(done), later


class _Ref:
    def __init__(self, value) -> None:
        self.value = value


def test_the_ray_engine_encodes_a_repeat_in_another_shard_once(tmp_path, tiny_model, monkeypatch):
    """The ray engine's driver and actors (Ray itself replaced by an in-process stand-in):
    each distinct caption is encoded once over the run, the same bytes and report as local."""
    import textenc.dataset.engines.ray as ray_engine
    from textenc.dataset.encode import CaptionEncoder

    encoded = []
    original = CaptionEncoder.encode_batch
    monkeypatch.setattr(CaptionEncoder, "encode_batch",
                        lambda self, items: encoded.extend(item.row for item in items) or original(self, items))
    monkeypatch.setattr(ray_engine, "_require_ray", _InlineRay)
    texts = ["a cat", "a dog"] * 20 + ["a bird", "a cat"] * 20 + ["a dog", "a fish"] * 20
    local = _encode(tmp_path, texts, "local", model=tiny_model)
    assert sorted(encoded) == [0, 1, 40, 81]
    encoded.clear()
    ray_report = _encode(tmp_path, texts, "ray", model=tiny_model, engine="ray", workers=2)
    assert sorted(encoded) == [0, 1, 40, 81]
    assert ray_report.reused == local.reused == len(texts) - 4
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "local")
