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

WORDS = ("a photo of the cat dog red blue house tree sky sun moon painting portrait old woman man "
         "city night river mountain forest girl boy smiling standing").split()
SIZES = {"l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu"),
         "g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")}


def _state(role: str, seed: int) -> dict:
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                                         bos_token_id=49406, **SIZES[role])
    model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="sdpa")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _clip(kind: str):
    from textenc.convert import to_layout
    from textenc.sd import load_clip

    if kind == "sd1":
        state = {k: v for k, v in _state("l", 0).items() if k != "text_projection.weight"}
        return load_clip([], state_dicts=[("clip_l", to_layout(state, "sd1"))])
    l_state = {k: v for k, v in _state("l", 0).items() if k != "text_projection.weight"}
    state = {**to_layout(l_state, "sdxl_l"), **to_layout(_state("g", 1), "sdxl_g")}
    return load_clip([], state_dicts=[("sdxl", state)])


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
