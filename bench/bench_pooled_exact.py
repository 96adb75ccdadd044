"""Cost of ComfyUI's exact pooled output at an intermediate layer (issue 27, point 2).

Since issue 27 every layer runs on every row when an intermediate layer is encoded
(clip skip; the SD2 and SDXL defaults), as ComfyUI runs them, so pooled is ComfyUI's bit
for bit. Before, the layers after the intermediate one ran for the pooled row only
(``fast_pooled=True`` of :class:`textenc.nn.clip_model.CLIPTextModel_`, still there at the
model level). This times both side by side in one process, interleaved, on full-size
random weights: ``CLIP.encode_from_tokens`` of one weighted 1-window prompt (SD1 at clip
skip 2, SD2 and SDXL at their defaults) and ``CLIP.encode_batch`` of 8 prompts (the
dataset encoder's call). "old" is today's encode with the transformer's forward bound to
``fast_pooled=True`` (the batch then runs the one-row tail once for the whole batch, not
per caption as before: a little faster than the old code, so the ratio is an upper bound).

Run: ``python bench/bench_pooled_exact.py [--repeats N]`` (torch threads 1).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import dataset_models  # noqa: E402

#: OpenCLIP ViT-H/14's text tower (SD2), as a full-size random model.
dataset_models.SIZES.setdefault("vit-h", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, projection_dim=1024, hidden_act="gelu"))

FAMILIES = {  # name -> (checkpoint parts, ComfyUI layer set with clip_layer, or None for the default)
    "SD1 clip skip 2": ([("clip-l", "sd1", False)], -2),
    "SD2 (default -2)": ([("vit-h", "sd2", True)], None),
    "SDXL (default -2)": ([("clip-l", "sdxl_l", False), ("bigg", "sdxl_g", True)], None),
}
PROMPT = "a (red:1.2) fox sitting in deep snow at dusk, highly detailed, soft light"


def _clip(parts, layer):
    from textenc.sd import load_clip

    state, _ = dataset_models.checkpoint_state(parts)
    clip = load_clip(None, state_dicts=[("bench", state)])
    if layer is not None:
        clip.clip_layer(layer)
    for encoder in clip.cond_stage_model.encoders.values():
        encoder.cache_size = 0  # time the forward, not the cache
    return clip


def _fast(clip):
    """``clip`` with every transformer's forward bound to ``fast_pooled=True`` (the old path)."""
    old = clip.clone()
    old.cond_stage_model = _Bound(clip.cond_stage_model)
    return old


class _Bound:
    """Runs the wrapped model's encodes with ``fast_pooled=True`` for the duration of each call."""

    def __init__(self, model) -> None:
        self.model = model

    def _call(self, name, *args, **kwargs):
        transformers_ = [e.transformer for e in self.model.encoders.values()]
        for t in transformers_:
            t.forward = functools.partial(type(t).forward, t, fast_pooled=True)
        try:
            return getattr(self.model, name)(*args, **kwargs)
        finally:
            for t in transformers_:
                del t.forward

    def __getattr__(self, name):
        if name in ("encode_token_weights", "encode_token_weights_batch"):
            return functools.partial(self._call, name)
        return getattr(self.model, name)


def run(repeats: int, *, report=None) -> list[dict]:
    """The rows; ``report(row)`` is called as each is measured."""
    rows = []
    for name, (parts, layer) in FAMILIES.items():
        clip = _clip(parts, layer)
        old = _fast(clip)
        tokens = clip.tokenize(PROMPT)
        batch = [clip.tokenize(f"{PROMPT}, variation {i}") for i in range(8)]
        scale = 3 if "SDXL" in name else 1
        with torch.inference_mode():
            one = common.interleaved({
                "new": lambda: clip.encode_from_tokens(tokens, return_pooled=True),
                "old": lambda: old.encode_from_tokens(tokens, return_pooled=True),
            }, repeats=max(3, repeats // scale))
            many = common.interleaved({
                "new": lambda: clip.encode_batch(batch),
                "old": lambda: old.encode_batch(batch),
            }, repeats=max(2, repeats // (4 * scale)))
        for case, stats in (("1 prompt", one), ("8 prompts, encode_batch", many)):
            rows.append(common.ratio_row("pooled exact (issue 27)", f"{name}, {case}", stats["new"], stats["old"],
                                         1.05, ref_label="fast pooled",
                                         note=f"torch threads {torch.get_num_threads()}"))
            if report is not None:
                report(rows[-1])
        del clip, old
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(common.machine(), flush=True)
    run(args.repeats, report=lambda row: print("| " + " | ".join("" if v is None else str(v) for v in row.values())
                                               + " |", flush=True))


if __name__ == "__main__":
    main()
