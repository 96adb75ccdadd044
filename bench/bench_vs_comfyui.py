"""Tokenize and load speed side by side with ComfyUI's own code, in one process (issue 27, point 7).

Two comparisons, each interleaved A B C A B C ... in one process (the machine is
shared, so ratios of the same rounds are what counts), repeated:

* **tokenize**: the 2,000 realistic prompts of ``bench_prompt.make_corpus``,
  each round on fresh (cold-cache) tokenizers: textenc's ``SDTokenizer``, the
  ComfyUI-style reference (``tests/comfy_reference.py``, the tests' oracle) and,
  with ``--comfyui``, the real ``comfy.sd1_clip.SDTokenizer``. Outputs are
  checked equal before timing.
* **load**: with ``--comfyui``, a CLIP-L fp16 file (random weights, written
  once to ``bench/out``) loaded by ``textenc.sd.load_clip`` (finite-weight
  check on, the default) and by ComfyUI's ``comfy.sd.load_clip``.

ComfyUI is imported from ``--comfyui`` at run time (nothing of it is copied
here), forced onto the CPU (its ``--cpu`` flag); ``--deps`` appends a folder
of its extra imports to ``sys.path``, and ``--stub-missing`` replaces imports of
``comfy.sd`` that are still missing (torchvision, ...; off the text-encoder
path) by placeholders, listing them.

Usage: ``python bench/bench_vs_comfyui.py [--comfyui DIR [--deps DIR]] [--rounds N] [--repeats N]``
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import os
import statistics
import sys
import types
from pathlib import Path
from unittest import mock

import torch

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.join(os.path.dirname(_BENCH), "tests")]
import common  # noqa: E402
from bench_prompt import make_corpus  # noqa: E402
from comfy_reference import ComfyTokenizer  # noqa: E402

from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer  # noqa: E402

CLIP_L_FILE = common.OUT_DIR / "clip_l_fp16_comfy_layout.safetensors"


class _Stub(types.ModuleType):
    """A placeholder for a module ComfyUI imports but the text-encoder path never uses."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.__name__}.{name}")


def _import_stubbing(module: str, stub: bool) -> tuple[types.ModuleType, list[str]]:
    """``import module``; with ``stub``, each missing module (torchvision, ...) becomes a placeholder."""
    missing: list[str] = []
    while True:
        try:
            return importlib.import_module(module), missing
        except ModuleNotFoundError as error:
            if not stub or error.name is None or error.name in missing:
                raise
            missing.append(error.name)
            parts = error.name.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join(parts[:depth])
                if name not in sys.modules:
                    placeholder = _Stub(name)
                    placeholder.__spec__ = importlib.machinery.ModuleSpec(name, None)
                    placeholder.__path__ = []
                    sys.modules[name] = placeholder


def import_comfy(path: str, deps: str | None, stub: bool):
    """ComfyUI's ``comfy.sd`` and ``comfy.sd1_clip`` from a source tree, on the CPU."""
    sys.path.insert(0, str(Path(path).resolve()))
    if deps:
        sys.path.append(deps)
    import transformers  # noqa: F401  (before any placeholder: it probes optional packages once)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # ComfyUI's --cpu, before model_management is imported
    import comfy.model_management  # noqa: F401
    import comfy.sd1_clip

    comfy_sd, missing = _import_stubbing("comfy.sd", stub)
    if missing:
        print(f"ComfyUI imports not installed, replaced by placeholders (not on the text-encoder path): {missing}")
    return comfy_sd, comfy.sd1_clip


def _tokenizers(comfy_sd1) -> dict:
    import transformers

    makers = {"textenc": SDTokenizer,
              "reference": lambda: ComfyTokenizer(transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB))}
    if comfy_sd1 is not None:
        makers["comfyui"] = comfy_sd1.SDTokenizer
    return makers


