"""Drift of ``encode-dataset --compute-dtype`` against fp32, on full-size encoders.

``python bench/dataset_drift.py [--quick]`` prints a markdown table: for each
compute dtype this machine runs (bf16 where the CPU has bf16 units; fp16 needs
CUDA), the max and mean absolute difference from the fp32 encoding of the same
captions, for ``cond`` and ``pooled``. Models: a full-size CLIP-L (SD1, last
layer) and an SDXL pair with a ViT-bigG-sized G (1280 wide, 32 layers; SDXL's
default penultimate layer). Weights are random with transformers' own
initialisation (no download); captions are 1 and 2 windows long. The stored
dtype's own rounding (fp16) is shown beside it for scale.
"""

from __future__ import annotations

import argparse
import random

import torch

try:
    from .dataset_models import WORDS, checkpoint_state
except ImportError:  # run as a script from bench/
    from dataset_models import WORDS, checkpoint_state

#: SD1: a full-size CLIP-L; SDXL: that CLIP-L and a ViT-bigG-sized G (see dataset_models).
CHECKPOINTS = {"sd1": ("clip_l", [("clip-l", "sd1", False)]),
               "sdxl": ("sdxl", [("clip-l", "sdxl_l", False), ("bigg", "sdxl_g", True)])}


def _clip(kind: str):
    from textenc.sd import load_clip

    name, parts = CHECKPOINTS[kind]
    return load_clip([], state_dicts=[(name, checkpoint_state(parts)[0])])


def _captions(count: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40) if i % 4 else rng.randint(80, 110)))
            for i in range(count)]


def _encode(clip, texts: list[str], compute_dtype: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from textenc.dataset.encode import CaptionEncoder, EncodeSettings
    from textenc.dataset.model import cast_for_compute

    cast_for_compute(clip, compute_dtype)
    encoder = CaptionEncoder(clip, EncodeSettings(dtype="fp32", compute_dtype=compute_dtype))
    items = [encoder.tokenize(i, text) for i, text in enumerate(texts)]
    groups: dict = {}
    for item in items:
        groups.setdefault(item.group_key, []).append(item)
    results = {}
    for group in groups.values():
        for start in range(0, len(group), 16):
            results.update(encoder.encode_batch(group[start:start + 16]))
    return [results[i][:2] for i in range(len(texts))]


def _stats(got, reference, part: int) -> tuple[float, float]:
    diffs = torch.cat([(g[part].float() - r[part]).abs().flatten() for g, r in zip(got, reference)])
    return diffs.max().item(), diffs.mean().item()


def run(quick: bool) -> list[dict]:
    from textenc.dataset.compute import cpu_has_bf16_units

    texts = _captions(8 if quick else 32)
    rows = []
    for kind, label in (("sd1", "CLIP-L (SD1, last layer)"), ("sdxl", "SDXL L + bigG-sized G (penultimate)")):
        clip = _clip(kind)
        reference = _encode(clip, texts, "fp32")
        stored = [(c.half(), p.half()) for c, p in reference]
        candidates = {"fp16 storage of the fp32 result": stored}
        if cpu_has_bf16_units():
            candidates["--compute-dtype bf16"] = _encode(clip, texts, "bf16")
        for name, got in candidates.items():
            cond, pooled = _stats(got, reference, 0), _stats(got, reference, 1)
            rows.append({"model": label, "vs fp32": name, "cond max/mean": f"{cond[0]:.2e} / {cond[1]:.2e}",
                         "pooled max/mean": f"{pooled[0]:.2e} / {pooled[1]:.2e}",
                         "|cond| max": f"{max(r[0].abs().max().item() for r in reference):.1f}"})
        rows.append({"model": label, "vs fp32": "--compute-dtype fp16", "cond max/mean": "CUDA only: not measured",
                     "pooled max/mean": "", "|cond| max": ""})
        del clip
    return rows


def to_markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 captions instead of 32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{len(_captions(8 if args.quick else 32))} captions, torch {torch.__version__}, threads {args.threads}")
    print(to_markdown(run(args.quick)))
