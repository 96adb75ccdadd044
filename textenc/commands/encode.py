"""``textenc encode``: prompts → ``cond_{i}`` / ``pooled_{i}`` in one safetensors file.

``--model`` is repeated for a family of several files (SDXL: clip_l and clip_g; SD3: any of
clip_l, clip_g, T5-XXL; Flux: clip_l and T5-XXL); the metadata records every file, the family
and the text encoders loaded. Wan (UMT5) has no pooled output: its prompts have no ``pooled_{i}``.

Every option is resolved to the value actually used before anything is
encoded, and that value is what the output's metadata records: the layer
index (ComfyUI numbering) whether or not ``--clip-skip`` was given, the
weight mode whether given or taken from ``--syntax``, and with ``--syntax
compel`` its ``truncate_long_prompts`` (``--no-truncate-long-prompts``: false). So giving an option
with its default value and leaving it out produce the same file.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..prompts.dialects import SYNTAXES, default_weight_mode
from ..errors import LayerError, TextencError
from ..text_encoders.clip_skip import layer_from_clip_skip
from ..text_encoders.names import CLIP_TYPE_HELP
from ..text_encoders.names import CLIP_TYPES as FAMILIES
from .common import (FAST_POOLED_HELP, add_dialect_flags, add_embedding_options, add_progress_flag, check_folder,
                     check_out_file, dialect_flag_options, progress, show_path, write_file_atomically)
from .early_checks import check_clip_skip_depth, check_clip_skip_option, check_model_paths, check_prompt_limits

__all__ = ["add_encode", "read_prompts", "resolve_layer", "resolve_options", "run_encode", "WEIGHT_MODES",
           "NORMALIZATIONS", "CLIP_TYPES", "CLIP_SKIP_HELP", "SYNTAX_HELP", "MODEL_HELP", "model_record"]

# The same tuples as textenc.text_encoders.weighting (tests check), kept here so that parsing
# the command line imports no torch.
WEIGHT_MODES = ("comfy", "a1111", "a1111_no_norm", "compel", "none")
NORMALIZATIONS = ("none", "mean", "length", "length+mean")
#: ``--clip-type`` choices: auto, then every registered family (a table tests check against the
#: registry, so that parsing imports no torch).
CLIP_TYPES = ("auto", *FAMILIES)
MODEL_HELP = ("a checkpoint file in any known layout (.safetensors, .gguf for T5) or a diffusers model "
              "folder; repeat it for a family of several files: SDXL clip_l and clip_g, SD3 any of clip_l, "
              "clip_g and t5xxl, Flux clip_l and t5xxl (required)")

CLIP_SKIP_HELP = ("layer to stop at, counted from the end as in A1111 and civitai: 1 = last layer, "
                  "2 = penultimate, up to the model's depth; ComfyUI's -1, -2, ... are accepted and mean "
                  "the same, for every text encoder of the model (T5 too, as ComfyUI's CLIPSetLastLayer); "
                  "0 or a count beyond the depth is an error (default: the model's own layer: SD1, Flux "
                  "and Wan 1, SD2 and SDXL 2; SD3 each part's own: CLIP 2, T5 1)")
SYNTAX_HELP = ("prompt grammar: comfy = ComfyUI's; a1111 = AUTOMATIC1111's (its weight convention, "
               "[word] down-weights, BREAK starts a new window); compel = compel's (default: comfy)")


# --- prompts ----------------------------------------------------------------------

def read_prompts(path: str) -> list[str]:
    """Prompts from a UTF-8 text file (one per non-empty line) or a ``.jsonl`` file
    (each line a JSON string or an object with a ``"prompt"`` or ``"text"`` key).

    Raises:
        TextencError: a file that is not UTF-8, a JSONL line that is not a
            prompt. OSError: an unreadable file (its name in ``filename``).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle]
    except UnicodeDecodeError as error:
        raise TextencError(f"{show_path(path)}: not UTF-8 text (byte 0x{error.object[error.start]:02x} "
                           f"near offset {error.start}); save the prompts file as UTF-8") from None
    if not path.lower().endswith((".jsonl", ".ndjson")):
        return [line for line in lines if line.strip()]
    return [_jsonl_prompt(line, f"{show_path(path)}:{number}")
            for number, line in enumerate(lines, 1) if line.strip()]


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        value = json.loads(line)
    except ValueError as error:
        raise TextencError(f"{where}: not JSON ({error})") from None
    except RecursionError:
        raise TextencError(f"{where}: JSON nested too deeply; a line holds a string or an object "
                           "with a 'prompt' key") from None
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


