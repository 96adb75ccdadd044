"""``textenc inspect``: how a prompt is read (windows, tokens, weights, embeddings).

Needs no model weights: the bundled tokenizer of ``--tokenizer``, or the
tokenizer of ``--model`` when one is given. The model code (torch layers) is
imported only for ``--model``. All printing is :func:`format_report`
(table) and :func:`report_dict` (``--json``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..dialects import SYNTAXES
from .common import check_folder
from .encode import SYNTAX_HELP

__all__ = ["add_inspect", "run_inspect", "format_report", "report_dict", "TOKENIZERS"]

#: --tokenizer name → (embedding width, pad with the end token, embedding key).
TOKENIZERS = {"sd1": (768, True, "clip_l"), "sd2": (1024, False, "clip_h"), "sdxl-g": (1280, False, "clip_g")}


def _bundled_tokenizer(args: argparse.Namespace, embeddings: str | None):
    from ..tokenizer import SDTokenizer

    width, pad_with_end, key = TOKENIZERS[args.tokenizer]
    return SDTokenizer(pad_with_end=pad_with_end, embedding_directory=embeddings,
                       embedding_size=width, embedding_key=key)


def _model_tokenizer(args: argparse.Namespace, embeddings: str | None):
    """The tokenizer of ``--model``: its only one, or for SDXL CLIP-L's (``--tokenizer sd1``,
    the default) or bigG's (``--tokenizer sdxl-g``)."""
    from ..load import load_text_model

    tokenizer = load_text_model(args.model, embedding_directory=embeddings).tokenizer
    if hasattr(tokenizer, "clip_g"):
        return tokenizer.clip_l if args.tokenizer == "sd1" else tokenizer.clip_g
    return tokenizer.tokenizer


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report of ``args.prompt`` as a table or JSON."""
    embeddings = None if args.embeddings is None else check_folder(args.embeddings, "--embeddings")
    tokenizer = (_model_tokenizer(args, embeddings) if args.model
                 else _bundled_tokenizer(args, embeddings))
    report = tokenizer.inspect(args.prompt, syntax=args.syntax)
    print(json.dumps(report_dict(report), indent=1) if args.json else format_report(report))
    return 0


# --- printing ---------------------------------------------------------------------

def report_dict(report) -> dict[str, Any]:
    """An ``InspectReport`` as plain JSON-able data (``--json``)."""
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


def format_report(report) -> str:
    """An ``InspectReport`` as the table ``textenc inspect`` prints."""
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


def add_inspect(sub) -> argparse.ArgumentParser:
    """Add ``inspect`` to the ``textenc`` sub-parsers; returns its parser."""
    parser = sub.add_parser("inspect", help="show how a prompt is tokenized (no model needed)",
                            description="Show windows, tokens, weights and embeddings of a prompt.")
    add = parser.add_argument
    add("prompt", help="the prompt, in the grammar chosen by --syntax")
    add("--syntax", choices=SYNTAXES, default="comfy", help=SYNTAX_HELP)
    add("--tokenizer", choices=list(TOKENIZERS), default="sd1",
        help="bundled tokenizer: padding and embedding width of sd1 (CLIP-L), sd2 (ViT-H) or sdxl-g "
             "(bigG); with an SDXL --model, sd1 picks its CLIP-L side and sdxl-g its bigG side")
    add("--model", action="append", metavar="PATH",
        help="read the tokenizer and embedding width from this checkpoint file or diffusers model "
             "folder, as textenc encode --model (default: none: the bundled --tokenizer)")
    add("--embeddings", metavar="DIR", help="textual-inversion folder for embedding:name (default: none; "
        "each embedding:name is then reported missing)")
    add("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run_inspect)
    return parser
