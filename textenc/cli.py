"""The ``textenc`` command line: ``encode``, ``inspect``, ``vision``, ``encode-dataset``.

Bad input (a missing file, a file of the wrong kind, a model that is not
CLIP) ends with one ``textenc: error: ...`` line on stderr and exit status 1;
any other exception is a bug and is left to raise. Heavy modules (torch,
the models) are imported inside the subcommands, so ``textenc --help`` and
``textenc inspect`` stay fast; ``inspect`` never imports the model code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any, Sequence

from .errors import TextencError

__all__ = ["main", "build_parser", "read_prompts"]

WEIGHT_MODES = ("comfy", "a1111", "a1111_no_norm", "compel", "none")  # textenc.weighting.WEIGHT_MODES
NORMALIZATIONS = ("none", "mean", "length", "length+mean")
CLIP_TYPES = ("auto", "sd1", "sd2", "sdxl")
TOKENIZERS = {"sd1": (768, True), "sd2": (1024, False), "sdxl-g": (1280, False)}  # width, pad with end


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


# --- prompts ----------------------------------------------------------------------

def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or a ``.jsonl`` file
    (each line a JSON string or an object with a ``"prompt"`` or ``"text"`` key).

    Raises:
        TextencError: a JSONL line that is not a prompt; OSError: unreadable file.
    """
    with open(path, encoding="utf-8") as handle:
        lines = [line.rstrip("\n") for line in handle]
    if not path.lower().endswith((".jsonl", ".ndjson")):
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            prompts.append(_jsonl_prompt(line, f"{path}:{number}"))
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        value = json.loads(line)
    except ValueError as error:
        raise TextencError(f"{where}: not JSON ({error})") from None
    if isinstance(value, dict):
        value = value.get("prompt", value.get("text"))
    if not isinstance(value, str):
        raise TextencError(f"{where}: expected a JSON string or an object with a 'prompt' key")
    return value


def _gather_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise TextencError("no prompts: give them as arguments or with --prompts-file")
    return prompts


# --- encode -----------------------------------------------------------------------

def _layer(clip_skip: int | None) -> int | None:
    """``--clip-skip``: ComfyUI's negative layer (-2), or A1111's positive count (2 = -2)."""
    return None if clip_skip in (None, 0) else -abs(clip_skip)


def _check_out(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise TextencError(f"--out {path}: folder {folder} does not exist")
    if not path.endswith(".safetensors"):
        raise TextencError(f"--out {path}: the output is a safetensors file; name it *.safetensors")


def _progress(items: list, description: str):
    if len(items) < 2:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="prompt", file=sys.stderr)


def _encode_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"weight_mode": args.weight_mode, "normalization": args.normalization}
    layer = _layer(args.clip_skip)
    if layer is not None:
        options["layer"] = layer
    return options


def run_encode(args: argparse.Namespace) -> int:
    prompts = _gather_prompts(args)
    _check_out(args.out)
    from safetensors.torch import save_file

    from .sd import load_clip

    clip = load_clip(args.model, embedding_directory=args.embeddings, clip_type=args.clip_type)
    options = _encode_options(args)
    tensors = {}
    for index, prompt in enumerate(_progress(prompts, "encode")):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, options=options)
        tensors[f"cond_{index}"] = cond.detach().contiguous().cpu()
        tensors[f"pooled_{index}"] = pooled.detach().contiguous().cpu()
    metadata = {"format": "textenc.encode/1", "prompts": json.dumps(prompts),
                "options": json.dumps({**options, "clip_type": clip.clip_type,
                                       "models": [os.path.basename(m) for m in args.model]})}
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {len(prompts)} prompt(s) to {args.out}: cond {tuple(tensors['cond_0'].shape)}, "
          f"pooled {tuple(tensors['pooled_0'].shape)} ({clip.clip_type})")
    return 0


# --- inspect ----------------------------------------------------------------------