# --- options ----------------------------------------------------------------------

def resolve_layer(clip, clip_skip: int | None) -> int | None:
    """ComfyUI's layer for ``--clip-skip`` (A1111 numbering) or, when None, the model family's
    default (``clip.family.comfy_default_layer``: SD1, Flux and Wan the last, SD2 and SDXL the
    penultimate); None when that default is not its T5 part's (always T5's last layer): then
    each part keeps its own (SD3: CLIP the penultimate, T5 the last, as ComfyUI without
    CLIPSetLastLayer).
    The CLIP's own numbering checks it (diffusers' 23-layer SD2 counts as ViT-H's 24).

    Raises:
        LayerError: 0, beyond the model's depth, or ViT-H's last layer on a 23-layer SD2.
    """
    if clip_skip is None:
        family = clip.family
        t5_last = all(family.comfy_default_layer == -1 for role in family.roles if role.is_t5)
        return family.comfy_default_layer if t5_last else None
    layer = layer_from_clip_skip(clip_skip, clip.numbered_layers, numbering="a1111")
    try:
        return clip.check_layer(layer)
    except LayerError as error:
        raise LayerError(f"clip_skip {clip_skip}: {error}") from None


def resolve_options(args: argparse.Namespace, clip) -> tuple[dict[str, Any], dict[str, Any]]:
    """The clip options one ``encode`` passes to ``clip``, and the same options as recorded.

    ``layer`` is ComfyUI's index (``--clip-skip`` n is ``-n``, else the model
    type's default; SD3 records None and passes none, so each part keeps its own);
    ``weight_mode`` is ``--weight-mode`` or the syntax's.

    Raises:
        LayerError: see :func:`resolve_layer`.
    """
    weight_mode = args.weight_mode or default_weight_mode(args.syntax)
    layer = resolve_layer(clip, args.clip_skip)
    options = {"layer": layer, "weight_mode": weight_mode, "normalization": args.normalization}
    if args.fast_pooled:
        options["fast_pooled"] = True
    recorded = dict(options)
    if layer is None:
        del options["layer"]
    return options, recorded


def _model_names(models: list[str]) -> list[str]:
    return [show_path(os.path.basename(os.path.normpath(model))) for model in models]


# --- run --------------------------------------------------------------------------

def run_encode(args: argparse.Namespace) -> int:
    """Encode the prompts; every input is checked before the model loads."""
    prompts = _gather_prompts(args)
    check_out_file(args.out, suffix=".safetensors")
    embeddings = None if args.embeddings is None else check_folder(args.embeddings, "--embeddings")
    models = check_model_paths(args.model)
    check_clip_skip_option(args.clip_skip)
    check_clip_skip_depth(args.clip_skip, models)
    syntax_options = dialect_flag_options(args)
    limits = {} if args.max_weight is None else {"max_weight": args.max_weight}
    check_prompt_limits(prompts, syntax=args.syntax, syntax_options=syntax_options, limits=limits)
    from safetensors.torch import save

    from ..load import load_text_model

    clip = load_text_model(models, clip_type=args.clip_type, embedding_directory=embeddings)
    options, recorded_options = resolve_options(args, clip)
    tensors: dict = {}
    for index, prompt in enumerate(progress(prompts, "encode", "prompt", enabled=args.progress or None)):
        # word ids: --normalization groups tokens by word (the weights are the same either way)
        tokens = clip.tokenize(prompt, return_word_ids=True, syntax=args.syntax, **syntax_options, **limits)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True, options=options)
        tensors[f"cond_{index}"] = cond.detach().contiguous().cpu()
        if pooled is not None:  # Wan (UMT5) has none
            tensors[f"pooled_{index}"] = pooled.detach().contiguous().cpu()
    metadata = {"format": "textenc.encode/1", "prompts": json.dumps(prompts),
                "options": json.dumps({"syntax": args.syntax, **syntax_options, **recorded_options,
                                       **model_record(clip, args.model)})}
    write_file_atomically(args.out, save(tensors, metadata=metadata))
    pooled_shape = tuple(tensors["pooled_0"].shape) if "pooled_0" in tensors else "none"
    print(f"wrote {len(prompts)} prompt(s) to {show_path(args.out)}: cond {tuple(tensors['cond_0'].shape)}, "
          f"pooled {pooled_shape} ({clip.clip_type}, layer {_shown_layer(recorded_options['layer'])})")
    return 0


