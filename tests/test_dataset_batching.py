"""Every model kind is batched, intermediate layers included (clip skip, the SD2 and
SDXL defaults), on SD1, SD2 and SDXL checkpoints whose weights are transformers' CLIP
text models (``test_sd1_clip``). Against a direct ``CLIP.encode_from_tokens`` of each
caption alone (fp32):

``cond`` and ``pooled`` are bit for bit equal, for every layer, at 1 and 2 torch
threads. The model runs the layers after an intermediate one for the pooled row only,
as a [windows, 1, D] slice, and CPU matmul kernels round a 1- or 2-row product
differently from a larger one: the dataset encoder therefore runs that slice (and
the pooled projection) caption by caption (``row_groups``), with the shapes each
caption has alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dataset_fixtures import random_captions
from test_sd1_clip import hf_models, hf_state, to_layout  # noqa: F401  (fixture)
from textenc.dataset import encode_dataset, open_shards
from textenc.sd import load_clip

ROWS = 96  # two shards of shard_rows=80, one- and multi-window captions (asserted)


@pytest.fixture(scope="module")
def model_files(hf_models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kinds")
    states = {
        "sd1": to_layout(hf_state(hf_models["l"], projection=False), "sd1"),
        "sd2": to_layout(hf_state(hf_models["h"]), "sd2"),
        "sdxl": {**to_layout(hf_state(hf_models["l"], projection=False), "sdxl_l"),
                 **to_layout(hf_state(hf_models["g"]), "sdxl_g")},
    }
    files = {}
    for name, state in states.items():
        files[name] = folder / f"{name}.safetensors"
        save_file(state, str(files[name]))
    return files


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> tuple[Path, list[str]]:
    return random_captions(tmp_path_factory, ROWS, seed=2)


# Each kind at its default and at clip skip 1-3 (the claim in docs/dataset.md).
CASES = [("sd1", None, None), ("sd1", 2, -2), ("sd1", 3, -3), ("sd2", None, None), ("sd2", 1, -1),
         ("sd2", 3, -3), ("sdxl", None, None), ("sdxl", 1, -1), ("sdxl", 2, -2), ("sdxl", 3, -3)]


@pytest.mark.parametrize("kind,clip_skip,layer", CASES)
def test_batched_equals_each_caption_alone(tmp_path, model_files, captions, kind, clip_skip, layer, threads):
    report = encode_dataset(captions[0], model=model_files[kind], out=tmp_path, dtype="fp32",
                            clip_skip=clip_skip, shard_rows=80, batch_size=16, progress=False, threads=threads)
    assert report.encoded == ROWS and len(report.windows_histogram) > 1  # 1- and multi-window
    clip = load_clip(str(model_files[kind]))
    options = {} if layer is None else {"layer": layer}
    for caption_id, cond, pooled in open_shards(tmp_path):
        tokens = clip.tokenize(captions[1][caption_id])
        alone_cond, alone_pooled = clip.encode_from_tokens(tokens, return_pooled=True, options=options)
        assert torch.equal(cond, alone_cond[0]), caption_id
        assert torch.equal(pooled, alone_pooled[0]), (caption_id, (pooled - alone_pooled[0]).abs().max())