def _inspect_report(args: argparse.Namespace):
    from .tokenizer import SDTokenizer

    width, pad_with_end = TOKENIZERS[args.tokenizer]
    if args.embeddings is not None and not os.path.isdir(args.embeddings):
        raise TextencError(f"--embeddings {args.embeddings}: not a directory")
    tokenizer = SDTokenizer(pad_with_end=pad_with_end, embedding_directory=args.embeddings,
                            embedding_size=width, embedding_key="clip_g" if args.tokenizer == "sdxl-g" else
                            ("clip_h" if args.tokenizer == "sd2" else "clip_l"),
                            weight_convention=args.weight_convention, square_brackets=args.square_brackets,
                            break_keyword=args.break_keyword)
    return tokenizer.inspect(args.prompt)


def _report_dict(report) -> dict[str, Any]:
    return {
        "windows": [[{"token": t.token, "text": t.text, "weight": t.weight, "word_id": t.word_id}
                     for t in window] for window in report.windows],
        "units": [{"word_id": u.word_id, "kind": u.kind, "text": u.text, "weight": u.weight,
                   "start": u.start, "end": u.end, "num_tokens": u.num_tokens} for u in report.units],
        "embeddings": [{"name": e.name, "status": e.status, "path": e.path, "reason": e.reason,
                        "vectors": None if e.vectors is None else int(e.vectors.shape[0])}
                       for e in report.embeddings],
        **({"chunks": [vars(c) for c in report.chunks], "moves": [vars(m) for m in report.moves]}
           if hasattr(report, "chunks") else {}),
    }


def _window_lines(index: int, window) -> list[str]:
    content = [t for t in window if t.word_id != 0]
    lines = [f"window {index}: {len(window)} tokens, {len(content)} from the prompt",
             f"  {'pos':>4}  {'token':>6}  {'weight':>7}  {'word':>4}  text"]
    last = max((i for i, t in enumerate(window) if t.word_id != 0), default=0) + 1
    for position, token in enumerate(window[:last + 1]):
        token_id = "emb" if token.token is None else str(token.token)
        lines.append(f"  {position:>4}  {token_id:>6}  {token.weight:>7.4g}  {token.word_id:>4}  {token.text}")
    if len(window) > last + 1:
        lines.append(f"  ... {len(window) - last - 1} padding token(s)")
    return lines


def _format_report(report) -> str:
    lines = []
    for index, window in enumerate(report.windows):
        lines += _window_lines(index, window)
    lines.append("units:")
    for unit in report.units:
        lines.append(f"  word {unit.word_id:>3}  {unit.kind:<9}  weight {unit.weight:<7.4g}  "
                     f"{unit.num_tokens:>3} token(s)  {unit.text!r}")
    for chunk in getattr(report, "chunks", ()):  # syntax="a1111": A1111's chunks
        lines.append(f"chunk {chunk.index}: {chunk.num_tokens} prompt token(s), ended by {chunk.ended_by}")
    for move in getattr(report, "moves", ()):
        lines.append(f"  comma backtracking moved {move.num_tokens} token(s) from chunk {move.source} "
                     f"to chunk {move.source + 1}: {move.text!r}")
    if report.embeddings:
        lines.append("embeddings:")
        for entry in report.embeddings:
            detail = entry.path if entry.status == "found" else entry.reason
            lines.append(f"  {entry.name}: {entry.status} ({detail})")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    report = _inspect_report(args)
    print(json.dumps(_report_dict(report), indent=1) if args.json else _format_report(report))
    return 0


# --- vision -----------------------------------------------------------------------

def _read_image(path: str):
    try:
        from PIL import Image
    except ImportError:
        raise TextencError("textenc vision needs Pillow: pip install pillow") from None
    import numpy as np
    import torch

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]  # (1, H, W, 3) in 0..1, ComfyUI's IMAGE


