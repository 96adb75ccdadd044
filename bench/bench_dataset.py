"""Benchmark ``textenc encode-dataset``: the local engine against plain transformers loops,
bf16 compute, dedup, and Ray against local.

``python bench/bench_dataset.py [--quick]`` prints a markdown table. Every pair is
measured side by side in one process, in alternating rounds (medians), with the
same torch thread count on both sides (the process's: ``bench/run.py --threads``).
Rows:

* local engine vs a plain loop (HF tokenizer + transformers ``CLIPTextModel``,
  batch 64, outputs stored fp16) at the same compute dtype (fp32), for SD1 (last
  layer), SD2-style (penultimate layer + final norm) and SDXL (two encoders,
  penultimate, concatenated); small random models (4 layers, 256-384 wide);
* ``--compute-dtype bf16`` against the fp32 plain loop on a full-size CLIP-L;
* a caption set with 50 % repeats, with and without dedup;
* Ray with 1 and 2 workers against the local engine at equal threads.

Ratios are of wall time; the CPU-time ratio (this process's CPU seconds, which
other processes on a busy machine barely change) is in the notes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

try:
    from .dataset_models import WORDS, Part, checkpoint_state
except ImportError:  # run as a script from bench/, or imported by bench/run.py
    from dataset_models import WORDS, Part, checkpoint_state

LAYOUTS: dict[str, list[Part]] = {
    "sd1": [("l", "sd1", False)], "sd2": [("h", "sd2", True)],
    "sdxl": [("l", "sdxl_l", False), ("g", "sdxl_g", True)], "clip-l": [("clip-l", "sd1", False)]}


def _checkpoint(kind: str, folder: Path) -> tuple[Path, dict]:
    """Our checkpoint file for ``kind`` and the transformers models holding its weights."""
    from safetensors.torch import save_file

    state, models = checkpoint_state(LAYOUTS[kind])
    path = folder / f"bench_{kind}.safetensors"
    save_file(state, str(path))
    return path, models


def _captions(folder: Path, count: int, name: str, *, repeats: float = 0.0) -> tuple[Path, list[str]]:
    rng = random.Random(0)
    unique = max(1, round(count * (1 - repeats)))
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + f" {i}" for i in range(unique)]
    texts += [rng.choice(texts) for _ in range(count - unique)]
    rng.shuffle(texts)
    path = folder / name
    path.write_text("\n".join(texts) + "\n")
    return path, texts


def _plain_outputs(kind: str, models: dict, ids: torch.Tensor):
    """What the engine stores, computed the plain transformers way."""
    if kind in ("sd1", "clip-l"):
        out = next(iter(models.values())).text_model(input_ids=ids)
        return out.last_hidden_state, out.pooler_output
    if kind == "sd2":
        model = models["h"]
        out = model(input_ids=ids, output_hidden_states=True)
        return model.text_model.final_layer_norm(out.hidden_states[-2]), out.text_embeds
    out_l = models["l"].text_model(input_ids=ids, output_hidden_states=True)
    out_g = models["g"](input_ids=ids, output_hidden_states=True)
    return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1), out_g.text_embeds


def _plain_loop(kind: str, models: dict, texts: list[str]) -> None:
    """fp32, batch 64, in input order; outputs cast to fp16 as the engine stores them."""
    import transformers

    from textenc.prompts.tokenizer import DEFAULT_VOCAB

    tokenizer = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            ids = tokenizer(texts[i:i + 64], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
            cond, pooled = _plain_outputs(kind, models, ids)
            cond.half(), pooled.half()


def _engine(captions: Path, model: Path, out: Path, **kwargs):
    from textenc.dataset import encode_dataset

    options = dict(shard_rows=1000, batch_size=64, progress=False, overwrite=True,
                   threads=torch.get_num_threads())
    options.update(kwargs)
    return encode_dataset(captions, model=model, out=out, **options)


def _paired(sides: dict[str, Callable[[], object]], rounds: int = 2) -> dict[str, tuple[float, float]]:
    """Alternate the sides ``rounds`` times (order flipped each round) → median (wall, cpu) seconds."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            sides[name]()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def _ratio_row(measure: str, fast: tuple[float, float], slow: tuple[float, float], count: int,
               goal: float) -> dict:
    wall, cpu = slow[0] / fast[0], slow[1] / fast[1]
    return {"measure": measure, "value": f"{count / fast[0]:.0f} vs {count / slow[0]:.0f} captions/s: "
            f"{wall:.2f}x (cpu-time {cpu:.2f}x)", "goal": f">= {goal}x", "passed": wall >= goal}


def _kind_rows(folder: Path, count: int) -> list[dict]:
    rows = []
    captions, texts = _captions(folder, count, "captions.txt")
    warmup, warmup_texts = _captions(folder, 128, "warmup.txt")
    for kind, label in (("sd1", "SD1, last layer"), ("sd2", "SD2-style, penultimate"),
                        ("sdxl", "SDXL, two encoders, penultimate")):
        model, hf = _checkpoint(kind, folder)
        _plain_loop(kind, hf, warmup_texts)  # first-call costs off the clock, both sides
        _engine(warmup, model, folder / f"warm-{kind}")
        times = _paired({"local": lambda: _engine(captions, model, folder / kind),
                         "plain": lambda: _plain_loop(kind, hf, texts)})
        rows.append(_ratio_row(f"local engine vs plain transformers loop, fp32: {label}",
                               times["local"], times["plain"], count, 1.0))
    return rows


