"""Shared benchmark helpers: machine description, interleaved timing, result rows,
and builders for textenc / transformers models holding the same random weights.

Nothing here changes global torch state at import; ``bench/run.py`` sets the
thread count once for the whole run.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"  # gitignored scratch: checkpoints, HF folders


@dataclasses.dataclass
class Stats:
    """min / median / max of one timed callable, in seconds."""

    samples: list[float]
    #: Process CPU time of the same calls: barely affected by other processes
    #: competing for the cores, so it shows intrinsic cost on a busy machine.
    cpu: list[float] = dataclasses.field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def fmt(self, scale: float = 1e3, unit: str = "ms") -> str:
        return f"{self.min * scale:.1f}/{self.median * scale:.1f}/{self.max * scale:.1f} {unit}"


def interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int,
                warmup: int = 1) -> dict[str, Stats]:
    """Time each callable ``repeats`` times, interleaved A B A B ..., after ``warmup`` rounds.

    Interleaving makes ratios robust to load that changes during the run (other
    processes share this machine's two cores).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        # Alternate the order each round so neither side always runs first.
        order = list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: Stats(values, cpu[name]) for name, values in samples.items()}


def paired_ratio(ours: Stats, ref: Stats) -> Stats:
    """Per-round ratios ours[i] / ref[i] (each round ran both back to back)."""
    return Stats([a / b for a, b in zip(ours.samples, ref.samples)])


def row(target: str, case: str, ours: str, reference: str, ratio: float | None,
        limit: str, passed: bool | None, note: str = "", *, ratios: Stats | None = None) -> dict:
    """One line of the results table. ``passed`` None means not measured / skipped."""
    return {"target": target, "case": case, "ours": ours, "reference": reference,
            "ratio": ratio, "limit": limit, "passed": passed, "note": note,
            "ratio_spread": (f"{ratios.min:.2f}/{ratios.median:.2f}/{ratios.max:.2f}"
                             if ratios is not None else "")}


def ratio_row(target: str, case: str, ours: Stats, ref: Stats, limit: float, *,
              ref_label: str = "", note: str = "", higher_is_better: bool = False) -> dict:
    """A row comparing medians: passes when ours/ref <= limit (or >= for speed-ups)."""
    ratios = paired_ratio(ours, ref)
    ratio = ours.median / ref.median
    if higher_is_better:
        ratio = ref.median / ours.median
        ratios = Stats([1 / r for r in ratios.samples])
        passed, limit_text = ratio >= limit, f">= {limit:g}x"
    else:
        passed, limit_text = ratio <= limit, f"<= {limit:g}x"
    if ours.cpu and ref.cpu:
        cpu_ratio = statistics.median(ours.cpu) / statistics.median(ref.cpu)
        cpu_ratio = 1 / cpu_ratio if higher_is_better else cpu_ratio
        note = f"cpu-time ratio {cpu_ratio:.2f}" + ("; " + note if note else "")
    return row(target, case, ours.fmt(), (ref_label + " " if ref_label else "") + ref.fmt(),
               ratio, limit_text, passed, note, ratios=ratios)


def machine() -> dict[str, str]:
    """CPU model, cores, flags of interest, torch version, date, load."""
    cpu = platform.processor() or "unknown"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                             "avx512_fp16") if f in have)
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f"{pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    import transformers  # only for the version string; the reference library

    return {"cpu": cpu, "cores": str(os.cpu_count()), "flags": flags, "memory": mem,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": str(torch.get_num_threads()), "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg": load}


def has_bf16_cpu() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo


# ---- models with identical random weights ------------------------------------

def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial random weights with fan-in scaling (as tests/random_weights.py)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "embedding" in name and p.dim() <= 2 and "patch" not in name:
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(noise * math.prod(p.shape[1:]) ** -0.5)
            else:
                p.copy_(0.1 * noise)


def hf_text_config(config_name: str):
    import transformers
    from textenc.nn.config import load_text_config

    cfg = dataclasses.asdict(load_text_config(config_name))
    hf_cfg = transformers.CLIPTextConfig(**cfg)
    hf_cfg._attn_implementation = "sdpa"
    return hf_cfg


def hf_text_model(config_name: str, *, seed: int = 0):
    """transformers ``CLIPTextModel`` (SDPA) with random weights, eval, fp32."""
    import transformers

    model = _no_init(transformers.CLIPTextModel, hf_text_config(config_name)).eval()
    randomize_(model, seed)
    return model


def _no_init(cls, hf_config):
    # HF's own init is skipped: randomize_ overwrites every parameter anyway.
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return cls._from_config(hf_config, attn_implementation="sdpa")


def hf_vision_model(config_name: str, *, seed: int = 0):
    """transformers ``CLIPVisionModelWithProjection`` (SDPA), random weights, eval, fp32."""
    import transformers
    from textenc.nn.config import load_vision_config

    values = dataclasses.asdict(load_vision_config(config_name))
    values = {k: v for k, v in values.items() if k not in ("image_mean", "image_std")}
    model = _no_init(transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(**values))
    randomize_(model.eval(), seed)
    return model


def hf_text_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """Our key layout (``text_model.*``, ``text_projection.weight``) from an HF model."""
    out = {}
    for key, value in hf_model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    if "text_projection.weight" not in out:
        # transformers' CLIPTextModel has no projection; ours always applies one
        # (a (B, D) x (D, P) matmul on the pooled row, ~0.1% of the forward).
        width = out["text_model.final_layer_norm.weight"].shape[0]
        generator = torch.Generator().manual_seed(1)
        out["text_projection.weight"] = torch.randn(width, width, generator=generator) * width ** -0.5
    return out


def ours_text_model(config_name: str, state_dict: Mapping[str, torch.Tensor], *,
                    dtype: torch.dtype = torch.float32, cast: bool = False):
    """textenc ``CLIPTextModel`` built on meta and assigned ``state_dict`` (cast to ``dtype``)."""
    from textenc.nn import ops
    from textenc.nn.clip_model import CLIPTextModel

    operations = ops.manual_cast if cast else ops.disable_weight_init
    model = CLIPTextModel(config_name, dtype=dtype, device="meta", operations=operations)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"