def bench_tokenize(comfy_sd1, rounds: int, count: int) -> dict[str, common.Stats]:
    """Seconds per round of ``count`` prompts for each tokenizer (fresh instance per round)."""
    corpus = make_corpus(count)
    makers = _tokenizers(comfy_sd1)
    once = {name: make() for name, make in makers.items()}
    for prompt in corpus:  # identical output, word ids included
        outputs = {name: t.tokenize_with_weights(prompt, True) for name, t in once.items()}
        if any(o != outputs["textenc"] for o in outputs.values()):
            raise AssertionError(f"tokenizers differ on {prompt!r}")
    fresh = {name: [make() for _ in range(rounds)] for name, make in makers.items()}

    def run_all(name: str):
        tokenizer = fresh[name].pop()
        for prompt in corpus:
            tokenizer.tokenize_with_weights(prompt)

    return common.interleaved({name: (lambda n=name: run_all(n)) for name in makers}, repeats=rounds, warmup=0)


def write_clip_l() -> Path:
    """A CLIP-L fp16 text encoder file in ComfyUI's key layout (random weights), once."""
    if CLIP_L_FILE.exists():
        return CLIP_L_FILE
    from safetensors.torch import save_file

    common.OUT_DIR.mkdir(parents=True, exist_ok=True)
    hf = common.hf_text_model("sd1_clip_config").half()
    save_file({k: v.contiguous() for k, v in common.hf_text_state_dict(hf).items()}, str(CLIP_L_FILE))
    return CLIP_L_FILE


def bench_load(comfy_sd, rounds: int) -> dict[str, common.Stats]:
    """Seconds to load the CLIP-L fp16 file: textenc (finite check on) and ComfyUI."""
    from textenc.sd import load_clip

    path = str(write_clip_l())
    fns = {"textenc": lambda: load_clip(path, require_finite=True),
           "comfyui": lambda: comfy_sd.load_clip(ckpt_paths=[path])}
    return common.interleaved(fns, repeats=rounds, warmup=1)


def _print(title: str, stats: dict[str, common.Stats], base: str, speedup: bool) -> None:
    print(f"\n{title} (min / median / max ms, wall; cpu median ms)")
    for name, s in stats.items():
        print(f"  {name:10s} {s.fmt()}  cpu {statistics.median(s.cpu) * 1e3:.1f} ms")
    for name, s in stats.items():
        if name == base:
            continue
        ratio = (s.median / stats[base].median) if speedup else (stats[base].median / s.median)
        paired = [(a / b) if speedup else (b / a) for a, b in zip(s.samples, stats[base].samples)]
        what = f"{name} / {base}" if speedup else f"{base} / {name}"
        cpu_ratio = (statistics.median(s.cpu) / statistics.median(stats[base].cpu) if speedup
                     else statistics.median(stats[base].cpu) / statistics.median(s.cpu))
        print(f"  {what}: {ratio:.2f}x wall (paired per round: {min(paired):.2f} / "
              f"{statistics.median(paired):.2f} / {max(paired):.2f}); {cpu_ratio:.2f}x cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="a ComfyUI source tree (adds the real ComfyUI columns)")
    parser.add_argument("--deps", help="an extra folder for ComfyUI's imports (appended to sys.path)")
    parser.add_argument("--stub-missing", action="store_true",
                        help="replace ComfyUI imports that are not installed (torchvision, ...) by placeholders")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per repeat")
    parser.add_argument("--repeats", type=int, default=1, help="times to run each comparison")
    parser.add_argument("--count", type=int, default=2000, help="prompts per tokenize round")
    parser.add_argument("--only", choices=("tokenize", "load"), help="run one comparison")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    comfy_sd, comfy_sd1 = import_comfy(args.comfyui, args.deps, args.stub_missing) if args.comfyui else (None, None)
    print(common.machine())
    for repeat in range(args.repeats):
        if args.only != "load":
            _print(f"tokenize {args.count} prompts, repeat {repeat + 1}",
                   bench_tokenize(comfy_sd1, args.rounds, args.count), "textenc", speedup=True)
        if args.only != "tokenize" and comfy_sd is not None:
            _print(f"load CLIP-L fp16, repeat {repeat + 1}", bench_load(comfy_sd, args.rounds),
                   "comfyui", speedup=False)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
