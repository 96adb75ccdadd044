"""What the encode-dataset test modules share: tiny random CLIP text encoders written
in SD1 layout (and as a diffusers folder), random captions, an ``encode_dataset``
with a module's defaults, a folder's bytes, a guarded Ray session, and the
environment of a subprocess that runs this checkout's textenc.

The pytest fixtures built on these (``tiny_model``, ``one_torch_thread``) are in
``conftest.py``; the helpers are plain functions so a module can build a model of
another width or captions of its own seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch
from safetensors.torch import save_file

#: The checkout's root, put first on a subprocess's PYTHONPATH by :func:`checkout_env`.
ROOT = Path(__file__).resolve().parents[1]

WORDS = ("a photo of the cat dog red blue house tree sky sun moon painting portrait old "
         "woman man city night river mountain forest girl boy smiling standing").split()


def caption(rng: random.Random) -> str:
    """A random caption: 2% empty, 8% long (60-150 words, several windows), some weighted."""
    roll = rng.random()
    if roll < 0.02:
        return ""
    count = rng.randint(60, 150) if roll < 0.1 else rng.randint(1, 25)
    words = [rng.choice(WORDS) for _ in range(count)]
    if rng.random() < 0.15:
        words[0] = f"({words[0]}:{rng.choice(['1.3', '0.7', '1.1'])})"
    return " ".join(words)


def random_captions(tmp_path_factory, count: int, *, seed: int,
                    extra: Sequence[str] = ()) -> tuple[Path, list[str]]:
    """``count`` captions of :func:`caption` (random seed ``seed``) plus ``extra``, one per
    line in a new ``captions.txt`` → ``(path, texts)``."""
    rng = random.Random(seed)
    texts = [caption(rng) for _ in range(count)] + list(extra)
    path = tmp_path_factory.mktemp("data") / "captions.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path, texts


def tiny_hf_text_model(*, width: int):
    """A random CLIP-L-shaped text encoder (2 layers, 2 heads, quick_gelu), seed 0,
    without touching the caller's torch random state."""
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width,
                                             num_hidden_layers=2, num_attention_heads=2, vocab_size=49408,
                                             max_position_embeddings=77, projection_dim=width,
                                             hidden_act="quick_gelu")
        return transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="sdpa")


def write_tiny_sd1(folder: Path, *, width: int, diffusers: bool = False) -> Path:
    """:func:`tiny_hf_text_model` saved in SD1 layout as ``folder/tiny_sd1.safetensors``;
    with ``diffusers``, the same weights as a diffusers folder ``folder/diffusers``."""
    from textenc.loading.convert import to_layout

    model = tiny_hf_text_model(width=width)
    state = to_layout(dict(model.state_dict()), "sd1")
    path = folder / "tiny_sd1.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    if diffusers:
        write_diffusers_folder(folder / "diffusers", model)
    return path


def write_diffusers_folder(folder: Path, model) -> None:
    """``model`` as a diffusers SD1 pipeline folder (text encoder and tokenizer only)."""
    import textenc

    (folder / "tokenizer").mkdir(parents=True)
    vocab = Path(textenc.__file__).parent / "vocab"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab / name, folder / "tokenizer" / name)
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    model.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))


def encoder(**defaults: Any) -> Callable[..., Any]:
    """``encode(source, model, out, **kwargs)``: :func:`encode_dataset` with ``defaults``
    (and no progress bar), ``kwargs`` overriding them."""
    def encode(source, model, out, **kwargs):
        from textenc.dataset import encode_dataset

        return encode_dataset(source, model=model, out=out, **{"progress": False, **defaults, **kwargs})
    return encode


def checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout first on ``PYTHONPATH`` (so a
    ``python -m textenc.dataset`` subprocess runs this textenc), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (not recursive) by name → its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@contextlib.contextmanager
def ray_session(seconds: int) -> Iterator[Any]:
    """A local 2-CPU Ray session, shut down after; a run that outlasts ``seconds``
    (a scheduling deadlock) raises TimeoutError instead of hanging the suite."""
    ray = pytest.importorskip("ray", reason="the ray engine needs the textenc[ray] extra")
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal.alarm guards against scheduling deadlocks; needs the main thread")

    def deadline(signum, frame):
        raise TimeoutError(f"the ray engine did not finish in {seconds} s (scheduling deadlock?)")

    previous = signal.signal(signal.SIGALRM, deadline)
    signal.alarm(seconds)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        ray.shutdown()
