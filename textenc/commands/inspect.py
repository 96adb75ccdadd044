"""``textenc inspect``: how a prompt is read (windows, tokens, weights, embeddings).

Needs no model weights: the bundled tokenizer of ``--tokenizer``, or the
tokenizer of ``--model`` when one is given. The model code (torch layers) is
imported only for ``--model``. All printing is :func:`format_report`
(table) and :func:`report_dict` (``--json``); with ``--steps N`` (A1111
syntax) it is :func:`format_schedule` and :func:`schedule_dict`: for each
``AND`` part and each text of its prompt-editing schedule, the steps it is
used at (as :meth:`textenc.sd.CLIP.encode_scheduled` with ``steps=N``), the
text and its chunks.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..prompts.dialects import SYNTAXES, prompt_schedules
from ..prompts.step_ranges import step_ranges
from .common import add_dialect_flags, check_folder, dialect_flag_options, positive_int
from .encode import SYNTAX_HELP
from .inspect_summary import FULL_HELP, dropped_lines, format_summary, is_long

__all__ = ["add_inspect", "run_inspect", "format_report", "report_dict", "format_schedule", "schedule_dict",
           "TOKENIZERS", "SCHEDULED_SYNTAXES"]

#: The syntaxes whose dialect has prompt schedules (editing, alternation, AND), so
#: --steps can be checked while parsing, without importing the dialects (tests check).
SCHEDULED_SYNTAXES = ("a1111",)

#: --tokenizer name → (embedding width, pad with the end token, embedding key).
TOKENIZERS = {"sd1": (768, True, "clip_l"), "sd2": (1024, False, "clip_h"), "sdxl-g": (1280, False, "clip_g")}


def _bundled_tokenizer(args: argparse.Namespace, embeddings: str | None):
    from ..prompts.tokenizer import SDTokenizer

    width, pad_with_end, key = TOKENIZERS[args.tokenizer]
    return SDTokenizer(pad_with_end=pad_with_end, embedding_directory=embeddings,
                       embedding_size=width, embedding_key=key)


def _model_tokenizer(args: argparse.Namespace, embeddings: str | None):
    """The tokenizer of ``--model``: its only one, or for SDXL CLIP-L's (``--tokenizer sd1``,
    the default) or bigG's (``--tokenizer sdxl-g``)."""
    from ..load import load_text_model

    tokenizers = load_text_model(args.model, embedding_directory=embeddings).tokenizer.tokenizers
    if len(tokenizers) == 1:
        return next(iter(tokenizers.values()))
    return tokenizers["l"] if args.tokenizer == "sd1" else tokenizers["g"]


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report of ``args.prompt`` as a table or JSON."""
    embeddings = None if args.embeddings is None else check_folder(args.embeddings, "--embeddings")
    tokenizer = (_model_tokenizer(args, embeddings) if args.model
                 else _bundled_tokenizer(args, embeddings))
    if args.steps is not None:
        schedule = schedule_report(tokenizer, args.prompt, syntax=args.syntax, steps=args.steps)
        print(json.dumps(schedule_dict(schedule), indent=1) if args.json else format_schedule(schedule))
        return 0
    report = tokenizer.inspect(args.prompt, syntax=args.syntax, **dialect_flag_options(args))
    if args.json:
        print(json.dumps(report_dict(report), indent=1))
    else:
        print(format_report(report) if args.full or not is_long(report) else format_summary(report, _window_lines))
    return 0


# --- schedules (--steps) ----------------------------------------------------------

def schedule_report(tokenizer, prompt: str, *, syntax: str, steps: int) -> dict[str, Any]:
    """``{"steps", "parts": [{"weight", "entries": [(StepRange, InspectReport), ...]}]}``:
    the ``AND`` parts of ``prompt``, each text of their schedules over ``steps``
    sampling steps, and how ``tokenizer`` reads that text."""
    parts = []
    for weight, schedule in prompt_schedules(syntax, prompt, steps):
        entries = [(entry, tokenizer.inspect(entry.text, syntax=syntax))
                   for entry in step_ranges(schedule, steps)]
        parts.append({"weight": weight, "entries": entries})
    return {"steps": steps, "parts": parts}


def schedule_dict(schedule: dict[str, Any]) -> dict[str, Any]:
    """A :func:`schedule_report` as plain JSON-able data (``--steps N --json``)."""
    def entry_dict(entry, report) -> dict[str, Any]:
        return {"first_step": entry.first_step, "last_step": entry.last_step,
                "start_percent": entry.start_percent, "end_percent": entry.end_percent, "text": entry.text,
                "chunks": [vars(c) for c in getattr(report, "chunks", ())],
                "moves": [vars(m) for m in getattr(report, "moves", ())]}

    return {"steps": schedule["steps"],
            "parts": [{"weight": part["weight"], "entries": [entry_dict(*pair) for pair in part["entries"]]}
                      for part in schedule["parts"]]}


def format_schedule(schedule: dict[str, Any]) -> str:
    """A :func:`schedule_report` as the table ``textenc inspect --steps N`` prints."""
    steps, parts = schedule["steps"], schedule["parts"]
    lines = [f"schedule over {steps} steps (0..{steps - 1}), {len(parts)} AND part(s)"]
    for number, part in enumerate(parts, 1):
        lines.append(f"part {number}: weight {part['weight']:.4g}")
        for entry, report in part["entries"]:
            lines.append(f"  steps {entry.first_step}..{entry.last_step}  start_percent {entry.start_percent:.4g}"
                         f"  end_percent {entry.end_percent:.4g}  {entry.text!r}")
            lines += ["    " + line for line in _chunk_lines(report)]
    return "\n".join(lines)


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
        "dropped_tokens": report.dropped_tokens,
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


def _chunk_lines(report) -> list[str]:
    """A1111's chunks and comma-backtracking moves of a report (none for other syntaxes)."""
    lines = [f"chunk {chunk.index}: {chunk.num_tokens} prompt token(s), ended by {chunk.ended_by}"
             for chunk in getattr(report, "chunks", ())]
    for move in getattr(report, "moves", ()):
        lines.append(f"  comma backtracking moved {move.num_tokens} token(s) from chunk {move.source} "
                     f"to chunk {move.source + 1}: {move.text!r}")
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
    lines += _chunk_lines(report)
    lines += dropped_lines(report)
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
    add_dialect_flags(parser)
    add("--tokenizer", choices=list(TOKENIZERS), default="sd1",
        help="bundled tokenizer: padding and embedding width of sd1 (CLIP-L), sd2 (ViT-H) or sdxl-g "
             "(bigG); with an SDXL --model, sd1 picks its CLIP-L side and sdxl-g its bigG side")
    add("--model", action="append", metavar="PATH",
        help="read the tokenizer and embedding width from this checkpoint file or diffusers model "
             "folder, as textenc encode --model (default: none: the bundled --tokenizer)")
    add("--embeddings", metavar="DIR", help="textual-inversion folder for embedding:name (default: none: each "
        "embedding:name is then read as plain text, as ComfyUI does, with a warning; one missing from the "
        "folder is left out, with a warning and an embeddings: line saying why)")
    add("--steps", type=positive_int, default=None, metavar="N",
        help="sampling steps, as steps= of CLIP.encode_scheduled: print the prompt's schedule instead "
             "(A1111 prompt editing [a:b:when], alternation [a|b] and AND parts): for each part and each "
             "text, the 0-based steps it is used at, ComfyUI's start_percent/end_percent, the text and "
             f"its chunks; needs --syntax {'|'.join(SCHEDULED_SYNTAXES)} (default: none: the prompt's "
             "windows and units)")
    add("--json", action="store_true", help="print JSON instead of a table")
    add("--full", action="store_true", help=FULL_HELP)
    parser.add_check(_check_steps)
    parser.set_defaults(run=run_inspect)
    return parser


def _check_steps(args: argparse.Namespace) -> str | None:
    """``--steps`` only with a syntax that has prompt schedules."""
    if args.steps is None or args.syntax in SCHEDULED_SYNTAXES:
        return None
    return (f"--steps needs a syntax with prompt schedules (--syntax {' or '.join(SCHEDULED_SYNTAXES)}); "
            f"--syntax {args.syntax} has no prompt editing, alternation or AND: drop --steps or "
            f"use --syntax {SCHEDULED_SYNTAXES[0]}")
