"""Issue #5 (5): one model, tokenizer and embedding cache shared by 16 threads.

A tiny random CLIP-L-shaped text encoder (width 128, 2 heads, 2 layers) is
saved in the SD1 checkpoint layout and loaded with :func:`textenc.sd.load_clip`
together with an embedding folder. Sixteen threads then make 200 mixed calls
each (prompts, clip skip per call and through ``CLIP.clone().clip_layer``,
embeddings, weight modes and normalisations) on one shared ``CLIP``. Every
result must equal, bit for bit, the same call made serially on a separately
loaded copy, and no call may raise.
"""

from __future__ import annotations

import random
import threading
import warnings

import pytest
import torch
from safetensors.torch import save_file

from textenc.loading.convert import to_layout
from textenc.sd import load_clip

transformers = pytest.importorskip("transformers")

THREADS = 16
CALLS_PER_THREAD = 80  # 1,280 encodes over 16 threads, all sharing cold caches at the start
WIDTH = 128

PROMPTS = (
    "a photo of a cat",
    "a (red:1.3) fox in the ((snow))",
    "embedding:style, a castle at dusk",
    "(embedding:style:0.6) portrait, [blurry:0.4]",
    "a (tiny:0.5) dragon embedding:two",
    "\\(escaped\\) text, (weighted:1.1) " * 6,  # two windows
    "",
)
# (per-call options, clone clip_layer or None)
SETTINGS = (
    ({}, None),
    ({"layer": -2}, None),
    ({}, -2),
    ({"weight_mode": "a1111"}, None),
    ({"weight_mode": "compel"}, -1),
    ({"weight_mode": "none", "layer": -1}, None),
    ({"normalization": "length+mean"}, None),
)


@pytest.fixture(scope="module")
def checkpoint_and_embeddings(tmp_path_factory):
    """Paths of a tiny SD1-layout checkpoint and an embedding folder."""
    root = tmp_path_factory.mktemp("concurrency")
    torch.manual_seed(5)
    config = transformers.CLIPTextConfig(
        hidden_size=WIDTH, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=49408, max_position_embeddings=77, projection_dim=WIDTH, hidden_act="quick_gelu",
    )
    model = transformers.CLIPTextModelWithProjection._from_config(config)
    hf = {key: value.detach().clone() for key, value in model.state_dict().items()}
    save_file(to_layout(hf, "sd1"), root / "tiny_sd1.safetensors")
    embeddings = root / "embeddings"
    embeddings.mkdir()
    generator = torch.Generator().manual_seed(6)
    save_file({"emb_params": torch.randn(3, WIDTH, generator=generator)}, embeddings / "style.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, WIDTH, generator=generator)}}, embeddings / "two.pt")
    return str(root / "tiny_sd1.safetensors"), str(embeddings)


def _encode(clip, prompt: str, options: dict, clip_layer: int | None):
    if clip_layer is not None:
        clip = clip.clone()
        clip.clip_layer(clip_layer)
    tokens = clip.tokenize(prompt, return_word_ids=True)
    return clip.encode_from_tokens(tokens, return_pooled=True, options=options)


def _jobs() -> list[tuple[str, dict, int | None]]:
    return [(prompt, options, layer) for prompt in PROMPTS for options, layer in SETTINGS]


def test_sixteen_threads_match_serial_results(checkpoint_and_embeddings):
    path, embeddings = checkpoint_and_embeddings
    jobs = _jobs()
    reference_clip = load_clip(path, embedding_directory=embeddings)
    serial = [_encode(reference_clip, *job) for job in jobs]
    assert all(torch.isfinite(cond).all() and torch.isfinite(pooled).all() for cond, pooled in serial)
    # Distinct settings must give distinct results, or the comparison proves little.
    assert not torch.equal(serial[0][0], serial[1][0])
    assert not torch.equal(serial[PROMPTS.index("a (red:1.3) fox in the ((snow))") * len(SETTINGS)][0],
                           serial[PROMPTS.index("a (red:1.3) fox in the ((snow))") * len(SETTINGS) + 3][0])

    shared = load_clip(path, embedding_directory=embeddings)  # cold caches, shared by all threads
    errors: list[BaseException] = []
    mismatches: list[tuple[int, int]] = []
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> None:
        order = random.Random(seed)
        try:
            start.wait()
            for _ in range(CALLS_PER_THREAD):
                index = order.randrange(len(jobs))
                cond, pooled = _encode(shared, *jobs[index])
                expected_cond, expected_pooled = serial[index]
                if not (torch.equal(cond, expected_cond) and torch.equal(pooled, expected_pooled)):
                    mismatches.append((seed, index))
        except BaseException as error:  # reported below, with the thread's seed
            errors.append(error)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no embedding may be reported missing or rejected
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert mismatches == []


def test_shared_clip_options_are_not_mutated_by_calls(checkpoint_and_embeddings):
    path, embeddings = checkpoint_and_embeddings
    clip = load_clip(path, embedding_directory=embeddings)
    encoder = clip.cond_stage_model.encoder
    before = encoder.options
    _encode(clip, "a cat", {"layer": -2, "weight_mode": "a1111"}, -1)
    assert encoder.options == before and clip.layer_idx is None