def _bf16_row(folder: Path, count: int) -> list[dict]:
    from textenc.dataset.compute import cpu_has_bf16_units

    if not cpu_has_bf16_units():
        return [{"measure": "--compute-dtype bf16 vs fp32 plain loop, CLIP-L", "goal": ">= 2.5x",
                 "value": "not measured: this CPU has no bf16 units"}]
    captions, texts = _captions(folder, count, "bf16.txt")
    model, hf = _checkpoint("clip-l", folder)
    _engine(captions, model, folder / "bf16-warm", compute_dtype="bf16", limit=64)
    _plain_loop("clip-l", hf, texts[:64])
    times = _paired({"bf16": lambda: _engine(captions, model, folder / "bf16", compute_dtype="bf16"),
                     "plain": lambda: _plain_loop("clip-l", hf, texts)})
    flags = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    units = "+".join(k for k in ("avx512_bf16", "amx_bf16") if flags.get(k)) or "bf16"
    row = _ratio_row(f"local --compute-dtype bf16 vs plain fp32 loop, full-size CLIP-L ({units})",
                     times["bf16"], times["plain"], count, 2.5)
    return [row]


def _dedup_row(folder: Path, count: int) -> list[dict]:
    captions, _ = _captions(folder, count, "repeats.txt", repeats=0.5)
    model, _ = _checkpoint("sd1", folder)
    _engine(captions, model, folder / "dedup-warm", limit=128)
    # The CLI's default --shard-rows (10000): one shard here. Dedup works within a shard,
    # so with smaller shards a repeat whose first occurrence is in another shard is encoded.
    times = _paired({"dedup": lambda: _engine(captions, model, folder / "dedup", shard_rows=10000),
                     "plain": lambda: _engine(captions, model, folder / "no-dedup", dedup=False,
                                              shard_rows=10000)})
    return [_ratio_row("50 % repeated captions: dedup vs --no-dedup (SD1, one shard)", times["dedup"],
                       times["plain"], count, 1.8)]


def run(quick: bool) -> list[dict]:
    """Run every measurement → table rows ``{"measure", "value", "goal"[, "passed"]}``."""
    count = 640 if quick else 2000
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as tmp:
        folder = Path(tmp)
        rows = _kind_rows(folder, count)
        rows += _bf16_row(folder, 128 if quick else 384)
        # Dedup saves encoding time only: at 640 captions the fixed cost of a run (model
        # load, fingerprint, empty caption) is a third of the small model's encoding.
        rows += _dedup_row(folder, 2000 if quick else 5000)
        rows += _ray_rows(folder, count)
    return rows


def _ray_rows(folder: Path, count: int) -> list[dict]:
    """Ray with 1 and 2 workers against the local engine at equal parallelism.

    Local runs with every core's worth of threads; Ray's actors split them
    (``--threads cores/workers`` each), so both use the same cores. Time per
    caption is taken at steady state, from two runs of each engine:
    (T(all captions) - T(64 captions)) / (captions - 64), because Ray also
    starts actors that import torch and load the model (fixed costs shown).
    """
    try:
        import ray
    except ImportError:
        return [{"measure": "ray", "value": "skipped: ray not installed", "goal": ""}]
    captions, _ = _captions(folder, count, "ray.txt")
    small, _ = _captions(folder, 64, "small.txt")
    model, _ = _checkpoint("sd1", folder)
    cores = os.cpu_count() or 1

    def timed(name: str, **engine) -> tuple[float, float]:
        start = time.perf_counter()
        _engine(small, model, folder / f"{name}-small", **engine)
        fixed = time.perf_counter() - start
        start = time.perf_counter()
        _engine(captions, model, folder / name, **engine)
        return (time.perf_counter() - start - fixed) / (count - 64), fixed

    local, local_fixed = timed("local-all-cores", threads=cores)
    rows = [{"measure": f"local engine, --threads {cores} (what Ray is held to)",
             "value": f"{1e3 * local:.2f} ms per caption at steady state; 64 captions take "
                      f"{local_fixed:.1f} s", "goal": ""}]
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            per_caption, fixed = timed(f"ray{workers}", engine="ray", workers=workers,
                                       threads=max(1, cores // workers))
            ratio = per_caption / local
            rows.append({"measure": f"ray, {workers} worker(s), --threads {max(1, cores // workers)}",
                         "value": f"{ratio:.2f}x local time per caption ({1e3 * per_caption:.2f} ms at "
                                  f"steady state); 64 captions take {fixed:.1f} s "
                                  f"(local {local_fixed:.1f} s): actor start and model load",
                         "goal": "<= 1.1x local", "passed": ratio <= 1.1})
    finally:
        ray.shutdown()
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| measure | value | goal |", "|---|---|---|"]
    lines += [f"| {r['measure']} | {r['value']} | {r['goal']} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer captions (about 3 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(to_markdown(run(args.quick)))
