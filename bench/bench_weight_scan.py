"""Cost of the finite-weight scan that ``load_clip`` runs by default (issue 15, point 7).

Full-size CLIP-L (``sd1_clip_config``, 124M parameters) and SDXL's CLIP-G
(``clip_g``, 695M) state dicts with random values, fp16 and fp32, on one
torch thread: :func:`textenc.loading.checkpoint.is_finite` (a sum per tensor, the
default) beside ``torch.isfinite(t).all()`` (the obvious scan), side by side.

Usage: ``python bench/bench_weight_scan.py [--quick]`` (``--quick``: CLIP-L only).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from textenc.loading.checkpoint import is_finite  # noqa: E402
from textenc.text_encoders.sd1_clip import SDClipModel  # noqa: E402


def _time(scan, state_dict, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        assert all(scan(t) for t in state_dict.values())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for config in ("sd1_clip_config",) if quick else ("sd1_clip_config", "clip_g"):
        shapes = {k: v.shape for k, v in SDClipModel(textmodel_json_config=config).transformer.state_dict().items()}
        params = sum(torch.Size(s).numel() for s in shapes.values())
        for dtype in (torch.float16, torch.float32):
            generator = torch.Generator().manual_seed(0)
            state_dict = {k: torch.randn(s, generator=generator).to(dtype) for k, s in shapes.items()}
            ours = _time(is_finite, state_dict, 3)
            plain = _time(lambda t: bool(torch.isfinite(t).all()), state_dict, 3)
            rows.append({"model": config, "params_M": round(params / 1e6), "dtype": str(dtype).split(".")[-1],
                         "sum_scan_ms": round(ours * 1000), "isfinite_all_ms": round(plain * 1000)})
            del state_dict
    return rows


def main() -> None:
    rows = run(quick="--quick" in sys.argv)
    print("| model | parameters | dtype | sum scan (default) | isfinite().all() |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params_M']}M | {r['dtype']} | {r['sum_scan_ms']} ms | {r['isfinite_all_ms']} ms |")


if __name__ == "__main__":
    main()
