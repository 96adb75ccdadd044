"""Every model kind is batched, intermediate layers included (clip skip, the SD2 and
SDXL defaults), on SD1, SD2 and SDXL checkpoints whose weights are transformers' CLIP
text models (``test_sd1_clip``). Against a direct ``CLIP.encode_from_tokens`` of each
caption alone (fp32):

* ``cond`` is bit for bit equal, for every layer;
* ``pooled`` is bit for bit equal for the last layer; for an intermediate layer it is
  within 1e-6 relative to the largest pooled value (a few ulp). The model runs the
  layers after an intermediate one for the pooled row only, as a [windows, 1, D]
  slice, and CPU matmul kernels round a 1- or 2-row product differently from a
  larger one: a caption alone has 1-2 such rows, a batch has many.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_dataset import _caption
from test_sd1_clip import hf_models, hf_state, to_layout  # noqa: F401  (fixture)
from textenc.dataset import encode_dataset, open_shards
from textenc.sd import load_clip

ROWS = 160


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
    rng = random.Random(2)
    texts = [_caption(rng) for _ in range(ROWS)]
    path = tmp_path_factory.mktemp("data") / "captions.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path, texts


CASES = [("sd1", None, None), ("sd1", 2, -2), ("sd1", 3, -3), ("sd2", None, None), ("sd2", 1, -1),
         ("sdxl", None, None), ("sdxl", 2, -2)]


@pytest.mark.parametrize("kind,clip_skip,layer", CASES)
def test_batched_equals_each_caption_alone(tmp_path, model_files, captions, kind, clip_skip, layer):
    torch.set_num_threads(1)
    report = encode_dataset(captions[0], model=model_files[kind], out=tmp_path, dtype="fp32",
                            clip_skip=clip_skip, shard_rows=80, batch_size=16, progress=False)
    assert report.encoded == ROWS and len(report.windows_histogram) > 1  # 1- and multi-window
    clip = load_clip(str(model_files[kind]))
    options = {} if layer is None else {"layer": layer}
    worst, largest = 0.0, 0.0
    for caption_id, cond, pooled in open_shards(tmp_path):
        tokens = clip.tokenize(captions[1][caption_id])
        alone_cond, alone_pooled = clip.encode_from_tokens(tokens, return_pooled=True, options=options)
        assert torch.equal(cond, alone_cond[0]), caption_id
        worst = max(worst, (pooled - alone_pooled[0]).abs().max().item())
        largest = max(largest, alone_pooled.abs().max().item())
    if clip_skip in (None, 1) and kind == "sd1":
        assert worst == 0.0
    assert worst <= 1e-6 * max(1.0, largest), (worst, largest)
