"""``textenc inspect``: how a prompt is read (windows, tokens, weights, embeddings).

Needs no model weights: the bundled tokenizer of ``--tokenizer``, the bundled tokenizers of
a family (``--clip-type flux``: CLIP-L and T5), or the tokenizers of ``--model`` when one is
given. A model of several text encoders (SDXL, SD3, Flux) is reported part by part (its
role, token count, prompt tokens and padding; T5's SentencePiece pieces with their weights)
unless ``--tokenizer`` picks one. The model code (torch layers) is imported only for
``--model`` and ``--clip-type``. All printing is :func:`format_report`
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

from ..prompts.dialects import SYNTAXES, get_dialect, prompt_schedules
from ..prompts.step_ranges import step_ranges
from ..text_encoders.names import CLIP_TYPE_HELP
from .common import add_dialect_flags, check_folder, dialect_flag_options, positive_int
from .encode import CLIP_TYPES, SYNTAX_HELP
from .early_checks import check_model_paths
from .inspect_summary import FULL_HELP, dropped_lines, embedding_lines, format_summary, is_long

__all__ = ["add_inspect", "run_inspect", "format_report", "report_dict", "format_schedule", "schedule_dict",
           "part_lengths", "TOKENIZERS", "TOKENIZER_ROLES", "SCHEDULED_SYNTAXES"]

#: The syntaxes whose dialect has prompt schedules (editing, alternation, AND), so
#: --steps can be checked while parsing, without importing the dialects (tests check).
SCHEDULED_SYNTAXES = ("a1111",)

#: --tokenizer name → (embedding width, pad with the end token, embedding key).
TOKENIZERS = {"sd1": (768, True, "clip_l"), "sd2": (1024, False, "clip_h"), "sdxl-g": (1280, False, "clip_g")}
#: --tokenizer name → the part (role) it picks of a model with several.
TOKENIZER_ROLES = {"sd1": "l", "sd2": "h", "sdxl-g": "g"}


def _bundled_tokenizer(args: argparse.Namespace, embeddings: str | None):
    from ..prompts.tokenizer import SDTokenizer

    width, pad_with_end, key = TOKENIZERS[args.tokenizer or "sd1"]
    return SDTokenizer(pad_with_end=pad_with_end, embedding_directory=embeddings,
                       embedding_size=width, embedding_key=key)


def _family_tokenizers(args: argparse.Namespace, embeddings: str | None) -> tuple[str | None, dict]:
    """``(clip_type, {role: tokenizer})`` of ``--model`` (loaded, as ``textenc encode``) or of
    ``--clip-type``'s family with its bundled vocabularies; ``(None, {})`` for neither.

    Raises:
        CheckpointError: a model that does not load, or a family whose tokenizer comes
            with its weights (Wan's UMT5) asked for without ``--model``.
    """
    clip_type = None if args.clip_type == "auto" else args.clip_type
    if args.model:
        from ..load import load_text_model
        from ..text_encoders.a1111_families import part_tokenizers

        clip = load_text_model(args.model, clip_type=clip_type, embedding_directory=embeddings)
        return clip.clip_type, part_tokenizers(clip.tokenizer)
    if clip_type is None:
        return None, {}
    from ..errors import CheckpointError
    from ..text_encoders.a1111_families import part_tokenizers
    from ..text_encoders.families import get_family

    try:
        tokenizer = get_family(clip_type).tokenizer_class.for_roles({}, embedding_directory=embeddings)
    except CheckpointError as error:
        raise CheckpointError(f"--clip-type {clip_type}: {error}; give the model's file with --model") from None
    return clip_type, part_tokenizers(tokenizer)


def _parts(args: argparse.Namespace, embeddings: str | None) -> tuple[str | None, dict]:
    """The tokenizers to report, by role: every part, or the one ``--tokenizer`` picks."""
    clip_type, tokenizers = _family_tokenizers(args, embeddings)
    if not tokenizers:
        return None, {TOKENIZER_ROLES[args.tokenizer or "sd1"]: _bundled_tokenizer(args, embeddings)}
    if args.tokenizer is None or len(tokenizers) == 1:
        return clip_type, tokenizers
    role = TOKENIZER_ROLES[args.tokenizer]
    if role not in tokenizers:
        from ..errors import CheckpointError

        raise CheckpointError(f"--tokenizer {args.tokenizer}: this {clip_type} model has no {role!r} part; its "
                              f"parts are {', '.join(tokenizers)} (leave --tokenizer out to see them all)")
    return clip_type, {role: tokenizers[role]}


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report of ``args.prompt`` as a table or JSON, one section per part."""
    embeddings = None if args.embeddings is None else check_folder(args.embeddings, "--embeddings")
    if args.model:
        args.model = check_model_paths(args.model)  # a missing file is refused before torch loads
    clip_type, parts = _parts(args, embeddings)
    if args.steps is not None:
        schedules = {role: schedule_report(tokenizer, args.prompt, syntax=args.syntax, steps=args.steps)
                     for role, tokenizer in parts.items()}
        _print_parts(args, clip_type, schedules, schedule_dict, format_schedule, with_lengths=False)
        return 0
    reports = {role: tokenizer.inspect(args.prompt, syntax=args.syntax, **dialect_flag_options(args))
               for role, tokenizer in parts.items()}

    def as_table(report) -> str:  # long prompts summarised unless --full
        return format_report(report) if args.full or not is_long(report) else format_summary(report, _window_lines)

    # The family's minimum length is shown where the dialect pads to it (not compel's chunks).
    min_lengths = None if not get_dialect(args.syntax).pads_to_min_length else {
        role: getattr(tokenizer, "min_length", None) for role, tokenizer in parts.items()}
    _print_parts(args, clip_type, reports, report_dict, as_table, with_lengths=True, min_lengths=min_lengths)
    return 0


def _print_parts(args: argparse.Namespace, clip_type: str | None, reports: dict, as_dict, as_table, *,
                 with_lengths: bool, min_lengths: dict | None = None) -> None:
    """One part: its report as before. Several: ``{"clip_type", "parts": {role: ...}}`` in JSON,
    or a ``part ROLE: ...`` header before each table."""
    if len(reports) == 1:
        (report,) = reports.values()
        print(json.dumps(as_dict(report), indent=1) if args.json else as_table(report))
        return
    sizes = {role: part_lengths(report, (min_lengths or {}).get(role)) if with_lengths else {}
             for role, report in reports.items()}
    if args.json:
        parts = {role: {**sizes[role], **as_dict(report)} for role, report in reports.items()}
        print(json.dumps({"clip_type": clip_type, "parts": parts}, indent=1))
        return
    sections = []
    for role, report in reports.items():
        body = "\n".join("  " + line for line in as_table(report).splitlines())
        sections.append(_part_header(role, sizes[role]) + "\n" + body)
    print(f"{clip_type}: {len(reports)} parts ({', '.join(reports)})\n" + "\n".join(sections))


def _part_header(role: str, size: dict[str, Any]) -> str:
    if not size:
        return f"part {role}"
    minimum = f" (minimum length {size['min_length']})" if size["min_length"] else ""
    return (f"part {role}: {size['tokens']} tokens, {size['prompt_tokens']} from the prompt, "
            f"{size['padding']} padding{minimum}")


def part_lengths(report, min_length: int | None) -> dict[str, Any]:
    """A part's sizes: ``tokens`` (all windows), ``prompt_tokens`` (from the prompt: word id
    not 0), ``padding`` (after each window's end token) and the tokenizer's ``min_length``."""
    tokens = sum(len(window) for window in report.windows)
    prompt_tokens = sum(1 for window in report.windows for token in window if token.word_id != 0)
    padding = 0
    for window in report.windows:
        last = max((i for i, t in enumerate(window) if t.word_id != 0), default=0) + 1  # the end token
        padding += max(len(window) - last - 1, 0)
    return {"tokens": tokens, "prompt_tokens": prompt_tokens, "padding": padding, "min_length": min_length}


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
        "dropped_tokens_exact": report.dropped_tokens_exact,
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
    lines += embedding_lines(report)
    return "\n".join(lines)


def add_inspect(sub) -> argparse.ArgumentParser:
    """Add ``inspect`` to the ``textenc`` sub-parsers; returns its parser."""
    parser = sub.add_parser("inspect", help="show how a prompt is tokenized (no model needed)",
                            description="Show windows, tokens, weights and embeddings of a prompt, for each "
                                        "text encoder of the model (SD3: l, g, t5xxl; Flux: l, t5xxl).")
    add = parser.add_argument
    add("prompt", help="the prompt, in the grammar chosen by --syntax")
    add("--syntax", choices=SYNTAXES, default="comfy", help=SYNTAX_HELP)
    add_dialect_flags(parser)
    add("--tokenizer", choices=list(TOKENIZERS), default=None,
        help="bundled tokenizer: padding and embedding width of sd1 (CLIP-L), sd2 (ViT-H) or sdxl-g "
             "(bigG); with a model of several parts (--model, --clip-type), the one part to show: sd1 "
             "its CLIP-L, sdxl-g its bigG (default: sd1 alone; every part of a model)")
    add("--model", action="append", metavar="PATH",
        help="read the tokenizers and embedding widths from this checkpoint file or diffusers model "
             "folder, repeated for a family of several files, as textenc encode --model (default: none: "
             "the bundled tokenizers)")
    add("--clip-type", choices=CLIP_TYPES, default="auto",
        help=CLIP_TYPE_HELP + "; without --model, the family's bundled tokenizers (not wan, whose "
             "tokenizer is in its file)")
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
