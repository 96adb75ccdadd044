"""Target 6: cold start of one encode in a fresh process, against transformers.

Ours: ``python -m textenc encode "a prompt" --model clip_l_fp16.safetensors --out x``.
Reference: ``CLIPTokenizer.from_pretrained`` + ``CLIPTextModel.from_pretrained``
from an HF folder written with ``save_pretrained`` in fp16, computing in fp32 like
ours, saving the result with safetensors. Both read the same random CLIP-L
weights; wall time and peak RSS (``/usr/bin/time -f %M`` around each child) are
measured, interleaved ours/theirs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

try:
    from . import common
except ImportError:  # run as a script from bench/
    import common

PROMPT = "a photograph of an astronaut riding a horse, (detailed:1.2)"
SD1_FILE = common.OUT_DIR / "clip_l_fp16_sd1.safetensors"
HF_DIR = common.OUT_DIR / "hf_clip_l_fp16"

HF_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer
tokenizer = CLIPTokenizer.from_pretrained(sys.argv[1])
model = CLIPTextModel.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = tokenizer(sys.argv[2], padding="max_length", max_length=77, truncation=True,
                return_tensors="pt").input_ids
with torch.no_grad():
    out = model(ids)
save_file({"cond_0": out.last_hidden_state.contiguous(), "pooled_0": out.pooler_output.contiguous()},
          sys.argv[3])
"""


def prepare() -> None:
    """Write the fp16 SD1-layout file and the fp16 HF folder once (random weights)."""
    if SD1_FILE.exists() and (HF_DIR / "config.json").exists():
        return
    import transformers
    from safetensors.torch import save_file

    from textenc.prompts.tokenizer import DEFAULT_VOCAB

    common.OUT_DIR.mkdir(parents=True, exist_ok=True)
    hf = common.hf_text_model("sd1_clip_config").half()
    sd = {"cond_stage_model.transformer." + k: v.contiguous()
          for k, v in common.hf_text_state_dict(hf).items() if k != "text_projection.weight"}
    save_file(sd, str(SD1_FILE))
    hf.save_pretrained(HF_DIR)
    transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB).save_pretrained(HF_DIR)


def ours_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "textenc", "encode", PROMPT, "--model", str(SD1_FILE), "--out", str(out)]


def hf_command(out: Path) -> list[str]:
    return [sys.executable, "-c", HF_SCRIPT, str(HF_DIR), PROMPT, str(out)]


TIME = Path("/usr/bin/time")


def measure(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process.

    The peak comes from ``/usr/bin/time -f %M``: a child forked straight from
    this (large) benchmark process would report this process's RSS as its
    high-water mark, because Linux keeps ``maxrss`` across fork and exec. The
    small C wrapper adds ~1 ms to the wall time of both sides alike.
    """
    report = common.OUT_DIR / "maxrss.txt"
    wrapped = [str(TIME), "-f", "%M", "-o", str(report), *command] if TIME.exists() else command
    start = time.perf_counter()
    process = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({process.returncode}): {stderr[-2000:]}")
    if TIME.exists():
        return wall, int(report.read_text().split()[-1]) * 1024  # KiB
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB; an upper bound, see above


def import_report() -> str:
    """Time of ``import textenc.sd`` and which heavy modules it pulls in."""
    code = ("import sys, time; t = time.perf_counter(); import textenc.sd; "
            "print(round(time.perf_counter() - t, 2), "
            "[m for m in ('transformers', 'tokenizers', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, heavy = out.stdout.strip().split(" ", 1)
    return f"import textenc.sd {seconds}s, heavy modules loaded: {heavy}"


def run(quick: bool = False) -> list[dict]:
    prepare()
    repeats = 2 if quick else 4
    ours_out, hf_out = common.OUT_DIR / "cold_ours.safetensors", common.OUT_DIR / "cold_hf.safetensors"
    measure(ours_command(ours_out))  # page cache warm for both sides: warm-file cold start
    measure(hf_command(hf_out))
    walls = {"ours": [], "hf": []}
    rss = {"ours": [], "hf": []}
    for i in range(repeats):
        order = [("ours", ours_command(ours_out)), ("hf", hf_command(hf_out))]
        for name, command in (order if i % 2 == 0 else order[::-1]):
            wall, peak = measure(command)
            walls[name].append(wall)
            rss[name].append(peak)
    ours_t, hf_t = common.Stats(walls["ours"]), common.Stats(walls["hf"])
    rows = [common.ratio_row("6 cold start wall", "CLIP-L fp16, 1 prompt", ours_t, hf_t, 0.5, ref_label="HF",
                             note=f"CLI `python -m textenc encode`; {import_report()}")]
    ours_rss, hf_rss = max(rss["ours"]), max(rss["hf"])
    rows.append(common.row("6 cold start peak RSS", "CLIP-L fp16, 1 prompt", common.fmt_bytes(ours_rss),
                           "HF " + common.fmt_bytes(hf_rss), ours_rss / hf_rss, "<= 1x",
                           ours_rss <= hf_rss, "max over runs; /usr/bin/time %M"))
    return rows


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
