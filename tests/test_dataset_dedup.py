"""A caption repeated within a shard is encoded once and written for each of its rows."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open

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


def _expected_reused(texts: list[str], max_chars: int) -> int:
    """Rows whose caption occurred earlier in the same shard, not rejected."""
    count = 0
    for start in range(0, len(texts), SHARD_ROWS):
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
    expected = _expected_reused(texts, 600)
    assert expected > 30 and report.reused == expected
    assert f"{expected} reused" in report.summary()
    manifest = json.loads((tmp_path / "dedup" / "manifest.json").read_text())
    assert manifest["totals"]["reused"] == expected
    assert sum(s["reused"] for s in manifest["shards"]) == expected
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