def _shown_layer(layer: int | None) -> str:
    return "each part's own" if layer is None else str(layer)


def model_record(clip, models: list[str]) -> dict[str, Any]:
    """What the metadata says of the model: ``clip_type`` (the family's name), ``family`` (its
    label), ``parts`` (the text encoders loaded, in role order: SD3 may have a subset) and
    ``models`` (every file's name, in the order given)."""
    parts = list(getattr(clip.cond_stage_model, "encoders", {}))
    return {"clip_type": clip.clip_type, "family": clip.family.label, "parts": parts,
            "models": _model_names(models)}


def add_encode(sub) -> argparse.ArgumentParser:
    """Add ``encode`` to the ``textenc`` sub-parsers; returns its parser."""
    parser = sub.add_parser("encode", help="encode prompts to a safetensors file",
                            description="Encode prompts with a model's text encoders (SD1, SD2, SDXL, SD3, "
                                        "Flux, Wan); writes cond_{i} and pooled_{i} per prompt (Wan: no "
                                        "pooled), with the prompts, the resolved options and the model files "
                                        "as metadata.")
    add = parser.add_argument
    add("prompts", nargs="*", help="prompts, in the grammar chosen by --syntax")
    add("--prompts-file", metavar="FILE", help="UTF-8 text file (one prompt per line) or .jsonl file (a JSON "
        "string or {\"prompt\": ...} per line), added after the prompt arguments (default: none)")
    # action="append", not nargs="+": a prompt written after --model FILE must
    # stay a prompt. SDXL from two files: --model clip_l.safetensors --model clip_g.safetensors
    add("--model", action="append", required=True, metavar="PATH", help=MODEL_HELP)
    add("--clip-type", choices=CLIP_TYPES, default="auto", help=CLIP_TYPE_HELP)
    add("--kind", dest="clip_type", choices=CLIP_TYPES, default=argparse.SUPPRESS,
        help=argparse.SUPPRESS)  # encode-dataset's old name of --clip-type, kept for one release
    add("--clip-skip", type=int, default=None, metavar="N", help=CLIP_SKIP_HELP)
    add("--syntax", choices=SYNTAXES, default="comfy", help=SYNTAX_HELP)
    add_dialect_flags(parser)
    pairs = ", ".join(f"{default_weight_mode(name)} for {name}" for name in SYNTAXES)
    add("--weight-mode", choices=WEIGHT_MODES, default=None,
        help=f"how token weights are applied, see textenc.text_encoders.weighting (default: the one that goes with --syntax: {pairs})")
    add("--normalization", choices=NORMALIZATIONS, default="none",
        help="rescaling of the weights of each prompt")
    add("--fast-pooled", action="store_true", help=FAST_POOLED_HELP)
    add_embedding_options(parser)
    add("--max-weight", type=float, default=None, metavar="W",
        help="refuse a prompt with a token weighted above W (comfy and a1111 syntax) (default: none: weights "
             "above 100 are a warning)")
    add_progress_flag(parser)
    add("--out", required=True, metavar="FILE", help="output .safetensors file; its folder must exist (required)")
    parser.add_check(_check_prompts)
    parser.set_defaults(run=run_encode)
    return parser


def _check_prompts(args: argparse.Namespace) -> str | None:
    """No prompt argument and no --prompts-file is a usage error (exit 2)."""
    if args.prompts or args.prompts_file:
        return None
    return "no prompts: give them as arguments or with --prompts-file"