def run_vision(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from . import clip_vision

    _check_out(args.out)
    for path in args.images:
        if not os.path.isfile(path):
            raise TextencError(f"{path}: image file does not exist")
    model = clip_vision.load(args.model)
    tensors = {}
    for index, path in enumerate(_progress(list(args.images), "vision")):
        out = model.encode_image(_read_image(path), crop=args.crop == "center")
        tensors[f"image_embeds_{index}"] = out.image_embeds.detach().contiguous().cpu()
        if args.hidden_states:
            tensors[f"penultimate_hidden_states_{index}"] = out.penultimate_hidden_states.contiguous().cpu()
    metadata = {"format": "textenc.vision/1", "images": json.dumps([os.path.basename(p) for p in args.images]),
                "options": json.dumps({"crop": args.crop, "model": os.path.basename(args.model)})}
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {len(args.images)} image embedding(s) to {args.out}: "
          f"{tuple(tensors['image_embeds_0'].shape)} each")
    return 0


# --- parser -----------------------------------------------------------------------

def _add_encode(sub) -> None:
    parser = sub.add_parser("encode", help="encode prompts to a safetensors file",
                            description="Encode prompts with a CLIP text encoder; writes cond_{i} and "
                                        "pooled_{i} per prompt, with the prompts and options as metadata.")
    parser.add_argument("prompts", nargs="*", help="prompts (ComfyUI weight syntax)")
    parser.add_argument("--prompts-file", help="text file (one prompt per line) or .jsonl file")
    # action="append", not nargs="+": a prompt written after --model FILE must
    # stay a prompt. SDXL from two files: --model clip_l.safetensors --model clip_g.safetensors
    parser.add_argument("--model", action="append", required=True,
                        help="checkpoint file; repeat for SDXL's clip_l and clip_g files")
    parser.add_argument("--clip-type", choices=CLIP_TYPES, default="auto")
    parser.add_argument("--clip-skip", type=int, default=None,
                        help="last layer: -2 (ComfyUI) or 2 (A1111) = penultimate")
    parser.add_argument("--weight-mode", choices=WEIGHT_MODES, default="comfy")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="none")
    parser.add_argument("--embeddings", metavar="DIR", help="textual-inversion folder")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.set_defaults(run=run_encode)


def _add_inspect(sub) -> None:
    parser = sub.add_parser("inspect", help="show how a prompt is tokenized (no model needed)",
                            description="Show windows, tokens, weights and embeddings of a prompt.")
    parser.add_argument("prompt")
    parser.add_argument("--embeddings", metavar="DIR", help="textual-inversion folder")
    parser.add_argument("--tokenizer", choices=list(TOKENIZERS), default="sd1",
                        help="padding and embedding width: sd1 (CLIP-L), sd2 (ViT-H), sdxl-g (bigG)")
    parser.add_argument("--weight-convention", choices=("comfy", "a1111"), default="comfy")
    parser.add_argument("--square-brackets", action="store_true", help="[x] down-weights by 1/1.1")
    parser.add_argument("--break", dest="break_keyword", action="store_true", help="BREAK starts a new window")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run_inspect)


def _add_vision(sub) -> None:
    parser = sub.add_parser("vision", help="encode images with a CLIP vision model",
                            description="Encode image files; writes image_embeds_{i} per image.")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--model", required=True, help="CLIP vision checkpoint")
    parser.add_argument("--crop", choices=("center", "none"), default="center")
    parser.add_argument("--hidden-states", action="store_true", help="also save penultimate hidden states")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.set_defaults(run=run_vision)


def _add_dataset(sub, wanted: bool) -> None:
    """``encode-dataset`` comes from :mod:`textenc.dataset`, imported only when it is the
    command; for the other commands a stub keeps it listed in ``--help``."""
    if wanted:
        from . import dataset
        dataset.add_encode_dataset_arguments(sub)
    else:
        sub.add_parser("encode-dataset", help="encode a caption dataset (see textenc encode-dataset --help)",
                       add_help=False)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textenc", description="CLIP text conditioning for Stable Diffusion.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"textenc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_encode(sub)
    _add_inspect(sub)
    _add_vision(sub)
    command = next((a for a in argv if not a.startswith("-")), None)
    _add_dataset(sub, command == "encode-dataset")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"textenc: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.run(args))
        except (TextencError, OSError) as error:
            print(f"textenc: error: {_one_line(error)}", file=sys.stderr)
            return 1
