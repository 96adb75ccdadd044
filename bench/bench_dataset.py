"""Benchmark ``textenc encode-dataset``: local engine vs a plain transformers loop, Ray vs local.

``python bench/bench_dataset.py [--quick]`` prints a markdown table. A small
random CLIP (4 layers × 256 wide, SD1 layout) keeps it to a minute or two on CPU.
Rows: captions/s of the local engine and of a plain loop (HF tokenizer +
transformers ``CLIPTextModel``, batch 64, same model and outputs: last hidden
state + pooled, stored fp16); Ray with 1 and 2 workers (time per caption relative
to local); bytes per caption; the local engine's time split.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("a photo of the cat dog red blue house tree sky sun moon painting portrait old woman man "
         "city night river mountain forest girl boy smiling standing").split()


def _model(folder: Path):
    import transformers
    from safetensors.torch import save_file

    from textenc.convert import to_layout

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                         num_attention_heads=4, vocab_size=49408, max_position_embeddings=77,
                                         projection_dim=256, hidden_act="quick_gelu")
    model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="sdpa").eval()
    path = folder / "bench_sd1.safetensors"
    save_file({k: v.contiguous().clone() for k, v in to_layout(dict(model.state_dict()), "sd1").items()},
              str(path))
    return path, model


def _captions(folder: Path, count: int) -> tuple[Path, list[str]]:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(count)]
    path = folder / "captions.txt"
    path.write_text("\n".join(texts) + "\n")
    return path, texts


def _plain_loop(model, texts: list[str], batch: int = 64) -> float:
    import transformers

    from textenc.tokenizer import DEFAULT_VOCAB

    tokenizer = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    text_model = model.text_model
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            ids = tokenizer(texts[i:i + batch], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
            out = text_model(input_ids=ids)
            out.last_hidden_state.half(), out.pooler_output.half()
    return time.perf_counter() - start


def _encode(captions: Path, model: Path, out: Path, **kwargs):
    from textenc.dataset import encode_dataset

    start = time.perf_counter()
    report = encode_dataset(captions, model=model, out=out, shard_rows=500, batch_size=64,
                            progress=False, overwrite=True, **kwargs)
    return time.perf_counter() - start, report


def run(quick: bool) -> list[dict]:
    """Run every measurement → table rows ``{"measure", "value", "goal"}``."""
    count = 1000 if quick else 3000
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        folder = Path(tmp)
        model_path, hf_model = _model(folder)
        captions, texts = _captions(folder, count)
        # Alternating rounds (plain first, then local first), medians: drift cancels.
        plain_times, local_times = [], []
        for i in range(1 if quick else 2):
            for side in (("plain", "local") if i % 2 == 0 else ("local", "plain")):
                if side == "plain":
                    plain_times.append(_plain_loop(hf_model, texts))
                else:
                    seconds, report = _encode(captions, model_path, folder / "local")
                    local_times.append(seconds)
        plain, local_s = statistics.median(plain_times), statistics.median(local_times)
        rows += [{"measure": "plain loop (HF tokenizer + CLIPTextModel, batch 64)", "value": f"{count / plain:.0f} captions/s", "goal": ""},
                 {"measure": "local engine", "value": f"{count / local_s:.0f} captions/s "
                  f"({plain / local_s:.2f}x plain)", "goal": ">= 1.0x plain", "passed": plain / local_s >= 1.0},
                 {"measure": "bytes per caption (fp16, cond+pooled)", "value": f"{report.bytes / count:.0f}", "goal": ""}]
        split = report.timings
        total = sum(split.values()) or 1.0
        rows.append({"measure": "local time split tokenize / forward / write",
                     "value": " / ".join(f"{split[k] / total:.0%}" for k in ("tokenize", "forward", "write")),
                     "goal": "(tokenizing overlaps the forward)"})
        rows += _ray_rows(captions, model_path, folder, count, local_s)
    return rows


def _ray_rows(captions: Path, model_path: Path, folder: Path, count: int, local_s: float) -> list[dict]:
    try:
        import ray
    except ImportError:
        return [{"measure": "ray", "value": "skipped: ray not installed", "goal": ""}]
    import os

    rows = []
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            seconds, _ = _encode(captions, model_path, folder / f"ray{workers}", engine="ray", workers=workers)
            rows.append({"measure": f"ray, {workers} worker(s)", "value": f"{count / seconds:.0f} captions/s "
                         f"({seconds / local_s:.2f}x local time per caption)", "goal": "<= 1.1x local",
                         "passed": seconds / local_s <= 1.1})
    finally:
        ray.shutdown()
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| measure | value | goal |", "|---|---|---|"]
    lines += [f"| {r['measure']} | {r['value']} | {r['goal']} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(to_markdown(run(parser.parse_args().quick)))
